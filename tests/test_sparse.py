"""Sparse fine-tunes: kernels, extract, the container, exact composition and revert, mask
algebra, stats, composable-sft and SpIEL interop, the LT-SFT training helper, bad input."""

from __future__ import annotations

import itertools
import json
import pickle
import struct
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from compeft_helpers import assert_one_line_error, data_offset, leftovers, rewrite_metadata
from conftest import snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sparse_helpers import (
    SHAPES,
    bits,
    exact_sum,
    finetune,
    flat,
    kept_reference,
    model,
    round_to,
    save_composable,
    save_spiel,
)

import merge
from merge import compeft, sparse
from merge.errors import (
    CorruptFileError,
    InputError,
    MismatchError,
    NonFiniteError,
    ParameterError,
)
from merge.kernels import sparse as kernels
from merge.kernels.positions import decode_positions, encode_positions

FLOATS = sorted(n for n in SHAPES)


def sft_and_states(tmp_path: Path, dtype: torch.dtype = torch.bfloat16, **options):
    base, ft = model(0, dtype), None
    ft = finetune(base, 1)
    bp = tmp_path / "base.safetensors"
    fp = tmp_path / "ft.safetensors"
    save_file(base, str(bp))
    save_file(ft, str(fp))
    return base, ft, bp, fp


def positions_of(src: sparse.SparseSource) -> dict[str, np.ndarray]:
    return {n: src.positions(n) for n in src.sparse_names}


# --------------------------------------------------------------------------- kernels


@st.composite
def sorted_sets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 300_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pa, pb = draw(st.floats(0, 1)), draw(st.floats(0, 1))
    a = np.flatnonzero(rng.random(n) < pa)
    b = np.flatnonzero(rng.random(n) < pb)
    return a, b


@settings(max_examples=30, deadline=None)
@given(sorted_sets())
def test_set_operations_match_numpy(sets: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = sets
    np.testing.assert_array_equal(kernels.union(a, b), np.union1d(a, b))
    np.testing.assert_array_equal(kernels.difference(a, b), np.setdiff1d(a, b))
    common, ia, ib = kernels.intersect(a, b)
    want, wa, wb = np.intersect1d(a, b, return_indices=True)
    np.testing.assert_array_equal(common, want)
    np.testing.assert_array_equal(ia, wa)
    np.testing.assert_array_equal(ib, wb)


SCALES = st.sampled_from([1.0, -1.0, 0.5, 0.3, -2.75, 1e-3, 3.7, 1 / 3])
BASE_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.float16])


@st.composite
def compositions(draw: st.DrawFn):
    """A base tensor and 1-4 sparse streams (positions, values, scale) that overlap."""
    n = draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(BASE_DTYPES)
    base = torch.from_numpy(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).to(dtype)
    streams = []
    for _ in range(draw(st.integers(1, 4))):
        positions = np.flatnonzero(rng.random(n) < draw(st.floats(0, 1)))
        wide = draw(st.booleans())
        values = rng.standard_normal(positions.size) * 10.0 ** rng.integers(-12, 4, positions.size)
        values = values.astype(np.float64 if wide else np.float32)
        streams.append((positions, values, draw(SCALES)))
    return base, streams


def run_compose(base: torch.Tensor, streams) -> torch.Tensor:
    """The compose kernel on a copy of ``base`` (f16 through a float32 buffer, as the engine)."""
    code = merge.dtypes.code_of_torch(base.dtype)
    out = merge.dtypes.to_numpy(base.clone(), code).copy()
    if code == "F16":
        out = out.astype(np.float32)
    n = base.numel()
    payloads = [encode_positions(p, n) for p, _, _ in streams]
    wide = any(v.dtype == np.float64 for _, v, _ in streams)
    values = [v.astype(np.float64 if wide else np.float32) for _, v, _ in streams]
    status, _ = kernels.compose(
        out,
        np.concatenate([p for p, _ in payloads] + [np.zeros(0, np.uint8)]),
        np.cumsum([0] + [p.size for p, _ in payloads]).astype(np.int64),
        np.array([p.size for p, _, _ in streams], np.int64),
        np.array([m for _, m in payloads], np.int64),
        np.concatenate(values),
        np.cumsum([0] + [v.size for v in values]).astype(np.int64),
        np.array([s for _, _, s in streams]),
    )
    assert status == 0
    if code == "F16":
        return torch.from_numpy(out.astype(np.float16))
    return merge.dtypes.to_torch(out, code, (n,))


def exact_reference(base: torch.Tensor, streams) -> torch.Tensor:
    start = flat(base)
    terms: list[list[tuple[float, float]]] = [[] for _ in range(start.size)]
    for positions, values, s in streams:
        for p, v in zip(positions, values, strict=True):
            terms[p].append((s, float(v)))
    touched = [exact_sum(float(x), t) if t else float(x) for x, t in zip(start, terms, strict=True)]
    out = round_to(np.array(touched), base.dtype)
    untouched = torch.tensor([not t for t in terms])
    return torch.where(untouched, base, out)


@settings(max_examples=80, deadline=None)
@given(compositions())
def test_composition_is_the_exactly_rounded_sum(case) -> None:
    """Every touched entry is R(theta0 + sum s_i v_i) of the exact real sum: so composition is
    commutative and associative bit for bit (any order, any grouping)."""
    base, streams = case
    got = run_compose(base, streams)
    np.testing.assert_array_equal(bits(got), bits(exact_reference(base, streams)))
    for perm in itertools.islice(itertools.permutations(streams), 1, 6):
        np.testing.assert_array_equal(bits(run_compose(base, list(perm))), bits(got))


def test_plain_float_addition_is_not_associative() -> None:
    """Why apply sums exactly: with float64 accumulation the order would matter."""
    a, b, c = 1.0, 2.0**-53, 2.0**-53
    assert (a + b) + c != a + (b + c)
    base = torch.tensor([1.0], dtype=torch.float64)
    streams = [(np.array([0]), np.array([2.0**-53]), 1.0)] * 2
    assert run_compose(base, streams).item() == exact_sum(1.0, [(1.0, 2.0**-53)] * 2)


def test_compose_reports_corrupt_codes() -> None:
    payload, m = encode_positions(np.array([1, 5, 9]), 10)
    values = np.ones(3, np.float32)

    def status(data: np.ndarray, count: int, n: int) -> int:
        out = np.zeros(n, np.float32)
        args = (np.array([0, data.size]), np.array([count]), np.array([m]), values)
        return kernels.compose(out, data, *args, np.array([0, count]), np.ones(1))[0]

    assert status(payload, 3, 10) == 0
    assert status(payload[:-1], 3, 10) != 0  # truncated
    assert status(payload, 3, 8) != 0  # position past the end
    assert status(np.concatenate([payload, [0]]).astype(np.uint8), 3, 10) != 0  # trailing


def test_kernels_do_not_depend_on_the_thread_count() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(700_000).astype(np.float32)
    a, b = np.flatnonzero(x > 0.5), np.flatnonzero(x < 0.7)
    threads = numba.get_num_threads()
    results = []
    try:
        for t in (1, threads):
            numba.set_num_threads(t)
            results.append(
                (kernels.kept_positions(x, np.int64(0x3F000000), np.int64(0)), kernels.union(a, b))
            )
    finally:
        numba.set_num_threads(threads)
    for (p1, u1), (p2, u2) in itertools.pairwise(results):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(u1, u2)


# --------------------------------------------------------------------------- extract


@st.composite
def models(draw: st.DrawFn):
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    base = model(draw(st.integers(0, 1000)), dtype)
    ft = finetune(base, draw(st.integers(0, 1000)), frac=draw(st.floats(0.05, 1.0)))
    return base, ft


@settings(max_examples=40, deadline=None)
@given(models(), st.floats(0.01, 1.0), st.sampled_from(["global", "tensor"]))
def test_extract_then_apply_reproduces_the_finetune(case, density: float, scope: str) -> None:
    """Exactly on the kept entries, the base elsewhere; revert gives the base back exactly."""
    base, ft = case
    sft = sparse.extract(ft, base=base, density=density, scope=scope)
    floats = [n for n in base if base[n].is_floating_point()]
    total = sum(base[n].numel() for n in floats)
    if scope == "global":
        assert sft.header.kept == round(density * total)
        want = kept_reference(base, ft, sft.header.kept, floats)
        assert {n: p.tolist() for n, p in positions_of(sft).items()} == {
            n: p.tolist() for n, p in want.items()
        }
    else:
        assert sft.header.kept == sum(round(density * base[n].numel()) for n in floats)
    assert all(e.inexact == 0 and e.values == "F32" for e in sft.entries.values())
    applied = sparse.apply(base, [sft])
    for n in floats:
        kept = np.zeros(base[n].numel(), bool)
        kept[sft.positions(n)] = True
        np.testing.assert_array_equal(bits(applied[n])[kept], bits(ft[n])[kept])
        np.testing.assert_array_equal(bits(applied[n])[~kept], bits(base[n])[~kept])
    back = sparse.revert(applied, [sft])
    for n in base:
        np.testing.assert_array_equal(bits(back[n]), bits(base[n]))
    assert torch.equal(applied["ids"], base["ids"])


def test_float64_overrides_where_float32_would_not_reproduce(tmp_path: Path) -> None:
    """theta0 = 1, theta = 2**-30 in float32: float32(theta - theta0) = -1 loses theta; a
    float64 override keeps it. 2**-60 is beyond float64 too: counted as inexact."""
    base = {"w": torch.tensor([1.0, 1.0, 0.5], dtype=torch.float32)}
    near = {"w": torch.tensor([2.0**-30, 1.25, 0.5])}
    far = {"w": torch.tensor([2.0**-60, 1.25, 0.5])}
    sft = sparse.extract(near, base=base, count=2)
    e = sft.entries["w"]
    assert (e.values, e.wide, e.inexact) == ("F32", 1, 0)
    assert sft.values("w").tolist() == [2.0**-30 - 1, 0.25]
    assert sparse.apply(base, [sft])["w"].tolist() == near["w"].tolist()
    path = sft.save(tmp_path / "w.sft.safetensors")
    with safe_open(str(path), "np") as f:
        assert f.get_tensor("w.wide_index").tolist() == [0]
        assert f.get_tensor("w.wide_values").tolist() == [2.0**-30 - 1]
        assert f.get_tensor("w.values").dtype == np.float32
    assert merge.open(path).values("w").tolist() == sft.values("w").tolist()
    restricted = sparse.restrict(path, sparse.Mask({"w": [0]}, {"w": (3,)}))
    assert (restricted.entries["w"].count, restricted.entries["w"].wide) == (1, 1)
    assert sparse.apply(base, [restricted])["w"].tolist() == [2.0**-30, 1.0, 0.5]
    sft = sparse.extract(far, base=base, count=2)
    assert (sft.entries["w"].wide, sft.entries["w"].inexact) == (1, 1)
    got = sparse.apply(base, [sft])["w"]
    assert got[1] == 1.25 and got[0] != 2.0**-60
    pinned = sparse.extract(near, base=base, count=2, values="float32")
    assert (pinned.entries["w"].values, pinned.entries["w"].inexact) == ("F32", 1)


def test_bf16_pathological_entry_gets_a_float64_override() -> None:
    """A bf16 weight moving from 1 to 2**-30 is not reproduced by float32 values."""
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([2.0**-30, 2.5], dtype=torch.bfloat16)}
    sft = sparse.extract(ft, base=base, density=1.0)
    assert (sft.entries["w"].values, sft.entries["w"].wide, sft.entries["w"].inexact) == (
        "F32",
        1,
        0,
    )
    assert torch.equal(sparse.apply(base, [sft])["w"], ft["w"])
    same = sparse.extract(ft, base=base, density=1.0, values="same")
    assert same.entries["w"].values == "BF16" and same.entries["w"].inexact == 1


def test_value_policies() -> None:
    base, ft = model(0, torch.float32), None
    ft = finetune(base, 2)
    for policy, code in [("float64", "F64"), ("bf16", "BF16"), ("float16", "F16"), ("same", "F32")]:
        sft = sparse.extract(ft, base=base, density=0.2, values=policy)
        assert {e.values for e in sft.entries.values()} == {code}
        assert sparse.apply(base, [sft])["a.weight"].dtype == torch.float32
    with pytest.raises(ParameterError, match="--values"):
        sparse.extract(ft, base=base, density=0.2, values="int8")
    huge = ft | {"b.bias": base["b.bias"] + 1e5}
    with pytest.raises(ParameterError, match=r"'b\.bias'.*overflows F16"):
        sparse.extract(huge, base=base, density=0.2, values="float16")


def test_count_and_scope_parameters() -> None:
    base = model(0)
    ft = finetune(base, 1, frac=1.0)
    total = sum(base[n].numel() for n in FLOATS)
    assert sparse.extract(ft, base=base, count=17).header.coded == 17
    per = sparse.extract(ft, base=base, density=0.5, scope="tensor")
    assert {n: per.entries[n].count for n in FLOATS} == {
        n: round(0.5 * base[n].numel()) for n in FLOATS
    }
    for bad, needle in [
        ({"count": 5, "density": 0.1}, "exactly one"),
        ({}, "exactly one"),
        ({"density": 0.0}, "--density"),
        ({"density": 1.5}, "--density"),
        ({"count": -1}, "--count"),
        ({"count": total + 1}, "exceeds"),
        ({"count": 3, "scope": "tensor"}, "--scope global"),
        ({"density": 0.1, "scope": "layer"}, "--scope"),
        ({"density": 0.1, "dense": ["("]}, "--dense"),
    ]:
        with pytest.raises(ParameterError, match=needle):
            sparse.extract(ft, base=base, **bad)


def test_dense_tensors_are_stored_whole_and_replace_the_base(tmp_path: Path, run_cli) -> None:
    base = model(0)
    ft = finetune(base, 1)
    sft = sparse.extract(ft, base=base, density=0.1, dense=["head"])
    assert sft.replaced == {"head.weight"} and "head.weight" not in sft.sparse_names
    assert sft.entries["head.weight"].dtype == "BF16"
    applied = sparse.apply(base, [sft])
    assert torch.equal(applied["head.weight"], ft["head.weight"])
    with pytest.raises(ParameterError, match="cannot be reverted"):
        sparse.revert(applied, [sft])
    with pytest.raises(MismatchError, match="stored whole in both"):
        sparse.apply(base, [sft, sft])
    # adapt merge: the dense tensor is a full weight (replaced), the rest task vectors
    merged = merge.run(merge.TaskArithmetic(), [sft], base=base)
    for n in base:
        np.testing.assert_array_equal(bits(merged[n]), bits(applied[n]))


def test_changed_integer_tensor_is_refused() -> None:
    base = model(0)
    ft = finetune(base, 1) | {"ids": torch.arange(4) + 1}
    with pytest.raises(MismatchError, match="'ids'"):
        sparse.extract(ft, base=base, density=0.1)


def test_nonfinite_finetune_is_refused() -> None:
    base = model(0, torch.float32)
    ft = finetune(base, 1)
    ft["b.bias"][3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'b\.bias'"):
        sparse.extract(ft, base=base, density=0.1)


def test_extract_from_an_update_is_refused() -> None:
    base = model(0)
    sft = sparse.extract(finetune(base, 1), base=base, density=0.1)
    with pytest.raises(ParameterError, match="not fine-tuned weights"):
        sparse.extract(sft, base=base, density=0.1)


# --------------------------------------------------------------------------- the container


def test_container_layout(tmp_path: Path) -> None:
    base, ft, bp, fp = sft_and_states(tmp_path)
    path = sparse.extract(
        fp, base=bp, density=0.2, dense=["head"], out=tmp_path / "t.sft.safetensors"
    )
    mem = sparse.extract(fp, base=bp, density=0.2, dense=["head"])
    assert mem.save(tmp_path / "m.sft.safetensors").read_bytes() == path.read_bytes()
    src = merge.open(path)
    assert isinstance(src, sparse.SparseSource) and src.delta
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        names = list(f.keys())
    assert meta["adapt_format"] == "sparse" and meta["adapt_format_version"] == "1"
    assert meta["adapt_content"] == "sparse_fine_tune" and meta["adapt_method"] == "sparse-extract"
    entries = json.loads(meta["adapt_sparse_tensors"])
    assert [e["name"] for e in entries] == [*FLOATS[:3], "head.weight"]
    expected = []
    for e in entries:
        if e["kind"] == "dense":
            expected.append(e["name"] + ".dense")
            continue
        expected += [e["name"] + ".positions", e["name"] + ".values"]
        expected += [e["name"] + ".wide_index", e["name"] + ".wide_values"] if e["wide"] else []
        assert e["dtype"] == "BF16" and e["values"] == "F32" and e["inexact"] == 0
    assert sorted(names) == sorted(expected)
    header = json.loads(meta["adapt_sparse"])
    assert header["origin"] == "extract" and header["dense_patterns"] == ["head"]
    with safe_open(str(path), "pt") as f:
        for e in entries:
            if e["kind"] == "dense":
                continue
            payload = f.get_tensor(e["name"] + ".positions").numpy()
            positions = decode_positions(payload, e["count"], int(np.prod(e["shape"])), e["m"])
            # the ComPEFT position code, byte for byte
            assert (
                encode_positions(positions, int(np.prod(e["shape"])))[0].tobytes()
                == payload.tobytes()
            )
            tau = (flat(ft[e["name"]]) - flat(base[e["name"]]))[positions]
            np.testing.assert_array_equal(f.get_tensor(e["name"] + ".values").numpy(), tau)
    # data offsets are contiguous in list order
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header_json = json.loads(raw[8 : 8 + n])
    offsets = [header_json[name]["data_offsets"] for name in expected]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
    assert 8 + n + offsets[-1][1] == len(raw) and n % 8 == 0


def test_merge_accepts_a_sparse_finetune_as_task_vector(
    demo_models, tmp_path: Path, run_cli
) -> None:
    base, fts = demo_models
    sft = tmp_path / "t.sft.safetensors"
    assert (
        run_cli(
            "sparse", "extract", fts[0], "--base", base, "--density", "0.05", "-o", sft, "-q"
        ).code
        == 0
    )
    assert (
        run_cli(
            "merge", "--base", base, sft, "--method", "task-arithmetic", "-o", tmp_path / "m", "-q"
        ).code
        == 0
    )
    assert run_cli("sparse", "apply", base, sft, "-o", tmp_path / "a", "-q").code == 0
    m = load_file(str(tmp_path / "m" / "model.safetensors"))
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(torch.equal(bits_t(m[k]), bits_t(a[k])) for k in m)
    assert (tmp_path / "a" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    ft = load_file(str(fts[0] / "model.safetensors"))
    src = merge.open(sft)
    name = src.sparse_names[0]
    kept = src.positions(name)
    np.testing.assert_array_equal(bits(a[name])[kept], bits(ft[name])[kept])


def bits_t(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t


def test_apply_output_forms(tmp_path: Path) -> None:
    _base, _ft, bp, fp = sft_and_states(tmp_path)
    sft = sparse.extract(fp, base=bp, density=0.3, out=tmp_path / "t.sft.safetensors")
    as_dict = sparse.apply(bp, [sft])
    path = sparse.apply(bp, [sft], tmp_path / "out.safetensors")
    assert path == tmp_path / "out.safetensors"
    assert all(torch.equal(bits_t(v), bits_t(load_file(str(path))[k])) for k, v in as_dict.items())
    shards = sparse.apply(bp, [sft], tmp_path / "sharded", shard_size=200)
    assert (shards / "model.safetensors.index.json").is_file()
    f32 = sparse.apply(bp, [sft], dtype="float32")
    assert f32["a.weight"].dtype == torch.float32
    with pytest.raises(ParameterError, match="--scale"):
        sparse.apply(bp, [sft], scales=[1.0, 2.0])
    with pytest.raises(ParameterError, match="finite"):
        sparse.apply(bp, [sft], scales=[float("inf")])


def test_scaled_composition_of_two_finetunes(tmp_path: Path) -> None:
    base = model(0, torch.float32)
    lang = sparse.extract(finetune(base, 1), base=base, density=0.3)
    task = sparse.extract(finetune(base, 2), base=base, density=0.3)
    got = sparse.apply(base, [lang, task], scales=[0.5, -1.25])
    other = sparse.apply(base, [task, lang], scales=[-1.25, 0.5])
    for n in FLOATS:
        start = flat(base[n])
        terms: list[list[tuple[float, float]]] = [[] for _ in start]
        for src, s in ((lang, 0.5), (task, -1.25)):
            for p, v in zip(src.positions(n), src.values(n), strict=True):
                terms[p].append((s, v))
        want = round_to(
            np.array([exact_sum(x, t) for x, t in zip(start, terms, strict=True)]), torch.float32
        )
        np.testing.assert_array_equal(bits(got[n]), bits(want))
        np.testing.assert_array_equal(bits(other[n]), bits(got[n]))


def test_revert_is_not_a_general_inverse() -> None:
    """apply is not injective in float32 (2**-30 + 1 and 0 + 1 both round to 1), so no revert
    can restore every model: adapt guarantees revert(apply(base)) == base for the base the
    fine-tune was extracted from (checked entry by entry at extraction)."""
    base = {"w": torch.tensor([0.0, 0.5], dtype=torch.float32)}
    ft = {"w": torch.tensor([1.0, 0.5], dtype=torch.float32)}
    sft = sparse.extract(ft, base=base, count=1)
    other = {"w": torch.tensor([2.0**-30, 0.5], dtype=torch.float32)}
    assert torch.equal(sparse.apply(other, [sft])["w"], sparse.apply(base, [sft])["w"])
    assert torch.equal(sparse.revert(sparse.apply(base, [sft]), [sft])["w"], base["w"])


# --------------------------------------------------------------------------- interop


def three_d_delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {}
    for n in FLOATS:
        d = torch.randn(SHAPES[n], generator=g) * (torch.rand(SHAPES[n], generator=g) < 0.3)
        out[n] = d
    return out


def manual_apply(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict:
    return {
        n: (t.double() + deltas[n].double()).to(t.dtype) if n in deltas else t
        for n, t in base.items()
    }


@pytest.mark.parametrize("steps_as_tensor", [False, True])
def test_composable_sft_round_trip(tmp_path: Path, run_cli, steps_as_tensor: bool) -> None:
    base = model(0, torch.float32)
    deltas = three_d_delta()
    head = {"head.weight": torch.randn(2, 6)}
    diffs = {n: d for n, d in deltas.items() if n != "head.weight"}
    path = save_composable(tmp_path / "lang" / "pytorch_diff.bin", diffs, head, steps_as_tensor)
    bp = tmp_path / "base.safetensors"
    save_file(base, str(bp))
    src = sparse.open_sparse(path.parent, allow_pickle=True)
    for n, d in diffs.items():  # column-major indices became row-major positions
        np.testing.assert_array_equal(src.positions(n), np.flatnonzero(d.reshape(-1).numpy()))
        np.testing.assert_array_equal(src.values(n), d.reshape(-1)[d.reshape(-1) != 0].numpy())
    want = manual_apply(base, diffs) | head
    got = sparse.apply(bp, [path], allow_pickle=True)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    out = tmp_path / "lang.sft.safetensors"
    r = run_cli("sparse", "convert", path, "--allow-pickle", "-o", out)
    assert r.code == 0, r.err
    converted = merge.open(out)
    assert converted.header.origin == "composable-sft" and converted.replaced == {"head.weight"}
    again = sparse.apply(bp, [out])
    assert all(torch.equal(again[n], got[n]) for n in got)


def test_composable_sft_needs_allow_pickle(tmp_path: Path, run_cli) -> None:
    path = save_composable(tmp_path / "pytorch_diff.bin", {"a.weight": torch.eye(6, 5)})
    bp = tmp_path / "base.safetensors"
    save_file(model(0, torch.float32), str(bp))
    before = snapshot([tmp_path])
    r = run_cli("sparse", "apply", bp, path, "-o", tmp_path / "out")
    assert_one_line_error(r, str(path), "--allow-pickle")
    r = run_cli("sparse", "convert", path, "-o", tmp_path / "x.sft.safetensors")
    assert_one_line_error(r, "--allow-pickle")
    assert snapshot([tmp_path]) == before and not (tmp_path / "out").exists()


def test_malicious_pickle_is_refused(tmp_path: Path, run_cli) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "pytorch_diff.bin"
    path.write_bytes(pickle.dumps({"diffs": Evil()}))
    r = run_cli("sparse", "convert", path, "--allow-pickle", "-o", tmp_path / "x.sft.safetensors")
    assert_one_line_error(r, str(path), "weights_only")
    assert "pwned" not in r.out


def test_composable_sft_index_out_of_range(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "pytorch_diff.bin"
    torch.save(
        {
            "diffs": {
                "b.bias": {"size": torch.Size([7]), "index_steps": [2, 6], "values": torch.ones(2)}
            }
        },
        path,
    )
    r = run_cli("sparse", "convert", path, "--allow-pickle", "-o", tmp_path / "x.sft.safetensors")
    assert_one_line_error(r, str(path), "'b.bias'", "out of range")
    assert leftovers(tmp_path) == [] and not (tmp_path / "x.sft.safetensors").exists()


@pytest.mark.parametrize("shuffle", [False, True])
def test_spiel_adapter(tmp_path: Path, run_cli, shuffle: bool) -> None:
    base = model(0, torch.bfloat16)
    bp = tmp_path / "base.safetensors"
    save_file(base, str(bp))
    deltas = {
        n: d for n, d in three_d_delta().items() if n.endswith(".weight") and n != "head.weight"
    }
    whole = {"head.weight": torch.randn(2, 6).to(torch.bfloat16)}
    folder = save_spiel(tmp_path / "spiel", deltas, whole, shuffle)
    with pytest.raises(ParameterError, match="--base"):
        sparse.open_sparse(folder)
    got = sparse.apply(bp, [folder])
    want = manual_apply(base, deltas) | whole
    for n in want:
        assert torch.equal(got[n], want[n]), n
    out = tmp_path / "task.sft.safetensors"
    assert run_cli("sparse", "convert", folder, "--base", bp, "-o", out, "-q").code == 0
    assert merge.open(out).header.origin == "spiel"
    assert all(torch.equal(sparse.apply(bp, [out])[n], got[n]) for n in got)
    r = run_cli("sparse", "convert", folder, "-o", tmp_path / "y.sft.safetensors")
    assert_one_line_error(r, "--base")


def test_spiel_bad_indices(tmp_path: Path, run_cli) -> None:
    bp = tmp_path / "base.safetensors"
    save_file(model(0), str(bp))
    folder = save_spiel(tmp_path / "spiel", {"a.weight": torch.ones(6, 5)})
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.a.sft_delta.indices"
    for bad, needle in [(30, "out of range"), (0, "appears twice")]:
        broken = dict(tensors)
        broken[key] = tensors[key].clone()
        broken[key][-1] = bad
        save_file(broken, str(weights))
        r = run_cli("sparse", "apply", bp, folder, "-o", tmp_path / "out")
        assert_one_line_error(r, "'a.weight'", needle)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    config = json.loads((folder / "adapter_config.json").read_text()) | {"peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="SFT"):
        sparse.open_sparse(folder, base=bp)


# --------------------------------------------------------------------------- masks


def test_mask_algebra_and_restrict(tmp_path: Path) -> None:
    base = model(0, torch.float32)
    a = sparse.extract(finetune(base, 1), base=base, density=0.3, dense=["head"])
    b = sparse.extract(finetune(base, 2), base=base, density=0.3)
    ma, mb = sparse.mask_of(a), sparse.mask_of(b)
    assert "head.weight" not in ma.names and "head.weight" in mb.names
    sets = {n: (set(ma.positions.get(n, [])), set(mb.positions[n])) for n in mb.names}
    union, inter, diff = (
        sparse.union(ma, mb),
        sparse.intersection(ma, mb),
        sparse.difference(mb, ma),
    )
    for n, (sa, sb) in sets.items():
        assert set(union.positions[n]) == sa | sb
        assert set(diff.positions[n]) == sb - sa
        if n in ma.names:
            assert set(inter.positions[n]) == sa & sb
    assert "head.weight" not in inter.names
    assert sparse.Mask.from_torch(union.to_torch()) == union
    restricted = sparse.restrict(b, ma, tmp_path / "r.sft.safetensors")
    r = merge.open(restricted)
    assert r.header.origin == "restrict"
    kept = sparse.mask_of(r)
    assert all(set(kept.positions[n]) == set(inter.positions.get(n, [])) for n in mb.names)
    applied = sparse.apply(base, [r])
    for n in FLOATS:
        keep = np.isin(b.positions(n), ma.positions.get(n, []))
        want = flat(base[n]).astype(np.float32)
        want[b.positions(n)[keep]] = (
            flat(base[n])[b.positions(n)[keep]] + b.values(n)[keep]
        ).astype(np.float32)
        np.testing.assert_array_equal(applied[n].numpy().reshape(-1), want)
    with pytest.raises(MismatchError):
        _ = ma | sparse.Mask({"a.weight": np.array([0])}, {"a.weight": (3, 10)})


def test_mask_of_a_compeft_expert(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    update = {
        "w": rng.standard_normal((20, 10)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
    }
    expert = compeft.compress(update, density=0.2)
    path = expert.save(tmp_path / "e.cpeft.safetensors")
    mask = sparse.compeft_mask(path)
    for n in update:
        np.testing.assert_array_equal(mask.positions[n], np.flatnonzero(expert.read(n)))
        assert mask.shapes[n] == update[n].shape
    assert mask.count == expert.header.coded


# --------------------------------------------------------------------------- stats


def test_stats_overlap_and_sign_conflicts(tmp_path: Path, run_cli) -> None:
    base = {"w": torch.zeros(10), "v": torch.zeros(4)}
    a = sparse.extract(
        {"w": torch.tensor([1.0, -2, 3, 0, 0, 0, 0, 0, 0, 0]), "v": torch.zeros(4)},
        base=base,
        count=3,
    )
    b = sparse.extract(
        {"w": torch.tensor([1.0, 2, 0, 0, 5, 0, 0, 0, 0, 0]), "v": torch.zeros(4)},
        base=base,
        count=3,
    )
    pa, pb = a.save(tmp_path / "a.sft.safetensors"), b.save(tmp_path / "b.sft.safetensors")
    report = sparse.stats([pa, pb])
    (pair,) = report["pairs"]
    assert (pair["shared"], pair["union"], pair["sign_conflicts"]) == (2, 4, 1)
    assert pair["jaccard"] == 0.5
    s0 = report["sfts"][0]
    assert (s0["count"], s0["parameters"]) == (3, 14)
    assert s0["l2"] == pytest.approx(14**0.5) and s0["l1"] == 6 and s0["max_abs"] == 3
    w = next(t for t in s0["tensors"] if t["name"] == "w")
    assert (w["count"], w["density"]) == (3, 0.3)
    r = run_cli("sparse", "stats", pa, pb, "--json")
    assert r.code == 0 and json.loads(r.out)["pairs"][0]["jaccard"] == 0.5
    r = run_cli("sparse", "stats", pa, pb, "--tensors")
    assert r.code == 0 and "Jaccard 0.5000" in r.out and "1 sign conflicts" in r.out


# --------------------------------------------------------------------------- training


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.body(x)))


def train(net: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def test_lottery_ticket_training_with_adamw() -> None:
    torch.manual_seed(0)
    net = Tiny()
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    train(net, torch.optim.AdamW(net.parameters(), lr=1e-2), 5)  # the full fine-tune
    mask = sparse.lottery_ticket_mask(net, original, k=40)
    assert mask.count == 40
    tuned = {n: p.detach().clone() for n, p in net.named_parameters()}
    ref = kept_reference(original, tuned, 40, list(original))
    assert {n: list(p) for n, p in mask.positions.items()} == {n: list(p) for n, p in ref.items()}
    with torch.no_grad():  # LT-SFT: reset, then train only the mask
        for n, p in net.named_parameters():
            p.copy_(original[n])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    handles = sparse.restrict_grads(net, mask, opt)
    train(net, opt, 5)
    inside = mask.to_torch()
    for n, p in net.named_parameters():
        assert torch.equal(p[~inside[n]], original[n][~inside[n]]), n
    assert any(
        not torch.equal(p[inside[n]], original[n][inside[n]]) for n, p in net.named_parameters()
    )
    # the fine-tune holds no entry outside the mask
    sft = sparse.extract(
        {n: p.detach() for n, p in net.named_parameters()}, base=original, density=1.0
    )
    assert all(set(sft.positions(n)) <= set(mask.positions[n]) for n in sft.sparse_names)
    for h in handles:
        h.remove()
    train(net, opt, 1)
    assert any(
        not torch.equal(p[~inside[n]], original[n][~inside[n]]) for n, p in net.named_parameters()
    )


def test_gradient_hooks_alone_let_weight_decay_move_the_rest() -> None:
    torch.manual_seed(0)
    net = Tiny()
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    mask = sparse.Mask.from_torch(
        {n: torch.zeros_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    sparse.restrict_grads(net, mask)  # no optimizer: decoupled weight decay still shrinks
    train(net, opt, 2)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    assert not torch.equal(net.body.weight, original["body.weight"])
    with pytest.raises(MismatchError, match="not a parameter"):
        sparse.restrict_grads(net, sparse.Mask({"nope": np.zeros(0)}, {"nope": (2,)}))


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def env(tmp_path: Path):
    _base, _ft, bp, fp = sft_and_states(tmp_path)
    sft = sparse.extract(fp, base=bp, density=0.2, out=tmp_path / "t.sft.safetensors")
    out = tmp_path / "out"
    return tmp_path, bp, fp, sft, out


def refused(run_cli, root: Path, out: Path, *args: object, needles: tuple[str, ...]) -> None:
    before = snapshot([root])
    r = run_cli(*args)
    assert_one_line_error(r, *needles)
    assert snapshot([root]) == before
    assert not out.exists() and leftovers(root) == [] and leftovers(out.parent) == []


def test_sft_for_another_model(env, run_cli, make_file) -> None:
    root, _bp, fp, sft, out = env
    other = make_file("other.safetensors", {k: v for k, v in model(0).items() if k != "b.bias"})
    refused(
        run_cli, root, out, "sparse", "apply", other, sft, "-o", out, needles=(str(sft), "'b.bias'")
    )
    shapes = make_file(
        "shapes.safetensors", model(0) | {"a.weight": torch.zeros(5, 6, dtype=torch.bfloat16)}
    )
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "apply",
        shapes,
        sft,
        "-o",
        out,
        needles=("'a.weight'", "[5, 6]", "[6, 5]"),
    )
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "extract",
        fp,
        "--base",
        other,
        "--density",
        "0.1",
        "-o",
        out,
        needles=("'b.bias'",),
    )


def test_corrupted_payload(env, run_cli) -> None:
    root, bp, _fp, sft, out = env
    begin, _ = data_offset(sft, "c.conv.values")
    raw = bytearray(sft.read_bytes())
    raw[begin] ^= 0x40
    sft.write_bytes(bytes(raw))
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "apply",
        bp,
        sft,
        "-o",
        out,
        needles=(str(sft), "'c.conv'", "checksum"),
    )


def test_position_past_the_end_with_a_matching_checksum(env, run_cli) -> None:
    root, bp, _fp, sft, out = env
    src = merge.open(sft)
    e = src.entries["c.conv"]
    positions = np.array([3, 50, 59])  # a valid code for 60 entries, read as 48
    payload, m = encode_positions(positions, 60)
    values = np.ones(3, np.float32)
    tensors = {k: torch.from_numpy(v) for k, v in _arrays(sft).items()}
    tensors["c.conv.positions"] = torch.from_numpy(payload)
    tensors["c.conv.values"] = torch.from_numpy(values)
    meta = dict(src.metadata)
    entries = json.loads(meta["adapt_sparse_tensors"])
    for x in entries:
        if x["name"] == "c.conv":
            x |= {"shape": [3, 4, 4], "count": 3, "m": m, "crc32": _crc(payload, values)}
    header = json.loads(meta["adapt_sparse"])
    header["parameters"] += 48 - e.numel
    header["coded"] += 3 - e.count
    meta["adapt_sparse_tensors"] = json.dumps(entries)
    meta["adapt_sparse"] = json.dumps(header)
    save_file(tensors, str(sft), metadata=meta)
    shapes = model(0) | {"c.conv": torch.zeros(3, 4, 4, dtype=torch.bfloat16)}
    save_file(shapes, str(bp))
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "apply",
        bp,
        sft,
        "-o",
        out,
        needles=("'c.conv'", "past the end"),
    )


def _arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file as load_numpy

    return load_numpy(str(path))


def _crc(*parts: np.ndarray) -> int:
    from merge.sparse.container import checksum

    return checksum(parts)


def test_bad_headers(env, run_cli) -> None:
    root, bp, _fp, sft, out = env
    rewrite_metadata(sft, lambda m: m.update(adapt_format_version="9"))
    refused(
        run_cli, root, out, "sparse", "apply", bp, sft, "-o", out, needles=(str(sft), "version '9'")
    )
    rewrite_metadata(sft, lambda m: m.update(adapt_format_version="1", adapt_sparse="{}"))
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "stats",
        sft,
        needles=(str(sft), "corrupt sparse fine-tune header"),
    )
    with pytest.raises(CorruptFileError):
        merge.open(sft)


def test_cli_misuse(env, run_cli) -> None:
    root, bp, fp, sft, out = env
    refused(run_cli, root, out, "sparse", "apply", bp, sft, needles=("--output",))
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "apply",
        bp,
        sft,
        "--scale",
        "1,2",
        "-o",
        out,
        needles=("--scale",),
    )
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "apply",
        bp,
        sft,
        "--scale",
        "x",
        "-o",
        out,
        needles=("--scale",),
    )
    refused(
        run_cli, root, out, "sparse", "extract", fp, "--base", bp, "-o", out, needles=("--density",)
    )
    refused(
        run_cli,
        root,
        out,
        "sparse",
        "apply",
        bp,
        fp,
        "-o",
        out,
        needles=(str(fp), "not a sparse fine-tune"),
    )
    refused(run_cli, root, out, "sparse", "apply", bp, sft, "-o", sft, needles=("overwrite",))
