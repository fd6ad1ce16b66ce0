"""Merge methods, one module per family, registered by name in one place."""

from __future__ import annotations

from .base import Method
from .soup import Soup

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Soup,)}

__all__ = ["METHODS", "Method", "Soup"]
