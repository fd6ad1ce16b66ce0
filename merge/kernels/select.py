"""Exact top-k magnitude selection by radix select on float32 bit patterns (no sort).

A selection of the ``k`` entries of largest magnitude in a flat float32 array ``x`` is the pair
``(thr, cut)``: ``thr`` a non-negative float32 magnitude and ``cut`` an int64 flat index. Entry
``i`` is kept iff::

    |x[i]| > thr  or  (|x[i]| == thr and i < cut)

so ties at the threshold magnitude are broken by keeping the lowest flat indices first; the kept
set equals the first ``k`` entries of ``np.argsort(-np.abs(x), kind="stable")``. Conventions:

- ``k == 0`` gives ``(inf, 0)``: nothing is kept.
- ``cut == n`` (the size of the array) whenever every entry tied at ``thr`` is kept, and
  ``cut == 0`` whenever none is; so ``k == n`` keeps everything.
- A negative ``thr`` (``THR_KEEP_ALL``, -1.0) keeps every entry whatever ``cut`` is.
- Magnitudes are compared on the float bits with the sign cleared (``bits & 0x7FFFFFFF``): for
  non-negative floats the unsigned bit order is the numeric order, and -0.0 and 0.0 are the
  same magnitude. NaN never reaches these kernels; if one does, nothing crashes and it ranks as
  larger than inf.

Algorithm (O(n)): histogram the high 16 bits of the magnitude bits (2**15 bins, since the sign
bit is clear), find the bin holding the k-th largest, histogram the low 16 bits of the entries in
that bin, which gives the exact threshold, then scan for the cut index. Counts are integers, so
results do not depend on the thread count.

``GlobalTopK`` does the same over a whole model streamed tensor by tensor, in three passes.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

__all__ = [
    "THR_KEEP_ALL",
    "THR_KEEP_NONE",
    "GlobalTopK",
    "apply_selection",
    "count_for_density",
    "count_kept",
    "kept_mask",
    "threshold_key",
    "topk_threshold",
]

THR_KEEP_ALL = np.float32(-1.0)
"""Threshold that keeps every entry (any negative threshold does)."""
THR_KEEP_NONE = np.float32(np.inf)
"""Threshold that, with ``cut = 0``, keeps nothing (the ``k == 0`` selection)."""

_ABS = np.uint32(0x7FFFFFFF)
_SHIFT = np.uint32(16)
_LOW = np.uint32(0xFFFF)
_HI_BINS = 1 << 15  # high 16 bits of a magnitude: the sign bit is clear
_LO_BINS = 1 << 16
_CHUNK = 1 << 16  # fixed work unit of the parallel loops
_PARALLEL_MIN = 1 << 17  # below this, loops run serially (same results, less overhead)
_KEY_INF = 0x7F800000


# ---------------------------------------------------------------------------------------------
# Jitted building blocks


@njit(cache=True)
def _kept(xbits: np.uint32, index: int, key: int, cut: int) -> bool:
    """Keep test on raw float bits against a threshold key (see ``threshold_key``)."""
    a = np.int64(xbits & _ABS)
    return a > key or (a == key and index < cut)


@njit(cache=True, parallel=True, nogil=True)
def _hist_high(x: np.ndarray, hist: np.ndarray, nt: int) -> None:
    """Add the histogram of the high 16 magnitude bits of ``x`` into ``hist`` (int64[2**15]).

    ``nt`` is ``numba.get_num_threads()`` read by the caller (calling it in here would make the
    function uncacheable); it sizes the per-thread histograms, which are summed exactly.
    """
    xb = x.view(np.uint32)
    n = xb.size
    if n < _PARALLEL_MIN:
        for j in range(n):
            hist[(xb[j] & _ABS) >> _SHIFT] += 1
        return
    local = np.zeros((nt, _HI_BINS), np.int64)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        t = numba.get_thread_id()
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            local[t, (xb[j] & _ABS) >> _SHIFT] += 1
    for t in range(nt):
        for b in range(_HI_BINS):
            hist[b] += local[t, b]


@njit(cache=True, parallel=True, nogil=True)
def _hist_low(x: np.ndarray, high: int, hist: np.ndarray, nt: int) -> None:
    """Add the histogram of the low 16 bits of the magnitudes whose high 16 bits equal ``high``."""
    xb = x.view(np.uint32)
    n = xb.size
    hi = np.uint32(high)
    if n < _PARALLEL_MIN:
        for j in range(n):
            a = xb[j] & _ABS
            if (a >> _SHIFT) == hi:
                hist[a & _LOW] += 1
        return
    local = np.zeros((nt, _LO_BINS), np.int64)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        t = numba.get_thread_id()
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            a = xb[j] & _ABS
            if (a >> _SHIFT) == hi:
                local[t, a & _LOW] += 1
    for t in range(nt):
        for b in range(_LO_BINS):
            hist[b] += local[t, b]


@njit(cache=True)
def _find_rank(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest (k >= 1) and the rank ``r >= 1`` inside it; (-1, 0) if none."""
    above = 0
    for b in range(hist.size - 1, -1, -1):
        c = hist[b]
        if above + c >= k:
            return b, k - above
        above += c
    return -1, 0


@njit(cache=True, parallel=True, nogil=True)
def _tie_cut(x: np.ndarray, tbits: int, quota: int) -> tuple[int, int]:
    """Cut that keeps the first ``quota`` entries of magnitude bits ``tbits``; returns (cut, used).

    ``cut == x.size`` when the quota covers every such entry, ``cut == 0`` when ``quota <= 0``.
    """
    n = x.size
    if quota <= 0:
        return 0, 0
    xb = x.view(np.uint32)
    tb = np.uint32(tbits)
    nch = (n + _CHUNK - 1) // _CHUNK
    counts = np.zeros(nch, np.int64)
    if n < _PARALLEL_MIN:
        for c in range(nch):
            m = 0
            for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
                if (xb[j] & _ABS) == tb:
                    m += 1
            counts[c] = m
    else:
        for c in prange(nch):
            m = 0
            for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
                if (xb[j] & _ABS) == tb:
                    m += 1
            counts[c] = m
    total = 0
    for c in range(nch):
        total += counts[c]
    if total <= quota:
        return n, total
    used = 0
    for c in range(nch):
        if used + counts[c] >= quota:
            for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
                if (xb[j] & _ABS) == tb:
                    used += 1
                    if used == quota:
                        return j + 1, used
        used += counts[c]
    return n, used  # unreachable


@njit(cache=True, parallel=True, nogil=True)
def _apply(x: np.ndarray, key: int, cut: int, offset: int, out: np.ndarray) -> None:
    xb = x.view(np.uint32)
    n = x.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            out[j] = x[j] if _kept(xb[j], offset + j, key, cut) else np.float32(0.0)


@njit(cache=True)
def _mask(x: np.ndarray, key: int, cut: int, offset: int, out: np.ndarray) -> None:
    xb = x.view(np.uint32)
    for j in range(x.size):
        out[j] = _kept(xb[j], offset + j, key, cut)


# ---------------------------------------------------------------------------------------------
# Python API


def _check_flat(x: np.ndarray, name: str = "x") -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1:
        raise TypeError(f"{name} must be a 1-D float32 numpy array, got {_describe(x)}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous; pass np.ascontiguousarray({name})")


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"ndarray(dtype={x.dtype}, shape={x.shape})"
    return type(x).__name__


def _bits_to_float(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


def _check_offset(offset: int) -> int:
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return offset


def count_for_density(density: float, n: int) -> int:
    """Number of entries kept at ``density`` out of ``n``: ``round(density * n)``.

    ``round`` is Python's (half to even on the float64 product), clamped to ``[0, n]``.

    Raises:
        ValueError: if ``density`` is not in (0, 1] or ``n < 0``.
    """
    density = float(density)
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return min(int(n), max(0, round(density * n)))


def threshold_key(thr: float | np.ndarray) -> int | np.ndarray:
    """Integer key of a threshold, as the jitted keep test compares it to magnitude bits.

    A non-negative ``thr`` (-0.0 included) maps to its magnitude bits; a negative one maps to -1,
    which every entry exceeds (keep all). Accepts a scalar (returns ``int``) or an array (returns
    int64 array of the same shape).
    """
    t = np.asarray(thr, dtype=np.float32)
    bits = t.view(np.uint32).astype(np.int64)
    mag = bits & 0x7FFFFFFF
    negative = (bits != mag) & (mag != 0) & (mag <= _KEY_INF)
    key = np.where(negative, np.int64(-1), mag)
    return int(key) if key.ndim == 0 else key


def topk_threshold(x: np.ndarray, k: int) -> tuple[np.float32, int]:
    """Exact selection of the ``k`` entries of ``x`` with the largest magnitude.

    Ties at the threshold magnitude keep the lowest flat indices first, so exactly ``k`` entries
    are kept (see the module docstring for the keep rule and the ``k == 0`` / ``k == n`` forms).

    Args:
        x (`np.ndarray`): flat contiguous float32 array; not modified.
        k (`int`): number of entries to keep, ``0 <= k <= x.size``.

    Returns:
        `(thr, cut)`: ``thr`` the k-th largest magnitude (float32), ``cut`` the tie cut index.

    Raises:
        TypeError: if ``x`` is not a 1-D float32 array.
        ValueError: if ``k`` is out of range or ``x`` is not contiguous.
    """
    _check_flat(x)
    k = int(k)
    if not 0 <= k <= x.size:
        raise ValueError(f"k must be in [0, {x.size}], got {k}")
    if k == 0:
        return THR_KEEP_NONE, 0
    nt = numba.get_num_threads()
    hist_hi = np.zeros(_HI_BINS, np.int64)
    _hist_high(x, hist_hi, nt)
    high, r = (int(v) for v in _find_rank(hist_hi, k))
    hist_lo = np.zeros(_LO_BINS, np.int64)
    _hist_low(x, high, hist_lo, nt)
    low, r2 = (int(v) for v in _find_rank(hist_lo, r))
    tbits = (high << 16) | low
    if r2 == hist_lo[low]:
        return _bits_to_float(tbits), x.size  # every tie kept
    cut, _ = _tie_cut(x, tbits, r2)
    return _bits_to_float(tbits), int(cut)


def apply_selection(
    x: np.ndarray, thr: float, cut: int, out: np.ndarray, *, offset: int = 0
) -> None:
    """Write ``x`` into ``out`` with every entry not kept by ``(thr, cut)`` set to 0.

    ``offset`` is the flat index of ``x[0]`` within the tensor the selection was made on, so a
    tensor can be processed in slices. ``out`` may be ``x`` itself.
    """
    _check_flat(x)
    _check_flat(out, "out")
    if out.size != x.size:
        raise ValueError(f"out has {out.size} entries, x has {x.size}")
    _apply(x, threshold_key(thr), int(cut), _check_offset(offset), out)


def kept_mask(x: np.ndarray, thr: float, cut: int, *, offset: int = 0) -> np.ndarray:
    """Boolean array, True where ``(thr, cut)`` keeps the entry of ``x`` (``offset`` as above)."""
    _check_flat(x)
    out = np.empty(x.size, np.bool_)
    _mask(x, threshold_key(thr), int(cut), _check_offset(offset), out)
    return out


def count_kept(x: np.ndarray, thr: float, cut: int, *, offset: int = 0) -> int:
    """Number of entries of ``x`` kept by ``(thr, cut)`` (``offset`` as in ``apply_selection``)."""
    return int(np.count_nonzero(kept_mask(x, thr, cut, offset=offset)))


class GlobalTopK:
    """Exact top-k by magnitude over a whole model that is streamed tensor by tensor.

    Exactly ``total_k`` entries are kept over all tensors; ties at the threshold magnitude keep
    earlier tensors (in streaming order) first, then lower flat indices: the kept set equals the
    stable top-k of the concatenation of the tensors in streaming order.

    Use, with the same tensors in the same order in every pass::

        g = GlobalTopK(total_k)            # or GlobalTopK(density=0.2)
        for x in tensors: g.add_high(x)    # pass 1: histogram of the high 16 bits
        g.finish_high()
        for x in tensors: g.add_low(x)     # pass 2: optional when g.needs_low_pass is False
        g.finish_low()
        for x in tensors:                  # pass 3: per tensor selection, tie quota consumed
            thr, cut = g.selection(x)
            apply_selection(x, thr, cut, out)
        g.finish_selection()               # checks every tensor was seen and the quota is spent

    State (all public, read-only for callers):
        total_k: entries to keep (``None`` until ``finish_high`` when built from a density).
        density: the density given instead of ``total_k``, else ``None``.
        phase: ``"high"`` -> ``"low"`` -> ``"select"`` -> ``"done"``.
        sizes: tensor sizes seen in pass 1; passes 2 and 3 must match them in order.
        position: index of the next tensor expected in pass 2 or 3.
        n_total: number of entries seen in pass 1.
        hist_high: int64[2**15] histogram of the high 16 magnitude bits (pass 1).
        high: the high 16 bits of the threshold magnitude (-1 when ``total_k == 0``).
        rank_in_high: entries still to keep from bin ``high`` after all larger bins.
        needs_low_pass: False when every entry of bin ``high`` is kept (then the threshold is the
            bin's lower edge and pass 2 is skipped) or ``total_k == 0``.
        hist_low: int64[2**16] histogram of the low 16 bits of bin ``high`` (pass 2).
        thr: float32 threshold magnitude (set by ``finish_low``).
        tie_quota: entries of magnitude exactly ``thr`` still to keep in pass 3; ``None`` means
            all of them are kept.
    """

    def __init__(self, total_k: int | None = None, *, density: float | None = None) -> None:
        if (total_k is None) == (density is None):
            raise ValueError("give exactly one of total_k and density")
        if total_k is not None:
            total_k = int(total_k)
            if total_k < 0:
                raise ValueError(f"total_k must be >= 0, got {total_k}")
        if density is not None:
            count_for_density(density, 0)  # validates the range
            density = float(density)
        self.total_k: int | None = total_k
        self.density: float | None = density
        self.phase = "high"
        self.sizes: list[int] = []
        self.position = 0
        self.n_total = 0
        self.hist_high = np.zeros(_HI_BINS, np.int64)
        self.high = -1
        self.rank_in_high = 0
        self.needs_low_pass = False
        self.hist_low = np.zeros(_LO_BINS, np.int64)
        self.thr = THR_KEEP_NONE
        self.tie_quota: int | None = 0

    def _expect(self, phase: str, what: str) -> None:
        if self.phase != phase:
            raise RuntimeError(f"{what} called in phase {self.phase!r}, expected {phase!r}")

    def _next_tensor(self, x: np.ndarray) -> None:
        _check_flat(x)
        if self.position >= len(self.sizes):
            raise RuntimeError(f"more tensors than the {len(self.sizes)} seen in pass 1")
        if x.size != self.sizes[self.position]:
            raise RuntimeError(
                f"tensor {self.position} has {x.size} entries, pass 1 saw "
                f"{self.sizes[self.position]}: stream the tensors in the same order in every pass"
            )
        self.position += 1

    def add_high(self, x: np.ndarray) -> None:
        """Pass 1: add the next tensor to the high-bits histogram."""
        self._expect("high", "add_high")
        _check_flat(x)
        _hist_high(x, self.hist_high, numba.get_num_threads())
        self.sizes.append(x.size)
        self.n_total += x.size

    def finish_high(self) -> None:
        """End pass 1: pick the bin of the threshold (and ``total_k`` from a density).

        Raises:
            ValueError: if ``total_k`` exceeds the number of entries seen.
        """
        self._expect("high", "finish_high")
        if self.total_k is None:
            self.total_k = count_for_density(self.density, self.n_total)
        if self.total_k > self.n_total:
            raise ValueError(f"total_k={self.total_k} exceeds the {self.n_total} entries seen")
        self.phase = "low"
        self.position = 0
        if self.total_k == 0:
            return
        self.high, self.rank_in_high = (int(v) for v in _find_rank(self.hist_high, self.total_k))
        self.needs_low_pass = bool(self.rank_in_high < self.hist_high[self.high])

    def add_low(self, x: np.ndarray) -> None:
        """Pass 2: add the next tensor's entries in the threshold bin to the low-bits histogram."""
        self._expect("low", "add_low")
        if not self.needs_low_pass:
            return
        self._next_tensor(x)
        _hist_low(x, self.high, self.hist_low, numba.get_num_threads())

    def finish_low(self) -> None:
        """End pass 2: fix the threshold magnitude and the tie quota."""
        self._expect("low", "finish_low")
        if self.needs_low_pass and self.position != len(self.sizes):
            raise RuntimeError(f"pass 2 saw {self.position} of {len(self.sizes)} tensors")
        self.phase = "select"
        self.position = 0
        if self.total_k == 0:
            self.thr, self.tie_quota = THR_KEEP_NONE, 0
        elif not self.needs_low_pass:
            # Every entry of bin `high` is kept: threshold at the bin's lower edge, all ties kept.
            self.thr, self.tie_quota = _bits_to_float(self.high << 16), None
        else:
            low, r2 = (int(v) for v in _find_rank(self.hist_low, self.rank_in_high))
            self.thr = _bits_to_float((self.high << 16) | low)
            self.tie_quota = None if r2 == self.hist_low[low] else r2

    def selection(self, x: np.ndarray) -> tuple[np.float32, int]:
        """Pass 3: ``(thr, cut)`` for the next tensor, consuming the tie quota in stream order."""
        self._expect("select", "selection")
        self._next_tensor(x)
        if self.tie_quota is None:
            return self.thr, x.size
        if self.tie_quota == 0:
            return self.thr, 0
        cut, used = _tie_cut(x, int(threshold_key(self.thr)), self.tie_quota)
        self.tie_quota -= int(used)
        return self.thr, int(cut)

    def finish_selection(self) -> None:
        """End pass 3: check every tensor was selected and the tie quota is spent."""
        self._expect("select", "finish_selection")
        if self.position != len(self.sizes):
            raise RuntimeError(f"pass 3 saw {self.position} of {len(self.sizes)} tensors")
        if self.tie_quota not in (None, 0):
            raise RuntimeError(f"{self.tie_quota} tied entries were not found in pass 3")
        self.phase = "done"
