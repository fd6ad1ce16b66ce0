"""Kernels of ComPEFT's passes over an update ``tau`` (``finetuned - base``, or a task vector /
adapter minus its baseline), computed element by element from the inputs' storage arrays.

Pass 1 (:class:`FirstPass`) sweeps the inputs once and gathers, without writing ``tau``:

- the moments (count, mean, sum of squared deviations) for sigma: per chunk of ``_CHUNK``
  entries in float64, values shifted by the chunk's first value (no sum-of-squares
  cancellation); chunks and tensors are merged in order with Chan et al.'s pairwise update;
- the histogram of the high 16 bits of ``|tau|`` (pass 1 of
  :class:`~merge.kernels.select.GlobalTopK`);
- the histograms of the low 16 bits inside a window of high-bit bins around a predicted
  threshold: when the threshold's bin falls in it, pass 2 of ``GlobalTopK`` is not needed.

Histograms are integer counts kept per thread and summed once, moments are merged in a fixed
order: no result depends on the thread count. :func:`residual` writes ``tau`` for pass 2;
:func:`merge.kernels.convert.copy_finite` copies a base before an update is added to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from .positions import value_at

__all__ = ["FirstPass", "Moments", "residual"]

_CHUNK = 1 << 14
_ABS = np.uint32(0x7FFFFFFF)
_HI_BINS = 1 << 15  # the sign bit is clear
_LO_BINS = 1 << 16
_PARALLEL_MIN = 1 << 17  # below this, loops run serially (same results, no thread wake-ups)


@njit(cache=True)
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    if n == 0:
        return n, 0.0, 0.0
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * (n_b / n))


@njit(inline="always")
def _count(x, t, lane, lo_bin, high, window):
    """Count ``|x|`` into thread ``t``'s histograms (lane ``lane`` of the high one)."""
    a = x.view(np.uint32) & _ABS
    h = a >> np.uint32(16)
    high[t, lane, h] += 1
    w = np.int64(h) - lo_bin
    if np.uint64(w) < np.uint64(window.shape[1]):  # 0 <= w < width in one test
        window[t, w, a & np.uint32(0xFFFF)] += 1


@njit(inline="always")
def _sweep(ft, base, baseline, lo_bin, high, window, means, m2s, c, t):
    """Chunk ``c`` of pass 1, counted into thread ``t``'s histograms. Four lanes (entries
    ``j % 4``) of accumulators and of high-bit counts break the dependency chains (runs of
    equal values are common); lanes are summed in a fixed order."""
    n = ft.size
    lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
    shift = np.float64(value_at(ft, base, baseline, lo))
    s0 = s1 = s2 = s3 = q0 = q1 = q2 = q3 = 0.0
    j = lo
    while j + 4 <= hi:
        x0 = value_at(ft, base, baseline, j)
        x1 = value_at(ft, base, baseline, j + 1)
        x2 = value_at(ft, base, baseline, j + 2)
        x3 = value_at(ft, base, baseline, j + 3)
        _count(x0, t, 0, lo_bin, high, window)
        _count(x1, t, 1, lo_bin, high, window)
        _count(x2, t, 2, lo_bin, high, window)
        _count(x3, t, 3, lo_bin, high, window)
        d0 = np.float64(x0) - shift
        d1 = np.float64(x1) - shift
        d2 = np.float64(x2) - shift
        d3 = np.float64(x3) - shift
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
        x0 = value_at(ft, base, baseline, j)
        _count(x0, t, 0, lo_bin, high, window)
        d0 = np.float64(x0) - shift
        s0 += d0
        q0 += d0 * d0
        j += 1
    st = (s0 + s1) + (s2 + s3)
    m2 = (q0 + q1) + (q2 + q3) - st * st / (hi - lo)
    means[c] = shift + st / (hi - lo)
    m2s[c] = m2 if m2 >= 0.0 or m2 != m2 else 0.0  # rounding below 0; NaN stays NaN


@njit(cache=True, parallel=True, nogil=True)
def _first_pass(ft, base, baseline, lo_bin, high, window):
    n = ft.size
    nch = (n + _CHUNK - 1) // _CHUNK
    means = np.zeros(nch)
    m2s = np.zeros(nch)
    if n < _PARALLEL_MIN:
        for c in range(nch):
            _sweep(ft, base, baseline, lo_bin, high, window, means, m2s, c, 0)
    else:
        for c in prange(nch):
            t = numba.get_thread_id()
            _sweep(ft, base, baseline, lo_bin, high, window, means, m2s, c, t)
    count, mean, m2 = 0, 0.0, 0.0
    for c in range(nch):
        size = min(n, (c + 1) * _CHUNK) - c * _CHUNK
        count, mean, m2 = _merge(count, mean, m2, size, means[c], m2s[c])
    return count, mean, m2, np.isfinite(m2)


class FirstPass:
    """Pass 1 over the tensors of an update, in stream order.

    Args:
        lo: first high-bit bin of the window (``width`` bins) whose low-bits histograms are
            gathered; ``width=0`` gathers none.

    Memory: ``threads * (1 MiB + width * 512 KiB)`` of per-thread counts.
    """

    def __init__(self, lo: int = 0, width: int = 0):
        self.lo = lo
        self.width = width
        nt = numba.get_num_threads()
        self._high = np.zeros((nt, 4, _HI_BINS), np.int64)
        self._window = np.zeros((nt, width, _LO_BINS), np.int64)
        self.sizes: list[int] = []

    @classmethod
    def around(cls, lo: int, mid: int, hi: int, budget: int) -> FirstPass:
        """A window over bins ``lo..hi``, or as many as ``budget`` bytes of counts allow,
        centred on ``mid`` (at least 4 bins)."""
        width = min(hi - lo + 1, max(4, budget // (numba.get_num_threads() * _LO_BINS * 8)))
        return cls(max(lo, min(mid - width // 2, hi + 1 - width)), width)

    def add(
        self, ft: np.ndarray, base: np.ndarray | None = None, baseline: float = 0.0
    ) -> tuple[int, float, float, bool]:
        """Add one tensor: ``tau = ft - base`` (flat arrays of one storage dtype) or, without
        ``base``, ``tau = ft - baseline``. Returns ``(count, mean, m2, finite)`` of ``tau``.

        Raises:
            RuntimeError: numba's thread count grew since construction.
        """
        if numba.get_num_threads() > self._high.shape[0]:
            raise RuntimeError("numba's thread count grew during pass 1")
        base = ft[:0] if base is None else base
        self.sizes.append(ft.size)
        return _first_pass(ft, base, float(baseline), np.int64(self.lo), self._high, self._window)

    def high(self) -> np.ndarray:
        """The histogram of the high 16 bits of ``|tau|`` (int64, ``2**15`` bins)."""
        return self._high.sum(axis=(0, 1))

    def low(self, high: int) -> np.ndarray | None:
        """The low-bits histogram of bin ``high``, or None when it is outside the window."""
        if not self.lo <= high < self.lo + self.width:
            return None
        return self._window[:, high - self.lo].sum(axis=0)


@njit(cache=True, parallel=True, nogil=True)
def residual(base, ft, out):
    """``out = ft - base`` (float64 difference rounded to float32, as ``task_vectors``) for
    flat arrays of one storage dtype."""
    n = out.size
    if n < _PARALLEL_MIN:
        for j in range(n):
            out[j] = value_at(ft, base, 0.0, j)
        return
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            out[j] = value_at(ft, base, 0.0, j)


@dataclass
class Moments:
    """Running moments over tensors added in a fixed order."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, count: int, mean: float, m2: float) -> None:
        """Merge the moments of the next tensor (as ``FirstPass.add`` returns them)."""
        self.count, self.mean, self.m2 = _merge(self.count, self.mean, self.m2, count, mean, m2)

    def std(self, ddof: int = 1) -> float:
        """Standard deviation with ``count - ddof`` in the denominator (NaN if not positive)."""
        dof = self.count - ddof
        return math.sqrt(self.m2 / dof) if dof > 0 else math.nan
