"""Composing sparse fine-tunes onto a base: ``theta = theta0 + sum_i s_i phi_i`` (``revert``:
``theta0 - sum_i s_i phi_i``), streamed tensor by tensor through the engine and the writer.

Each touched entry is the exact real sum of the base value and every scaled delta, rounded
once to the output dtype (:mod:`merge.kernels.sparse`): the result does not depend on the order
of the fine-tunes, nor on how they are grouped. A tensor a fine-tune stores whole replaces the
base's (the other fine-tunes' deltas are then added onto it); two fine-tunes storing the same
tensor whole cannot be composed, and such a tensor cannot be reverted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import dtypes
from ..api import Input, _as_source
from ..engine import execute
from ..errors import MismatchError, ParameterError
from ..kernels.convert import copy_finite, from_float32
from ..kernels.soup import weighted_rows
from ..methods.base import Method
from ..plan import Plan, PlannedTensor, build_plan
from ..provenance import Provenance
from ..writer import DEFAULT_SHARD_SIZE, SafetensorsSink, StateDictSink, check_output, parse_size
from .container import SparseSource, add_records, as_float
from .extract import CITATION
from .interop import open_sparse

SparseInput = str | os.PathLike[str] | SparseSource
_ONE = np.ones(1)
_FIRST = np.zeros(1, np.int64)


@dataclass
class Compose(Method):
    """``base + sum_i s_i phi_i`` per tensor: the base (or a tensor stored whole) copied, then
    every fine-tune's delta added at its positions, exactly, rounded once."""

    sfts: tuple[SparseSource, ...]
    scales: tuple[float, ...]
    revert: bool = False
    name: ClassVar[str] = "sparse-apply"
    citation: ClassVar[str] = CITATION

    def parameters(self) -> dict[str, Any]:
        return {"scales": list(self.scales), "revert": self.revert}

    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        name = tensor.name
        whole = [src for src in self.sfts if name in src.replaced]
        if whole:
            src = whole[0]
            data = src.record(name)[0]
            code = src.entries[name].dtype
            if code == tensor.out_dtype and out.dtype == data.dtype:
                out[:] = data
            else:
                from_float32(np.asarray(as_float(data, code), np.float32), out)
        elif arrays[0].dtype == out.dtype:
            if not copy_finite(arrays[0], out) and check_finite:
                return 0
        elif weighted_rows(arrays[0][None, :], _FIRST, _ONE, out, check_finite) >= 0:
            return 0
        sign = -1.0 if self.revert else 1.0
        streams = [
            (src, name, sign * s)
            for src, s in zip(self.sfts, self.scales, strict=True)
            if name in src.entries and name not in src.replaced
        ]
        add_records(out, streams)
        return -1


def _scales(scales: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if scales is None:
        return (1.0,) * n
    scales = tuple(float(s) for s in scales)
    if len(scales) != n:
        raise ParameterError(f"--scale has {len(scales)} value(s) but there are {n} fine-tunes")
    if not all(math.isfinite(s) for s in scales):
        raise ParameterError(f"--scale must be finite, got {list(scales)}")
    return scales


def apply(
    base: Input,
    sfts: Sequence[SparseInput],
    out: str | os.PathLike[str] | None = None,
    *,
    scales: Sequence[float] | None = None,
    revert: bool = False,
    dtype: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> Path | dict[str, Any]:
    """``base + sum_i s_i phi_i`` (``revert``: minus), streamed tensor by tensor.

    Every touched entry is the exact sum rounded once, so the result is the same for any
    order of ``sfts``. The output keeps the base's dtypes unless ``dtype`` is given; a folder
    output gets the base's config and tokenizer files.

    Args:
        base: the base model (file, folder, sharded folder or state dict).
        sfts: sparse fine-tunes: adapt containers, composable-sft ``pytorch_diff.bin`` files or
            folders (with ``allow_pickle``), SpIEL adapter folders or files.
        out: ``.safetensors`` file, model folder, or None for a ``dict[str, torch.Tensor]``.
        scales: one multiplier per fine-tune (default 1).
        revert: subtract the fine-tunes instead (tensors stored whole cannot be reverted).
        dtype: output dtype (``float32``...); default each tensor keeps the base's.
        allow_pickle: read composable-sft pickles with ``torch.load(weights_only=True)``.

    Raises:
        MismatchError: a fine-tune's tensors are not in the base or have other shapes, or two
            fine-tunes store the same tensor whole.
        CorruptFileError: a payload is corrupt (checksum, code, position out of range).
        ParameterError: bad scales, or ``revert`` with a tensor stored whole.

    Example:
        >>> apply("base/", ["l.sft.safetensors", "t.sft.safetensors"], "out/")  # doctest: +SKIP
    """
    if not sfts:
        raise ParameterError("no sparse fine-tunes given")
    base_src = _as_source(base, "<base>")
    sources = tuple(open_sparse(s, base=base_src, allow_pickle=allow_pickle) for s in sfts)
    factors = _scales(scales, len(sources))
    code = dtypes.parse(dtype) if dtype else None
    full = build_plan(list(sources), base_src, code)
    owner: dict[str, str] = {}
    for src in sources:
        for name in sorted(src.replaced):
            if revert:
                raise ParameterError(
                    f"{src.label}: stores tensor {name!r} whole (a replacement, not a delta): "
                    "it cannot be reverted"
                )
            if name in owner:
                raise MismatchError(
                    f"tensor {name!r} is stored whole in both {owner[name]} and {src.label}: "
                    "they cannot be composed"
                )
            owner[name] = src.label
    tensors = tuple(
        replace(t, in_dtypes=t.in_dtypes[:1], contents=t.contents[:1]) for t in full.tensors
    )
    plan = Plan(tensors, (base_src,), None)
    method = Compose(sources, factors, revert)
    if out is None:
        sink: SafetensorsSink | StateDictSink = StateDictSink()
    else:
        check_output(Path(out), full, overwrite)
        sink = SafetensorsSink(
            out,
            shard_size=parse_size(shard_size),
            copy_from=base_src.folder,
            out_dtype=code,
            overwrite=overwrite,
        )
    roles = ("base",) + ("sft",) * len(sources)
    prov = Provenance(method, (base_src, *sources), roles)
    return execute(plan, method, sink, prov, check_finite=not allow_nonfinite, progress=progress)  # type: ignore[no-any-return]


def revert(
    model: Input,
    sfts: Sequence[SparseInput],
    out: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Path | dict[str, Any]:
    """``model - sum_i s_i phi_i``: :func:`apply` with ``revert=True`` (same options)."""
    return apply(model, sfts, out, revert=True, **options)
