"""Every bad input of issue 2 item 8, through the real CLI entry point.

Each refusal must: exit non-zero, print ONE stderr line ``adapt: error: ...`` naming the file
(and the tensor where there is one), show no traceback, leave no output or temporary file, and
leave the inputs byte-identical.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_state, snapshot
from safetensors import safe_open

import merge
import merge.methods.soup
from merge.errors import SourceNotFoundError


def tree(root: Path) -> tuple[set[str], dict[Path, bytes]]:
    """Every path under ``root`` (files and folders) and the bytes of every file."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}, snapshot([root])


def raw_safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def last_tensor(path: Path) -> str:
    """The name of the tensor whose data ends last in a safetensors file (parsed here)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


class Env:
    """Two valid inputs ``a`` and ``b`` in ``tmp_path`` plus an (empty) output folder."""

    def __init__(self, tmp_path: Path, make_file, run_cli):
        self.root = tmp_path
        self.make_file = make_file
        self.run_cli = run_cli
        self.a = make_file("a.safetensors", random_state(1))
        self.b = make_file("b.safetensors", random_state(2))
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()
        self.out = self.out_dir / "merged.safetensors"

    def refused(self, *args: object, needles: tuple[object, ...] = ()) -> str:
        """Run ``adapt ARGS``; assert a clean one-line refusal that changed nothing."""
        before = tree(self.root)
        res = self.run_cli(*args)
        assert res.code != 0, res
        assert "Traceback" not in res.err
        lines = res.err.splitlines()
        assert len(lines) == 1, res.err
        assert lines[0].startswith("adapt: error: "), res.err
        for needle in needles:
            assert str(needle) in lines[0], (needle, lines[0])
        after = tree(self.root)
        assert after[0] == before[0], "files were created or removed"
        assert after[1] == before[1], "a file changed"
        return lines[0]

    def merge_refused(self, *inputs: object, needles: tuple[object, ...] = (), extra=()) -> str:
        return self.refused("merge", *inputs, "-o", self.out, *extra, needles=needles)

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path


@pytest.fixture
def env(tmp_path, make_file, run_cli) -> Env:
    return Env(tmp_path, make_file, run_cli)


# --- unreadable inputs ----------------------------------------------------------------------


def test_missing_file(env):
    missing = env.root / "missing.safetensors"
    env.merge_refused(env.a, missing, needles=(missing,))


def test_missing_folder_and_empty_folder(env):
    (env.root / "empty").mkdir()
    env.merge_refused(env.a, env.root / "empty", needles=(env.root / "empty",))
    env.merge_refused(env.root / "nofolder", env.a, needles=(env.root / "nofolder",))


def test_not_a_safetensors_file(env):
    text = env.write("notes.safetensors", b"Hello, this is not a tensor file at all.\n" * 5)
    env.merge_refused(env.a, text, needles=(text,))
    tiny = env.write("tiny.safetensors", b"abc")
    env.merge_refused(env.a, tiny, needles=(tiny,))
    empty = env.write("empty.safetensors", b"")
    env.merge_refused(empty, env.a, needles=(empty,))


def test_truncated_file_data(env):
    full = env.b.read_bytes()
    cut = env.write("cut.safetensors", full[:-10])
    env.merge_refused(env.a, cut, needles=(cut, repr(last_tensor(env.b))))


def test_truncated_file_header(env):
    cut = env.write("cut.safetensors", env.b.read_bytes()[:40])
    env.merge_refused(env.a, cut, needles=(cut,))


def test_corrupt_header_json(env):
    bad = env.write("bad.safetensors", raw_safetensors({}, b"")[:8])
    garbage = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, oops'
    bad.write_bytes(struct.pack("<Q", len(garbage)) + garbage + b"\0" * 8)
    env.merge_refused(env.a, bad, needles=(bad,))


def test_header_not_utf8(env):
    junk = b"{\xff\xfe\xfd}"
    bad = env.write("bad.safetensors", struct.pack("<Q", len(junk)) + junk)
    env.merge_refused(bad, env.a, needles=(bad,))


def test_header_offsets_past_end_of_file(env):
    header = {
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    bad = env.write("past.safetensors", raw_safetensors(header, b"\0" * 16))
    env.merge_refused(bad, bad, needles=(bad, "'v'"))


def test_overlapping_offsets(env):
    header = {
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    bad = env.write("overlap.safetensors", raw_safetensors(header, b"\0" * 16))
    line = env.merge_refused(bad, bad, needles=(bad,))
    assert "'w'" in line or "'v'" in line
    assert "overlap" in line


def test_offsets_disagree_with_shape_and_unknown_dtype(env):
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    bad = env.write("span.safetensors", raw_safetensors(header, b"\0" * 8))
    env.merge_refused(bad, bad, needles=(bad, "'w'"))
    header = {"q": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}
    odd = env.write("odd.safetensors", raw_safetensors(header, b"\0" * 2))
    env.merge_refused(odd, odd, needles=(odd, "'q'", "Q4"))


# --- inputs that do not match ---------------------------------------------------------------


def test_tensor_present_in_one_input_only(env):
    state = random_state(3)
    state["extra.weight"] = torch.ones(2)
    state["extra.bias"] = torch.ones(1)
    more = env.make_file("more.safetensors", state)
    env.merge_refused(more, env.b, needles=(more, env.b, "extra.weight", "extra.bias"))
    env.merge_refused(env.b, more, needles=(more, env.b, "extra.weight", "extra.bias"))


def test_shape_mismatch(env):
    state = random_state(3)
    state["layer.0.weight"] = torch.ones(6, 8, dtype=torch.bfloat16)
    other = env.make_file("other.safetensors", state)
    env.merge_refused(env.a, other, needles=("layer.0.weight", "[8, 6]", "[6, 8]", env.a, other))


def test_float_dtype_mismatch_refused_then_accepted_with_dtype(env):
    f32 = env.make_file("f32.safetensors", random_state(3, torch.float32))
    line = env.merge_refused(env.a, f32, needles=(env.a, f32, "--dtype", "BF16", "F32"))
    assert "layer." in line
    res = env.run_cli("merge", env.a, f32, "-o", env.out, "--dtype", "float32", "-q")
    assert res.code == 0, res.err
    with safe_open(str(env.out), framework="pt") as f:
        assert f.get_tensor("layer.0.weight").dtype == torch.float32


def test_integer_dtype_mismatch(env):
    state = random_state(2)
    state["position_ids"] = torch.arange(7, dtype=torch.int32)
    other = env.make_file("i32.safetensors", state)
    env.merge_refused(env.a, other, needles=("position_ids", "I64", "I32"))


def test_integer_tensor_differs(env):
    state = random_state(2)
    state["position_ids"] = torch.arange(7).flip(0)
    other = env.make_file("other.safetensors", state)
    # found while merging (values, not headers): the temporary output must be removed.
    env.merge_refused(env.a, other, needles=("'position_ids'", env.a, other), extra=("-q",))


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_nonfinite_input(env, bad_value, dtype):
    good = env.make_file("good.safetensors", random_state(1, dtype))
    state = random_state(2, dtype)
    state["layer.1.weight"][2, 3] = bad_value
    bad = env.make_file("bad.safetensors", state)
    line = env.merge_refused(
        good, bad, needles=(bad, "'layer.1.weight'", "--allow-nonfinite"), extra=("-q",)
    )
    assert str(good) not in line.replace(str(bad), "")
    res = env.run_cli("merge", good, bad, "-o", env.out, "--allow-nonfinite", "-q")
    assert res.code == 0, res.err
    with safe_open(str(env.out), framework="pt") as f:
        got = f.get_tensor("layer.1.weight")
    assert not math.isfinite(got[2, 3].item())
    assert torch.isfinite(got.view(-1)[:10]).all()


def test_error_found_during_merge_is_one_line_without_quiet(env):
    """Regression: the progress bar used to print a blank stderr line on a non-terminal."""
    state = random_state(2)
    state["layer.1.weight"][0, 0] = math.nan
    bad = env.make_file("bad.safetensors", state)
    env.merge_refused(env.a, bad, needles=(bad, "'layer.1.weight'"))


# --- outputs that cannot or must not be written ---------------------------------------------


def test_output_equal_to_an_input(env):
    env.refused("merge", env.a, env.b, "-o", env.b, needles=(env.b,))
    env.refused("merge", env.a, env.b, "-o", env.a, "--overwrite", needles=(env.a,))


def test_output_equal_to_an_input_folder_or_its_parent(env, demo_models):
    _, (ft1, _) = demo_models
    folder = env.root / "ft1"
    folder.mkdir()
    for p in ft1.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    env.refused(
        "merge", folder, env.a.parent / "ft1", "-o", folder, "--overwrite", needles=(folder,)
    )
    # a folder output containing the inputs would delete them on --overwrite
    env.refused("merge", env.a, env.b, "-o", env.root, "--overwrite", needles=(env.root,))


def test_output_parent_is_a_regular_file(env):
    out = env.a / "merged.safetensors"
    env.refused("merge", env.a, env.b, "-o", out, needles=(out,))
    env.refused("merge", env.a, env.b, "-o", env.a / "folder", needles=(env.a / "folder",))


@pytest.mark.parametrize(
    "out", ["/proc/adapt-test/out.safetensors", "/proc/out.safetensors", "/proc/adapt-out"]
)
def test_output_in_read_only_location(env, out):
    if not Path("/proc/self").exists():
        pytest.skip("no /proc")
    env.refused("merge", env.a, env.b, "-o", out, needles=(out,))
    assert not Path(out).exists()
    assert not [n for n in os.listdir("/proc") if "adapt" in n]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions"
)
def test_output_folder_not_writable(env):
    locked = env.root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        env.refused("merge", env.a, env.b, "-o", locked / "o.safetensors", needles=(locked,))
    finally:
        locked.chmod(0o700)


def test_output_exists_refused_then_overwritten(env):
    env.out.write_bytes(b"old contents")
    line = env.merge_refused(env.a, env.b, needles=(env.out, "--overwrite"))
    assert "exists" in line
    assert env.out.read_bytes() == b"old contents"
    inputs = snapshot([env.a, env.b])
    res = env.run_cli("merge", env.a, env.b, "-o", env.out, "--overwrite", "-q")
    assert res.code == 0, res.err
    assert snapshot([env.a, env.b]) == inputs
    assert sorted(os.listdir(env.out_dir)) == ["merged.safetensors"]
    want = merge.soup([env.a, env.b])
    with safe_open(str(env.out), framework="pt") as f:
        for k in want:
            assert torch.equal(f.get_tensor(k), want[k])


def test_output_folder_exists_refused(env):
    (env.out_dir / "keep.txt").write_text("keep")
    env.refused("merge", env.a, env.b, "-o", env.out_dir, needles=(env.out_dir,))


# --- bad options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        ("0.5", "--weights"),
        ("0.2,0.3,0.5", "--weights"),
        ("-1,2", "--weights"),
        ("a,b", "--weights"),
        ("1,,2", "--weights"),
        ("0,0", "--weights"),
        ("nan,1", "--weights"),
        ("inf,1", "--weights"),
    ],
)
def test_bad_weights(env, weights, needle):
    env.merge_refused(env.a, env.b, needles=(needle,), extra=("--weights", weights))


def test_unknown_method(env):
    env.merge_refused(env.a, env.b, needles=("'nonsense'", "soup"), extra=("--method", "nonsense"))


@pytest.mark.parametrize("dtype", ["int8", "float128", "xyz"])
def test_bad_dtype(env, dtype):
    env.merge_refused(env.a, env.b, needles=(dtype,), extra=("--dtype", dtype))


@pytest.mark.parametrize("size", ["0", "-5", "lots", "5XB"])
def test_bad_shard_size(env, size):
    env.refused(
        "merge", env.a, env.b, "-o", env.out_dir / "o", "--shard-size", size, needles=(size,)
    )


def test_missing_output_option(env):
    env.refused("merge", env.a, env.b, needles=("--output",))


# --- --debug --------------------------------------------------------------------------------


def test_debug_shows_the_exception(env, monkeypatch):
    missing = env.root / "missing.safetensors"
    res = env.run_cli("merge", env.a, missing, "-o", env.out)
    assert res.code != 0
    assert "Traceback" not in res.err
    with pytest.raises(SourceNotFoundError, match=r"missing\.safetensors"):
        env.run_cli("merge", env.a, missing, "-o", env.out, "--debug")
    with pytest.raises(SourceNotFoundError):
        env.run_cli("--debug", "merge", env.a, missing, "-o", env.out)
    monkeypatch.setenv("ADAPT_DEBUG", "1")
    with pytest.raises(SourceNotFoundError):
        env.run_cli("merge", env.a, missing, "-o", env.out)
    assert not env.out.exists()


def test_debug_traceback_in_a_real_process(env):
    missing = env.root / "missing.safetensors"
    cmd = [sys.executable, "-m", "cli", "merge", str(env.a), str(missing), "-o", str(env.out)]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0
    assert "Traceback" not in plain.stderr
    assert plain.stderr.startswith("adapt: error: ")
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "SourceNotFoundError" in debug.stderr
    assert not env.out.exists()


# --- interrupted merge ----------------------------------------------------------------------


@pytest.fixture
def interrupt_second_tensor(monkeypatch):
    """The real engine runs; the soup method raises KeyboardInterrupt on its 2nd tensor."""
    real = merge.methods.soup.Soup.merge
    calls = []

    def merge_then_interrupt(self, tensor, arrays, out, check_finite):
        calls.append(tensor.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, tensor, arrays, out, check_finite)

    monkeypatch.setattr(merge.methods.soup.Soup, "merge", merge_then_interrupt)
    return calls


@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_interrupted_merge_leaves_nothing(env, interrupt_second_tensor, kind):
    out = env.out if kind == "file" else env.out_dir / "folder"
    before = tree(env.root)
    res = env.run_cli("merge", env.a, env.b, "-o", out, "--shard-size", "100")
    assert len(interrupt_second_tensor) == 2  # the engine really started merging
    assert "Traceback" not in res.err
    assert tree(env.root) == before
    assert os.listdir(env.out_dir) == []


def test_interrupted_merge_exits_130(env, interrupt_second_tensor):
    """Regression: typer's Exit(130) for Ctrl-C used to be dropped and adapt exited 0."""
    res = env.run_cli("merge", env.a, env.b, "-o", env.out)
    assert res.code == 130
    assert "interrupted" in res.err
