"""The interface every merge method implements: pure per-tensor maths plus its parameters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from ..plan import Plan, PlannedTensor


class Rows(list):
    """One tensor's arrays in ``plan.sources`` order, all rows of ``matrix`` (n_sources, n), of
    one kernel dtype: bf16 bits, float32 or float64 as stored when the present sources agree,
    else float32. A source that leaves the tensor out has an empty array here (its matrix row
    is not filled). Rows live in reused buffers: valid until the engine reads the next tensor.
    """

    matrix: np.ndarray
    pending: list[int]  # rows still to be filled (engine internal)


TensorStream = Callable[[], Iterator[tuple[PlannedTensor, Rows]]]


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
        self, tensor: PlannedTensor, arrays: Rows, out: np.ndarray, check_finite: bool
    ) -> int:
        """Fill ``out`` (flat, kernel dtype) for one tensor from ``arrays`` (sources order, base
        first); the method may empty the list to free memory early.

        Returns the position in ``arrays`` of the first array holding NaN/Inf when
        ``check_finite`` is on, else -1.
        """
