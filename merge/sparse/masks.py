"""Mask algebra: sets of positions per tensor, their union, intersection and difference, the
mask of a sparse fine-tune or of a ComPEFT expert, and a fine-tune restricted to a mask.

A :class:`Mask` maps tensor names to increasing flat row-major positions (int64) and knows each
tensor's shape. Tensors a fine-tune stores whole are not part of its mask (they are not
sparse); :func:`restrict` keeps them as they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import CorruptFileError, MismatchError
from ..kernels import sparse as kernels
from ..kernels.positions import CodeError, decode_positions, encode_positions
from ..provenance import Provenance
from .container import CONTENT, Builder, Entry, Header, SparseFineTune, SparseSource
from .interop import open_sparse


class Mask:
    """Positions per tensor (increasing, distinct, row-major) and the tensors' shapes.

    Example:
        >>> m = mask_of("lang.sft.safetensors") & mask_of("task.sft.safetensors")  # doctest: +SKIP
        >>> m.count, m.density  # doctest: +SKIP
    """

    def __init__(self, positions: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]):
        if set(positions) != set(shapes):
            raise ValueError("positions and shapes must name the same tensors")
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
        self.positions: dict[str, np.ndarray] = {}
        for name, p in positions.items():
            p = np.ascontiguousarray(p, np.int64).reshape(-1)
            n = math.prod(self.shapes[name])
            if p.size and (p[0] < 0 or p[-1] >= n or not (np.diff(p) > 0).all()):
                raise ValueError(f"tensor {name!r}: positions must be increasing, in [0, {n})")
            self.positions[name] = p

    @property
    def names(self) -> list[str]:
        return list(self.positions)

    @property
    def count(self) -> int:
        """Positions in the mask."""
        return sum(p.size for p in self.positions.values())

    @property
    def numel(self) -> int:
        """Entries of the tensors the mask covers."""
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        return self.count / self.numel if self.numel else 0.0

    def _shapes_with(self, other: Mask) -> dict[str, tuple[int, ...]]:
        for name in self.shapes.keys() & other.shapes.keys():
            if self.shapes[name] != other.shapes[name]:
                raise MismatchError(
                    f"tensor {name!r}: shape {list(self.shapes[name])} in one mask but "
                    f"{list(other.shapes[name])} in the other"
                )
        return self.shapes | other.shapes

    def __or__(self, other: Mask) -> Mask:
        shapes = self._shapes_with(other)
        empty = np.zeros(0, np.int64)
        return Mask(
            {
                n: kernels.union(self.positions.get(n, empty), other.positions.get(n, empty))
                for n in shapes
            },
            shapes,
        )

    def __and__(self, other: Mask) -> Mask:
        shapes = self._shapes_with(other)
        common = [n for n in shapes if n in self.positions and n in other.positions]
        return Mask(
            {n: kernels.intersect(self.positions[n], other.positions[n])[0] for n in common},
            {n: shapes[n] for n in common},
        )

    def __sub__(self, other: Mask) -> Mask:
        self._shapes_with(other)
        return Mask(
            {
                n: kernels.difference(p, other.positions[n]) if n in other.positions else p
                for n, p in self.positions.items()
            },
            self.shapes,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self.shapes == other.shapes and all(
            np.array_equal(p, other.positions[n]) for n, p in self.positions.items()
        )

    __hash__ = None  # type: ignore[assignment]

    def to_torch(self) -> dict[str, Any]:
        """``{name: torch.BoolTensor}`` of each tensor's shape, True at the mask's positions."""
        import torch

        out = {}
        for name, p in self.positions.items():
            m = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool)
            m[torch.from_numpy(p)] = True
            out[name] = m.reshape(self.shapes[name])
        return out

    @classmethod
    def from_torch(cls, masks: Mapping[str, Any]) -> Mask:
        """A mask from ``{name: bool tensor}`` (True = in the mask)."""
        return cls(
            {
                n: m.detach().cpu().reshape(-1).nonzero().reshape(-1).numpy()
                for n, m in masks.items()
            },
            {n: tuple(m.shape) for n, m in masks.items()},
        )

    def __repr__(self) -> str:
        n = len(self.positions)
        return f"Mask({n} tensors, {self.count:,} positions, density {self.density:.4g})"


def union(*masks: Mask) -> Mask:
    """Positions in any of the masks."""
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def intersection(*masks: Mask) -> Mask:
    """Positions in every mask (tensors absent from a mask drop out)."""
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def difference(a: Mask, b: Mask) -> Mask:
    """Positions of ``a`` not in ``b``."""
    return a - b


def mask_of(sft: str | os.PathLike[str] | SparseSource, **options: Any) -> Mask:
    """The positions of a sparse fine-tune's sparse tensors (``options``: of
    :func:`open_sparse`, e.g. ``base`` for SpIEL or ``allow_pickle``)."""
    src = open_sparse(sft, **options)
    names = src.sparse_names
    return Mask({n: src.positions(n) for n in names}, {n: src.entries[n].shape for n in names})


def compeft_mask(expert: Any) -> Mask:
    """The kept (coded) positions of a ComPEFT expert (container path or in-memory expert),
    read with :mod:`merge.compeft`'s reader."""
    from ..compeft import open_compressed

    src = open_compressed(expert)
    positions = {}
    for name, code in src.codes.items():
        payload, _ = src.payload(name)
        try:
            positions[name] = decode_positions(payload, code.count, code.numel, code.m)
        except CodeError as e:
            raise CorruptFileError(f"{src.label}: tensor {name!r}: {e}") from None
    return Mask(positions, {n: c.shape for n, c in src.codes.items()})


class Restrict:
    """Provenance of :func:`restrict`."""

    name: ClassVar[str] = "sparse-restrict"
    content: ClassVar[str] = CONTENT

    def __init__(self, mask: Mask):
        self.mask = mask

    def parameters(self) -> dict[str, Any]:
        return {"mask_positions": self.mask.count, "mask_tensors": len(self.mask.positions)}


def restrict(
    sft: str | os.PathLike[str] | SparseSource,
    mask: Mask,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    **options: Any,
) -> Path | SparseFineTune:
    """The fine-tune with only the entries inside ``mask`` (tensors stored whole are kept).

    Returns:
        The container path, or a :class:`SparseFineTune` when ``out`` is None.

    Raises:
        MismatchError: the mask gives a tensor another shape.
    """
    src = open_sparse(sft, **options)
    builder = Builder(Path(out) if out is not None else None, overwrite, (src,))
    prov = Provenance(Restrict(mask), (src,), ("sft",))  # type: ignore[arg-type]
    try:
        builder.begin()
        for name, e in src.entries.items():
            if e.dense:
                builder.add(e, src.record(name))
                continue
            shape = mask.shapes.get(name, e.shape)
            if shape != e.shape:
                raise MismatchError(
                    f"{src.label}: tensor {name!r}: shape {list(e.shape)} but "
                    f"{list(shape)} in the mask"
                )
            keep = mask.positions.get(name, np.zeros(0, np.int64))
            record = src.record(name)
            common, ia, _ = kernels.intersect(src.positions(name, record), keep)
            payload, m = encode_positions(common, e.numel)
            kept: tuple[np.ndarray, ...] = (payload, record[1][ia])
            if e.wide:  # float64 overrides of the kept entries, re-indexed
                _, new, old = kernels.intersect(ia, record[2])
                kept += (new, record[3][old]) if new.size else ()
            inexact = 0 if e.inexact == 0 else None
            wide = kept[2].size if len(kept) > 2 else 0
            fields = {"count": common.size, "m": m, "inexact": inexact, "wide": wide}
            builder.add(Entry(**(asdict(e) | fields)), kept)
        sparse = [e for e in builder.entries if not e.dense]
        coded = sum(e.count for e in sparse)
        header = Header(
            "restrict",
            None,
            None,
            None,
            src.header.values,
            src.header.dense_patterns,
            src.header.parameters,
            coded,
            coded,
        )
        return builder.finish(header, prov.metadata(final=True))
    except BaseException:
        prov.cancel()
        builder.abort()
        raise
