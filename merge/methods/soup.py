"""Model soups (Wortsman et al., ICML 2022, arXiv:2203.05482): the weighted mean of weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ParameterError
from ..kernels.soup import weighted_rows
from ..plan import PlannedTensor
from .base import Method


def normalized_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """Soup weights w_i / sum(w); uniform 1/n when ``weights`` is None.

    Raises:
        ParameterError: wrong count, a negative or non-finite weight, or a zero sum.
    """
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(list(weights), dtype=np.float64)
    if w.size != n:
        raise ParameterError(f"--weights has {w.size} value(s) but there are {n} inputs")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ParameterError(f"--weights must be finite and non-negative, got {list(weights)}")
    total = math.fsum(w)
    if total <= 0:
        raise ParameterError("--weights sum to zero")
    return w / total


@dataclass(frozen=True)
class Soup(Method):
    """theta = sum_i w_i theta_i / sum_i w_i (uniform when no weights)."""

    weights: tuple[float, ...] | None = None
    name = "soup"
    citation = "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482"

    def parameters(self) -> dict[str, Any]:
        return {"weights": list(self.weights) if self.weights is not None else None}

    def validate(self, num_inputs: int) -> None:
        normalized_weights(self.weights, num_inputs)

    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        w = normalized_weights(self.weights, len(arrays))
        rows = np.arange(len(arrays), dtype=np.int64)
        return int(weighted_rows(arrays.matrix, rows, w, out, check_finite))
