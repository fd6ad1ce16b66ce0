"""Shared helpers of the ComPEFT tests: a numpy reference of the formula, file surgery."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np


def topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest magnitudes of float32 ``x``, lowest index first among ties."""
    mask = np.zeros(x.size, bool)
    mask[np.argsort(-np.abs(x.astype(np.float32)), kind="stable")[:k]] = True
    return mask


def reference(
    update: Mapping[str, np.ndarray], density: float, scale: float, scope: str = "global"
) -> dict[str, np.ndarray]:
    """The ternary update of the formula: sign(tau) * scale on the top-k, 0 elsewhere (float32).

    Global scope: top ``round(density * d)`` of the concatenation in sorted-name order.
    """
    names = sorted(update)
    flats = [np.asarray(update[n], np.float32).reshape(-1) for n in names]
    if scope == "global":
        cat = np.concatenate(flats)
        mask = topk_mask(cat, round(density * cat.size))
        masks = np.split(mask, np.cumsum([f.size for f in flats])[:-1])
    else:
        masks = [topk_mask(f, round(density * f.size)) for f in flats]
    s = np.float32(scale)
    return {
        n: (np.sign(f) * s * m).astype(np.float32).reshape(np.shape(update[n]))
        for n, f, m in zip(names, flats, masks, strict=True)
    }


def sigma(update: Mapping[str, np.ndarray]) -> float:
    """Standard deviation (ddof 1) of the whole update, float64 over its float32 values."""
    cat = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in update.values()])
    return float(np.std(cat.astype(np.float64), ddof=1))


def entropy_bound(density: float) -> float:
    """H(d) + d bits per parameter."""
    d = density
    return float(-d * np.log2(d) - (1 - d) * np.log2(1 - d) + d)


def header_size(path: Path) -> int:
    """Bytes before the tensor data of a safetensors file."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def rewrite_metadata(path: Path, edit: Callable[[dict[str, str]], None]) -> None:
    """Rewrite a safetensors file with its ``__metadata__`` changed by ``edit`` (data kept)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header["__metadata__"])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def data_offset(path: Path, tensor: str) -> tuple[int, int]:
    """Absolute byte range of a tensor's data in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def assert_one_line_error(result: object, *needles: str) -> None:
    """A CLI failure: exit != 0, one stderr line ``adapt: error: ...`` with every needle."""
    code, err = result.code, result.err  # type: ignore[attr-defined]
    assert code != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adapt: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def leftovers(folder: Path) -> list[str]:
    """Temporary files adapt may have left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".adapt-" in p.name)
