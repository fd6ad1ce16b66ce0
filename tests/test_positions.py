"""The position code: Golomb-coded gaps, packed bits, fused decode + scatter kernels."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge.kernels.positions import (
    MAX_M,
    CodeError,
    count_selected,
    decode_positions,
    encode_difference,
    encode_positions,
    encode_selection,
    golomb_parameter,
    pack_bits,
    scatter_add_ternary,
    scatter_ternary,
    unpack_bits,
)
from merge.kernels.select import kept_mask, topk_threshold


@st.composite
def position_sets(draw: st.DrawFn, max_n: int = 5000) -> tuple[np.ndarray, int]:
    """A tensor size and a sorted set of distinct positions in it (empty and full included)."""
    n = draw(st.integers(1, max_n))
    kind = draw(st.sampled_from(["random", "empty", "full", "dense", "sparse"]))
    if kind == "empty":
        return np.zeros(0, np.int64), n
    if kind == "full":
        return np.arange(n, dtype=np.int64), n
    p = {"random": draw(st.floats(0.0, 1.0)), "dense": 0.9, "sparse": 0.002}[kind]
    seed = draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random(n) < p
    return np.flatnonzero(mask).astype(np.int64), n


@settings(max_examples=200, deadline=None)
@given(position_sets(), st.one_of(st.none(), st.integers(1, 300)))
def test_positions_round_trip(case: tuple[np.ndarray, int], m: int | None) -> None:
    positions, n = case
    payload, m_used = encode_positions(positions, n, m)
    assert payload.dtype == np.uint8
    assert m_used == (golomb_parameter(positions.size, n) if m is None else m)
    np.testing.assert_array_equal(decode_positions(payload, positions.size, n, m_used), positions)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 2**50 - 1), min_size=1, max_size=20, unique=True),
    st.sampled_from([None, 2**20, MAX_M]),
)
def test_huge_gaps_round_trip(values: list[int], m: int | None) -> None:
    positions = np.array(sorted(values), np.int64)
    payload, m_used = encode_positions(positions, 2**50, m)
    np.testing.assert_array_equal(
        decode_positions(payload, positions.size, 2**50, m_used), positions
    )


@pytest.mark.parametrize(
    ("positions", "n"),
    [([], 1), ([0], 1), ([], 10), (list(range(10)), 10), ([9], 10), ([0, 2**40 - 1], 2**40)],
)
def test_edge_sets(positions: list[int], n: int) -> None:
    p = np.array(positions, np.int64)
    payload, m = encode_positions(p, n)
    if not positions:
        assert payload.size == 0
    np.testing.assert_array_equal(decode_positions(payload, p.size, n, m), p)


def test_full_set_costs_one_bit_per_entry() -> None:
    payload, m = encode_positions(np.arange(80), 80)
    assert m == 1 and payload.size == 10


@pytest.mark.parametrize(("p", "m"), [(0.05, 14), (0.1, 7), (0.2, 3), (0.38, 2), (0.39, 1)])
def test_golomb_parameter(p: float, m: int) -> None:
    assert golomb_parameter(round(p * 10**6), 10**6) == m


def test_golomb_parameter_edges() -> None:
    assert golomb_parameter(0, 100) == 1
    assert golomb_parameter(100, 100) == 1
    assert golomb_parameter(1, 2**60) == MAX_M


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2])
def test_code_length_near_entropy(density: float) -> None:
    """Uniformly random positions (geometric gaps): within 2.5% of H(p)/p bits per position."""
    n = 400_000
    positions = np.flatnonzero(np.random.default_rng(1).random(n) < density)
    payload, _ = encode_positions(positions, n)
    p = positions.size / n
    entropy = -p * math.log2(p) - (1 - p) * math.log2(1 - p)
    assert payload.size * 8 / n <= 1.025 * entropy


@pytest.mark.parametrize(
    "positions", [[3, 3], [5, 2], [-1, 4], [0, 10]], ids=["dup", "unsorted", "negative", "range"]
)
def test_encode_refuses_bad_sets(positions: list[int]) -> None:
    with pytest.raises(CodeError, match="sorted, distinct"):
        encode_positions(np.array(positions), 10)


def test_decode_detects_corruption() -> None:
    positions = np.flatnonzero(np.random.default_rng(2).random(5000) < 0.1)
    payload, m = encode_positions(positions, 5000)
    k = positions.size
    with pytest.raises(CodeError, match="ends early"):
        decode_positions(payload[:-3], k, 5000, m)
    with pytest.raises(CodeError, match="trailing"):
        decode_positions(np.append(payload, np.uint8(0)), k, 5000, m)
    with pytest.raises(CodeError, match="trailing"):
        decode_positions(payload, k - 5, 5000, m)
    with pytest.raises(CodeError, match="past the end"):
        decode_positions(payload, k, int(positions[-1]), m)
    with pytest.raises(CodeError, match="ends early"):
        decode_positions(np.zeros(0, np.uint8), 1, 10, 1)


def test_decode_detects_nonzero_padding() -> None:
    payload, m = encode_positions(np.array([1]), 4, 1)  # gap 1 with m = 1: "10" (2 bits)
    with pytest.raises(CodeError, match="trailing"):
        decode_positions(payload | np.uint8(0x80), 1, 4, m)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=70))
def test_bits_round_trip(bits: list[bool]) -> None:
    payload = pack_bits(np.array(bits, bool))
    assert payload.size == (len(bits) + 7) // 8
    np.testing.assert_array_equal(unpack_bits(payload, len(bits)), bits)


def test_unpack_bits_checks() -> None:
    with pytest.raises(CodeError, match="need 1 bytes"):
        unpack_bits(np.zeros(2, np.uint8), 3)
    with pytest.raises(CodeError, match="padding"):
        unpack_bits(np.array([0xF0], np.uint8), 3)


def _ternary_case(seed: int, n: int = 3000, density: float = 0.15):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.random(n) < 0.2] = 0.0  # zeros are never coded
    x[rng.random(n) < 0.1] = np.float32(0.5)  # ties at one magnitude
    thr, cut = topk_threshold(x, round(density * n))
    keep = kept_mask(x, thr, cut) & (x != 0)
    return x, thr, cut, keep


@pytest.mark.parametrize(
    ("seed", "n", "density"),
    [(0, 3000, 0.15), (1, 3000, 0.9), (2, 300_000, 0.1), (3, 300_000, 1e-5), (4, 200_000, 0.0)],
)
def test_encode_selection_matches_positions(seed: int, n: int, density: float) -> None:
    """Chunks coded in parallel and stitched give the bytes of the sequential code."""
    x, thr, cut, keep = _ternary_case(seed, n, density)
    payload, signs, count, m = encode_selection(x, thr, cut)
    positions = np.flatnonzero(keep)
    assert count == positions.size == count_selected(x, thr, cut)
    expected, m_ref = encode_positions(positions, x.size)
    assert m == m_ref
    np.testing.assert_array_equal(payload, expected)
    np.testing.assert_array_equal(signs, pack_bits(x[positions] < 0))


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (torch's conversion)."""
    t = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "bf16"])
def test_scatter_kernels_match_dense(dtype: type | str) -> None:
    x, thr, cut, keep = _ternary_case(3)
    payload, signs, count, m = encode_selection(x, thr, cut)
    scale = np.float32(0.37)
    ternary = np.where(keep, np.sign(x) * scale, 0).astype(np.float32)
    base = np.random.default_rng(4).standard_normal(x.size).astype(np.float32)
    # exact: float64 sum rounded once to the storage dtype (bf16 through float32)
    want_add = base.astype(np.float64) + ternary.astype(np.float64)
    if dtype == "bf16":
        out = np.zeros(x.size, np.uint16)
        scatter_ternary(payload, count, m, signs, scale, out)
        np.testing.assert_array_equal(out, _bf16_bits(ternary))
        added = _bf16_bits(base)
        start = _bf16_values(added).astype(np.float64)
        scatter_add_ternary(payload, count, m, signs, scale, added)
        want = _bf16_bits((start + ternary.astype(np.float64)).astype(np.float32))
        np.testing.assert_array_equal(added, want)
        return
    out = np.zeros(x.size, dtype)
    scatter_ternary(payload, count, m, signs, scale, out)
    np.testing.assert_array_equal(out, ternary.astype(dtype))
    added = base.astype(dtype)
    scatter_add_ternary(payload, count, m, signs, scale, added)
    np.testing.assert_array_equal(added, want_add.astype(dtype))


def test_scatter_detects_corruption() -> None:
    x, thr, cut, _ = _ternary_case(5)
    payload, signs, count, m = encode_selection(x, thr, cut)
    out = np.zeros(x.size, np.float32)
    with pytest.raises(CodeError, match="past the end"):
        scatter_ternary(payload, count, m, signs, 1.0, out[: x.size // 2])
    with pytest.raises(CodeError, match="sign bits need"):
        scatter_ternary(payload, count, m, signs[:-1], 1.0, out)
    with pytest.raises(CodeError, match="ends early"):
        scatter_add_ternary(payload[: payload.size // 2], count, m, signs, 1.0, out)


def test_results_do_not_depend_on_threads() -> None:
    x = np.random.default_rng(6).standard_normal(600_000).astype(np.float32)
    thr, cut = topk_threshold(x, 60_000)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = encode_selection(x, thr, cut)
    finally:
        numba.set_num_threads(threads)
    many = encode_selection(x, thr, cut)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", [0, 1, 70_000, 150_000, 299_999])
def test_encode_difference_spends_a_tie_quota(k: int) -> None:
    """Ties at the threshold kept earliest first up to a quota, over many chunks, with the
    difference computed on the fly from bf16 inputs: the bytes of the materialised selection."""
    rng = np.random.default_rng(7)
    n = 300_000
    base = _bf16_bits(rng.standard_normal(n).astype(np.float32))
    step = rng.integers(-3, 4, n).astype(np.float32) * np.float32(2.0**-6)
    x = _bf16_bits(_bf16_values(base) + step)  # x - base: few distinct values, many ties
    d = (_bf16_values(x).astype(np.float64) - _bf16_values(base)).astype(np.float32)
    thr, cut = topk_threshold(d, k)
    tied_kept = int(np.count_nonzero((np.abs(d) == thr) & (d != 0) & (np.arange(n) < cut)))
    want = encode_selection(d, thr, cut)
    got = encode_difference(x, base, 0.0, thr, tied_kept)
    for a, b in zip(want, got[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    assert got[4] == tied_kept
    all_ties = encode_difference(d, None, 0.0, thr, None)
    np.testing.assert_array_equal(all_ties[0], encode_selection(d, thr, n)[0])
