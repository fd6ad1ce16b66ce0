"""The plan: every tensor name, shape and dtype checked across inputs before any work.

A plan is built from sources alone (headers, no tensor data). Float tensors are merged;
integer, bool and float8 tensors are carried through and must be identical in every input.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import dtypes
from .errors import MismatchError, ParameterError
from .safetensors_file import TensorInfo
from .sources import Source

_SHOW = 5

WEIGHTS, DELTA, ABSENT = "weights", "delta", "absent"


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, shape, per-source dtypes and contents, output dtype."""

    name: str
    shape: tuple[int, ...]
    in_dtypes: tuple[str, ...]
    out_dtype: str
    merged: bool  # False: carried through unchanged (integer/bool/float8)
    contents: tuple[str, ...] = ()  # per source: WEIGHTS, DELTA (task vector) or ABSENT (zero)

    @property
    def out_info(self) -> TensorInfo:
        return TensorInfo(self.out_dtype, self.shape)


@dataclass(frozen=True)
class Plan:
    """Validated work list. ``sources`` is ``(base, *inputs)`` when there is a base."""

    tensors: tuple[PlannedTensor, ...]
    inputs: tuple[Source, ...]
    base: Source | None

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.base, *self.inputs) if self.base is not None else self.inputs

    @property
    def out_bytes(self) -> int:
        return sum(t.out_info.nbytes for t in self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.out_info.numel for t in self.tensors)

    def peak_estimate(self) -> int:
        """Bytes the engine holds at once: the largest tensor in every source, as float32
        temporaries where a method needs them, plus the output buffer."""
        largest = max((t.out_info.numel for t in self.tensors), default=0)
        return largest * 4 * (len(self.sources) + 2)


def _names_list(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def _content(src: Source, name: str) -> str:
    if name not in src.names_set:
        return ABSENT
    if src.delta and name not in getattr(src, "replaced", ()):
        return DELTA
    return WEIGHTS


def build_plan(
    inputs: list[Source], base: Source | None = None, out_dtype: str | None = None
) -> Plan:
    """Check that all sources describe the same tensors and return the plan.

    Without a base, every input must hold every tensor, with one float dtype per tensor
    (unless ``out_dtype`` is given). With a base, the base names the tensors; task-vector
    inputs (``src.delta``) may leave tensors out (a zero update), and float dtypes may differ
    (computed in float32; the output keeps the base's dtype unless ``out_dtype`` is given).

    Raises:
        MismatchError: names, shapes or dtypes differ (the message names the tensor and files).
    """
    if not inputs:
        raise ParameterError("no inputs given")
    sources = [base, *inputs] if base is not None else list(inputs)
    ref = sources[0]
    ref_names = ref.names
    ref_set = set(ref_names)
    for src in sources[1:]:
        names = src.names_set
        missing = [n for n in ref_names if n not in names]
        if missing and not (base is not None and src.delta):
            raise MismatchError(
                f"{src.label}: missing {len(missing)} tensor(s) present in {ref.label}: "
                f"{_names_list(missing)}"
            )
        extra = [n for n in src.names if n not in ref_set]
        if extra:
            raise MismatchError(
                f"{src.label}: has {len(extra)} tensor(s) not in {ref.label}: {_names_list(extra)}"
            )
    tensors = []
    for name in ref_names:
        contents = tuple(_content(src, name) for src in sources)
        r = ref.info(name)
        in_dtypes = [r.dtype]
        for src, content in zip(sources[1:], contents[1:], strict=True):
            if content == ABSENT:
                in_dtypes.append(r.dtype)
                continue
            info = src.info(name)
            in_dtypes.append(info.dtype)
            if info.shape != r.shape:
                raise MismatchError(
                    f"tensor {name!r}: shape {list(r.shape)} in {ref.label} but "
                    f"{list(info.shape)} in {src.label}"
                )
            if dtypes.is_float(info.dtype) != dtypes.is_float(r.dtype) or (
                not dtypes.is_float(r.dtype) and info.dtype != r.dtype
            ):
                raise MismatchError(
                    f"tensor {name!r}: dtype {r.dtype} in {ref.label} but {info.dtype} "
                    f"in {src.label}"
                )
            if info.dtype != r.dtype and out_dtype is None and base is None:
                raise MismatchError(
                    f"tensor {name!r}: dtype {r.dtype} in {ref.label} but {info.dtype} in "
                    f"{src.label}; pass --dtype to choose the output dtype (inputs are then "
                    "computed in float32)"
                )
        merged = dtypes.is_float(r.dtype)
        out = (out_dtype or r.dtype) if merged else r.dtype
        tensors.append(PlannedTensor(name, r.shape, tuple(in_dtypes), out, merged, contents))
    return Plan(tuple(tensors), tuple(inputs), base)
