"""Kernels of sparse fine-tunes: selected positions, exact deltas, sorted-index set operations,
and the fused decode + exactly rounded scatter-add that composes sparse fine-tunes.

Exact composition: at every position some fine-tune touches, the output is the exact real sum
``start + sum_i s_i * v_i`` rounded once: each product ``s_i * v_i`` is split into exact
float64 partial products (Veltkamp/Dekker), the terms are summed with Shewchuk's algorithm
and rounded correctly to float64 (as CPython's ``math.fsum``), then ``put`` rounds to the
storage dtype (bf16 via float32, as everywhere in adapt). The result depends only on the
multiset of terms, never on their order or grouping. A non-finite term (or an overflowing
sum) falls back to the plain IEEE sum.

Position streams are decoded with the code of :mod:`merge.kernels.positions` (its internals
are imported, not copied): each fine-tune's positions are decoded lazily, merged k-way, and
never materialised.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .convert import get, put
from .positions import (
    _OK,
    _PEEK,
    _advance,
    _check,
    _decode_table,
    _end_status,
    _params,
)
from .select import _kept

__all__ = [
    "add_at",
    "check_status",
    "compose",
    "delta_at",
    "difference",
    "intersect",
    "kept_positions",
    "union",
    "update",
]

_CHUNK = 1 << 16
_SPLIT = 134217729.0  # 2**27 + 1: Veltkamp's splitter for float64
_UNION, _INTERSECT, _DIFFERENCE = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Exact sums


@njit(inline="always")
def _split(a):
    """``a = hi + lo`` exactly, each with at most 26 significant bits."""
    t = _SPLIT * a
    hi = t - (t - a)
    return hi, a - hi


@njit(inline="always")
def _push_product(terms, nt, s_hi, s_lo, v):
    """Append the exact partial products of ``(s_hi + s_lo) * v`` (zeros skipped)."""
    v_hi, v_lo = _split(v)
    for p in (s_hi * v_hi, s_hi * v_lo, s_lo * v_hi, s_lo * v_lo):
        if p != 0.0:
            terms[nt] = p
            nt += 1
    return nt


@njit(inline="always")
def _fsum(terms, n, partials):
    """Correctly rounded float64 sum of ``terms[:n]`` (CPython's ``math.fsum``), or the plain
    sum when that is not finite."""
    if n <= 2:  # IEEE addition is correctly rounded
        return terms[0] + terms[1] if n == 2 else terms[0]
    naive = 0.0
    for k in range(n):
        naive += terms[k]
    if not np.isfinite(naive):
        return naive
    m = 0
    for k in range(n):
        x = terms[k]
        j = 0
        for t in range(m):
            y = partials[t]
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo != 0.0:
                partials[j] = lo
                j += 1
            x = hi
        partials[j] = x
        m = j + 1
    if m == 0:
        return 0.0
    m -= 1
    hi = partials[m]
    lo = 0.0
    while m > 0:
        x = hi
        m -= 1
        y = partials[m]
        hi = x + y
        lo = y - (hi - x)
        if lo != 0.0:
            break
    if m > 0 and ((lo < 0.0 and partials[m - 1] < 0.0) or (lo > 0.0 and partials[m - 1] > 0.0)):
        y = lo * 2.0
        x = hi + y
        if y == x - hi:
            hi = x
    return hi


@njit(cache=True, parallel=True, nogil=True)
def add_at(out, values, scale):
    """``out[i] = round(out[i] + scale * values[i])``, the sum exact and rounded once (as
    :func:`compose`); ``out`` flat of a kernel storage dtype, ``values`` float32/float64."""
    s_hi, s_lo = _split(np.float64(scale))
    for c in prange((out.size + _CHUNK - 1) // _CHUNK):
        terms = np.empty(5, np.float64)
        partials = np.empty(6, np.float64)
        for i in range(c * _CHUNK, min(out.size, (c + 1) * _CHUNK)):
            terms[0] = np.float64(get(out, i))
            nt = _push_product(terms, 1, s_hi, s_lo, np.float64(values[i]))
            put(out, i, _fsum(terms, nt, partials))


# ---------------------------------------------------------------------------------------------
# Fused k-way decode + exact scatter-add


@njit(cache=True, nogil=True)
def compose(out, data, offsets, counts, ms, values, voffsets, scales):
    """Add ``scales[j] * values`` of every stream ``j`` at its coded positions into ``out``.

    Stream ``j``'s position code is ``data[offsets[j]:offsets[j+1]]`` (``counts[j]``
    positions, Golomb parameter ``ms[j]``), its values ``values[voffsets[j]:voffsets[j+1]]``.
    Streams are decoded together in position order; at each touched position the output is
    the exact sum of ``out[p]`` and every stream's scaled value, rounded once.

    Returns ``(status, stream)``: ``status`` 0 when every stream decoded and ended cleanly,
    else a :mod:`merge.kernels.positions` status code of the failing ``stream``.
    """
    k = counts.size
    n = out.size
    tables = np.zeros((k, 1 << _PEEK), np.int64)
    bs = np.zeros(k, np.int64)
    us = np.zeros(k, np.int64)
    state = np.zeros((k, 5), np.int64)  # byte index, accumulator, bits in it, position, decoded
    s_hi = np.zeros(k, np.float64)
    s_lo = np.zeros(k, np.float64)
    for j in range(k):
        bs[j], us[j] = _params(ms[j])
        tables[j] = _decode_table(ms[j])
        s_hi[j], s_lo[j] = _split(np.float64(scales[j]))
        state[j, 3] = -1
    terms = np.empty(1 + 4 * k, np.float64)
    partials = np.empty(2 + 4 * k, np.float64)
    for j in range(k):  # the first position of each stream (n when it is empty)
        if counts[j] == 0:
            state[j, 3] = n
            continue
        d = data[offsets[j] : offsets[j + 1]]
        st, state[j, 0], state[j, 1], state[j, 2], state[j, 3] = _advance(
            d, state[j, 0], state[j, 1], state[j, 2], state[j, 3], tables[j], ms[j], bs[j], us[j], n
        )
        if st != _OK:
            return st, j
        state[j, 4] = 1
    while True:
        q = n
        for j in range(k):
            q = min(q, state[j, 3])
        if q == n:
            break
        terms[0] = np.float64(get(out, q))
        nt = 1
        for j in range(k):
            if state[j, 3] != q:
                continue
            v = np.float64(values[voffsets[j] + state[j, 4] - 1])
            nt = _push_product(terms, nt, s_hi[j], s_lo[j], v)
            if state[j, 4] == counts[j]:
                state[j, 3] = n
                continue
            d = data[offsets[j] : offsets[j + 1]]
            st, state[j, 0], state[j, 1], state[j, 2], state[j, 3] = _advance(
                d, state[j, 0], state[j, 1], state[j, 2], q, tables[j], ms[j], bs[j], us[j], n
            )
            if st != _OK:
                return st, j
            state[j, 4] += 1
        put(out, q, _fsum(terms, nt, partials))
    for j in range(k):
        st = _end_status(data[offsets[j] : offsets[j + 1]], state[j, 0], state[j, 2])
        if st != _OK:
            return st, j
    return _OK, -1


def check_status(status: int) -> None:
    """Raise :class:`~merge.kernels.positions.CodeError` for a failing status of
    :func:`compose`."""
    _check(status)


# ---------------------------------------------------------------------------------------------
# Extraction


@njit(cache=True, parallel=True, nogil=True)
def kept_positions(x, key, cut):
    """Increasing flat positions of the nonzero entries of float32 ``x`` kept by the
    selection ``(key, cut)`` (``key`` from :func:`merge.kernels.select.threshold_key`)."""
    xb = x.view(np.uint32)
    n = x.size
    nch = (n + _CHUNK - 1) // _CHUNK
    counts = np.zeros(nch + 1, np.int64)
    for c in prange(nch):
        s = 0
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            if (xb[j] & np.uint32(0x7FFFFFFF)) != 0 and _kept(xb[j], j, key, cut):
                s += 1
        counts[c + 1] = s
    offsets = np.cumsum(counts)
    out = np.empty(offsets[-1], np.int64)
    for c in prange(nch):
        w = offsets[c]
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            if (xb[j] & np.uint32(0x7FFFFFFF)) != 0 and _kept(xb[j], j, key, cut):
                out[w] = j
                w += 1
    return out


@njit(cache=True, parallel=True, nogil=True)
def update(base, ft, out):
    """``out = float32(ft - base)`` (the float64 difference rounded once) for flat arrays of one
    kernel storage dtype; returns False when an input or the difference is NaN or Inf."""
    n = out.size
    nch = (n + _CHUNK - 1) // _CHUNK
    finite = np.ones(nch, np.bool_)
    for c in prange(nch):
        ok = True
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            d = np.float32(np.float64(get(ft, j)) - np.float64(get(base, j)))
            out[j] = d
            ok &= np.isfinite(d)
        finite[c] = ok
    return finite.all()


@njit(cache=True, parallel=True, nogil=True)
def delta_at(base, ft, positions, out):
    """``out[i] = ft[p] - base[p]`` in float64 at ``p = positions[i]`` (flat arrays of one
    kernel storage dtype)."""
    for i in prange(positions.size):
        p = positions[i]
        out[i] = np.float64(get(ft, p)) - np.float64(get(base, p))


# ---------------------------------------------------------------------------------------------
# Sorted-index set operations


@njit(inline="always")
def _walk(a, alo, ahi, b, blo, bhi, op, out, ia, ib, w, fill):
    """Merge ``a[alo:ahi]`` with ``b[blo:bhi]`` (sorted, distinct) by ``op``; writes from
    ``w`` when ``fill`` and returns the end (the count when ``w == 0`` and not ``fill``)."""
    i, j = alo, blo
    while i < ahi or j < bhi:
        if op == _INTERSECT and (i >= ahi or j >= bhi):
            break
        if op == _DIFFERENCE and i >= ahi:
            break
        if j >= bhi or (i < ahi and a[i] < b[j]):
            if op != _INTERSECT:
                if fill:
                    out[w] = a[i]
                w += 1
            i += 1
        elif i >= ahi or b[j] < a[i]:
            if op == _UNION:
                if fill:
                    out[w] = b[j]
                w += 1
            j += 1
        else:
            if op != _DIFFERENCE:
                if fill:
                    out[w] = a[i]
                    if op == _INTERSECT:
                        ia[w] = i
                        ib[w] = j
                w += 1
            i += 1
            j += 1
    return w


@njit(cache=True, parallel=True, nogil=True)
def _setop(a, b, op):
    """``(result, ia, ib)``: chunks of ``a`` and the matching ranges of ``b`` merged in
    parallel (counted, then filled at prefix-sum offsets: thread-count independent)."""
    nch = (a.size + _CHUNK - 1) // _CHUNK
    lo = np.zeros(nch + 1, np.int64)
    lo[nch] = b.size
    for c in range(1, nch):
        lo[c] = np.searchsorted(b, a[c * _CHUNK])
    no = np.empty(0, np.int64)
    counts = np.zeros(nch + 1, np.int64)
    for c in prange(nch):
        ahi = min(a.size, (c + 1) * _CHUNK)
        counts[c + 1] = _walk(a, c * _CHUNK, ahi, b, lo[c], lo[c + 1], op, no, no, no, 0, False)
    offsets = np.cumsum(counts)
    out = np.empty(offsets[-1], np.int64)
    ia = np.empty(offsets[-1] if op == _INTERSECT else 0, np.int64)
    ib = np.empty(offsets[-1] if op == _INTERSECT else 0, np.int64)
    for c in prange(nch):
        ahi = min(a.size, (c + 1) * _CHUNK)
        _walk(a, c * _CHUNK, ahi, b, lo[c], lo[c + 1], op, out, ia, ib, offsets[c], True)
    return out, ia, ib


def _sorted(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.int64).reshape(-1)


def union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted arrays of distinct int64 positions."""
    a, b = _sorted(a), _sorted(b)
    if a.size == 0:
        return b.copy()
    return _setop(a, b, _UNION)[0]


def intersect(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(common, ia, ib)``: the sorted intersection and its indices in ``a`` and ``b``
    (``a[ia] == b[ib] == common``)."""
    a, b = _sorted(a), _sorted(b)
    if a.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), empty.copy()
    return _setop(a, b, _INTERSECT)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted ``a`` minus ``b`` (both sorted arrays of distinct int64 positions)."""
    a, b = _sorted(a), _sorted(b)
    if a.size == 0:
        return a.copy()
    return _setop(a, b, _DIFFERENCE)[0]
