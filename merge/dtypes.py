"""The safetensors dtype table and how each code is held in numpy.

bf16 has no numpy dtype: it is held as its raw ``uint16`` bits, and float8 as ``uint8``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ParameterError

# safetensors code -> (numpy storage dtype, is floating point)
_TABLE: dict[str, tuple[np.dtype, bool]] = {
    "F64": (np.dtype("<f8"), True),
    "F32": (np.dtype("<f4"), True),
    "F16": (np.dtype("<f2"), True),
    "BF16": (np.dtype("<u2"), True),
    "F8_E4M3": (np.dtype("u1"), False),
    "F8_E5M2": (np.dtype("u1"), False),
    "I64": (np.dtype("<i8"), False),
    "I32": (np.dtype("<i4"), False),
    "I16": (np.dtype("<i2"), False),
    "I8": (np.dtype("i1"), False),
    "U64": (np.dtype("<u8"), False),
    "U32": (np.dtype("<u4"), False),
    "U16": (np.dtype("<u2"), False),
    "U8": (np.dtype("u1"), False),
    "BOOL": (np.dtype("?"), False),
}

# dtypes adapt computes on (float8 is carried through like an integer: no arithmetic on it)
MERGEABLE = ("F32", "F16", "BF16", "F64")

_ALIASES = {
    "float32": "F32",
    "fp32": "F32",
    "f32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "f16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "f64": "F64",
}


def known(code: str) -> bool:
    """Whether ``code`` is a safetensors dtype code adapt can read."""
    return code in _TABLE


def storage(code: str) -> np.dtype:
    """The numpy dtype that holds tensors of safetensors dtype ``code``."""
    return _TABLE[code][0]


def itemsize(code: str) -> int:
    """Bytes per element of safetensors dtype ``code``."""
    return _TABLE[code][0].itemsize


def is_float(code: str) -> bool:
    """Whether adapt does arithmetic on ``code`` (F64/F32/F16/BF16)."""
    return code in MERGEABLE


def parse(name: str) -> str:
    """Turn a user dtype name (``bf16``, ``float16``, ``F32``...) into a safetensors code."""
    code = _ALIASES.get(name.lower(), name.upper())
    if code not in MERGEABLE:
        raise ParameterError(
            f"unknown output dtype {name!r}: use one of float32, float16, bfloat16, float64"
        )
    return code


# safetensors code <-> torch dtype attribute name
_TORCH = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_FROM_TORCH = {f"torch.{v}": k for k, v in _TORCH.items()}
# dtypes numpy lacks or torch cannot hand to numpy: moved as same-width integers
_VIA_INT = {"BF16": "int16", "F8_E4M3": "uint8", "F8_E5M2": "uint8", "U16": "int16"}
_VIA_INT |= {"U32": "int32", "U64": "int64"}


def torch_name(code: str) -> str:
    """The torch dtype name of a code (e.g. for config.json ``torch_dtype``)."""
    return _TORCH[code]


def code_of_torch(dtype: object) -> str | None:
    """The safetensors code of a torch dtype, or None when adapt cannot hold it."""
    return _FROM_TORCH.get(str(dtype))


def to_numpy(t: Any, code: str) -> np.ndarray:
    """A flat numpy view of the bits of a CPU torch tensor of dtype ``code`` (no copy)."""
    import torch

    t = t.detach().cpu().contiguous().reshape(-1)
    if code in _VIA_INT:
        t = t.view(getattr(torch, _VIA_INT[code]))
    return t.numpy().view(storage(code))


def to_torch(a: np.ndarray, code: str, shape: tuple[int, ...]) -> Any:
    """A torch tensor of dtype ``code`` over the bits of a flat numpy array (no copy)."""
    import torch

    if code in _VIA_INT:
        a = a.view(np.dtype(_VIA_INT[code]))
        return torch.from_numpy(a).view(getattr(torch, _TORCH[code])).reshape(shape)
    return torch.from_numpy(a).reshape(shape)
