"""Count, mean and sum of squared deviations of a stream of tensors (for a standard deviation),
and the residual ``finetuned - base`` fused with them.

Each tensor is cut into fixed chunks. A chunk's moments are taken in float64 in one sweep of
values shifted by the chunk's first value (four interleaved accumulators, a fixed order), and
chunks are merged in order with Chan et al.'s pairwise update, so the result depends on neither
the thread count nor the size of the mean (no sum-of-squares cancellation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .convert import get

__all__ = ["Moments", "chunk_moments", "residual"]

_CHUNK = 1 << 14


@njit(cache=True)
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    if n == 0:
        return n, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * (n_b / n))


@njit(inline="always")
def _chunk(x, lo, hi):
    """(mean, m2) of ``x[lo:hi]``: float64, one sweep, values shifted by ``x[lo]``, four
    interleaved accumulators summed in a fixed order."""
    c = np.float64(x[lo])
    s0 = s1 = s2 = s3 = q0 = q1 = q2 = q3 = 0.0
    j = lo
    while j + 4 <= hi:
        d0 = np.float64(x[j]) - c
        d1 = np.float64(x[j + 1]) - c
        d2 = np.float64(x[j + 2]) - c
        d3 = np.float64(x[j + 3]) - c
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
        q0 += d0 * d0
        q1 += d1 * d1
        q2 += d2 * d2
        q3 += d3 * d3
        j += 4
    while j < hi:
        d0 = np.float64(x[j]) - c
        s0 += d0
        q0 += d0 * d0
        j += 1
    n = hi - lo
    s = (s0 + s1) + (s2 + s3)
    m2 = (q0 + q1) + (q2 + q3) - s * s / n
    if m2 < 0.0:  # rounding; NaN stays NaN
        m2 = 0.0
    return c + s / n, m2


@njit(inline="always")
def _combine(n, means, m2s):
    count, mean, m2 = 0, 0.0, 0.0
    for c in range(means.size):
        size = min(n, (c + 1) * _CHUNK) - c * _CHUNK
        count, mean, m2 = _merge(count, mean, m2, size, means[c], m2s[c])
    return count, mean, m2, np.isfinite(m2)


@njit(cache=True, parallel=True, nogil=True)
def chunk_moments(x):
    """``(count, mean, m2, finite)`` of the flat float array ``x`` (m2 = sum of squared
    deviations from the mean); ``finite`` is False when ``x`` holds NaN or Inf."""
    n = x.size
    nch = (n + _CHUNK - 1) // _CHUNK
    means = np.zeros(nch)
    m2s = np.zeros(nch)
    for c in prange(nch):
        means[c], m2s[c] = _chunk(x, c * _CHUNK, min(n, (c + 1) * _CHUNK))
    return _combine(n, means, m2s)


@njit(cache=True, parallel=True, nogil=True)
def residual(base, ft, out, moments):
    """``out = ft - base`` (float64 difference rounded to float32, as ``task_vectors``) for
    flat arrays of one storage dtype; with ``moments``, also ``chunk_moments(out)`` from the
    same sweep (else zeros and ``finite`` True)."""
    n = out.size
    nch = (n + _CHUNK - 1) // _CHUNK
    means = np.zeros(nch if moments else 0)
    m2s = np.zeros(nch if moments else 0)
    for c in prange(nch):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        for j in range(lo, hi):
            out[j] = np.float32(np.float64(get(ft, j)) - np.float64(get(base, j)))
        if moments:
            means[c], m2s[c] = _chunk(out, lo, hi)
    if not moments:
        return 0, 0.0, 0.0, True
    return _combine(n, means, m2s)


@dataclass
class Moments:
    """Running moments over tensors added in a fixed order."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, count: int, mean: float, m2: float) -> None:
        """Merge the moments of the next tensor (as ``chunk_moments`` returns them)."""
        self.count, self.mean, self.m2 = _merge(self.count, self.mean, self.m2, count, mean, m2)

    def std(self, ddof: int = 1) -> float:
        """Standard deviation with ``count - ddof`` in the denominator (NaN if not positive)."""
        dof = self.count - ddof
        return math.sqrt(self.m2 / dof) if dof > 0 else math.nan
