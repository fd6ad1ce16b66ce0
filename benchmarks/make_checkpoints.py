"""Write deterministic synthetic Llama checkpoints (bf16) for merge benchmarks.

Usage::

    python benchmarks/make_checkpoints.py --preset tiny|small --n 3 --out DIR \
        [--shard-size 2GB] [--seed 0]

Writes ``DIR/base`` and ``DIR/ft1 .. DIR/ftN``, each a Hugging Face model folder
(``config.json``, ``generation_config.json`` and ``model.safetensors`` or
transformers-style shards with ``model.safetensors.index.json``).

Tensors are generated one at a time with a ``torch.Generator`` seeded from the
seed, the checkpoint and the tensor name, and streamed straight to all N+1
output files, so peak memory is a few times the largest tensor (~0.5 GB for
``small``) and the bytes are reproducible.  Fine-tunes are ``base + low-rank
delta (rank 4) + sparse delta (~1% of entries)`` for 2-D tensors and
``base + small dense noise`` for 1-D norms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

PRESETS: dict[str, dict[str, int]] = {
    # ~22.2M parameters.
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=8,
        intermediate_size=688,
        vocab_size=32000,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    # ~373.9M parameters.
    "small": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        intermediate_size=2816,
        vocab_size=32000,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
}

BASE_STD = 0.02  # std of base 2-D weights (Llama initializer_range)
LOWRANK_RANK = 4
LOWRANK_STD = 1e-3  # std of each low-rank delta entry (~5% of BASE_STD; survives bf16)
SPARSE_FRAC = 0.01  # fraction of entries hit by the sparse delta
SPARSE_STD = 5e-3  # std of the sparse delta values
NORM_NOISE_STD = 1e-2  # dense noise on 1-D norm weights (base norms are 1.0 + noise)
MARKER = ".complete"
VERSION = 1  # bump when the generation recipe changes


@dataclass(frozen=True)
class TensorSpec:
    """Name and shape of one checkpoint tensor."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return 2 * self.numel  # bf16


def llama_specs(cfg: dict[str, int]) -> list[TensorSpec]:
    """Tensor names/shapes of transformers' LlamaForCausalLM, in state_dict order."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", (h, h)),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, h)),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, h)),
            TensorSpec(p + "self_attn.o_proj.weight", (h, h)),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, h)),
            TensorSpec(p + "mlp.up_proj.weight", (inter, h)),
            TensorSpec(p + "mlp.down_proj.weight", (h, inter)),
            TensorSpec(p + "input_layernorm.weight", (h,)),
            TensorSpec(p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [TensorSpec("model.norm.weight", (h,)), TensorSpec("lm_head.weight", (v, h))]
    return specs


def config_json(cfg: dict[str, int]) -> dict[str, object]:
    """A LlamaConfig JSON readable by transformers 4.x and 5.x."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": BASE_STD,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }


GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}


def parse_size(text: str) -> int:
    """Parse '2GB', '200MB', '1.5GiB' or a plain byte count (transformers uses 10**9)."""
    t = text.strip().upper().replace(" ", "")
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    if t.endswith("B"):
        t = t[:-1]
    return int(t)


def plan_shards(specs: list[TensorSpec], shard_size: int | None) -> list[list[TensorSpec]]:
    """Split tensors into shards the way transformers does (greedy, in order)."""
    if shard_size is None or sum(s.nbytes for s in specs) <= shard_size:
        return [specs]
    shards: list[list[TensorSpec]] = [[]]
    cur = 0
    for s in specs:
        if shards[-1] and cur + s.nbytes > shard_size:
            shards.append([])
            cur = 0
        shards[-1].append(s)
        cur += s.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards (``model.safetensors`` when unsharded)."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """Length-prefixed safetensors header for bf16 tensors laid out in ``specs`` order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        header[s.name] = {
            "dtype": "BF16",
            "shape": list(s.shape),
            "data_offsets": [off, off + s.nbytes],
        }
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte align the data section, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _gen(seed: int, model: str, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{model}:{name}".encode())) % 2**62)
    return g


def base_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The base model's tensor in float32."""
    g = _gen(seed, "base", spec.name)
    if len(spec.shape) == 1:
        return 1.0 + NORM_NOISE_STD * torch.randn(spec.shape, generator=g)
    return BASE_STD * torch.randn(spec.shape, generator=g)


def finetune_delta(spec: TensorSpec, seed: int, ft: int) -> torch.Tensor:
    """The float32 delta of fine-tune ``ft`` (1-based) for one tensor."""
    g = _gen(seed, f"ft{ft}", spec.name)
    if len(spec.shape) == 1:
        return NORM_NOISE_STD * torch.randn(spec.shape, generator=g)
    rows, cols = spec.shape
    # A @ B with entries of std LOWRANK_STD: each factor std = (LOWRANK_STD**2 / r) ** 0.25.
    f = (LOWRANK_STD**2 / LOWRANK_RANK) ** 0.25
    a = torch.randn((rows, LOWRANK_RANK), generator=g) * f
    b = torch.randn((LOWRANK_RANK, cols), generator=g) * f
    delta = a @ b
    k = max(1, int(SPARSE_FRAC * spec.numel))
    idx = torch.randint(0, spec.numel, (k,), generator=g)
    vals = torch.randn((k,), generator=g) * SPARSE_STD
    delta.view(-1).index_add_(0, idx, vals)
    return delta


def bf16_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of ``t`` cast to bf16."""
    return memoryview(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()).cast("B")


def generate_tensors(
    specs: list[TensorSpec], seed: int, n: int
) -> Iterator[tuple[TensorSpec, list[memoryview]]]:
    """Yield, per tensor, the bf16 bytes for [base, ft1, .., ftN]."""
    for spec in specs:
        base = base_tensor(spec, seed)
        out = [bf16_bytes(base)]
        for ft in range(1, n + 1):
            out.append(bf16_bytes(base + finetune_delta(spec, seed, ft)))
        del base
        yield spec, out


def write_models(
    out: Path, cfg: dict[str, int], n: int, seed: int, shard_size: int | None
) -> tuple[int, int]:
    """Write base + N fine-tunes into ``out``; return (parameters, bytes per model)."""
    specs = llama_specs(cfg)
    shards = plan_shards(specs, shard_size)
    names = shard_names(len(shards))
    models = ["base"] + [f"ft{i}" for i in range(1, n + 1)]
    for m in models:
        d = out / m
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config_json(cfg), indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        if len(shards) > 1:
            weight_map = {s.name: names[i] for i, sh in enumerate(shards) for s in sh}
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for shard, fname in zip(shards, names, strict=True):
        header = safetensors_header(shard)
        with contextlib.ExitStack() as stack:
            files: list[BinaryIO] = [
                stack.enter_context(open(out / m / fname, "wb")) for m in models
            ]
            for f in files:
                f.write(header)
            for _spec, blobs in generate_tensors(shard, seed, n):
                for f, blob in zip(files, blobs, strict=True):
                    f.write(blob)
    return sum(s.numel for s in specs), sum(s.nbytes for s in specs)


def make_checkpoints(
    preset: str, n: int, out: str | Path, shard_size: str | None = None, seed: int = 0
) -> Path:
    """Create (or reuse, when the marker matches) the checkpoints; return ``out``."""
    out = Path(out)
    cfg = PRESETS[preset]
    size = parse_size(shard_size) if shard_size else None
    key = {"version": VERSION, "preset": preset, "n": n, "seed": seed, "shard_size": size}
    marker = out / MARKER
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
            if info.get("args") == key:
                print(
                    f"[make_checkpoints] {out}: up to date (preset={preset} n={n} "
                    f"params={info['parameters']:,} bytes/model={info['bytes_per_model']:,}), "
                    "skipping"
                )
                return out
        except (OSError, json.JSONDecodeError):
            pass
        marker.unlink()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    params, nbytes = write_models(out, cfg, n, seed, size)
    dt = time.perf_counter() - t0
    info = {"args": key, "parameters": params, "bytes_per_model": nbytes, "seconds": round(dt, 2)}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"[make_checkpoints] {out}: preset={preset} params={params:,} "
        f"bytes/model={nbytes:,} ({nbytes / 1e9:.3f} GB) models={n + 1} "
        f"total={(n + 1) * nbytes / 1e9:.3f} GB in {dt:.1f}s"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--n", type=int, default=3, help="number of fine-tunes")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--shard-size", default=None, help="e.g. 2GB, 200MB (transformers units)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    make_checkpoints(a.preset, a.n, a.out, a.shard_size, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
