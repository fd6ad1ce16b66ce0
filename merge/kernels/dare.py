"""DARE drop-and-rescale with a counter-based random number generator.

Entry ``i`` of a task vector survives iff ``uniform(key, i) < density``; survivors become
``float32(float64(x) / density)`` (the exact quotient rounded once to float32) and the others
0.0. This is the paper's and PEFT's rescale by ``1 / density`` (``density`` = 1 - drop
probability), not mergekit's L1-norm matching.

The random number of entry ``i`` is a pure function of ``(key, i)`` and ``key`` a pure function
of ``(seed, tensor name, input index)`` (``dare_key``), so the mask is the same for any thread
count and any chunking (``offset`` gives the flat index of a slice's first entry).

``uniform(key, i)``: ``z = mix(key ^ mix((i + 1) * 0x9E3779B97F4A7C15))`` with ``mix`` the
splitmix64 finalizer (all arithmetic mod 2**64), then the top 53 bits of ``z`` times 2**-53,
a float64 in [0, 1).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numba import njit, prange

__all__ = ["dare", "dare_inplace", "dare_key", "uniform"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TWO_M53 = 2.0**-53
_CHUNK = 1 << 16
_PERSON = b"adapt.dare.v1"


def dare_key(seed: int, tensor_name: str, input_index: int) -> int:
    """64-bit RNG key of one (run seed, tensor, input) triple.

    BLAKE2b (digest_size=8, personalisation ``adapt.dare.v1``) over the length-prefixed UTF-8
    fields ``str(seed)``, ``tensor_name`` and ``str(input_index)``; the digest read as a
    little-endian unsigned integer in ``[0, 2**64)``.
    """
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    for field in (str(int(seed)), tensor_name, str(int(input_index))):
        data = field.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


@njit(cache=True)
def _mix(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True)
def uniform(key: np.uint64, index: int) -> float:
    """Float64 in [0, 1) for entry ``index`` under ``key`` (counter-based, stateless)."""
    z = _mix(np.uint64(key) ^ _mix((np.uint64(index) + np.uint64(1)) * _GAMMA))
    return np.float64(z >> _S11) * _TWO_M53


@njit(cache=True, parallel=True, nogil=True)
def _dare_kernel(tau: np.ndarray, density: float, key: np.uint64, offset: int) -> None:
    n = tau.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            if uniform(key, offset + j) < density:
                tau[j] = np.float32(np.float64(tau[j]) / density)
            else:
                tau[j] = np.float32(0.0)


def _check(tau: np.ndarray, density: float, key: int, offset: int) -> tuple[float, int, int]:
    if not isinstance(tau, np.ndarray) or tau.dtype != np.float32 or tau.ndim != 1:
        raise TypeError("tau must be a 1-D float32 numpy array")
    if not tau.flags.c_contiguous:
        raise ValueError("tau must be contiguous; pass np.ascontiguousarray(tau)")
    density = float(density)
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in (0, 1], got {density}")
    key = int(key)
    if not 0 <= key < 2**64:
        raise ValueError(f"key must be in [0, 2**64), got {key}")
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return density, key, offset


def dare_inplace(tau: np.ndarray, density: float, key: int, offset: int = 0) -> None:
    """Drop entries of ``tau`` in place and rescale the survivors by ``1 / density``.

    Args:
        tau (`np.ndarray`): flat contiguous float32 task vector (or a slice of one); modified.
        density (`float`): keep probability in (0, 1]; 1 leaves ``tau`` unchanged.
        key (`int`): RNG key from ``dare_key``.
        offset (`int`, *optional*, defaults to 0): flat index of ``tau[0]`` in its tensor.

    Raises:
        TypeError: if ``tau`` is not a 1-D float32 array.
        ValueError: if ``density`` is outside (0, 1], ``key`` outside [0, 2**64), ``offset < 0``
            or ``tau`` is not contiguous.
    """
    density, key, offset = _check(tau, density, key, offset)
    if density == 1.0:
        return
    _dare_kernel(tau, density, np.uint64(key), offset)


def dare(tau: np.ndarray, density: float, key: int, offset: int = 0) -> np.ndarray:
    """Like ``dare_inplace`` but returns a new array and leaves ``tau`` untouched."""
    _check(tau, density, key, offset)
    out = tau.copy()
    dare_inplace(out, density, key, offset)
    return out
