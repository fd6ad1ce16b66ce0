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


def compression_summary(src: Source) -> dict[str, Any] | None:
    """Size figures of a ComPEFT source (None for any other source), from headers only: bits
    per parameter of the file and of its payloads, the entropy bound H(d) + d at the coded
    density d, and the ratio against the original dtypes."""
    from . import dtypes
    from .compeft import CompressedSource, bound_bits

    if not isinstance(src, CompressedSource):
        return None
    h = src.header
    n = max(h.parameters, 1)
    file_bytes = sum(f.stat().st_size for f in src.files) if src.files else src.payload_bytes
    original = sum(c.numel * dtypes.itemsize(c.dtype) for c in src.codes.values())
    return {
        "update": h.update,
        "density": h.density,
        "alpha": h.alpha,
        "scope": h.scope,
        "sigma": h.sigma,
        "scale": h.scale,
        "parameters": h.parameters,
        "kept": h.kept,
        "coded": h.coded,
        "file_bytes": file_bytes,
        "payload_bytes": src.payload_bytes,
        "bits_per_parameter": 8 * file_bytes / n,
        "payload_bits_per_parameter": 8 * src.payload_bytes / n,
        "bound_bits_per_parameter": bound_bits(h.coded / n),
        "original_bytes": original,
        "original_dtypes": sorted({c.dtype for c in src.codes.values()}),
        "ratio": original / max(file_bytes, 1),
    }
