"""The safetensors writer: single files, shards + index, provenance, determinism, model folders."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest
import torch
from conftest import random_state
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge

SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
CARD_FILES = ("README.md", "adapt-recipe.json")  # every folder output: see test_card.py


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or model folder (single or sharded), via safe_open."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert k not in out, f"{k} in two shards"
                out[k] = h.get_tensor(k)
    return out


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as h:
        return h.metadata()


def header_of(path: Path) -> tuple[int, dict]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def mean_bf16(*ts: torch.Tensor) -> torch.Tensor:
    """Uniform soup reference: float64 mean, rounded to float32, then to the inputs' dtype."""
    acc = sum(t.double() * (1.0 / len(ts)) for t in ts)
    return acc.float().to(ts[0].dtype)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def three_files(make_file):
    states = [random_state(s) for s in (1, 2, 3)]
    for i, s in enumerate(states):  # one tensor spanning several kernel chunks
        g = torch.Generator().manual_seed(100 + i)
        s["big"] = torch.randn(2, 16385, generator=g).to(torch.bfloat16)
    return states, [make_file(f"in{i}.safetensors", s) for i, s in enumerate(states)]


# --- single file ----------------------------------------------------------------------------


def test_single_file_loads_and_equals_library_result(three_files, tmp_path):
    _, paths = three_files
    out = tmp_path / "out" / "soup.safetensors"
    out.parent.mkdir()
    assert merge.soup(paths, weights=[1, 2, 3], out=out) == out
    in_memory = merge.soup(paths, weights=[1, 2, 3])
    assert_same(read_all(out), in_memory)
    assert_same(load_file(str(out)), in_memory)
    n, header = header_of(out)
    assert n % 8 == 0
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert out.stat().st_size == 8 + n + spans[-1][1]
    assert os.listdir(out.parent) == ["soup.safetensors"]


# --- sharded folder output ------------------------------------------------------------------


def test_sharded_folder_output(three_files, tmp_path, run_cli):
    states, paths = three_files
    out = tmp_path / "merged"
    shard_size = 40_000  # "big" (65540 bytes) gets a shard of its own
    res = run_cli("merge", *paths, "-o", out, "--shard-size", shard_size, "-q")
    assert res.code == 0, res.err
    files = sorted(os.listdir(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert files == sorted([*shards, "model.safetensors.index.json", *CARD_FILES])
    n = len(shards)
    assert n >= 2
    for i, name in enumerate(shards, 1):
        m = SHARD_RE.fullmatch(name)
        assert m, name
        assert (int(m.group(1)), int(m.group(2))) == (i, n)
    tensors = read_all(out)
    assert set(index["weight_map"]) == set(tensors) == set(states[0])
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for name in shards:
        with safe_open(str(out / name), framework="pt") as h:
            keys = set(h.keys())
        assert keys == {k for k, s in index["weight_map"].items() if s == name}
        assert sum(sizes[k] for k in keys) <= shard_size or len(keys) == 1
    assert_same(tensors, merge.soup(paths))
    # and adapt reads its own sharded output back
    src = merge.open(out)
    assert src.kind == "sharded model folder"
    assert sorted(src.names) == sorted(tensors)


def test_folder_output_below_shard_size_is_single_model_safetensors(three_files, tmp_path):
    _, paths = three_files
    out = tmp_path / "folder"
    merge.soup(paths, out=out)
    assert sorted(os.listdir(out)) == sorted(["model.safetensors", *CARD_FILES])
    assert_same(read_all(out), merge.soup(paths))


# --- provenance -----------------------------------------------------------------------------


def test_provenance_metadata(three_files, tmp_path, run_cli):
    _, paths = three_files
    out = tmp_path / "p.safetensors"
    res = run_cli("merge", *paths, "-o", out, "--weights", "0.5,0.3,0.2", "-q")
    assert res.code == 0, res.err
    meta = file_metadata(out)
    assert set(meta) >= {
        "format",
        "adapt_version",
        "adapt_method",
        "adapt_parameters",
        "adapt_inputs",
    }
    assert meta["format"] == "pt"
    assert meta["adapt_version"] == importlib_metadata.version("adapt")
    assert meta["adapt_method"] == "soup"
    assert json.loads(meta["adapt_parameters"]) == {"weights": [0.5, 0.3, 0.2]}
    inputs = json.loads(meta["adapt_inputs"])
    assert len(inputs) == 3
    for entry, p in zip(inputs, paths, strict=True):
        assert entry["role"] == "input"
        assert entry["path"] == str(p)
        assert entry["sha256"] == {p.name: sha256(p)}


def test_provenance_of_folders_and_shards(demo_models, tmp_path):
    _, (ft1, ft2) = demo_models
    out = tmp_path / "sharded_out"
    merge.soup([ft1, ft2], out=out, shard_size="200KB")
    merge.soup([out, ft2], out=tmp_path / "x")
    meta_first = None
    for shard in sorted(out.glob("*.safetensors")):
        meta = file_metadata(shard)
        meta_first = meta_first or meta
        assert meta == meta_first  # every shard carries the same provenance
    inputs = json.loads(meta_first["adapt_inputs"])
    assert [e["sha256"] for e in inputs] == [
        {"model.safetensors": sha256(ft1 / "model.safetensors")},
        {"model.safetensors": sha256(ft2 / "model.safetensors")},
    ]
    # a sharded input is hashed shard by shard
    meta = file_metadata(tmp_path / "x" / "model.safetensors")
    first = json.loads(meta["adapt_inputs"])[0]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert first["sha256"] == {p.name: sha256(p) for p in shards}


def test_provenance_state_dict_input_has_no_hash(make_file, tmp_path):
    a = make_file("a.safetensors", random_state(1))
    out = tmp_path / "o.safetensors"
    merge.soup([a, random_state(2)], out=out)
    inputs = json.loads(file_metadata(out)["adapt_inputs"])
    assert inputs[0]["sha256"] == {"a.safetensors": sha256(a)}
    assert "sha256" not in inputs[1]
    assert inputs[1]["path"] == "<input 1>"


# --- determinism ----------------------------------------------------------------------------


def test_same_merge_twice_is_byte_identical(three_files, tmp_path):
    _, paths = three_files
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge.soup(paths, weights=[3, 1, 1], out=a)
    merge.soup(paths, weights=[3, 1, 1], out=b)
    assert a.read_bytes() == b.read_bytes()
    fa, fb = tmp_path / "fa", tmp_path / "fb"
    merge.soup(paths, out=fa, shard_size=40_000)
    merge.soup(paths, out=fb, shard_size=40_000)
    assert sorted(os.listdir(fa)) == sorted(os.listdir(fb))
    for name in os.listdir(fa):
        assert (fa / name).read_bytes() == (fb / name).read_bytes(), name


def test_deterministic_across_processes_and_thread_counts(three_files, tmp_path):
    _, paths = three_files
    here = tmp_path / "here.safetensors"
    merge.soup([str(p) for p in paths], weights=[1, 2, 3], out=here, progress=False)
    outputs = []
    for threads in ("1", None):
        out = tmp_path / f"sub{threads}.safetensors"
        env = dict(os.environ)
        env.pop("NUMBA_NUM_THREADS", None)
        if threads:
            env["NUMBA_NUM_THREADS"] = threads
        cmd = [sys.executable, "-m", "cli", "merge", *map(str, paths), "-o", str(out)]
        proc = subprocess.run(
            [*cmd, "--weights", "1,2,3", "-q"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == here.read_bytes()


# --- model folders: config files, dtype, transformers ---------------------------------------


def test_config_files_copied_from_first_input(demo_models, tmp_path, run_cli):
    _, (ft1, ft2) = demo_models
    other = shutil.copytree(ft2, tmp_path / "ft2_copy")
    config = json.loads((other / "config.json").read_text())
    config["marker"] = "second"
    (other / "config.json").write_text(json.dumps(config))
    (other / "tokenizer.json").write_text('{"tok": 1}')
    snapshot_before = {p: p.read_bytes() for p in other.iterdir()}

    out1 = tmp_path / "o1"
    assert run_cli("merge", ft1, other, "-o", out1, "-q").code == 0
    assert sorted(os.listdir(out1)) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", *CARD_FILES]
    )
    for name in ("config.json", "generation_config.json"):
        assert (out1 / name).read_bytes() == (ft1 / name).read_bytes()

    out2 = tmp_path / "o2"
    assert run_cli("merge", other, ft1, "-o", out2, "-q").code == 0
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out2 / name).read_bytes() == (other / name).read_bytes()
    assert {p: p.read_bytes() for p in other.iterdir()} == snapshot_before


def test_dtype_float32_updates_config(demo_models, tmp_path, run_cli):
    _, (ft1, ft2) = demo_models
    out = tmp_path / "f32"
    res = run_cli("merge", ft1, ft2, "-o", out, "--dtype", "float32", "-q")
    assert res.code == 0, res.err
    before = json.loads((ft1 / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert before["torch_dtype"] == "bfloat16"
    assert after.pop("torch_dtype") == "float32"
    before.pop("torch_dtype")
    assert after == before
    merged = read_all(out)
    a, b = read_all(ft1), read_all(ft2)
    for k, t in merged.items():
        assert t.dtype == torch.float32
        want = ((a[k].double() + b[k].double()) * 0.5).float()
        assert torch.equal(t, want), k


def test_merged_demo_model_loads_with_transformers(demo_models, tmp_path, run_cli):
    transformers = pytest.importorskip("transformers")
    _, (ft1, ft2) = demo_models
    out = tmp_path / "soup"
    res = run_cli("merge", ft1, ft2, "-o", out, "--shard-size", "200KB", "-q")
    assert res.code == 0, res.err
    assert (out / "model.safetensors.index.json").is_file()
    merged = read_all(out)
    a, b = read_all(ft1), read_all(ft2)
    for k in merged:
        assert torch.equal(merged[k], mean_bf16(a[k], b[k])), k
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    assert set(sd) == set(merged)
    for k, t in merged.items():
        assert sd[k].shape == t.shape, k
        assert torch.equal(sd[k].to(t.dtype), t), k
        assert torch.equal(sd[k].double(), t.double()), k


# --- atomic output --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder", "sharded"])
def test_no_temp_files_left_after_success(three_files, tmp_path, kind):
    _, paths = three_files
    parent = tmp_path / "outparent"
    parent.mkdir()
    (parent / "unrelated.txt").write_text("x")
    name = "o.safetensors" if kind == "file" else "o"
    shard = 40_000 if kind == "sharded" else "50GB"
    merge.soup(paths, out=parent / name, shard_size=shard)
    assert sorted(os.listdir(parent)) == sorted(["unrelated.txt", name])
    # overwrite: replaced atomically, nothing left over either
    merge.soup(paths, weights=[1, 0, 0], out=parent / name, shard_size=shard, overwrite=True)
    assert sorted(os.listdir(parent)) == sorted(["unrelated.txt", name])
    leftovers = [p for p in parent.rglob("*") if ".adapt-" in p.name]
    assert leftovers == []
    got = read_all(parent / name)
    src = load_file(str(paths[0]))
    for k in got:
        assert torch.equal(got[k], src[k]), k  # weights (1, 0, 0): exactly the first input


def test_save_file_of_output_round_trips(three_files, tmp_path):
    """The output is plain safetensors: re-saving its tensors with safetensors gives them back."""
    _, paths = three_files
    out = tmp_path / "o.safetensors"
    merge.soup(paths, out=out)
    tensors = load_file(str(out))
    again = tmp_path / "again.safetensors"
    save_file(tensors, str(again))
    assert_same(load_file(str(again)), tensors)
