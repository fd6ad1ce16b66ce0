"""The interface every merge method implements: pure per-tensor maths plus its parameters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from ..plan import Plan, PlannedTensor

# One tensor as the engine hands it over: arrays in ``plan.sources`` order (base first when
# the plan has one), all of one kernel dtype (bf16 bits as uint16, float32 or float64).
TensorStream = Callable[[], Iterator[tuple[PlannedTensor, list[np.ndarray]]]]


class Method(ABC):
    """A merge method. Subclasses are frozen dataclasses holding the parameters."""

    name: ClassVar[str]
    citation: ClassVar[str]
    needs_base: ClassVar[bool] = False
    content: ClassVar[str] = "model"  # or "task_vector": what the output holds

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """Parameters as recorded in provenance (JSON-serialisable)."""

    def validate(self, num_inputs: int) -> None:  # noqa: B027 - optional hook
        """Check parameters against the number of inputs; raise ParameterError."""

    def prepare(self, plan: Plan, stream: TensorStream) -> None:  # noqa: B027 - optional hook
        """Whole-model statistics (global top-k, LiNeS alpha) from extra streaming passes."""

    @abstractmethod
    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        """Fill ``out`` (flat, kernel dtype) for one tensor.

        Returns the position in ``arrays`` of the first array holding NaN/Inf when
        ``check_finite`` is on, else -1.
        """
