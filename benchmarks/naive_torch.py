"""Naive whole-state-dict merge baselines, the way a typical research script does it.

Usage::

    python benchmarks/naive_torch.py soup --out OUT IN1 IN2 ...
    python benchmarks/naive_torch.py task-arithmetic --base B --lam 1.0 --out OUT IN1 ...
    python benchmarks/naive_torch.py ties --base B --density 0.2 --out OUT IN1 ...
    python benchmarks/naive_torch.py dare-linear --base B --density 0.5 --seed 0 --out OUT IN1 ...
    python benchmarks/naive_torch.py dare-ties --base B --density 0.5 --seed 0 --out OUT IN1 ...

Inputs are model folders (``model.safetensors`` or a sharded index) or ``.safetensors``
files.  Every input is loaded fully with ``safetensors.torch.load_file``; the math is
float32 per tensor (PEFT-style ties / dare), the result is cast back to the first
input's dtype and written as ``OUT/model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


def load_state_dict(path: str) -> StateDict:
    """Load a whole checkpoint (single file, folder, or sharded folder) into memory."""
    p = Path(path)
    if p.is_file():
        return load_file(str(p))
    if (p / "model.safetensors").exists():
        return load_file(str(p / "model.safetensors"))
    index = json.loads((p / "model.safetensors.index.json").read_text())
    sd: StateDict = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(p / shard)))
    return sd


def soup(models: list[StateDict]) -> StateDict:
    """Uniform average of the models."""
    out = {}
    for k in models[0]:
        out[k] = torch.stack([m[k].float() for m in models]).mean(0).to(models[0][k].dtype)
    return out


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude (PEFT ``magnitude``)."""
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = True
    return t * mask.reshape(t.shape)


def random_prune(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep entries with probability ``density`` and rescale by 1/density."""
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density


def disjoint_merge(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election (by total) and mean over the agreeing, non-zero entries."""
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    mask = deltas.sign() == sign
    return (deltas * mask).sum(0) / mask.sum(0).clamp(min=1)


def merge_deltas(
    method: str, base: StateDict, models: list[StateDict], args: argparse.Namespace
) -> StateDict:
    """Task-vector methods: base + lam * combine(model - base)."""
    gen = torch.Generator().manual_seed(args.seed)
    out = {}
    for k, b in base.items():
        bf = b.float()
        deltas = [m[k].float() - bf for m in models]
        if method == "task-arithmetic":
            merged = torch.stack(deltas).sum(0)
        elif method == "ties":
            merged = disjoint_merge(torch.stack([magnitude_prune(d, args.density) for d in deltas]))
        elif method == "dare-linear":
            merged = torch.stack([random_prune(d, args.density, gen) for d in deltas]).sum(0)
        elif method == "dare-ties":
            merged = disjoint_merge(
                torch.stack([random_prune(d, args.density, gen) for d in deltas])
            )
        else:
            raise ValueError(method)
        out[k] = (bf + args.lam * merged).to(b.dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "method", choices=["soup", "task-arithmetic", "ties", "dare-linear", "dare-ties"]
    )
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    models = [load_state_dict(p) for p in args.inputs]
    if args.method == "soup":
        merged = soup(models)
    else:
        if not args.base:
            ap.error(f"{args.method} needs --base")
        merged = merge_deltas(args.method, load_state_dict(args.base), models, args)
    del models
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
