"""Count, mean and sum of squared deviations of a stream of tensors, for a standard deviation.

Each tensor is cut into fixed chunks; a chunk's mean and squared deviations are computed in
float64 in two passes over the (cached) chunk, and the chunks are merged in order with Chan et
al.'s pairwise update. The result depends on neither the thread count nor the magnitude of the
mean (no sum-of-squares cancellation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

__all__ = ["Moments", "chunk_moments"]

_CHUNK = 1 << 15


@njit(cache=True)
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    if n == 0:
        return n, 0.0, 0.0
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    return n, mean, m2_a + m2_b + delta * delta * (n_a * (n_b / n))


@njit(cache=True, parallel=True, nogil=True)
def chunk_moments(x):
    """``(count, mean, m2, finite)`` of the flat float array ``x`` (m2 = sum of squared
    deviations from the mean); ``finite`` is False when ``x`` holds NaN or Inf."""
    n = x.size
    nch = (n + _CHUNK - 1) // _CHUNK
    means = np.zeros(nch)
    m2s = np.zeros(nch)
    for c in prange(nch):
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        s = 0.0
        for j in range(lo, hi):
            s += np.float64(x[j])
        mean = s / (hi - lo)
        d2 = 0.0
        for j in range(lo, hi):
            d = np.float64(x[j]) - mean
            d2 += d * d
        means[c] = mean
        m2s[c] = d2
    count, mean, m2 = 0, 0.0, 0.0
    for c in range(nch):
        size = min(n, (c + 1) * _CHUNK) - c * _CHUNK
        count, mean, m2 = _merge(count, mean, m2, size, means[c], m2s[c])
    return count, mean, m2, np.isfinite(m2)


@dataclass
class Moments:
    """Running moments over tensors added in a fixed order."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> bool:
        """Add a flat float32/float64 array; returns False (and adds nothing) on NaN/Inf."""
        n, mean, m2, finite = chunk_moments(x)
        if not finite:
            return False
        self.count, self.mean, self.m2 = _merge(self.count, self.mean, self.m2, n, mean, m2)
        return True

    def std(self, ddof: int = 1) -> float:
        """Standard deviation with ``count - ddof`` in the denominator (NaN if not positive)."""
        dof = self.count - ddof
        return math.sqrt(self.m2 / dof) if dof > 0 else math.nan
