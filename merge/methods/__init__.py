"""Merge methods, one module per family, registered by name in one place."""

from __future__ import annotations

from .base import Method
from .soup import Soup
from .taskvec import (
    DareLinear,
    DareTies,
    Lines,
    TaskArithmetic,
    TaskVector,
    TaskVectorMethod,
    Ties,
)

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Soup, TaskArithmetic, Ties, DareLinear, DareTies)
}

__all__ = [
    "METHODS",
    "DareLinear",
    "DareTies",
    "Lines",
    "Method",
    "Soup",
    "TaskArithmetic",
    "TaskVector",
    "TaskVectorMethod",
    "Ties",
]
