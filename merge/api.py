"""Library entry points: open sources, run a method, make a soup."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import dtypes
from .engine import execute
from .errors import ParameterError
from .methods.base import Method
from .methods.soup import Soup
from .plan import Plan, build_plan
from .provenance import Provenance
from .sources import Source, open_source
from .writer import DEFAULT_SHARD_SIZE, SafetensorsSink, StateDictSink, parse_size

Input = str | os.PathLike | Mapping[str, Any] | Source


def open(path: str | os.PathLike[str] | Mapping[str, Any]) -> Source:
    """Open a safetensors file, model folder, sharded folder or state dict lazily.

    See :func:`merge.sources.open_source`.
    """
    return open_source(path)


def _as_source(x: Input, label: str) -> Source:
    if isinstance(x, (str, os.PathLike)):
        return open_source(x)
    if isinstance(x, Mapping):
        src = open_source(x)
        src.label = label
        return src
    return x


def plan(
    inputs: Sequence[Input],
    *,
    base: Input | None = None,
    dtype: str | None = None,
    deltas: bool = False,
) -> Plan:
    """Open and validate inputs (names, shapes, dtypes) without reading tensor data.

    ``deltas=True`` marks every input as a task vector (theta_i - theta_0); files adapt wrote
    as task vectors are recognised from their metadata without it.
    """
    sources = [_as_source(x, f"<input {i}>") for i, x in enumerate(inputs)]
    if deltas:
        for src in sources:
            src.delta = True
    base_src = _as_source(base, "<base>") if base is not None else None
    return build_plan(sources, base_src, dtypes.parse(dtype) if dtype else None)


def check(method: Method, p: Plan) -> None:
    """Everything about ``method`` on plan ``p`` that can be refused before any work.

    Raises:
        ParameterError: bad parameters, a base missing or extra, a task vector given to a
            method that averages weights.
    """
    method.validate(len(p.inputs))
    if method.needs_base and p.base is None:
        raise ParameterError(f"method {method.name!r} needs a base model (--base)")
    if not method.needs_base and p.base is not None:
        raise ParameterError(f"method {method.name!r} takes no base model; drop --base")
    for src in p.inputs:
        if src.delta and not method.needs_base:
            raise ParameterError(
                f"{src.label}: holds a task vector; {method.name!r} averages weights: give "
                "--base and a task-vector method (task-arithmetic, ties, dare-*)"
            )


def run(
    method: Method,
    inputs: Sequence[Input],
    *,
    base: Input | None = None,
    out: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    deltas: bool = False,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path | dict[str, Any]:
    """Run a merge method over inputs, streaming tensor by tensor.

    Args:
        method: a method instance, e.g. ``Soup(weights=(0.7, 0.3))``.
        inputs: paths (``.safetensors`` files, model folders, sharded folders) or state dicts.
        base: the base model, for methods over task vectors.
        deltas: the inputs are task vectors (theta_i - theta_0), not fine-tuned weights.
        out: ``None`` returns a ``dict[str, torch.Tensor]``; a path ending in ``.safetensors``
            writes one file; any other path writes a model folder (sharded above
            ``shard_size``, config and tokenizer files copied from the base or first input).
        dtype: output dtype (``bf16``, ``float16``, ``float32``, ``float64``); default: each
            tensor keeps its input dtype (inputs must then agree).
        shard_size: largest shard of a folder output, bytes or ``"5GB"``.
        allow_nonfinite: merge inputs holding NaN/Inf instead of refusing them.
        overwrite: replace an existing output.
        progress: show a progress bar on stderr.

    Returns:
        The output path, or the merged state dict when ``out`` is None.

    Raises:
        AdaptError: any bad input or option; the message names the file and the tensor.
    """
    p = plan(inputs, base=base, dtype=dtype, deltas=deltas)
    check(method, p)
    out_code = dtypes.parse(dtype) if dtype else None
    if out is None:
        sink: SafetensorsSink | StateDictSink = StateDictSink()
    else:
        ref = p.base if p.base is not None else p.inputs[0]
        size = parse_size(shard_size)
        sink = SafetensorsSink(
            out,
            shard_size=size,
            copy_from=ref.folder,
            out_dtype=out_code,
            overwrite=overwrite,
            recipe_options={
                "dtype": dtype,
                "deltas": deltas,
                "allow_nonfinite": allow_nonfinite,
                "shard_size": None if size == DEFAULT_SHARD_SIZE else shard_size,
            },
        )
    roles = (("base",) if p.base is not None else ()) + ("input",) * len(p.inputs)
    prov = Provenance(method, p.sources, roles)
    return execute(p, method, sink, prov, check_finite=not allow_nonfinite, progress=progress)


def soup(
    inputs: Sequence[Input],
    weights: Sequence[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Path | dict[str, Any]:
    """Uniform or weighted model soup: theta = sum_i w_i theta_i / sum_i w_i.

    Weights are normalised to sum to one. Options are those of :func:`run`.

    Example:
        >>> sd = merge.soup([sd_a, sd_b], weights=[0.7, 0.3])   # doctest: +SKIP
        >>> merge.soup(["a.safetensors", "b.safetensors"], out="soup.safetensors")  # doctest: +SKIP
    """
    w = tuple(float(x) for x in weights) if weights is not None else None
    return run(Soup(weights=w), inputs, out=out, **options)
