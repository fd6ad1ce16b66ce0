"""Element access that decodes storage dtypes to float32 inside numba kernels.

bf16 travels as its raw ``uint16`` bits (numpy has no bf16); float32 and float64 arrays pass
through. ``get`` and ``put`` dispatch on the array dtype at compile time, so a kernel is
written once as a scalar loop and compiled per storage dtype. float16 is not supported by
numba on CPU: callers convert it to float32 first.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

CHUNK = 16384  # elements per parallel work item; results never depend on it


@njit(inline="always")
def bf16_to_f32(bits: np.uint16) -> np.float32:
    """Exact: a bf16 is the top half of a float32."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def f32_to_bf16(value: np.float32) -> np.uint16:
    """Round to nearest, ties to even (as torch); NaN stays NaN."""
    b = np.float32(value).view(np.uint32)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
    r = np.uint32(b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
    return np.uint16(r >> np.uint32(16))


def get(a, i):  # pragma: no cover - replaced by the overload in jitted code
    """``a[i]`` as float32 (bf16 bits decoded), or float64 for float64 arrays."""
    raise NotImplementedError


def put(a, i, value):  # pragma: no cover - replaced by the overload in jitted code
    """``a[i] = value`` rounded to the storage dtype (bf16: via float32, ties to even)."""
    raise NotImplementedError


@overload(get, inline="always")
def _get(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: bf16_to_f32(a[i])
    if a.dtype == types.float64:
        return lambda a, i: a[i]
    return lambda a, i: np.float32(a[i])


@overload(put, inline="always")
def _put(a, i, value):
    if a.dtype == types.uint16:

        def impl(a, i, value):
            a[i] = f32_to_bf16(np.float32(value))

        return impl

    def impl_cast(a, i, value):
        a[i] = value

    return impl_cast


@njit(cache=True, parallel=True, nogil=True)
def to_float32(src: np.ndarray) -> np.ndarray:
    """Decode a flat storage array (bf16 bits, float32, float64) into a new float32 array."""
    out = np.empty(src.size, np.float32)
    for i in prange(src.size):
        out[i] = get(src, i)
    return out


@njit(cache=True, parallel=True, nogil=True)
def from_float32(values: np.ndarray, dst: np.ndarray) -> None:
    """Round float32 ``values`` into the flat storage array ``dst`` (bf16 bits or float)."""
    for i in prange(values.size):
        put(dst, i, values[i])


@njit(cache=True, parallel=True, nogil=True)
def copy_finite(src: np.ndarray, dst: np.ndarray) -> bool:
    """``dst[:] = src`` (flat, one storage dtype); False when ``src`` holds NaN/Inf."""
    n = src.size
    nch = (n + CHUNK - 1) // CHUNK
    finite = np.ones(nch, np.bool_)
    for c in prange(nch):
        ok = True
        for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            dst[j] = src[j]
            ok &= np.isfinite(get(src, j))
        finite[c] = ok
    return finite.all()
