"""Task vectors tau_i = theta_i - theta_0, the final theta_0 + s * tau, and L1 norms."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .convert import CHUNK, get, put

WEIGHTS, DELTA, ABSENT = 0, 1, 2  # per-input codes of task_vectors


@njit(cache=True, parallel=True, nogil=True)
def task_vectors(xs, codes, out, check_finite):
    """``out[i-1]`` = tau_i as float32: ``xs[i] - xs[0]`` where ``codes[i-1] == WEIGHTS``,
    ``xs[i]`` where ``DELTA``, zero where ``ABSENT`` (``xs[i]`` is then not read).

    ``xs`` = the (1 + N, n) matrix of rows base, input_1, ..., input_N, of one storage dtype;
    ``out`` is (N, n) float32. Returns the row of the first input holding NaN/Inf, or -1.
    """
    k = xs.shape[0]
    n = out.shape[1]
    nchunks = (n + CHUNK - 1) // CHUNK
    bad = np.full(nchunks, k, np.int64)
    for c in prange(nchunks):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        if check_finite:
            for j in range(lo, hi):
                if not np.isfinite(get(xs[0], j)):
                    bad[c] = 0
        for i in range(1, k):  # row by row: contiguous, vectorisable inner loops
            code = codes[i - 1]
            row = out[i - 1]
            if code == ABSENT:
                row[lo:hi] = 0.0
                continue
            x = xs[i]
            if code == DELTA:
                for j in range(lo, hi):
                    row[j] = get(x, j)
            else:
                for j in range(lo, hi):
                    row[j] = np.float64(get(x, j)) - np.float64(get(xs[0], j))
            if check_finite and i < bad[c]:
                for j in range(lo, hi):
                    if not np.isfinite(get(x, j)):
                        bad[c] = i
                        break
    first = bad.min() if nchunks else k
    return -1 if first == k else first


@njit(cache=True, parallel=True, nogil=True)
def add_scaled(base, tau, scale, out):
    """``out = base + scale * tau`` in float64, rounded to ``out``'s dtype (bf16 via float32)."""
    for j in prange(out.size):
        put(out, j, np.float64(get(base, j)) + scale * np.float64(tau[j]))


@njit(cache=True, parallel=True, nogil=True)
def l1_norm(x):
    """sum |x| in float64, summed per fixed chunk then in chunk order (thread-independent)."""
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    partial = np.zeros(nchunks, np.float64)
    for c in prange(nchunks):
        s = 0.0
        for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            s += abs(np.float64(x[j]))
        partial[c] = s
    total = 0.0
    for c in range(nchunks):
        total += partial[c]
    return total
