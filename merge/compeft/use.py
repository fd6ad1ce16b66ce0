"""Using compressed experts: decompress to a dense file (or adapter folder), apply onto a base.

Both stream tensor by tensor through the engine and the writer. ``apply`` runs the engine over
the base alone and adds each tensor's update into the output buffer with the fused
decode + add kernel (O(kept) work on top of copying the base).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import dtypes
from ..api import Input, _as_source
from ..engine import execute
from ..errors import InputError, ParameterError
from ..kernels.convert import copy_finite, from_float32
from ..lora import _AdapterSink
from ..methods.base import Method
from ..plan import Plan, PlannedTensor, build_plan
from ..provenance import Provenance
from ..sources import open_source
from ..writer import (
    DEFAULT_SHARD_SIZE,
    SafetensorsSink,
    StateDictSink,
    check_output,
    parse_size,
)
from .compress import CITATION
from .container import CompressedSource

ADAPTERS = {"lora": "LoRA", "ia3": "(IA)3"}


def open_compressed(expert: str | os.PathLike[str] | CompressedSource) -> CompressedSource:
    """A ComPEFT container (path) or an in-memory expert as a :class:`CompressedSource`.

    Raises:
        InputError: the file is not a ComPEFT container.
    """
    if isinstance(expert, CompressedSource):
        return expert
    src = open_source(expert)
    if not isinstance(src, CompressedSource):
        raise InputError(f"{src.label}: not a ComPEFT file (no adapt_format: compeft metadata)")
    return src


@dataclass
class _Decode(Method):
    """Each tensor decoded: ``baseline + update``, rounded to the output dtype."""

    expert: CompressedSource
    name: ClassVar[str] = "compeft-decompress"
    citation: ClassVar[str] = CITATION

    @property
    def content(self) -> str:  # type: ignore[override]
        return "model" if self.expert.header.update in ADAPTERS else "task_vector"

    def parameters(self) -> dict[str, Any]:
        h = self.expert.header
        return {"scale": h.scale, "baseline": h.baseline, "update": h.update}

    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        x = arrays[0]
        if self.expert.header.baseline:
            x = x + np.float32(self.expert.header.baseline)
        from_float32(x, out)
        return -1


@dataclass
class _Apply(Method):
    """``base + update``: the base copied, then the update added at its coded positions."""

    expert: CompressedSource
    name: ClassVar[str] = "compeft-apply"
    citation: ClassVar[str] = CITATION

    def parameters(self) -> dict[str, Any]:
        return {"scale": self.expert.header.scale}

    def merge(
        self, tensor: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray, check_finite: bool
    ) -> int:
        if not check_finite:
            np.copyto(out, arrays[0])
        elif not copy_finite(arrays[0], out):
            return 0
        if tensor.name in self.expert.names_set:
            self.expert.add_into(tensor.name, out)
        return -1


def decompress(
    expert: str | os.PathLike[str] | CompressedSource,
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path | dict[str, Any]:
    """Decode a compressed expert to dense tensors.

    A compressed fine-tune or task vector becomes a task-vector safetensors file (metadata
    ``adapt_content: task_vector``, so ``adapt merge --base`` reads it as one). A compressed
    adapter becomes its parameters again (baseline + update): a PEFT adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``) when ``out`` is a folder.

    Args:
        dtype: output dtype; default each tensor's original dtype (``float32`` is exact).
        out: ``.safetensors`` file, folder, or None for a ``dict[str, torch.Tensor]``.
    """
    src = open_compressed(expert)
    code = dtypes.parse(dtype) if dtype else None
    plan = build_plan([src])
    tensors = tuple(replace(t, out_dtype=code or src.codes[t.name].dtype) for t in plan.tensors)
    plan = replace(plan, tensors=tensors)
    method = _Decode(src)
    prov = Provenance(method, (src,), ("expert",))
    if out is None:
        return execute(plan, method, StateDictSink(), prov, progress=progress)  # type: ignore[no-any-return]
    out = Path(out)
    if src.header.update in ADAPTERS and out.suffix != ".safetensors":
        if src.adapter_config is None:
            raise InputError(f"{src.label}: holds no adapter config; write a .safetensors file")
        sink: SafetensorsSink = _AdapterSink(out, src.adapter_config, overwrite)
    else:
        sink = SafetensorsSink(out, overwrite=overwrite)
    return execute(plan, method, sink, prov, progress=progress)  # type: ignore[no-any-return]


def apply(
    expert: str | os.PathLike[str] | CompressedSource,
    base: Input,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> Path | dict[str, Any]:
    """``base + decoded update``, streamed tensor by tensor, decoding fused with the add.

    The output keeps the base's dtypes; a folder output gets the base's config and tokenizer
    files. A compressed adapter has no weight update to add (it decodes to its own
    parameters): decompress it to an adapter folder instead.

    Raises:
        MismatchError: the expert's tensors are not in the base or have other shapes.
        ParameterError: the expert is a compressed adapter.
    """
    src = open_compressed(expert)
    update = src.header.update
    if update in ADAPTERS:
        raise ParameterError(
            f"{src.label}: holds a compressed {ADAPTERS[update]} adapter (its own parameters, "
            f"not a weight update): run `adapt decompress {src.label} -o ADAPTER_DIR` and load "
            "that folder on the base with peft"
        )
    base_src = _as_source(base, "<base>")
    full = build_plan([src], base_src)
    tensors = tuple(
        replace(t, in_dtypes=t.in_dtypes[:1], contents=t.contents[:1]) for t in full.tensors
    )
    plan = Plan(tensors, (base_src,), None)
    method = _Apply(src)
    if out is None:
        sink: SafetensorsSink | StateDictSink = StateDictSink()
    else:
        check_output(Path(out), full, overwrite)
        sink = SafetensorsSink(
            out, shard_size=parse_size(shard_size), copy_from=base_src.folder, overwrite=overwrite
        )
    prov = Provenance(method, (base_src, src), ("base", "expert"))
    return execute(plan, method, sink, prov, check_finite=not allow_nonfinite, progress=progress)  # type: ignore[no-any-return]
