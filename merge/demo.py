"""A built-in example: a tiny random Llama base and two fine-tunes of it, made offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of transformers' LlamaForCausalLM for ``config``."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def _save(folder: Path, state: dict[str, np.ndarray]) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(a).to(torch.bfloat16) for k, a in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def build(folder: Path, num_finetunes: int = 2, seed: int = 0) -> tuple[Path, list[Path]]:
    """Write ``base/`` and ``ft1/``.. ``ftN/`` model folders under ``folder``.

    Each fine-tune is the base plus a small low-rank update of every matrix and a few
    large sparse changes, the shape of a real fine-tune's task vector.
    """
    rng = np.random.default_rng(seed)
    shapes = llama_shapes(CONFIG)
    base = {
        k: (np.ones(s, np.float32) if len(s) == 1 else rng.normal(0, 0.02, s).astype(np.float32))
        for k, s in shapes.items()
    }
    _save(folder / "base", base)
    fts = []
    for n in range(1, num_finetunes + 1):
        ft = {}
        for k, w in base.items():
            if w.ndim == 1:
                ft[k] = w + rng.normal(0, 0.01, w.shape).astype(np.float32)
                continue
            a = rng.normal(0, 1, (w.shape[0], 4)).astype(np.float32)
            b = rng.normal(0, 1, (4, w.shape[1])).astype(np.float32)
            sparse = (rng.random(w.shape) < 0.01) * rng.normal(0, 0.02, w.shape)
            ft[k] = w + 1e-3 * (a @ b) + sparse.astype(np.float32)
        _save(folder / f"ft{n}", ft)
        fts.append(folder / f"ft{n}")
    return folder / "base", fts
