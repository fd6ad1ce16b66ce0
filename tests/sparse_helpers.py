"""Shared helpers of the sparse fine-tune tests: models, numpy references, other tools' files
built from their documented layouts."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SHAPES = {"a.weight": (6, 5), "b.bias": (7,), "c.conv": (3, 4, 5), "head.weight": (2, 6)}


def model(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A small state dict with 1-D, 2-D and 3-D tensors and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    return state | {"ids": torch.arange(4)}


def finetune(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.05, frac: float = 0.5
) -> dict[str, torch.Tensor]:
    """``base`` with a random ``frac`` of its float entries moved by ~``scale``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in base.items():
        if not t.is_floating_point():
            out[n] = t.clone()
            continue
        move = torch.rand(t.shape, generator=g) < frac
        delta = torch.randn(t.shape, generator=g) * scale
        out[n] = (t.double() + delta.double() * move).to(t.dtype)
    return out


def flat(t: torch.Tensor) -> np.ndarray:
    """float64 numpy copy of a tensor, flattened."""
    return t.detach().to(torch.float64).reshape(-1).numpy()


def kept_reference(
    base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], k: int, names: list[str]
) -> dict[str, np.ndarray]:
    """Global top-k by float32 |ft - base| over ``names`` in sorted order (stable: earlier
    tensor, lower index first), nonzero entries only."""
    names = sorted(names)
    taus = [(flat(ft[n]) - flat(base[n])).astype(np.float32) for n in names]
    cat = np.concatenate(taus)
    mask = np.zeros(cat.size, bool)
    mask[np.argsort(-np.abs(cat), kind="stable")[:k]] = True
    mask &= cat != 0
    parts = np.split(mask, np.cumsum([t.size for t in taus])[:-1])
    return {n: np.flatnonzero(m) for n, m in zip(names, parts, strict=True)}


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor (for bit-exact comparisons)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(view).reshape(-1).numpy()


def exact_sum(start: float, terms: list[tuple[float, float]]) -> float:
    """``start + sum s * v`` in exact rational arithmetic, rounded once to float64."""
    acc = Fraction(start)
    for s, v in terms:
        acc += Fraction(s) * Fraction(v)
    return float(acc)


def round_to(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded as adapt's output does (bf16 and f16 through float32)."""
    t = torch.from_numpy(np.asarray(x, np.float64))
    if dtype == torch.float64:
        return t
    return t.to(torch.float32).to(dtype)


def save_composable(
    path: Path,
    diffs: dict[str, torch.Tensor],
    abs_: dict[str, torch.Tensor] | None = None,
    steps_as_tensor: bool = False,
) -> Path:
    """A composable-sft ``pytorch_diff.bin`` of dense deltas, from its documented layout:
    flat COLUMN-major indices of the nonzero entries, sorted, delta-coded (the first step a
    numpy int64, as composable-sft's encoder leaves it)."""
    encoded = {}
    for name, d in diffs.items():
        nz = d.nonzero(as_tuple=False).numpy()  # (k, ndim) coordinates
        shape = tuple(d.shape)
        multipliers = np.cumprod([1, *shape[:-1]], dtype=np.int64)
        cm = nz.astype(np.int64) @ multipliers if nz.size else np.zeros(0, np.int64)
        order = np.argsort(cm)
        cm = cm[order]
        values = d[tuple(torch.from_numpy(nz[order]).T)] if nz.size else d.reshape(-1)[:0]
        steps: list | torch.Tensor = [cm[0], *(int(x) for x in np.diff(cm))] if cm.size else []
        if steps_as_tensor:
            steps = torch.from_numpy(np.concatenate([cm[:1], np.diff(cm)]))
        encoded[name] = {"size": d.size(), "index_steps": steps, "values": values.clone()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"diffs": encoded, "abs": dict(abs_ or {})}, path)
    return path


def save_spiel(
    folder: Path,
    deltas: dict[str, torch.Tensor],
    whole: dict[str, torch.Tensor] | None = None,
    shuffle: bool = False,
) -> Path:
    """A SpIEL (PEFT-SFT) adapter folder: ``base_model.model.<module>.sft_delta.indices``
    (ROW-major flat int32) and ``.values`` per ``<module>.weight`` delta, ``modules_to_save``
    tensors under their own names, and an ``adapter_config.json`` with ``peft_type: SFT``."""
    tensors = {}
    for name, d in deltas.items():
        module = name.removesuffix(".weight")
        idx = d.reshape(-1).nonzero().reshape(-1)
        if shuffle:
            idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))]
        prefix = f"base_model.model.{module}.sft_delta."
        tensors[prefix + "indices"] = idx.to(torch.int32)
        tensors[prefix + "values"] = d.reshape(-1)[idx].clone()
    for name, t in (whole or {}).items():
        tensors[f"base_model.model.{name}"] = t.clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "SFT",
        "task_type": "CAUSAL_LM",
        "density": 0.01,
        "target_modules": [n.removesuffix(".weight") for n in deltas],
        "modules_to_save": sorted({n.rpartition(".")[0] for n in whole or {}}) or None,
        "dtype": "float32",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
