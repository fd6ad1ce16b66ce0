"""What sparse fine-tunes hold and how they overlap: density per tensor and per block, norms,
pairwise Jaccard overlap of the positions and sign conflicts on the shared ones.

Streams tensor by tensor: one tensor's positions and values of every fine-tune at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import MismatchError, ParameterError
from ..kernels.sparse import intersect
from ..lines import block_of
from .container import SparseSource
from .interop import open_sparse


def _norms(values: np.ndarray) -> dict[str, float]:
    return {
        "l1": float(np.abs(values).sum()),
        "l2": float(math.sqrt(float(np.dot(values, values)))),
        "max_abs": float(np.abs(values).max()) if values.size else 0.0,
    }


def _shapes(sources: Sequence[SparseSource]) -> dict[str, tuple[int, ...]]:
    """Every sparse tensor's shape (agreeing across the fine-tunes), names in first-seen order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for src in sources:
        for name in src.sparse_names:
            shape = src.entries[name].shape
            if shapes.setdefault(name, shape) != shape:
                raise MismatchError(
                    f"tensor {name!r}: shape {list(shapes[name])} in one fine-tune but "
                    f"{list(shape)} in {src.label}"
                )
    return shapes


def _jaccard(shared: int, union: int) -> float:
    return shared / union if union else 0.0


def stats(sfts: Sequence[str | os.PathLike[str] | SparseSource], **options: Any) -> dict[str, Any]:
    """Statistics of one or more sparse fine-tunes (``options``: of :func:`open_sparse`).

    Returns:
        A JSON-ready dict: ``sfts`` (per fine-tune: totals, norms, dense tensors, ``tensors``
        and ``blocks`` with their densities) and ``pairs`` (per pair ``i < j``: shared
        positions, union, Jaccard, sign conflicts on the shared positions, overall and per
        tensor).
    """
    if not sfts:
        raise ParameterError("no sparse fine-tunes given")
    sources = [open_sparse(s, **options) for s in sfts]
    shapes = _shapes(sources)
    per = [
        {
            "path": src.label,
            "format": src.kind,
            "origin": src.header.origin,
            "parameters": 0,
            "count": 0,
            "inexact": 0,
            "dense": sorted(src.replaced),
            "tensors": [],
            "blocks": {},
        }
        for src in sources
    ]
    sums = [np.zeros(3) for _ in sources]  # l1, sum of squares, max |v|
    pairs = [
        {"a": i, "b": j, "shared": 0, "union": 0, "sign_conflicts": 0, "tensors": []}
        for i in range(len(sources))
        for j in range(i + 1, len(sources))
    ]
    for name, shape in shapes.items():
        numel = math.prod(shape)
        block = block_of(name) or ("(outside blocks)", -1)  # (stack, 0-based index)
        held = []
        for k, src in enumerate(sources):
            if name not in src.entries or src.entries[name].dense:
                held.append((np.zeros(0, np.int64), np.zeros(0)))
                continue
            e = src.entries[name]
            record = src.record(name)
            positions, values = src.positions(name, record), src.values(name, record)
            held.append((positions, values))
            norms = _norms(values)
            row = {"name": name, "shape": list(shape), "numel": numel, "count": e.count}
            row |= {"density": e.count / numel if numel else 0.0, "inexact": e.inexact} | norms
            per[k]["tensors"].append(row)
            per[k]["parameters"] += numel
            per[k]["count"] += e.count
            if per[k]["inexact"] is not None:
                per[k]["inexact"] = None if e.inexact is None else per[k]["inexact"] + e.inexact
            b = per[k]["blocks"].setdefault(block, {"numel": 0, "count": 0})
            b["numel"] += numel
            b["count"] += e.count
            sums[k] += (norms["l1"], norms["l2"] ** 2, 0.0)
            sums[k][2] = max(sums[k][2], norms["max_abs"])
        for pair in pairs:
            (pa, va), (pb, vb) = held[pair["a"]], held[pair["b"]]
            if not pa.size and not pb.size:
                continue
            common, ia, ib = intersect(pa, pb)
            conflicts = int(np.count_nonzero(np.sign(va[ia]) * np.sign(vb[ib]) < 0))
            union = pa.size + pb.size - common.size
            pair["shared"] += common.size
            pair["union"] += union
            pair["sign_conflicts"] += conflicts
            pair["tensors"].append(
                {
                    "name": name,
                    "shared": int(common.size),
                    "union": int(union),
                    "jaccard": _jaccard(common.size, union),
                    "sign_conflicts": conflicts,
                }
            )
    for k, p in enumerate(per):
        n = p["parameters"]
        p["density"] = p["count"] / n if n else 0.0
        p |= {"l1": sums[k][0], "l2": math.sqrt(sums[k][1]), "max_abs": sums[k][2]}
        p["blocks"] = [
            {
                "block": stack if i < 0 else f"{stack}.{i}",
                **v,
                "density": v["count"] / v["numel"] if v["numel"] else 0.0,
            }
            for (stack, i), v in sorted(p["blocks"].items())
        ]
    for pair in pairs:
        pair["jaccard"] = _jaccard(pair["shared"], pair["union"])
    return {"sfts": per, "pairs": pairs}
