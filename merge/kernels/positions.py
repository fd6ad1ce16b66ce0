"""The position code: sorted flat positions as Golomb-coded gaps, plus packed sign bits.

A set of ``k`` distinct flat positions ``0 <= p_0 < ... < p_{k-1} < n`` is coded as its gaps
``g_0 = p_0``, ``g_i = p_i - p_{i-1} - 1``, each with the Golomb code of parameter ``m``:

- the quotient ``q = g // m`` in unary: ``q`` one-bits, then a zero-bit;
- the remainder ``r = g % m`` in ``b - 1`` or ``b`` bits, ``b = ceil(log2 m)`` (none when
  ``m == 1``): with ``u = 2**b - m``, ``r < u`` is written as a ``(b-1)``-bit integer; otherwise
  ``t = r - u`` is written as the ``(b-1)``-bit integer ``u + t // 2`` followed by the bit
  ``t % 2`` (a truncated binary code: the same lengths as the textbook one).

Bits are packed least significant bit first: bit ``j`` of the stream is bit ``j % 8`` of byte
``j // 8``; integers are written least significant bit first; the last byte is zero-padded.
Sign bits are packed the same way, one per coded position (1 = negative).

``m`` is chosen per tensor from its density ``p = k / n`` (:func:`golomb_parameter`): for gaps
that are geometric with parameter ``p`` (the positions of a top-k of i.i.d. values) this is the
optimal prefix code (Gallager and Van Voorhis, 1975), within 1-2 % of the binary entropy H(p)
per entry at 5-20 % density. Its cost is about ``n/m + k (1 + log2 m)`` bits however the
positions cluster, because the unary parts sum to at most ``n / m``.

Codes of short gaps come from tables built per ``m`` (12-bit windows for the decoder).
Decoding is sequential per tensor and O(k); every decoder checks the stream: a truncated
stream, a position past ``n`` and trailing or non-zero padding bits are reported as errors.
Coding a selection runs per chunk of ``_CHUNK`` entries in parallel, each chunk's bit string
then stitched onto the previous ones: the bytes of the sequential code, for any thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from .convert import get, put
from .select import _kept, threshold_key

__all__ = [
    "MAX_M",
    "CodeError",
    "count_selected",
    "decode_positions",
    "encode_difference",
    "encode_positions",
    "encode_selection",
    "golomb_parameter",
    "pack_bits",
    "scatter_add_ternary",
    "scatter_ternary",
    "unpack_bits",
]

MAX_M = 1 << 48
"""Largest Golomb parameter: remainders then fit in one 56-bit refill of the bit reader."""

_OK, _TRUNCATED, _RANGE, _TRAILING, _UNSORTED = 0, 1, 2, 3, 4
_MESSAGES = {
    _TRUNCATED: "the position code ends early (truncated or corrupt payload)",
    _RANGE: "a decoded position is past the end of the tensor (corrupt payload)",
    _TRAILING: "the position code has trailing bytes or non-zero padding (corrupt payload)",
    _UNSORTED: "positions must be sorted, distinct and within [0, n)",
}
_UNARY_STEP = 48  # unary runs are written in pieces of at most this many one-bits
_TABLE = 4096  # gaps below this are coded by table lookup
_PEEK = 12  # the decoder looks codes up in windows of this many bits
_CHUNK = 1 << 16
_NO_SIGNS = np.zeros(0, np.uint8)
_NO_POSITIONS = np.zeros(0, np.int64)
_NO_OUT = np.zeros(0, np.float32)


class CodeError(ValueError):
    """Raised when a position code or sign payload is malformed."""


def _check(status: int) -> None:
    if status != _OK:
        raise CodeError(_MESSAGES[int(status)])


def golomb_parameter(count: int, n: int) -> int:
    """The Golomb parameter for ``count`` positions among ``n``: ``ceil(log(2-p) / -log(1-p))``
    with ``p = count / n`` (1 when ``p >= (3 - sqrt 5) / 2`` or ``count == 0``), at most
    ``MAX_M``."""
    if count <= 0 or n <= 0 or count >= n:
        return 1
    p = count / n
    m = math.ceil(math.log(2.0 - p) / -math.log1p(-p))
    return int(min(max(m, 1), MAX_M))


def _bound_bytes(count: int, n: int, m: int) -> int:
    """Upper bound of the code length in bytes: sum q <= (n - count) / m."""
    b = (m - 1).bit_length()
    return ((n - count) // m + count * (1 + b) + 7) // 8 + 8


# ---------------------------------------------------------------------------------------------
# Bit writer and reader: the state (next byte, accumulator, bits in it) is passed by value.
# Codes of short gaps are looked up in tables built per m (``_encode_table``, ``_decode_table``).


@njit(inline="always")
def _params(m: int) -> tuple[int, int]:
    b = 0
    while (np.int64(1) << b) < m:
        b += 1
    return b, (np.int64(1) << b) - m


@njit(inline="always")
def _codeword(gap, m, b, u):
    """(bits, length) of the code of ``gap``; length may exceed 56 (then bits is meaningless)."""
    q = gap // m
    r = gap - q * m
    rem, rlen = np.int64(0), np.int64(0)
    if b > 0:
        if r < u:
            rem, rlen = r, b - 1
        else:
            t = r - u
            rem, rlen = (u + (t >> 1)) | ((t & 1) << (b - 1)), b
    length = q + 1 + rlen
    bits = ((np.int64(1) << q) - 1) | (rem << (q + 1)) if length <= 56 else np.int64(0)
    return bits, length


@njit(cache=True, nogil=True)
def _encode_table(m):
    """``(bits << 6) | length`` of the code of every gap below ``_TABLE`` (0 if over 56 bits)."""
    b, u = _params(m)
    table = np.zeros(_TABLE, np.int64)
    for g in range(_TABLE):
        bits, length = _codeword(np.int64(g), m, b, u)
        if length <= 56:
            table[g] = (bits << 6) | length
    return table


@njit(cache=True, nogil=True)
def _decode_table(m):
    """For every ``_PEEK``-bit window: ``(gap << 6) | length`` of the code it starts with, 0 when
    that code is longer than the window."""
    b, u = _params(m)
    table = np.zeros(1 << _PEEK, np.int64)
    if b > _PEEK + 1:
        return table
    for q in range(_PEEK):
        for r in range(m):
            bits, length = _codeword(np.int64(q) * m + r, m, b, u)
            if length > _PEEK:
                continue
            for v in range(bits, 1 << _PEEK, 1 << length):
                table[v] = ((np.int64(q) * m + r) << 6) | length
    return table


@njit(inline="always")
def _put(out, i, acc, nacc, value, nbits):
    """Append the low ``nbits`` (<= 56) of ``value`` to the stream; whole bytes go to ``out``."""
    acc |= value << nacc
    nacc += nbits
    while nacc >= 8:
        out[i] = np.uint8(acc & 0xFF)
        i += 1
        acc >>= 8
        nacc -= 8
    return i, acc, nacc


@njit(cache=True, nogil=True)
def _put_long_gap(out, i, acc, nacc, gap, m, b, u):
    """The rare codes not in the table (a separate function keeps the hot loops small)."""
    q = gap // m
    r = gap - q * m
    while q > _UNARY_STEP:
        i, acc, nacc = _put(out, i, acc, nacc, (np.int64(1) << _UNARY_STEP) - 1, _UNARY_STEP)
        q -= _UNARY_STEP
    i, acc, nacc = _put(out, i, acc, nacc, (np.int64(1) << q) - 1, q + 1)
    if b > 0:
        if r < u:
            i, acc, nacc = _put(out, i, acc, nacc, r, b - 1)
        else:
            t = r - u
            i, acc, nacc = _put(out, i, acc, nacc, u + (t >> 1), b - 1)
            i, acc, nacc = _put(out, i, acc, nacc, t & 1, 1)
    return i, acc, nacc


@njit(inline="always")
def _flush(out, i, acc, nacc):
    if nacc > 0:
        out[i] = np.uint8(acc)
        i += 1
    return i


@njit(inline="always")
def _fill(data, i, acc, nacc):
    while nacc <= 55 and i < data.size:
        acc |= np.int64(data[i]) << nacc
        i += 1
        nacc += 8
    return i, acc, nacc


@njit(cache=True, nogil=True)
def _get_long_gap(data, i, acc, nacc, m, b, u):
    """The codes longer than the table's window, or at the end of the stream."""
    q = np.int64(0)
    while True:
        if nacc == 0:
            return False, q, i, acc, nacc
        ones = np.int64(trailing_zeros(~acc))  # acc < 2**63: ~acc is never 0
        if ones < nacc:
            q += ones
            acc >>= ones + 1
            nacc -= ones + 1
            break
        q += nacc
        acc = np.int64(0)
        nacc = np.int64(0)
        i, acc, nacc = _fill(data, i, acc, nacc)
    r = np.int64(0)
    if b > 0:
        i, acc, nacc = _fill(data, i, acc, nacc)
        if nacc < b - 1:
            return False, q, i, acc, nacc
        x = acc & ((np.int64(1) << (b - 1)) - 1)
        acc >>= b - 1
        nacc -= b - 1
        if x < u:
            r = x
        else:
            if nacc < 1:
                return False, q, i, acc, nacc
            r = u + 2 * (x - u) + (acc & 1)
            acc >>= 1
            nacc -= 1
    return True, q * m + r, i, acc, nacc


@njit(inline="always")
def _end_status(data, i, nacc):
    """The stream must end in its last byte with zero padding."""
    used = 8 * i - nacc
    if (used + 7) // 8 != data.size:
        return _TRAILING
    if used % 8 and (np.int64(data[data.size - 1]) >> (used % 8)) != 0:
        return _TRAILING
    return _OK


# ---------------------------------------------------------------------------------------------
# Kernels. The table lookups are written out in each loop: behind a function boundary (even an
# inlined one) numba compiles these loops several times slower.

_SET, _ADD, _POSITIONS = 0, 1, 2  # what _decode does with each decoded position


@njit(cache=True, nogil=True)
def _encode_gaps(gaps, m, out):
    b, u = _params(m)
    table = _encode_table(m)
    i, acc, nacc = 0, np.int64(0), np.int64(0)
    for k in range(gaps.size):
        gap = gaps[k]
        e = table[gap] if gap < _TABLE else np.int64(0)
        if e != 0:
            i, acc, nacc = _put(out, i, acc, nacc, e >> 6, e & 63)
        else:
            i, acc, nacc = _put_long_gap(out, i, acc, nacc, gap, m, b, u)
    return _flush(out, i, acc, nacc)


@njit(inline="always")
def _advance(data, i, acc, nacc, p, table, m, b, u, n):
    """Decode the next position after ``p``: ``(status, i, acc, nacc, position)``."""
    i, acc, nacc = _fill(data, i, acc, nacc)
    t = table[acc & ((1 << _PEEK) - 1)]
    length = t & 63
    if length != 0 and length <= nacc:
        gap = t >> 6
        acc >>= length
        nacc -= length
    else:
        ok, gap, i, acc, nacc = _get_long_gap(data, i, acc, nacc, m, b, u)
        if not ok:
            return _TRUNCATED, i, acc, nacc, p
    p += gap + 1
    if p >= n:
        return _RANGE, i, acc, nacc, p
    return _OK, i, acc, nacc, p


@njit(cache=True, nogil=True)
def _decode(data, count, n, m, signs, scale, positions, out, mode):
    """Walk the code: ``positions[e] = p`` (``_POSITIONS``), ``out[p] = ±scale`` (``_SET``) or
    ``out[p] += ±scale`` in float64, rounded once (``_ADD``). Returns a status code."""
    b, u = _params(m)
    table = _decode_table(m)
    s = np.float64(scale)
    i, acc, nacc = 0, np.int64(0), np.int64(0)
    p = np.int64(-1)
    for e in range(count):
        status, i, acc, nacc, p = _advance(data, i, acc, nacc, p, table, m, b, u, n)
        if status != _OK:
            return status
        if mode == _POSITIONS:
            positions[e] = p
        else:
            v = -s if (signs[e >> 3] >> (e & 7)) & 1 else s
            put(out, p, np.float64(get(out, p)) + v if mode == _ADD else v)
    return _end_status(data, i, nacc)


@njit(inline="always")
def value_at(x, base, baseline, j):
    """Entry ``j`` of the array whose selection is coded: ``x[j]`` (``base`` empty and
    ``baseline`` 0), ``x[j] - base[j]`` or ``x[j] - baseline``, in float64 rounded to float32
    (storage dtypes decoded), so that a difference never has to be written out."""
    b = np.float64(get(base, j)) if base.size else baseline
    return np.float32(np.float64(get(x, j)) - b)


@njit(inline="always")
def _selected(bits, j, key, cut):
    return (bits & np.uint32(0x7FFFFFFF)) != 0 and _kept(bits, j, key, cut)


@njit(cache=True, parallel=True, nogil=True)
def _chunk_counts(x, base, baseline, key, cut):
    """Per chunk of ``_CHUNK`` entries: the nonzero entries kept by the selection, and the
    nonzero entries tied at the threshold."""
    n = x.size
    nch = (n + _CHUNK - 1) // _CHUNK
    kept = np.zeros(nch, np.int64)
    ties = np.zeros(nch, np.int64)
    for c in prange(nch):
        k = t = 0
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            bits = value_at(x, base, baseline, j).view(np.uint32)
            k += _selected(bits, j, key, cut)
            t += (bits & np.uint32(0x7FFFFFFF)) == key and key != 0
        kept[c] = k
        ties[c] = t
    return kept, ties


@njit(cache=True, nogil=True)
def _tie_index(x, base, baseline, key, c, rank):
    """Index of the ``rank``-th (1-based) nonzero entry tied at the threshold in chunk ``c``."""
    for j in range(c * _CHUNK, min(x.size, (c + 1) * _CHUNK)):
        if (value_at(x, base, baseline, j).view(np.uint32) & np.uint32(0x7FFFFFFF)) == key:
            rank -= 1
            if rank == 0:
                return j
    return -1


@njit(cache=True, parallel=True, nogil=True)
def _encode_chunks(x, base, baseline, key, cut, m, counts, offsets, scratch, firsts, signs, info):
    """Code each chunk on its own, into ``scratch[offsets[c]:]``, its first gap counted from
    the chunk's start; ``info[c]`` = (bits written, bits of the first code, first position,
    last position); one sign byte per coded entry, in order, into ``signs`` (chunk ``c``'s
    first at ``firsts[c]``)."""
    b, u = _params(m)
    table = _encode_table(m)
    n = x.size
    for c in prange(counts.size):
        if counts[c] == 0:
            continue
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        i, acc, nacc = offsets[c], np.int64(0), np.int64(0)
        prev = np.int64(lo - 1)
        k = 0
        for start in range(lo, hi, 64):
            mask = np.uint64(0)
            for j in range(start, min(hi, start + 64)):
                if _selected(value_at(x, base, baseline, j).view(np.uint32), j, key, cut):
                    mask |= np.uint64(1) << np.uint64(j - start)
            while mask:
                j = start + np.int64(trailing_zeros(mask))
                mask &= mask - np.uint64(1)
                gap = j - prev - 1
                prev = j
                e = table[gap] if gap < _TABLE else np.int64(0)
                if e != 0:
                    i, acc, nacc = _put(scratch, i, acc, nacc, e >> 6, e & 63)
                else:
                    i, acc, nacc = _put_long_gap(scratch, i, acc, nacc, gap, m, b, u)
                if k == 0:
                    info[c, 1] = (i - offsets[c]) * 8 + nacc
                    info[c, 2] = j
                signs[firsts[c] + k] = value_at(x, base, baseline, j) < 0
                k += 1
        info[c, 0] = (i - offsets[c]) * 8 + nacc
        info[c, 3] = prev
        _flush(scratch, i, acc, nacc)


@njit(cache=True, nogil=True)
def _stitch(scratch, offsets, counts, info, m, out):
    """Concatenate the chunk codes: each chunk's first gap re-coded from the previous chunk's
    last position, the rest of its bits copied. Returns the number of bytes written."""
    b, u = _params(m)
    table = _encode_table(m)
    i, acc, nacc = 0, np.int64(0), np.int64(0)
    prev = np.int64(-1)
    for c in range(counts.size):
        if counts[c] == 0:
            continue
        gap = info[c, 2] - prev - 1
        e = table[gap] if gap < _TABLE else np.int64(0)
        if e != 0:
            i, acc, nacc = _put(out, i, acc, nacc, e >> 6, e & 63)
        else:
            i, acc, nacc = _put_long_gap(out, i, acc, nacc, gap, m, b, u)
        pos = offsets[c] * 8 + info[c, 1]
        end = offsets[c] * 8 + info[c, 0]
        while pos < end:
            take = min(32, end - pos)
            p = pos >> 3
            word = np.int64(0)
            for t in range(5):
                word |= np.int64(scratch[p + t]) << (8 * t)
            bits = (word >> (pos & 7)) & ((np.int64(1) << take) - 1)
            i, acc, nacc = _put(out, i, acc, nacc, bits, take)
            pos += take
        prev = info[c, 3]
    return _flush(out, i, acc, nacc)


# ---------------------------------------------------------------------------------------------
# Python API


def encode_positions(positions: np.ndarray, n: int, m: int | None = None) -> tuple[np.ndarray, int]:
    """Code sorted distinct positions in ``[0, n)``.

    Args:
        positions: 1-D integer array, strictly increasing.
        n: number of entries of the tensor the positions index.
        m: Golomb parameter; default :func:`golomb_parameter` of ``(len(positions), n)``.

    Returns:
        ``(payload, m)``: the uint8 code and the parameter needed to decode it.

    Raises:
        CodeError: the positions are not sorted, distinct and within ``[0, n)``.
    """
    positions = np.asarray(positions).reshape(-1)
    m = golomb_parameter(positions.size, n) if m is None else int(m)
    if not 1 <= m <= MAX_M:
        raise ValueError(f"m must be in [1, {MAX_M}], got {m}")
    gaps = np.diff(positions.astype(np.int64), prepend=np.int64(-1)) - 1
    if positions.size and (gaps.min() < 0 or positions[-1] >= n):
        _check(_UNSORTED)
    bits = int((gaps // m).sum()) + gaps.size * (1 + (m - 1).bit_length())
    out = np.empty((bits + 7) // 8 + 8, np.uint8)
    size = int(_encode_gaps(gaps, np.int64(m), out))
    return out[:size].copy(), m


def decode_positions(payload: np.ndarray, count: int, n: int, m: int) -> np.ndarray:
    """The ``count`` positions coded in ``payload`` (int64, increasing).

    Raises:
        CodeError: the payload is truncated, decodes past ``n`` or has trailing bytes.
    """
    positions = np.empty(count, np.int64)
    _walk(payload, count, n, m, _NO_SIGNS, 0.0, positions, _NO_OUT, _POSITIONS)
    return positions


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Booleans to bytes, one bit each, least significant bit first, zero padding."""
    return np.packbits(np.asarray(bits, np.bool_).reshape(-1), bitorder="little")


def unpack_bits(payload: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` bits of ``payload`` as booleans (inverse of :func:`pack_bits`).

    Raises:
        CodeError: the payload has the wrong length or non-zero padding bits.
    """
    payload = _u8(payload)
    if payload.size != (count + 7) // 8:
        raise CodeError(f"{count} bits need {(count + 7) // 8} bytes, got {payload.size}")
    bits = np.unpackbits(payload, bitorder="little").astype(np.bool_)
    if bits[count:].any():
        raise CodeError("non-zero padding bits after the last bit (corrupt payload)")
    return bits[:count]


def count_selected(x: np.ndarray, thr: float, cut: int) -> int:
    """Number of nonzero entries of float32 ``x`` kept by the selection ``(thr, cut)``."""
    key = np.int64(threshold_key(thr))
    return int(_chunk_counts(x, x[:0], 0.0, key, np.int64(cut))[0].sum())


def encode_selection(
    x: np.ndarray, thr: float, cut: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Code the nonzero entries of float32 ``x`` kept by ``(thr, cut)`` (see ``select``).

    Zeros are never coded, whatever the selection: their sign is 0. Chunks of the tensor are
    coded in parallel and then stitched, which gives the bytes of :func:`encode_positions` of
    the kept positions.

    Returns:
        ``(payload, signs, count, m)``: the position code, the packed sign bits (1 = negative),
        the number of coded entries and the Golomb parameter.
    """
    key, cut = np.int64(threshold_key(thr)), np.int64(cut)
    counts = _chunk_counts(x, x[:0], 0.0, key, cut)[0]
    return _encode(x, x[:0], 0.0, key, cut, counts)


def encode_difference(
    x: np.ndarray, base: np.ndarray | None, baseline: float, thr: float, ties: int | None
) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """:func:`encode_selection` of ``d = x - base`` (flat arrays of one storage dtype: bf16
    bits, float32, float64), or of ``d = x - baseline`` without ``base``, computed element by
    element in float64 and rounded to float32, never written out.

    Kept: ``|d| > thr``, and the first ``ties`` nonzero entries with ``|d| == thr`` in index
    order (all of them when ``ties`` is None): a global top-k's tie quota spent tensor by
    tensor.

    Returns:
        ``(payload, signs, count, m, used)``: as :func:`encode_selection`, plus the number of
        tied entries kept.
    """
    base = x[:0] if base is None else base
    key = np.int64(threshold_key(thr))
    counts, tied = _chunk_counts(x, base, float(baseline), key, np.int64(x.size))
    cut, total = x.size, int(tied.sum())
    if ties is not None and ties < total:
        before = np.cumsum(tied) - tied
        c = int(np.searchsorted(before + tied, ties, side="left")) if ties else 0
        if ties:
            j = int(_tie_index(x, base, float(baseline), key, c, ties - before[c]))
            cut = j + 1
            counts[c] -= tied[c] - (ties - before[c])
        else:
            cut = 0
            counts[c] -= tied[c]
        counts[c + 1 :] -= tied[c + 1 :]
        total = ties
    out = _encode(x, base, float(baseline), key, np.int64(cut), counts)
    return (*out, total)


def _encode(
    x: np.ndarray,
    base: np.ndarray,
    baseline: float,
    key: np.int64,
    cut: np.int64,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    count = int(counts.sum())
    m = golomb_parameter(count, x.size)
    sizes = (counts * (1 + (m - 1).bit_length()) + _CHUNK // m + 64 + 7) // 8 + 8
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scratch = np.zeros(offsets[-1] + 8, np.uint8)
    signs = np.zeros(count, np.uint8)
    info = np.zeros((counts.size, 4), np.int64)
    firsts = np.cumsum(counts) - counts
    _encode_chunks(
        x, base, baseline, key, cut, np.int64(m), counts, offsets, scratch, firsts, signs, info
    )
    out = np.zeros(_bound_bytes(count, x.size, m), np.uint8)
    size = int(_stitch(scratch, offsets, counts, info, np.int64(m), out))
    return out[:size].copy(), pack_bits(signs), count, m


def scatter_ternary(
    payload: np.ndarray, count: int, m: int, signs: np.ndarray, scale: float, out: np.ndarray
) -> None:
    """``out[p] = ±scale`` at every coded position (other entries untouched).

    ``out`` is flat, of a kernel storage dtype (bf16 bits as uint16, float32, float64); the
    value is rounded once to that dtype.

    Raises:
        CodeError: corrupt payload or sign bits.
    """
    _scatter_checked(payload, count, m, signs, scale, out, _SET)


def scatter_add_ternary(
    payload: np.ndarray, count: int, m: int, signs: np.ndarray, scale: float, out: np.ndarray
) -> None:
    """``out[p] = out[p] ± scale`` at every coded position, in float64 then rounded once to
    ``out``'s dtype: decoding fused with the add, O(count).

    Raises:
        CodeError: corrupt payload or sign bits.
    """
    _scatter_checked(payload, count, m, signs, scale, out, _ADD)


def _scatter_checked(
    payload: np.ndarray,
    count: int,
    m: int,
    signs: np.ndarray,
    scale: float,
    out: np.ndarray,
    mode: int,
) -> None:
    signs = _u8(signs)
    if signs.size != (count + 7) // 8:
        raise CodeError(f"{count} sign bits need {(count + 7) // 8} bytes, got {signs.size}")
    if count % 8 and int(signs[-1]) >> (count % 8):
        raise CodeError("non-zero padding bits after the last sign bit (corrupt payload)")
    _walk(payload, count, out.size, m, signs, scale, _NO_POSITIONS, out, mode)


def _walk(
    payload: np.ndarray,
    count: int,
    n: int,
    m: int,
    signs: np.ndarray,
    scale: float,
    positions: np.ndarray,
    out: np.ndarray,
    mode: int,
) -> None:
    status = _decode(
        _u8(payload),
        np.int64(count),
        np.int64(n),
        np.int64(m),
        signs,
        float(scale),
        positions,
        out,
        mode,
    )
    _check(status)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.uint8).reshape(-1)
