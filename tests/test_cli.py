"""The command line: inspect (text and JSON), merge --dry-run, demo, help and version."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
import torch
from conftest import random_state, snapshot
from safetensors import safe_open
from safetensors.torch import save_file

CODES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}


def expected_summary(state: dict[str, torch.Tensor]) -> dict:
    """Counts computed from the tensors themselves."""
    dtypes: dict[str, dict[str, int]] = {}
    for t in state.values():
        d = dtypes.setdefault(CODES[t.dtype], {"tensors": 0, "parameters": 0, "bytes": 0})
        d["tensors"] += 1
        d["parameters"] += t.numel()
        d["bytes"] += t.numel() * t.element_size()
    return {
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "dtypes": dtypes,
    }


def mixed_state() -> dict[str, torch.Tensor]:
    state = random_state(1)
    state["head.weight"] = torch.ones(3, 4, dtype=torch.float32)
    state["norm.weight"] = torch.ones(1000, dtype=torch.float16)
    return state


def tree(root: Path) -> tuple[set[str], dict[Path, bytes]]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}, snapshot([root])


# --- inspect --------------------------------------------------------------------------------


def test_inspect_json_single_file(tmp_path, run_cli):
    state = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "note": "hello"})
    res = run_cli("inspect", path, "--json")
    assert res.code == 0, res.err
    info = json.loads(res.out)
    want = expected_summary(state)
    assert info["format"] == "safetensors file"
    assert info["path"] == str(path)
    assert [Path(f) for f in info["files"]] == [path]
    assert info["tensors"] == want["tensors"] == 6
    assert info["parameters"] == want["parameters"]
    assert info["bytes"] == want["bytes"]
    assert info["dtypes"] == want["dtypes"]
    assert info["metadata"] == {"format": "pt", "note": "hello"}


def test_inspect_text(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at the terminal width
    state = mixed_state()
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "note": "hello"})
    res = run_cli("inspect", path)
    assert res.code == 0, res.err
    want = expected_summary(state)
    text = res.out
    assert str(path) in text
    assert "safetensors file" in text
    assert f"{want['tensors']} tensors" in text
    assert f"{want['parameters']:,} parameters" in text
    assert want["bytes"] == 2296
    assert "2.30 KB" in text  # 2296 bytes, decimal units
    for code, d in want["dtypes"].items():
        row = next(line for line in text.splitlines() if f" {code} " in line)
        assert f" {d['tensors']} " in row
        assert f"{d['parameters']:,}" in row
    assert "note: hello" in text
    assert "format: pt" in text


def test_inspect_model_and_sharded_folders(tmp_path, run_cli):
    folder = tmp_path / "model"
    folder.mkdir()
    state = random_state(2)
    save_file(state, str(folder / "model.safetensors"))
    info = json.loads(run_cli("inspect", folder, "--json").out)
    assert info["format"] == "model folder"
    assert info["tensors"] == len(state)
    assert info["parameters"] == expected_summary(state)["parameters"]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(state)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = {"metadata": {"total_size": expected_summary(state)["bytes"]}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    info = json.loads(run_cli("inspect", sharded, "--json").out)
    assert info["format"] == "sharded model folder"
    assert sorted(Path(f).name for f in info["files"]) == sorted(shards)
    assert info["tensors"] == len(state)
    assert info["bytes"] == expected_summary(state)["bytes"]


def test_inspect_merged_output_shows_provenance(make_file, tmp_path, run_cli):
    a = make_file("a.safetensors", random_state(1))
    b = make_file("b.safetensors", random_state(2))
    out = tmp_path / "o.safetensors"
    assert run_cli("merge", a, b, "-o", out, "--weights", "3,1", "-q").code == 0
    info = json.loads(run_cli("inspect", out, "--json").out)
    meta = info["metadata"]
    assert meta["adapt_method"] == "soup"
    assert meta["adapt_version"] == importlib_metadata.version("adapt")
    assert meta["adapt_parameters"] == {"weights": [3.0, 1.0]}
    hashes = [e["sha256"] for e in meta["adapt_inputs"]]
    assert hashes == [{p.name: hashlib.sha256(p.read_bytes()).hexdigest()} for p in (a, b)]
    text = run_cli("inspect", out).out
    assert "adapt_method: soup" in text


def test_inspect_bad_file_is_one_line_error(tmp_path, run_cli):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a safetensors file, just some text")
    res = run_cli("inspect", bad)
    assert res.code != 0
    assert res.err.count("\n") == 1
    assert res.err.startswith("adapt: error: ")
    assert str(bad) in res.err
    res = run_cli("inspect", tmp_path / "missing")
    assert res.code != 0
    assert res.err.startswith("adapt: error: ")


# --- merge --dry-run and summary ------------------------------------------------------------


def test_merge_dry_run_prints_plan_and_writes_nothing(make_file, tmp_path, run_cli):
    a = make_file("a.safetensors", random_state(1))
    b = make_file("b.safetensors", random_state(2))
    out = tmp_path / "o.safetensors"
    before = tree(tmp_path)
    res = run_cli("merge", a, b, "-o", out, "--weights", "0.7,0.3", "--dry-run")
    assert res.code == 0, res.err
    assert tree(tmp_path) == before
    assert not out.exists()
    state = random_state(1)
    params = sum(t.numel() for t in state.values())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    assert "soup" in res.out
    assert "0.7" in res.out
    assert str(a) in res.out
    assert str(b) in res.out
    assert f"{len(state)} (3 merged, 1 carried through)" in res.out
    assert f"{params:,} parameters" in res.out
    assert f"{nbytes:,} bytes" in res.out
    # without -o too, and a bad input is still caught by a dry run
    assert run_cli("merge", a, b, "--dry-run").code == 0
    res = run_cli("merge", a, tmp_path / "missing.safetensors", "--dry-run")
    assert res.code != 0
    assert "missing.safetensors" in res.err
    assert tree(tmp_path) == before


def test_merge_prints_summary_unless_quiet(make_file, tmp_path, run_cli):
    a = make_file("a.safetensors", random_state(1))
    b = make_file("b.safetensors", random_state(2))
    res = run_cli("merge", a, b, "-o", tmp_path / "o.safetensors")
    assert res.code == 0, res.err
    assert res.err == ""  # no progress bar residue when stderr is not a terminal
    assert str(tmp_path / "o.safetensors") in res.out
    assert "soup" in res.out
    res = run_cli("merge", a, b, "-o", tmp_path / "q.safetensors", "-q")
    assert res.code == 0
    assert res.out == ""
    assert res.err == ""


# --- demo -----------------------------------------------------------------------------------


def test_demo_builds_and_merges(tmp_path, run_cli):
    d = tmp_path / "demo"
    res = run_cli("demo", "--dir", d)
    assert res.code == 0, res.err
    for name in ("base", "ft1", "ft2"):
        assert (d / name / "model.safetensors").is_file()
        assert (d / name / "config.json").is_file()
    soup = d / "soup"
    assert str(soup) in res.out
    with safe_open(str(soup / "model.safetensors"), framework="pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    inputs = []
    for name in ("ft1", "ft2"):
        with safe_open(str(d / name / "model.safetensors"), framework="pt") as f:
            inputs.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert set(merged) == set(inputs[0])
    for k, t in merged.items():
        assert t.dtype == torch.bfloat16
        want = ((inputs[0][k].double() + inputs[1][k].double()) * 0.5).float().bfloat16()
        assert torch.equal(t, want), k
    assert json.loads((soup / "config.json").read_text())["model_type"] == "llama"
    # running it again reuses the folder
    assert run_cli("demo", "--dir", d).code == 0
    assert not [n for n in os.listdir(d) if ".adapt-" in n]


# --- help and version -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--help"], ["merge", "inspect", "demo"]),
        (["-h"], ["merge"]),
        (["merge", "--help"], ["--output", "--weights", "--dtype", "--shard-size", "--overwrite"]),
        (["inspect", "--help"], ["--json"]),
        (["demo", "--help"], ["--dir"]),
    ],
)
def test_help_exits_zero(run_cli, args, needles):
    res = run_cli(*args)
    assert res.code == 0, res.err
    for needle in needles:
        assert needle in res.out


def test_version(run_cli):
    """Regression: `adapt --version` used to fail with 'Missing command.'."""
    try:
        res = run_cli("--version")
    except Exception as e:
        pytest.fail(f"{type(e).__name__} escaped the entry point: {e}")
    assert res.code == 0
    assert res.out.strip() == f"adapt {importlib_metadata.version('adapt')}"


@pytest.mark.parametrize(
    "args",
    [["merge", "--bogus"], ["merge"], ["no-such-command"], ["merge", "a", "--shard-size"]],
    ids=["unknown-option", "no-inputs", "unknown-command", "option-without-value"],
)
def test_usage_errors_are_short_and_exit_2(run_cli, args):
    """Regression: typer's vendored click errors used to escape main() as tracebacks."""
    try:
        res = run_cli(*args)
    except Exception as e:
        pytest.fail(f"{type(e).__name__} escaped the entry point: {e}")
    assert res.code == 2
    assert "Traceback" not in res.err
    assert res.err.strip()
