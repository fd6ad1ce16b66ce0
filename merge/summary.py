"""What ``adapt inspect`` reports about a source: format, counts, dtypes, bytes, metadata."""

from __future__ import annotations

import json
from typing import Any

from .sources import Source


def summarize(src: Source) -> dict[str, Any]:
    """A JSON-ready summary of a source, from its headers only (no tensor data is read)."""
    by_dtype: dict[str, dict[str, int]] = {}
    params = nbytes = 0
    for name in src.names:
        info = src.info(name)
        d = by_dtype.setdefault(info.dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        d["tensors"] += 1
        d["parameters"] += info.numel
        d["bytes"] += info.nbytes
        params += info.numel
        nbytes += info.nbytes
    metadata: dict[str, Any] = {}
    for key, value in src.metadata.items():
        try:
            metadata[key] = json.loads(value) if key.startswith("adapt_") else value
        except (TypeError, json.JSONDecodeError):
            metadata[key] = value
    return {
        "path": src.label,
        "format": src.kind,
        "files": [str(f) for f in src.files],
        "tensors": len(src.names),
        "parameters": params,
        "bytes": nbytes,
        "dtypes": dict(sorted(by_dtype.items())),
        "metadata": metadata,
    }


def layer_table(
    src: Source, alpha: float, beta: float, pattern: str | None = None
) -> list[dict[str, Any]]:
    """Each tensor's LiNeS stack, 1-based block and scale lambda(l) (``None`` outside blocks)."""
    from .errors import ParameterError
    from .lines import LayerSchedule

    try:
        schedule = LayerSchedule.from_names(src.names, alpha, beta, pattern)
    except ValueError as e:
        raise ParameterError(str(e)) from None
    rows = []
    for name in src.names:
        stack, block, scale = schedule.describe(name)
        rows.append({"name": name, "stack": stack, "block": block, "scale": scale})
    return rows
