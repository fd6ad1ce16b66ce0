"""Lazy sources (merge.open): single files, model folders, sharded folders, state dicts.

Every expected value is computed here from torch / numpy / the bytes written by the test.
"""

from __future__ import annotations

import json
import math
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import merge
from merge.errors import CorruptFileError, InputError, SourceNotFoundError

# torch dtype -> (safetensors code, unsigned integer torch dtype of the same width for bit views)
FILE_DTYPES = {
    torch.float32: ("F32", torch.int32),
    torch.float16: ("F16", torch.int16),
    torch.bfloat16: ("BF16", torch.int16),
    torch.float64: ("F64", torch.int64),
    torch.int64: ("I64", torch.int64),
    torch.int32: ("I32", torch.int32),
    torch.int16: ("I16", torch.int16),
    torch.int8: ("I8", torch.int8),
    torch.uint8: ("U8", torch.uint8),
    torch.bool: ("BOOL", torch.uint8),
}


def _bits(a: np.ndarray) -> bytes:
    """The raw bytes of an array (bit-exact comparison, NaN payloads and -0.0 included)."""
    return np.ascontiguousarray(a).tobytes()


def _torch_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor, via an integer view (works for bf16, which numpy lacks)."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8).numpy().tobytes()
    view = FILE_DTYPES[t.dtype][1]
    return t.view(view).numpy().tobytes()


def _special_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor of every dtype, floats with NaN, +-Inf, -0.0, subnormals and extremes."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for dtype, (code, _) in FILE_DTYPES.items():
        if dtype.is_floating_point:
            t = torch.randn(3, 5, generator=g).to(dtype)
            fi = torch.finfo(dtype)
            flat = t.view(-1)
            flat[:7] = torch.tensor(
                [math.nan, math.inf, -math.inf, -0.0, fi.tiny / 2, fi.max, fi.min]
            ).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(4, 3, generator=g) > 0.5
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(info.min, info.max, (2, 3, 2), generator=g, dtype=dtype)
            t.view(-1)[0] = info.min
            t.view(-1)[1] = info.max
        state[f"t.{code.lower()}"] = t
    return state


# --- single file --------------------------------------------------------------------------


def test_single_file_names_shapes_dtypes(make_file):
    state = _special_state()
    path = make_file("all.safetensors", state)
    src = merge.open(path)
    assert isinstance(src, merge.Source)
    assert src.kind == "safetensors file"
    assert src.label == str(path)
    assert src.folder is None
    assert [Path(f) for f in src.files] == [path]
    assert src.metadata == {"format": "pt"}
    assert sorted(src.names) == sorted(state)
    for name, t in state.items():
        info = src.info(name)
        assert info.dtype == FILE_DTYPES[t.dtype][0]
        assert info.shape == tuple(t.shape)
        assert info.numel == t.numel()
        assert info.nbytes == t.numel() * t.element_size()


@pytest.mark.parametrize("dtype", list(FILE_DTYPES), ids=[v[0] for v in FILE_DTYPES.values()])
def test_read_back_bit_exact(make_file, dtype):
    state = {k: v for k, v in _special_state(1).items() if v.dtype == dtype}
    path = make_file("one.safetensors", state)
    src = merge.open(path)
    (name,) = state
    a = src.read(name)
    assert a.ndim == 1
    assert a.size == state[name].numel()
    assert a.dtype.itemsize == state[name].element_size()
    assert _bits(a) == _torch_bytes(state[name])


def test_read_returns_fresh_arrays(make_file):
    path = make_file("a.safetensors", {"w": torch.arange(6, dtype=torch.float32)})
    src = merge.open(path)
    a = src.read("w")
    a[:] = -1
    np.testing.assert_array_equal(src.read("w"), np.arange(6, dtype=np.float32))


def test_names_in_storage_order_and_zero_size(make_file):
    state = {
        "b": torch.ones(3),
        "empty": torch.zeros(0, 4),
        "a": torch.full((2, 2), 7.0, dtype=torch.float16),
    }
    path = make_file("z.safetensors", state)
    src = merge.open(path)
    assert set(src.names) == set(state)
    assert src.info("empty").shape == (0, 4)
    assert src.info("empty").numel == 0
    assert src.read("empty").size == 0
    np.testing.assert_array_equal(src.read("a"), np.full(4, 7.0, np.float16))


def test_open_is_lazy_data_is_read_on_demand(make_file):
    """Opening reads the header only: data rewritten after open() is what read() returns."""
    path = make_file("lazy.safetensors", {"x": torch.zeros(4), "y": torch.ones(2)})
    src = merge.open(path)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin, end = header["x"]["data_offsets"]
    new = np.array([1.5, -2.0, 3.25, 4.0], np.float32)
    raw[8 + n + begin : 8 + n + end] = new.tobytes()
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(src.read("x"), new)
    np.testing.assert_array_equal(src.read("y"), np.ones(2, np.float32))


def test_open_huge_sparse_file_reads_no_data(tmp_path):
    """A header declaring 256 MiB of data opens instantly and without allocating it."""
    numel = 2**26  # F32: 256 MiB
    header = {
        "__metadata__": {"format": "pt"},
        "big": {"dtype": "F32", "shape": [2**13, 2**13], "data_offsets": [0, numel * 4]},
        "small": {"dtype": "BF16", "shape": [3], "data_offsets": [numel * 4, numel * 4 + 6]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + numel * 4 + 6)  # sparse: no data blocks written
    tracemalloc.start()
    t0 = time.perf_counter()
    src = merge.open(path)
    info = src.info("big")
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert info.shape == (2**13, 2**13)
    assert info.dtype == "F32"
    assert info.nbytes == numel * 4
    assert src.info("small").shape == (3,)
    assert peak < 10 * 2**20
    assert elapsed < 2.0
    np.testing.assert_array_equal(src.read("small"), np.zeros(3, np.uint16))


# --- model folders ------------------------------------------------------------------------


def test_model_folder_with_model_safetensors(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    state = {"w": torch.randn(3, 4).to(torch.bfloat16), "ids": torch.arange(5)}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "k": "v"})
    (folder / "config.json").write_text("{}")
    src = merge.open(folder)
    assert src.kind == "model folder"
    assert Path(src.folder) == folder
    assert [Path(f) for f in src.files] == [folder / "model.safetensors"]
    assert src.metadata == {"format": "pt", "k": "v"}
    assert sorted(src.names) == ["ids", "w"]
    assert src.info("w").dtype == "BF16"
    for name, t in state.items():
        assert _bits(src.read(name)) == _torch_bytes(t)


def _write_sharded(folder: Path, shards: list[dict[str, torch.Tensor]]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = 0
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_sharded_folder(tmp_path):
    g = torch.Generator().manual_seed(3)
    shards = [
        {"a.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16)},
        {"b.weight": torch.randn(5, generator=g), "b.ids": torch.arange(4, dtype=torch.int32)},
        {"c.weight": torch.randn(2, 2, generator=g).to(torch.float16)},
    ]
    folder = tmp_path / "sharded"
    weight_map = _write_sharded(folder, shards)
    src = merge.open(folder)
    assert src.kind == "sharded model folder"
    assert Path(src.folder) == folder
    assert sorted(Path(f).name for f in src.files) == sorted(set(weight_map.values()))
    assert sorted(src.names) == sorted(weight_map)
    expected = {k: v for shard in shards for k, v in shard.items()}
    for name, t in expected.items():
        info = src.info(name)
        assert info.shape == tuple(t.shape)
        assert info.dtype == FILE_DTYPES[t.dtype][0]
        assert _bits(src.read(name)) == _torch_bytes(t)


def test_sharded_folders_merge_like_their_tensors(tmp_path, make_file):
    """Merging two sharded folders gives exactly what merging the same tensors as files gives."""
    g = torch.Generator().manual_seed(5)
    a = {"x": torch.randn(6, generator=g), "y": torch.randn(2, 3, generator=g)}
    b = {"x": torch.randn(6, generator=g), "y": torch.randn(2, 3, generator=g)}
    _write_sharded(tmp_path / "sa", [{"x": a["x"]}, {"y": a["y"]}])
    _write_sharded(tmp_path / "sb", [{"y": b["y"]}, {"x": b["x"]}])
    got = merge.soup([tmp_path / "sa", tmp_path / "sb"])
    for k in a:
        want = ((a[k].double() + b[k].double()) / 2).float()
        assert torch.equal(got[k], want)


def test_sharded_folder_missing_shard(tmp_path):
    folder = tmp_path / "s"
    weight_map = _write_sharded(folder, [{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    missing = weight_map["b"]
    (folder / missing).unlink()
    with pytest.raises(SourceNotFoundError, match=missing):
        merge.open(folder)


def test_sharded_index_names_tensor_not_in_shard(tmp_path):
    folder = tmp_path / "s"
    _write_sharded(folder, [{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = index["weight_map"]["a"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match="ghost"):
        merge.open(folder)


def test_sharded_bad_index_json(tmp_path):
    folder = tmp_path / "s"
    _write_sharded(folder, [{"a": torch.ones(2)}])
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="index"):
        merge.open(folder)


def test_folder_without_weights_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="empty"):
        merge.open(tmp_path / "empty")
    with pytest.raises(SourceNotFoundError, match="nope"):
        merge.open(tmp_path / "nope.safetensors")
    # builtin parents keep working
    with pytest.raises(FileNotFoundError):
        merge.open(tmp_path / "nope.safetensors")


# --- state dicts --------------------------------------------------------------------------


def test_state_dict_source_torch():
    state = _special_state(2)
    src = merge.open(state)
    assert src.kind == "state dict"
    assert src.files == ()
    assert src.folder is None
    assert src.names == list(state)
    for name, t in state.items():
        info = src.info(name)
        assert info.dtype == FILE_DTYPES[t.dtype][0]
        assert info.shape == tuple(t.shape)
        a = src.read(name)
        assert a.ndim == 1
        assert _bits(a) == _torch_bytes(t)


def test_state_dict_source_non_contiguous_and_requires_grad():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()  # non-contiguous view
    p = torch.nn.Parameter(torch.ones(2, 2))
    src = merge.open({"t": t, "p": p})
    assert src.info("t").shape == (4, 3)
    np.testing.assert_array_equal(src.read("t"), t.contiguous().numpy().reshape(-1))
    np.testing.assert_array_equal(src.read("p"), np.ones(4, np.float32))


def test_state_dict_source_numpy():
    state = {
        "f32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "f16": np.array([1.5, -0.0], np.float16),
        "f64": np.array([math.pi], np.float64),
        "i64": np.arange(3, dtype=np.int64),
        "u8": np.array([0, 255], np.uint8),
        "b": np.array([True, False]),
        "col": np.arange(6, dtype=np.float32).reshape(2, 3)[:, 1],  # strided
    }
    src = merge.open(state)
    codes = {name: src.info(name).dtype for name in state}
    assert codes == {
        "f32": "F32",
        "f16": "F16",
        "f64": "F64",
        "i64": "I64",
        "u8": "U8",
        "b": "BOOL",
        "col": "F32",
    }
    for name, a in state.items():
        assert src.info(name).shape == a.shape
        assert _bits(src.read(name)) == _bits(a)


def test_state_dict_unsupported_dtype_names_tensor():
    with pytest.raises(InputError, match="'z'"):
        merge.open({"ok": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)})


def test_state_dict_unsigned_and_float8_tensors_are_accepted():
    """Regression: torch uint16/32/64 and float8 state dicts used to be refused."""
    state = {
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([1, 2**32 - 1], dtype=torch.uint32),
        "f8": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn),
    }
    src = merge.open(state)
    assert [src.info(k).dtype for k in state] == ["U16", "U32", "F8_E4M3"]


def test_unsigned_and_float8_files_are_read(tmp_path):
    state = {
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([1, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([1, 2**63], dtype=torch.uint64),
        "f8": torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn),
        "f8b": torch.tensor([0.5, -1.0]).to(torch.float8_e5m2),
    }
    path = tmp_path / "u.safetensors"
    save_file(state, str(path))
    src = merge.open(path)
    codes = {k: src.info(k).dtype for k in state}
    assert codes == {"u16": "U16", "u32": "U32", "u64": "U64", "f8": "F8_E4M3", "f8b": "F8_E5M2"}
    for name, t in state.items():
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        assert _bits(src.read(name)) == t.view(view).numpy().tobytes()


def test_plan_knows_shapes_before_reading(make_file):
    """merge.plan validates names, shapes and dtypes from the headers alone."""
    a = make_file("a.safetensors", {"w": torch.ones(3, 2), "ids": torch.arange(4)})
    b = make_file("b.safetensors", {"w": torch.ones(3, 2), "ids": torch.arange(4)})
    plan = merge.plan([a, b])
    assert [(t.name, t.shape, t.merged) for t in sorted(plan.tensors, key=lambda t: t.name)] == [
        ("ids", (4,), False),
        ("w", (3, 2), True),
    ]
    assert plan.num_params == 10
    assert plan.out_bytes == 3 * 2 * 4 + 4 * 8
