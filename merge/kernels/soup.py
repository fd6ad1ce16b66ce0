"""Weighted sum of N same-dtype tensors, decoded and re-encoded chunk by chunk."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .convert import CHUNK, load, store


@njit(cache=True, parallel=True, nogil=True)
def weighted_sum(xs, weights, out, check_finite):
    """``out = sum_i weights[i] * xs[i]`` with a float64 accumulator per entry.

    ``xs`` is a tuple of flat arrays of one storage dtype (bf16 bits, float32, float64);
    ``out`` a flat array of a storage dtype. Returns the position in ``xs`` of the first
    array holding a non-finite value (lowest position over the whole tensor), or -1.
    """
    n = out.size
    nchunks = (n + CHUNK - 1) // CHUNK
    bad = np.full(nchunks, len(xs), np.int64)
    for c in prange(nchunks):
        start = c * CHUNK
        m = min(CHUNK, n - start)
        scratch = np.empty(CHUNK, np.uint32)
        acc = np.zeros(m, np.float64)
        for i in range(len(xs)):
            v = load(xs[i], start, m, scratch)
            w = weights[i]
            for j in range(m):
                acc[j] += w * v[j]
            if check_finite and i < bad[c]:
                for j in range(m):
                    if not np.isfinite(v[j]):
                        bad[c] = i
                        break
        res = np.empty(m, np.float32)
        for j in range(m):
            res[j] = acc[j]
        store(out, start, res)
    first = bad.min() if nchunks else len(xs)
    return -1 if first == len(xs) else first
