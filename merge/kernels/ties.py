"""Fused TIES merge (trim, elect sign, disjoint mean) over N task vectors.

Per entry ``j`` (flat index ``offset + j`` in its tensor) and input ``i``::

    trimmed_i = w_i * tau_i[j]   if kept by (thr_i, cut_i), else 0      (weights after trimming)
    s         = sign(sum_i trimmed_i)            (SIGN_TOTAL, magnitude-weighted)
              = sign(sum_i sign(trimmed_i))      (SIGN_FREQUENCY, vote)
    out[j]    = sum of the trimmed_i with sign s / max(1, their count)

A zero sum elects +1 (PEFT's rule; the paper's code elects the majority sign instead), so with
a zero sum only positive values are averaged. Zeros never agree with either sign. Sums run in
float64 in input order i = 0..N-1 and the mean is rounded once to float32, so the result does
not depend on the thread count.

Trimming uses the ``(thr, cut)`` selections of ``merge.kernels.select``: entry ``i`` is kept iff
``|x| > thr or (|x| == thr and index < cut)``. A negative threshold keeps everything, so
``keep_all(N)`` (thr = -1.0) runs TIES without trimming, e.g. for DARE-TIES on dropped and
rescaled task vectors.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from merge.kernels.select import _kept, threshold_key

__all__ = ["SIGN_FREQUENCY", "SIGN_TOTAL", "keep_all", "ties_merge"]

SIGN_TOTAL = 0
"""Elect the sign of the sum of the trimmed, weighted values."""
SIGN_FREQUENCY = 1
"""Elect the sign with more votes among the nonzero trimmed, weighted values."""

_CHUNK = 4096  # entries per work unit; the per-chunk float64 buffers stay in cache


@njit(cache=True, parallel=True, nogil=True)
def _ties_kernel(
    taus: np.ndarray,
    weights: np.ndarray,
    keys: np.ndarray,
    cut: np.ndarray,
    sign_mode: int,
    out: np.ndarray,
    offset: int,
) -> None:
    n_inputs, n = taus.shape
    xb = taus.view(np.uint32)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        start = c * _CHUNK
        m = min(n, start + _CHUNK) - start
        total = np.zeros(m, np.float64)
        votes = np.zeros(m, np.int64)
        for i in range(n_inputs):  # elect: one streaming pass per input row
            key, ci, w = keys[i], cut[i], weights[i]
            for j in range(m):
                jj = start + j
                if _kept(xb[i, jj], offset + jj, key, ci):
                    t = w * np.float64(taus[i, jj])
                    total[j] += t
                    if t > 0.0:
                        votes[j] += 1
                    elif t < 0.0:
                        votes[j] -= 1
        positive = np.empty(m, np.bool_)
        for j in range(m):
            positive[j] = total[j] >= 0.0 if sign_mode == 0 else votes[j] >= 0
        acc = total  # reuse the buffers for the disjoint mean
        cnt = votes
        acc[:] = 0.0
        cnt[:] = 0
        for i in range(n_inputs):
            key, ci, w = keys[i], cut[i], weights[i]
            for j in range(m):
                jj = start + j
                if _kept(xb[i, jj], offset + jj, key, ci):
                    t = w * np.float64(taus[i, jj])
                    if (t > 0.0 and positive[j]) or (t < 0.0 and not positive[j]):
                        acc[j] += t
                        cnt[j] += 1
        for j in range(m):
            out[start + j] = np.float32(acc[j] / max(cnt[j], 1))


def keep_all(n_inputs: int) -> tuple[np.ndarray, np.ndarray]:
    """``(thr, cut)`` arrays that keep every entry of ``n_inputs`` task vectors (no trimming)."""
    return np.full(n_inputs, -1.0, np.float32), np.zeros(n_inputs, np.int64)


def ties_merge(
    taus: np.ndarray,
    weights: np.ndarray,
    thr: np.ndarray,
    cut: np.ndarray,
    sign_mode: int,
    out: np.ndarray,
    *,
    offset: int = 0,
) -> None:
    """TIES-merge N task vectors into ``out`` (see the module docstring for the exact rule).

    Args:
        taus (`np.ndarray`): (N, n) C-contiguous float32 task vectors; not modified.
        weights (`np.ndarray`): N per-input weights (float64), applied to the trimmed values
            before the sign election.
        thr (`np.ndarray`): N float32 trim thresholds; negative keeps everything.
        cut (`np.ndarray`): N int64 tie cut indices of the selections.
        sign_mode (`int`): ``SIGN_TOTAL`` or ``SIGN_FREQUENCY``.
        out (`np.ndarray`): n float32 output; may be a row of ``taus``.
        offset (`int`, *optional*, defaults to 0): flat index of column 0 within the tensor the
            selections were made on, so a tensor can be merged in slices.

    Raises:
        TypeError: if ``taus`` or ``out`` has the wrong dtype or rank.
        ValueError: on mismatched lengths, a non-contiguous array, an unknown ``sign_mode`` or
            a negative ``offset``.
    """
    if not isinstance(taus, np.ndarray) or taus.dtype != np.float32 or taus.ndim != 2:
        raise TypeError("taus must be a 2-D (N, n) float32 numpy array")
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.ndim != 1:
        raise TypeError("out must be a 1-D float32 numpy array")
    if not (taus.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("taus and out must be C-contiguous; use np.ascontiguousarray")
    n_inputs, n = taus.shape
    if out.size != n:
        raise ValueError(f"out has {out.size} entries, taus rows have {n}")
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    thr = np.ascontiguousarray(thr, dtype=np.float32)
    cut = np.ascontiguousarray(cut, dtype=np.int64)
    for name, arr in (("weights", weights), ("thr", thr), ("cut", cut)):
        if arr.shape != (n_inputs,):
            raise ValueError(f"{name} must have shape ({n_inputs},), got {arr.shape}")
    if sign_mode not in (SIGN_TOTAL, SIGN_FREQUENCY):
        raise ValueError(f"sign_mode must be SIGN_TOTAL (0) or SIGN_FREQUENCY (1), got {sign_mode}")
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    keys = np.asarray(threshold_key(thr), dtype=np.int64).reshape(n_inputs)
    _ties_kernel(taus, weights, keys, cut, int(sign_mode), out, offset)
