"""The safetensors dtype table and how each code is held in numpy.

bf16 has no numpy dtype: it is held as its raw ``uint16`` bits, and float8 as ``uint8``.
"""

from __future__ import annotations

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


def torch_name(code: str) -> str:
    """The torch dtype name for a float code (for config.json ``torch_dtype``)."""
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[code]
