"""The streaming executor: walk the plan, read each tensor from every source, merge, write.

Memory is bounded by a few copies of the largest tensor: the current tensor's arrays, the
next tensor's arrays (read ahead on a thread while the kernel runs, into a second reused
buffer), and the output buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import dtypes
from .errors import MismatchError, NonFiniteError
from .methods.base import Method, Rows
from .plan import ABSENT, Plan, PlannedTensor
from .progress import Progress
from .provenance import Provenance
from .writer import Sink

_KERNEL_NATIVE = ("BF16", "F32", "F64")


class _Buffers:
    """Reused byte buffers: a tensor's rows land in pages already mapped by earlier tensors."""

    def __init__(self) -> None:
        self._slots: dict[int, np.ndarray] = {}

    def take(self, slot: int, nbytes: int) -> np.ndarray:
        buf = self._slots.get(slot)
        if buf is None or buf.size < nbytes:
            buf = self._slots[slot] = np.empty(nbytes, np.uint8)
        return buf[:nbytes]


def _kernel_dtype(tensor: PlannedTensor) -> np.dtype:
    present = {c for c, x in zip(tensor.in_dtypes, tensor.contents, strict=True) if x != ABSENT}
    if not tensor.merged or (len(present) == 1 and present <= set(_KERNEL_NATIVE)):
        return dtypes.storage(tensor.in_dtypes[0])
    return np.dtype(np.float32)


def _into(row: np.ndarray, a: np.ndarray, code: str) -> None:
    if a.dtype == row.dtype:
        row[:] = a
    elif code == "BF16":  # exact: bf16 bits are the top half of float32 bits
        bits = row.view(np.uint32)
        bits[:] = a
        bits <<= 16
    else:
        np.copyto(row, a, casting="unsafe")  # float16/float64 -> float32


def _read(
    plan: Plan,
    tensor: PlannedTensor,
    buffers: _Buffers | None = None,
    slot: int = 0,
    files_only: bool = False,
) -> Rows:
    """Every source's array of the tensor as :class:`Rows` of one kernel dtype.

    ``files_only`` reads only what plain file I/O can fill (the read-ahead thread must not run
    numba kernels: the workqueue threading layer serves one calling thread at a time); the
    rest is left to :func:`_complete`.
    """
    kind = _kernel_dtype(tensor)
    k, n = len(plan.sources), tensor.out_info.numel
    nbytes = k * n * kind.itemsize
    raw = buffers.take(slot, nbytes) if buffers is not None else np.empty(nbytes, np.uint8)
    rows = Rows()
    rows.matrix = raw.view(kind).reshape(k, n)
    rows.pending = []
    triples = zip(plan.sources, tensor.in_dtypes, tensor.contents, strict=True)
    for i, (row, (src, code, content)) in enumerate(zip(rows.matrix, triples, strict=True)):
        read_into = getattr(src, "read_into", None)
        if content == ABSENT:
            rows.append(row[:0])
        elif read_into is not None and dtypes.storage(code) == kind:
            read_into(tensor.name, row)
            rows.append(row)
        else:
            rows.append(row)
            rows.pending.append(i)
    return rows if files_only else _complete(plan, tensor, rows)


def _complete(plan: Plan, tensor: PlannedTensor, rows: Rows) -> Rows:
    """Fill the rows :func:`_read` left (computed sources, dtype conversions)."""
    for i in rows.pending:
        _into(rows[i], plan.sources[i].read(tensor.name), tensor.in_dtypes[i])
    rows.pending = []
    return rows


def kernel_arrays(tensor: PlannedTensor, arrays: list[np.ndarray]) -> Rows:
    """``arrays`` (sources order) as :class:`Rows` of one kernel dtype (a copy unless they
    already are Rows)."""
    if isinstance(arrays, Rows):
        return arrays
    kind = _kernel_dtype(tensor)
    rows = Rows()
    rows.matrix = np.empty((len(arrays), tensor.out_info.numel), kind)
    rows.pending = []
    for row, a, code, content in zip(
        rows.matrix, arrays, tensor.in_dtypes, tensor.contents, strict=True
    ):
        if content == ABSENT:
            rows.append(row[:0])
        else:
            _into(row, a, code)
            rows.append(row)
    return rows


def _out_buffer(tensor: PlannedTensor) -> np.ndarray:
    n = tensor.out_info.numel
    if tensor.out_dtype == "F16":  # numba has no float16: compute in float32, round after
        return np.empty(n, np.float32)
    return np.empty(n, dtypes.storage(tensor.out_dtype))


def _check_carried(plan: Plan, tensor: PlannedTensor, arrays: list[np.ndarray]) -> None:
    present = zip(plan.sources[1:], arrays[1:], tensor.contents[1:], strict=True)
    for src, a, content in present:
        if content != ABSENT and not np.array_equal(a, arrays[0]):
            raise MismatchError(
                f"tensor {tensor.name!r} ({tensor.out_dtype}) differs between "
                f"{plan.sources[0].label} and {src.label}: {tensor.out_dtype} tensors are "
                "carried through unchanged and must be identical in every input"
            )


def stream(plan: Plan) -> Iterator[tuple[PlannedTensor, Rows]]:
    """Every merged tensor with its rows, one at a time (for extra passes); each item's rows
    are valid until the next item is taken."""
    buffers = _Buffers()
    for t in plan.tensors:
        if t.merged:
            yield t, _read(plan, t, buffers)


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
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapt-write")
    written: Future[None] | None = None  # at most one tensor being written behind the kernels
    try:
        method.prepare(plan, lambda: stream(plan))
        sink.reserve(provenance.metadata(final=False))
        tensors = plan.tensors
        with Progress(plan.out_bytes, enabled=progress) as bar:
            buffers = _Buffers()  # two slots: one read ahead while the other is merged
            ahead: Future[Rows] | None = (
                reader.submit(_read, plan, tensors[0], buffers, 0, True) if tensors else None
            )
            for i, t in enumerate(tensors):
                assert ahead is not None
                arrays = _complete(plan, t, ahead.result())
                if i + 1 < len(tensors):
                    nxt = tensors[i + 1]
                    ahead = reader.submit(_read, plan, nxt, buffers, (i + 1) % 2, True)
                data = _merge_one(plan, method, t, arrays, check_finite)
                if written is not None:
                    written.result()
                written = writer.submit(sink.write, t, data)
                bar.advance(t.out_info.nbytes)
            if written is not None:
                written.result()
        return sink.finish(provenance.metadata(final=True))
    except BaseException:
        provenance.cancel()
        writer.shutdown(wait=True)  # let a write in flight end before its file is removed
        sink.abort()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)


def _merge_one(
    plan: Plan, method: Method, t: PlannedTensor, arrays: list[np.ndarray], check_finite: bool
) -> np.ndarray:
    if not t.merged:
        _check_carried(plan, t, arrays)
        return arrays[0].copy()  # the row's buffer is refilled while the copy is written
    out = _out_buffer(t)
    bad = method.merge(t, kernel_arrays(t, arrays), out, check_finite)
    if bad >= 0:
        raise NonFiniteError(
            f"{plan.sources[bad].label}: tensor {t.name!r} holds NaN or Inf "
            "(pass --allow-nonfinite to merge anyway)"
        )
    return out.astype(np.float16) if t.out_dtype == "F16" else out
