"""The streaming executor: walk the plan, read each tensor from every source, merge, write.

Memory is bounded by a few copies of the largest tensor: the current tensor's arrays, the
next tensor's arrays (read ahead on a thread while the kernel runs), and the output buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import dtypes
from .errors import MismatchError, NonFiniteError
from .kernels.convert import to_float32
from .methods.base import Method
from .plan import ABSENT, Plan, PlannedTensor
from .progress import Progress
from .provenance import Provenance
from .writer import Sink

_KERNEL_NATIVE = ("BF16", "F32", "F64")


def kernel_arrays(tensor: PlannedTensor, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Arrays of one kernel dtype: as stored when all share a bf16/f32/f64 dtype, else float32."""
    codes = set(tensor.in_dtypes)
    if len(codes) == 1 and codes <= set(_KERNEL_NATIVE):
        return arrays
    return [
        a.astype(np.float32) if code == "F16" else to_float32(a)
        for code, a in zip(tensor.in_dtypes, arrays, strict=True)
    ]


def _out_buffer(tensor: PlannedTensor) -> np.ndarray:
    n = tensor.out_info.numel
    if tensor.out_dtype == "F16":  # numba has no float16: compute in float32, round after
        return np.empty(n, np.float32)
    return np.empty(n, dtypes.storage(tensor.out_dtype))


def _read(plan: Plan, tensor: PlannedTensor) -> list[np.ndarray]:
    """Every source's array of the tensor; an empty array where a task vector leaves it out."""
    return [
        np.empty(0, dtypes.storage(code)) if content == ABSENT else src.read(tensor.name)
        for src, code, content in zip(plan.sources, tensor.in_dtypes, tensor.contents, strict=True)
    ]


def _check_carried(plan: Plan, tensor: PlannedTensor, arrays: list[np.ndarray]) -> None:
    present = zip(plan.sources[1:], arrays[1:], tensor.contents[1:], strict=True)
    for src, a, content in present:
        if content != ABSENT and not np.array_equal(a, arrays[0]):
            raise MismatchError(
                f"tensor {tensor.name!r} ({tensor.out_dtype}) differs between "
                f"{plan.sources[0].label} and {src.label}: {tensor.out_dtype} tensors are "
                "carried through unchanged and must be identical in every input"
            )


def stream(plan: Plan) -> Iterator[tuple[PlannedTensor, list[np.ndarray]]]:
    """Every merged tensor with its kernel arrays, one at a time (for extra passes)."""
    for t in plan.tensors:
        if t.merged:
            yield t, kernel_arrays(t, _read(plan, t))


def execute(
    plan: Plan,
    method: Method,
    sink: Sink,
    provenance: Provenance,
    *,
    check_finite: bool = True,
    progress: bool = False,
) -> Any:
    """Run ``method`` over ``plan`` into ``sink``; returns what the sink returns.

    Raises:
        NonFiniteError: an input holds NaN/Inf and ``check_finite`` is on.
        MismatchError: a carried-through (integer/bool) tensor differs between inputs.
        OutputError: the output cannot be written. Nothing is left behind on any error.
    """
    sink.begin(plan)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapt-read")
    try:
        method.prepare(plan, lambda: stream(plan))
        sink.reserve(provenance.metadata(final=False))
        tensors = plan.tensors
        with Progress(plan.out_bytes, enabled=progress) as bar:
            ahead: Future[list[np.ndarray]] | None = (
                reader.submit(_read, plan, tensors[0]) if tensors else None
            )
            for i, t in enumerate(tensors):
                assert ahead is not None
                arrays = ahead.result()
                ahead = reader.submit(_read, plan, tensors[i + 1]) if i + 1 < len(tensors) else None
                sink.write(t, _merge_one(plan, method, t, arrays, check_finite))
                bar.advance(t.out_info.nbytes)
        return sink.finish(provenance.metadata(final=True))
    except BaseException:
        provenance.cancel()
        sink.abort()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


def _merge_one(
    plan: Plan, method: Method, t: PlannedTensor, arrays: list[np.ndarray], check_finite: bool
) -> np.ndarray:
    if not t.merged:
        _check_carried(plan, t, arrays)
        return arrays[0]
    out = _out_buffer(t)
    bad = method.merge(t, kernel_arrays(t, arrays), out, check_finite)
    if bad >= 0:
        raise NonFiniteError(
            f"{plan.sources[bad].label}: tensor {t.name!r} holds NaN or Inf "
            "(pass --allow-nonfinite to merge anyway)"
        )
    return out.astype(np.float16) if t.out_dtype == "F16" else out
