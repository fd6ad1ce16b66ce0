"""Chunk-wise conversion between storage dtypes and float32 inside numba kernels.

bf16 travels as its raw ``uint16`` bits; float32 and float64 arrays pass through.
``load`` and ``store`` dispatch on the array dtype at compile time, so a kernel is
written once and compiled per storage dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

CHUNK = 16384


def load(src, start, n, scratch):  # pragma: no cover - replaced by the overload in jitted code
    """Return ``src[start:start+n]`` as float32 (a view for float32, decoded otherwise)."""
    raise NotImplementedError


def store(dst, start, values):  # pragma: no cover - replaced by the overload in jitted code
    """Write float32 ``values`` into ``dst[start:]``, rounding to the storage dtype."""
    raise NotImplementedError


@overload(load, inline="always")
def _load(src, start, n, scratch):
    if src.dtype == types.uint16:

        def impl(src, start, n, scratch):
            bits = scratch[:n]
            for j in range(n):
                bits[j] = np.uint32(src[start + j]) << np.uint32(16)
            return bits.view(np.float32)

        return impl
    if src.dtype == types.float32:
        return lambda src, start, n, scratch: src[start : start + n]

    def impl_cast(src, start, n, scratch):
        out = scratch[:n].view(np.float32)
        for j in range(n):
            out[j] = np.float32(src[start + j])
        return out

    return impl_cast


@overload(store, inline="always")
def _store(dst, start, values):
    if dst.dtype == types.uint16:

        def impl(dst, start, values):
            bits = values.view(np.uint32)
            for j in range(values.size):
                b = bits[j]
                if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                    dst[start + j] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
                else:
                    r = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
                    dst[start + j] = np.uint16(r >> np.uint32(16))

        return impl

    def impl_cast(dst, start, values):
        for j in range(values.size):
            dst[start + j] = values[j]

    return impl_cast


@njit(cache=True)
def to_float32(src: np.ndarray) -> np.ndarray:
    """Decode a flat storage array (bf16 bits, float32, float64) into a new float32 array."""
    out = np.empty(src.size, np.float32)
    scratch = np.empty(CHUNK, np.uint32)
    for start in range(0, src.size, CHUNK):
        n = min(CHUNK, src.size - start)
        out[start : start + n] = load(src, start, n, scratch)
    return out


@njit(cache=True)
def from_float32(values: np.ndarray, dst: np.ndarray) -> None:
    """Round float32 ``values`` into the flat storage array ``dst`` (bf16 bits or float)."""
    for start in range(0, values.size, CHUNK):
        n = min(CHUNK, values.size - start)
        store(dst, start, values[start : start + n])
