"""Weighted sum of rows of one matrix, decoded and re-encoded chunk by chunk."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .convert import CHUNK, get, put


@njit(cache=True, parallel=True, nogil=True)
def weighted_rows(matrix, rows, weights, out, check_finite):
    """``out = sum_k weights[k] * matrix[rows[k]]``, accumulated in float64 per fixed chunk
    (row by row, so the inner loops are contiguous) and rounded to ``out``'s storage dtype.

    ``matrix`` is (n_sources, n) of one storage dtype; one compiled kernel serves any number
    of rows. Returns the first ``rows[k]`` (lowest k) whose row holds NaN/Inf, or -1.
    """
    n = out.size
    k = rows.size
    nchunks = (n + CHUNK - 1) // CHUNK
    bad = np.full(nchunks, k, np.int64)
    for c in prange(nchunks):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        acc = np.zeros(hi - lo, np.float64)
        for r in range(k):
            x = matrix[rows[r]]
            w = weights[r]
            for j in range(lo, hi):
                acc[j - lo] += w * get(x, j)
        if check_finite:  # any NaN/Inf input makes acc non-finite (0 * Inf is NaN)
            for j in range(lo, hi):
                if not np.isfinite(acc[j - lo]):
                    for r in range(k):
                        if not np.isfinite(get(matrix[rows[r]], j)):
                            bad[c] = min(bad[c], r)
                            break
        for j in range(lo, hi):
            put(out, j, acc[j - lo])
    first = bad.min() if nchunks else k
    return -1 if first == k else rows[first]
