"""Merges over a base: task arithmetic, TIES, DARE (linear and TIES), each with optional LiNeS.

Every method forms task vectors tau_i = theta_i - theta_0 per tensor (inputs already stored as
task vectors are used as they are), combines them into tau_m, and writes
theta = theta_0 + s(tensor) * tau_m, where s is ``lam`` or, with LiNeS, the layer's
lambda(l) = alpha + beta (l-1)/(L-1). Formulas, citations and choices: docs/methods.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import plan as planning
from ..errors import ParameterError
from ..kernels.dare import dare_inplace, dare_key
from ..kernels.select import GlobalTopK, count_for_density, topk_threshold
from ..kernels.soup import weighted_rows
from ..kernels.taskvec import ABSENT, DELTA, WEIGHTS, add_scaled, l1_norm, task_vectors
from ..kernels.ties import SIGN_FREQUENCY, SIGN_TOTAL, keep_all, ties_merge
from ..lines import LayerSchedule, lines_alpha
from ..plan import Plan, PlannedTensor
from .base import Method, Rows, TensorStream

SIGNS = {"total": SIGN_TOTAL, "frequency": SIGN_FREQUENCY}
SCOPES = ("global", "tensor")


@dataclass(frozen=True)
class Lines:
    """LiNeS layer scaling (Wang et al., ICLR 2025): lambda(l) = alpha + beta (l-1)/(L-1).

    ``alpha=None`` computes alpha = (||sum_t tau_t||_1 / ||tau_m||_1) / T in a first pass.
    """

    beta: float
    alpha: float | None = None
    pattern: str | None = None


_CODES = {planning.WEIGHTS: WEIGHTS, planning.DELTA: DELTA, planning.ABSENT: ABSENT}


def input_codes(t: PlannedTensor) -> np.ndarray:
    """Per input (base excluded): what its array holds, as task_vectors' int8 codes."""
    return np.array([_CODES[c] for c in t.contents[1:]], np.int8)


def _schedule_for(
    names: list[str], alpha: float, beta: float, pattern: str | None
) -> LayerSchedule:
    try:
        return LayerSchedule.from_names(names, alpha, beta, pattern)
    except ValueError as e:
        raise ParameterError(str(e)) from None


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ParameterError(f"--density must be in (0, 1], got {density}")


@dataclass
class TaskVectorMethod(Method):
    """Shared machinery; subclasses implement :meth:`combine`."""

    weights: tuple[float, ...] | None = None
    lam: float | None = None
    lines: Lines | None = None
    needs_base = True
    _schedule: LayerSchedule | None = field(default=None, init=False, repr=False)
    _buffers: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def parameters(self) -> dict[str, Any]:
        p: dict[str, Any] = {
            "weights": list(self.weights) if self.weights is not None else None,
            "lambda": None if self.lines is not None else self.scale_default,
        }
        if self.lines is not None:
            p["lines"] = {
                "alpha": self._schedule.alpha if self._schedule else self.lines.alpha,
                "beta": self.lines.beta,
                "layer_pattern": self.lines.pattern,
            }
        return p | self.extra_parameters()

    def extra_parameters(self) -> dict[str, Any]:
        return {}

    @property
    def scale_default(self) -> float:
        return 1.0 if self.lam is None else self.lam

    def validate(self, num_inputs: int) -> None:
        if self.weights is not None and len(self.weights) != num_inputs:
            raise ParameterError(
                f"--weights has {len(self.weights)} value(s) but there are {num_inputs} inputs"
            )
        if self.weights is not None and not all(np.isfinite(self.weights)):
            raise ParameterError(f"--weights must be finite, got {list(self.weights)}")
        if self.lines is not None and self.lam is not None:
            raise ParameterError(
                "--lambda and LiNeS (--lines-beta) exclude each other: LiNeS sets each "
                "layer's lambda"
            )
        scales = {"--lambda": self.lam}
        if self.lines is not None:
            scales |= {"--lines-alpha": self.lines.alpha, "--lines-beta": self.lines.beta}
            _schedule_for([], 0.0, 0.0, self.lines.pattern)  # checks the pattern
        for option, value in scales.items():
            if value is not None and not math.isfinite(value):
                raise ParameterError(f"{option} must be a finite number, got {value}")

    def w(self, n: int) -> np.ndarray:
        return np.ones(n) if self.weights is None else np.asarray(self.weights, np.float64)

    # -- passes ---------------------------------------------------------------------------

    def prepare(self, plan: Plan, stream: TensorStream) -> None:
        self._schedule = None  # an instance may run again on another plan
        self.prepare_selection(plan, stream)
        if self.lines is None:
            return
        names = [t.name for t in plan.tensors if t.merged]
        alpha = self.lines.alpha
        if alpha is None:
            alpha = self._lines_alpha(plan, stream)
        self._schedule = _schedule_for(names, alpha, self.lines.beta, self.lines.pattern)

    def prepare_selection(self, plan: Plan, stream: TensorStream) -> None:
        """Extra passes a method needs before merging (global top-k)."""

    def _lines_alpha(self, plan: Plan, stream: TensorStream) -> float:
        skip = ("_schedule", "_buffers")
        saved = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in skip})
        sum_l1 = merged_l1 = 0.0
        for t, arrays in stream():
            taus, _ = self.taus(t, arrays)
            n = taus.shape[1]
            total = self.buffer("total", n)
            weighted_rows(taus, np.arange(len(taus)), np.ones(len(taus)), total, False)
            merged = self.buffer("merged", n)
            self.combine(t, taus, merged)
            sum_l1 += l1_norm(total)
            merged_l1 += l1_norm(merged)
        self.__dict__.update(saved)  # the selection state is consumed again by the real pass
        try:
            return lines_alpha(sum_l1, merged_l1, len(plan.inputs))
        except ValueError as e:
            raise ParameterError(str(e)) from None

    # -- per tensor -----------------------------------------------------------------------

    def taus(
        self, t: PlannedTensor, arrays: Rows, check_finite: bool = False
    ) -> tuple[np.ndarray, int]:
        """(N, n) float32 task vectors and the position of an array with NaN/Inf (or -1)."""
        n, k = t.out_info.numel, len(arrays) - 1
        out = self.buffer("taus", k * n).reshape(k, n)
        return out, int(task_vectors(arrays.matrix, input_codes(t), out, check_finite))

    def buffer(self, key: str, size: int) -> np.ndarray:
        """A float32 scratch array of ``size`` entries, reused across tensors: the pages of a
        fresh allocation would be faulted in again for every tensor."""
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = self._buffers[key] = np.empty(size, np.float32)
        return buf[:size]

    def scale(self, t: PlannedTensor) -> float:
        return self._schedule.scale(t.name) if self._schedule else self.scale_default

    def combine(self, t: PlannedTensor, taus: np.ndarray, out: np.ndarray) -> None:
        """tau_m for one tensor into ``out`` (float32); ``taus`` may be overwritten."""
        raise NotImplementedError

    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        base = arrays[0]
        taus, bad = self.taus(tensor, arrays, check_finite)
        if bad >= 0:
            return bad
        arrays.clear()  # drop the raw inputs early: only base and the task vectors are needed
        merged = self.buffer("merged", taus.shape[1])
        self.combine(tensor, taus, merged)
        del taus
        add_scaled(base, merged, self.scale(tensor), out)
        return -1


@dataclass
class TaskArithmetic(TaskVectorMethod):
    """theta = theta_0 + lambda * sum_i w_i tau_i (Ilharco et al., ICLR 2023)."""

    name = "task-arithmetic"
    citation = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089"

    def combine(self, t: PlannedTensor, taus: np.ndarray, out: np.ndarray) -> None:
        weighted_rows(taus, np.arange(len(taus)), self.w(len(taus)), out, False)

    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        # Linear, so fused into one pass over the raw inputs: theta_0 + s sum_i w_i tau_i =
        # (1 - s sum_{i holds weights} w_i) theta_0 + sum_i s w_i x_i (absent inputs dropped)
        codes = input_codes(tensor)
        w = self.w(len(codes)) * self.scale(tensor)
        present = np.array([0] + [i + 1 for i, c in enumerate(codes) if c != ABSENT], np.int64)
        coef = np.concatenate([[1.0 - w[codes == WEIGHTS].sum()], w[codes != ABSENT]])
        return int(weighted_rows(arrays.matrix, present, coef, out, check_finite))


@dataclass
class Ties(TaskVectorMethod):
    """Trim (top-k by magnitude), elect sign, disjoint mean (Yadav et al., NeurIPS 2023)."""

    density: float = 0.2
    scope: str = "global"
    sign: str = "total"
    name = "ties"
    citation = "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708"
    _global: list[GlobalTopK] | None = field(default=None, init=False, repr=False)

    def extra_parameters(self) -> dict[str, Any]:
        return {"density": self.density, "scope": self.scope, "sign": self.sign}

    def validate(self, num_inputs: int) -> None:
        super().validate(num_inputs)
        _check_density(self.density)
        if self.scope not in SCOPES:
            raise ParameterError(f"--scope must be global or tensor, got {self.scope!r}")
        if self.sign not in SIGNS:
            raise ParameterError(f"--sign must be total or frequency, got {self.sign!r}")

    def prepare_selection(self, plan: Plan, stream: TensorStream) -> None:
        self._global = None
        if self.scope != "global":
            return
        self._global = [GlobalTopK(density=self.density) for _ in plan.inputs]
        for t, arrays in stream():
            for g, tau in zip(self._global, self.taus(t, arrays)[0], strict=True):
                g.add_high(tau)
        for g in self._global:
            g.finish_high()
        if any(g.needs_low_pass for g in self._global):
            for t, arrays in stream():
                for g, tau in zip(self._global, self.taus(t, arrays)[0], strict=True):
                    g.add_low(tau)
        for g in self._global:
            g.finish_low()

    def selections(self, t: PlannedTensor, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._global is not None:
            sel = [g.selection(tau) for g, tau in zip(self._global, taus, strict=True)]
        else:
            k = count_for_density(self.density, taus.shape[1])
            sel = [topk_threshold(tau, k) for tau in taus]
        thr = np.array([s[0] for s in sel], np.float32)
        cut = np.array([s[1] for s in sel], np.int64)
        return thr, cut

    def combine(self, t: PlannedTensor, taus: np.ndarray, out: np.ndarray) -> None:
        thr, cut = self.selections(t, taus)
        ties_merge(taus, self.w(len(taus)), thr, cut, SIGNS[self.sign], out)


@dataclass
class DareLinear(TaskVectorMethod):
    """Drop each entry with probability 1 - density, rescale by 1/density, then add
    (Yu et al., ICML 2024)."""

    density: float = 0.5
    seed: int = 0
    name = "dare-linear"
    citation = "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099"

    def extra_parameters(self) -> dict[str, Any]:
        return {"density": self.density, "seed": self.seed}

    def validate(self, num_inputs: int) -> None:
        super().validate(num_inputs)
        _check_density(self.density)

    def drop(self, t: PlannedTensor, taus: np.ndarray) -> None:
        for i, tau in enumerate(taus):
            dare_inplace(tau, self.density, dare_key(self.seed, t.name, i))

    def combine(self, t: PlannedTensor, taus: np.ndarray, out: np.ndarray) -> None:
        self.drop(t, taus)
        weighted_rows(taus, np.arange(len(taus)), self.w(len(taus)), out, False)


@dataclass
class DareTies(DareLinear):
    """DARE's drop and rescale, then TIES's sign election and disjoint mean (no trim)."""

    sign: str = "total"
    name = "dare-ties"

    def extra_parameters(self) -> dict[str, Any]:
        return super().extra_parameters() | {"sign": self.sign}

    def validate(self, num_inputs: int) -> None:
        super().validate(num_inputs)
        if self.sign not in SIGNS:
            raise ParameterError(f"--sign must be total or frequency, got {self.sign!r}")

    def combine(self, t: PlannedTensor, taus: np.ndarray, out: np.ndarray) -> None:
        self.drop(t, taus)
        thr, cut = keep_all(len(taus))
        ties_merge(taus, self.w(len(taus)), thr, cut, SIGNS[self.sign], out)


@dataclass
class TaskVector(TaskArithmetic):
    """The task vector itself: tau = lambda * sum_i w_i tau_i, without the base added.

    Written with ``adapt_content: task_vector`` metadata, so ``adapt merge --base`` reads the
    file back as a task vector.
    """

    name = "task-vector"
    content = "task_vector"
    citation = TaskArithmetic.citation

    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        taus, bad = self.taus(tensor, arrays, check_finite)
        if bad >= 0:
            return bad
        merged = self.buffer("merged", taus.shape[1])
        self.combine(tensor, taus, merged)
        weighted_rows(
            merged[None, :], np.zeros(1, np.int64), np.array([self.scale(tensor)]), out, False
        )
        return -1
