"""Exact top-k selection kernels against a stable-argsort numpy reference."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from merge.kernels.select import (
    THR_KEEP_ALL,
    GlobalTopK,
    apply_selection,
    count_for_density,
    count_kept,
    kept_mask,
    threshold_key,
    topk_threshold,
)

F32 = np.float32
# Many ties: equal magnitudes with both signs, both zeros, values sharing the high 16 bits
# (1.0, 1 + 2**-10, the next float after 1.0), denormals, huge values and infinities.
SPECIAL = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    -0.5,
    2.0,
    -2.0,
    1.0 + 2.0**-10,
    -(1.0 + 2.0**-10),
    float(np.nextafter(F32(1.0), F32(2.0))),
    -float(np.nextafter(F32(1.0), F32(2.0))),
    1e-45,
    -1e-45,
    3e38,
    float("inf"),
    float("-inf"),
]
ELEMENTS = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=False))


def ref_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Keep the first k of the stable descending-magnitude order (lowest index wins ties)."""
    mask = np.zeros(x.size, bool)
    mask[np.argsort(-np.abs(x), kind="stable")[:k]] = True
    return mask


def tied_vector(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random vector with heavy ties and near-ties (same high 16 bits) in the same bins."""
    base = rng.integers(-40, 41, n).astype(F32) * F32(0.125)
    bump = rng.integers(0, 3, n).astype(np.uint32)  # +0, +1 or +2 ulp: same high bits
    bits = base.view(np.uint32) + bump * (base != 0)
    return bits.view(F32)


def run_global(pieces: list[np.ndarray], total_k: int | None, density: float | None = None):
    g = GlobalTopK(total_k) if density is None else GlobalTopK(density=density)
    for p in pieces:
        g.add_high(p)
    g.finish_high()
    for p in pieces:
        g.add_low(p)
    g.finish_low()
    masks = []
    for p in pieces:
        thr, cut = g.selection(p)
        masks.append(kept_mask(p, thr, cut))
    g.finish_selection()
    return g, np.concatenate(masks) if masks else np.zeros(0, bool)


# ---------------------------------------------------------------------------------------------
# Per-tensor selection


@settings(max_examples=100, deadline=None)
@given(data=st.data(), x=arrays(F32, st.integers(0, 300), elements=ELEMENTS))
def test_topk_matches_stable_argsort(data, x):
    k = data.draw(st.integers(0, x.size))
    before = x.copy()
    thr, cut = topk_threshold(x, k)
    mask = kept_mask(x, thr, cut)
    np.testing.assert_array_equal(mask, ref_mask(x, k))
    assert count_kept(x, thr, cut) == k
    assert isinstance(thr, np.float32) and thr >= 0
    assert 0 <= cut <= x.size
    np.testing.assert_array_equal(before.view(np.uint32), x.view(np.uint32))  # not mutated


@pytest.mark.parametrize("n", [65537, 140_000, 300_000])
def test_topk_large_with_ties(n):
    rng = np.random.default_rng(n)
    x = tied_vector(rng, n)
    order = np.argsort(-np.abs(x), kind="stable")
    for k in [0, 1, n // 3, int(rng.integers(0, n)), n - 1, n]:
        thr, cut = topk_threshold(x, k)
        mask = kept_mask(x, thr, cut)
        ref = np.zeros(n, bool)
        ref[order[:k]] = True
        np.testing.assert_array_equal(mask, ref)


def test_edge_sizes_and_conventions():
    empty = np.zeros(0, F32)
    assert topk_threshold(empty, 0) == (np.inf, 0)
    one = np.array([-0.0], F32)
    assert count_kept(one, *topk_threshold(one, 1)) == 1
    assert count_kept(one, *topk_threshold(one, 0)) == 0
    x = np.array([3.0, -1.0, 1.0, 0.0, -0.0, -3.0], F32)
    assert topk_threshold(x, 1) == (3.0, 1)  # first of the tied 3s
    assert topk_threshold(x, 2) == (3.0, 6)  # every tie kept -> cut = n
    assert topk_threshold(x, 5) == (0.0, 4)  # 0.0 and -0.0 tie; the lower index wins
    assert count_kept(x, THR_KEEP_ALL, 0) == x.size
    assert count_kept(x, np.inf, 0) == 0


def test_threshold_key():
    assert threshold_key(-1.0) == -1
    assert threshold_key(-0.0) == 0 == threshold_key(0.0)
    assert threshold_key(1.0) == 0x3F800000
    keys = threshold_key(np.array([2.0, -3.0], F32))
    np.testing.assert_array_equal(keys, [0x40000000, -1])


def test_nan_does_not_crash():
    x = np.array([1.0, np.nan, -2.0, 0.5], F32)
    thr, cut = topk_threshold(x, 2)
    assert count_kept(x, thr, cut) == 2


def test_invalid_arguments():
    x = np.ones(4, F32)
    with pytest.raises(ValueError):
        topk_threshold(x, 5)
    with pytest.raises(ValueError):
        topk_threshold(x, -1)
    with pytest.raises(TypeError):
        topk_threshold(x.astype(np.float64), 1)
    with pytest.raises(TypeError):
        topk_threshold(np.ones((2, 2), F32), 1)
    with pytest.raises(ValueError):
        topk_threshold(np.ones(8, F32)[::2], 1)
    with pytest.raises(ValueError):
        apply_selection(x, 1.0, 0, np.empty(3, F32))


@pytest.mark.parametrize(
    ("density", "n", "k"),
    [(0.5, 3, 2), (0.5, 5, 2), (0.5, 1, 0), (1.0, 7, 7), (0.3, 10, 3), (1e-9, 10, 0), (0.2, 0, 0)],
)
def test_count_for_density(density, n, k):
    assert count_for_density(density, n) == k


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_count_for_density_rejects(density):
    with pytest.raises(ValueError):
        count_for_density(density, 10)


def test_apply_selection_and_offset():
    rng = np.random.default_rng(1)
    x = tied_vector(rng, 1000)
    k = 321
    thr, cut = topk_threshold(x, k)
    out = np.empty_like(x)
    apply_selection(x, thr, cut, out)
    np.testing.assert_array_equal(out, np.where(ref_mask(x, k), x, F32(0)))
    # Slices with their flat offset reproduce the whole.
    pieces = np.empty_like(x)
    for a, b in [(0, 17), (17, 500), (500, 1000)]:
        apply_selection(x[a:b], thr, cut, pieces[a:b], offset=a)
    np.testing.assert_array_equal(pieces.view(np.uint32), out.view(np.uint32))
    # In place.
    y = x.copy()
    apply_selection(y, thr, cut, y)
    np.testing.assert_array_equal(y, out)


def test_thread_count_independent():
    x = tied_vector(np.random.default_rng(7), 400_000)
    default = numba.get_num_threads()
    try:
        results = []
        for nt in sorted({1, default}):
            numba.set_num_threads(nt)
            thr, cut = topk_threshold(x, 123_457)
            out = np.empty_like(x)
            apply_selection(x, thr, cut, out)
            results.append((thr, cut, out.tobytes()))
    finally:
        numba.set_num_threads(default)
    assert all(r == results[0] for r in results)


# ---------------------------------------------------------------------------------------------
# Global (streaming) selection


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    x=arrays(F32, st.integers(0, 200), elements=ELEMENTS),
    n_cuts=st.integers(0, 5),
)
def test_global_matches_reference_on_concatenation(data, x, n_cuts):
    bounds = sorted(data.draw(st.lists(st.integers(0, x.size), min_size=n_cuts, max_size=n_cuts)))
    pieces = [x[a:b].copy() for a, b in zip([0, *bounds], [*bounds, x.size], strict=True)]
    k = data.draw(st.integers(0, x.size))
    g, mask = run_global(pieces, k)
    np.testing.assert_array_equal(mask, ref_mask(x, k))
    assert int(mask.sum()) == k
    assert g.phase == "done"


def test_global_large_ties_span_tensors():
    rng = np.random.default_rng(3)
    sizes = [150_000, 0, 70_000, 1, 200_000, 5]
    x = tied_vector(rng, sum(sizes))
    pieces = np.split(x, np.cumsum(sizes)[:-1])
    order = np.argsort(-np.abs(x), kind="stable")
    for k in [0, 1, 99_999, int(rng.integers(0, x.size)), x.size]:
        _, mask = run_global(pieces, k)
        ref = np.zeros(x.size, bool)
        ref[order[:k]] = True
        np.testing.assert_array_equal(mask, ref)


def test_global_density_and_skipped_low_pass():
    pieces = [np.array([4.0, 1.0, -4.0], F32), np.array([1.0, 4.0, 0.5, -1.0], F32)]
    g = GlobalTopK(3)
    for p in pieces:
        g.add_high(p)
    g.finish_high()
    assert not g.needs_low_pass  # the three 4s fill their whole bin
    g.finish_low()  # pass 2 skipped
    kept = [kept_mask(p, *g.selection(p)) for p in pieces]
    g.finish_selection()
    np.testing.assert_array_equal(np.concatenate(kept), [1, 0, 1, 0, 1, 0, 0])

    x = np.concatenate(pieces)
    g, mask = run_global(pieces, None, density=0.5)  # k = round(3.5) = 4 (half to even)
    assert g.total_k == 4
    np.testing.assert_array_equal(mask, ref_mask(x, 4))


def test_global_protocol_errors():
    a, b = np.ones(3, F32), np.ones(4, F32)
    with pytest.raises(ValueError):
        GlobalTopK()
    with pytest.raises(ValueError):
        GlobalTopK(3, density=0.5)
    g = GlobalTopK(8)
    g.add_high(a)
    g.add_high(b)
    with pytest.raises(ValueError):
        g.finish_high()  # 8 > 7 entries
    g = GlobalTopK(2)
    g.add_high(a)
    g.add_high(b)
    with pytest.raises(RuntimeError):
        g.selection(a)  # wrong phase
    g.finish_high()
    g.add_low(a)
    g.add_low(b)
    g.finish_low()
    with pytest.raises(RuntimeError):
        g.selection(b)  # wrong order
    g.selection(a)
    with pytest.raises(RuntimeError):
        g.finish_selection()  # b not selected yet
