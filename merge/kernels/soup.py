"""Weighted sum of N same-dtype tensors, decoded and re-encoded element by element."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .convert import CHUNK, get, put


@njit(cache=True, parallel=True, nogil=True)
def weighted_sum(xs, weights, out, check_finite):
    """``out = sum_i weights[i] * xs[i]``, accumulated in float64 and rounded to the storage
    dtype of ``out`` (bf16 via float32).

    ``xs`` is a tuple of flat arrays of one storage dtype (bf16 bits, float32, float64).
    Returns the position in ``xs`` of the first array holding a non-finite value (the lowest
    position over the whole tensor, so independent of threads), or -1.
    """
    n = out.size
    k = len(xs)
    nchunks = (n + CHUNK - 1) // CHUNK
    bad = np.full(nchunks, k, np.int64)
    for c in prange(nchunks):
        for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            acc = 0.0
            for i in range(k):
                acc += weights[i] * get(xs[i], j)
            # any NaN/Inf input makes acc non-finite (0 * Inf is NaN): find it only then
            if check_finite and not np.isfinite(acc):
                for i in range(bad[c]):
                    if not np.isfinite(get(xs[i], j)):
                        bad[c] = i
                        break
            put(out, j, acc)
    first = bad.min() if nchunks else k
    return -1 if first == k else first
