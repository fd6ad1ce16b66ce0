"""Fused TIES kernel against a plain numpy reference."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from merge.kernels.select import count_for_density, topk_threshold
from merge.kernels.ties import SIGN_FREQUENCY, SIGN_TOTAL, keep_all, ties_merge

F32 = np.float32
VALUES = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, 3.0, -3.0, 1e-3]


def ref_ties(taus, weights, keep, sign_mode):
    """Plain numpy TIES: trim with the given masks, weight, elect, disjoint mean."""
    trimmed = np.where(keep, np.asarray(weights, np.float64)[:, None] * taus.astype(np.float64), 0)
    total = np.zeros(taus.shape[1])
    votes = np.zeros(taus.shape[1], np.int64)
    for row in trimmed:  # input order, as documented
        total = total + row
        votes = votes + np.sign(row).astype(np.int64)
    score = total if sign_mode == SIGN_TOTAL else votes
    elected = np.where(score >= 0, 1.0, -1.0)  # a zero sum elects +1
    agree = np.sign(trimmed) == elected
    acc = np.zeros(taus.shape[1])
    for row, ok in zip(trimmed, agree, strict=True):
        acc = acc + np.where(ok, row, 0.0)
    return (acc / np.maximum(agree.sum(axis=0), 1)).astype(F32)


def ref_keep(taus, ks):
    keep = np.zeros(taus.shape, bool)
    for i, k in enumerate(ks):
        keep[i, np.argsort(-np.abs(taus[i]), kind="stable")[:k]] = True
    return keep


def selections(taus, ks):
    sel = [topk_threshold(row, k) for row, k in zip(taus, ks, strict=True)]
    return np.array([s[0] for s in sel], F32), np.array([s[1] for s in sel], np.int64)


@pytest.mark.parametrize("sign_mode", [SIGN_TOTAL, SIGN_FREQUENCY])
def test_worked_example_from_notes(sign_mode):
    taus = np.array([[1, -2, 0.5, 0], [1, 2, -0.5, 3]], F32)
    out = np.empty(4, F32)
    ties_merge(taus, np.ones(2), *keep_all(2), sign_mode, out)
    np.testing.assert_array_equal(out, [1, 2, 0.5, 3])


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 4), st.integers(0, 40)),
    sign_mode=st.sampled_from([SIGN_TOTAL, SIGN_FREQUENCY]),
    trim=st.booleans(),
)
def test_matches_reference(data, shape, sign_mode, trim):
    n_inputs, n = shape
    elements = st.one_of(st.sampled_from(VALUES), st.floats(-10, 10, width=32))
    taus = data.draw(arrays(F32, shape, elements=elements))
    weights = np.array(
        data.draw(
            st.lists(
                st.sampled_from([1.0, 0.5, 0.3, 2.0, -1.0, 0.0]),
                min_size=n_inputs,
                max_size=n_inputs,
            )
        ),
        np.float64,
    )
    if trim:
        ks = [data.draw(st.integers(0, n)) for _ in range(n_inputs)]
        thr, cut = selections(taus, ks)
    else:
        ks = [n] * n_inputs
        thr, cut = keep_all(n_inputs)
    before = taus.copy()
    out = np.full(n, np.nan, F32)
    ties_merge(taus, weights, thr, cut, sign_mode, out)
    expected = ref_ties(taus, weights, ref_keep(taus, ks), sign_mode)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(taus, before)


def test_zero_sum_elects_plus_and_weights_come_first():
    taus = np.array([[2.0, 1.0, 0.0], [-2.0, -3.0, 0.0], [0.0, 1.0, 0.0]], F32)
    out = np.empty(3, F32)
    # total: col0 sums to 0 -> +, mean of {2}; col1 sums to -1 -> -, mean of {-3}; col2 -> 0.
    ties_merge(taus, [1.0, 1.0, 1.0], *keep_all(3), SIGN_TOTAL, out)
    np.testing.assert_array_equal(out, [2.0, -3.0, 0.0])
    # frequency: col1 has two + votes against one -> mean of {1, 1}.
    ties_merge(taus, [1.0, 1.0, 1.0], *keep_all(3), SIGN_FREQUENCY, out)
    np.testing.assert_array_equal(out, [2.0, 1.0, 0.0])
    # weight -1 on input 1 flips its sign before the election.
    ties_merge(taus, [1.0, -1.0, 1.0], *keep_all(3), SIGN_TOTAL, out)
    np.testing.assert_array_equal(out, [2.0, F32(5.0 / 3.0), 0.0])


def test_large_offset_slices_and_threads():
    rng = np.random.default_rng(5)
    n_inputs, n = 3, 70_001
    taus = (rng.integers(-8, 9, (n_inputs, n)) * 0.25).astype(F32)
    ks = [count_for_density(d, n) for d in (0.2, 0.5, 0.9)]
    thr, cut = selections(taus, ks)
    weights = np.array([1.0, 0.7, 1.3])
    expected = ref_ties(taus, weights, ref_keep(taus, ks), SIGN_TOTAL)
    default = numba.get_num_threads()
    try:
        for nt in sorted({1, default}):
            numba.set_num_threads(nt)
            out = np.empty(n, F32)
            ties_merge(taus, weights, thr, cut, SIGN_TOTAL, out)
            np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    finally:
        numba.set_num_threads(default)
    pieces = np.empty(n, F32)
    for a, b in [(0, 4095), (4095, 30_000), (30_000, n)]:
        part = np.ascontiguousarray(taus[:, a:b])
        ties_merge(part, weights, thr, cut, SIGN_TOTAL, pieces[a:b], offset=a)
    np.testing.assert_array_equal(pieces.view(np.uint32), expected.view(np.uint32))


def test_out_may_alias_a_row():
    rng = np.random.default_rng(2)
    taus = rng.standard_normal((3, 9000)).astype(F32)
    expected = np.empty(9000, F32)
    ties_merge(taus.copy(), np.ones(3), *keep_all(3), SIGN_FREQUENCY, expected)
    ties_merge(taus, np.ones(3), *keep_all(3), SIGN_FREQUENCY, taus[1])
    np.testing.assert_array_equal(taus[1], expected)


def test_invalid_arguments():
    taus = np.ones((2, 4), F32)
    out = np.empty(4, F32)
    thr, cut = keep_all(2)
    with pytest.raises(ValueError):
        ties_merge(taus, np.ones(2), thr, cut, 2, out)
    with pytest.raises(ValueError):
        ties_merge(taus, np.ones(3), thr, cut, SIGN_TOTAL, out)
    with pytest.raises(ValueError):
        ties_merge(taus, np.ones(2), thr, cut, SIGN_TOTAL, np.empty(5, F32))
    with pytest.raises(TypeError):
        ties_merge(taus.astype(np.float64), np.ones(2), thr, cut, SIGN_TOTAL, out)
    with pytest.raises(ValueError):
        ties_merge(taus, np.ones(2), thr, cut, SIGN_TOTAL, out, offset=-1)
