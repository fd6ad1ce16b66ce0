"""Tiny transformers models and PEFT LoRA adapters built in the test, plus peft references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "tie_word_embeddings": False,
}
GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTN, "gate_proj", "up_proj", "down_proj"]


def save_llama(folder: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (hidden 32, 2 layers, vocab 128) saved as safetensors."""
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(folder)
    return folder


def save_gpt2(folder: Path, seed: int = 0) -> Path:
    """A random GPT2LMHeadModel (Conv1D layers store (in, out))."""
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**GPT2)).save_pretrained(folder)
    return folder


def make_adapter(base: Path, out: Path, seed: int, **config: Any) -> Path:
    """A peft LoRA adapter of ``base`` with random non-zero A and B (peft inits B = 0) and
    perturbed modules_to_save copies, saved with ``save_pretrained``."""
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out)
    return out


def input_ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids()).logits


def model_logits(folder: Path) -> torch.Tensor:
    """Logits of a model folder loaded by transformers (adapt's merged output)."""
    return logits(AutoModelForCausalLM.from_pretrained(folder))


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Logits of ``base`` with an adapter loaded by ``PeftModel.from_pretrained`` (unmerged)."""
    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))


def peft_merged_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Logits of peft's own ``merge_and_unload`` of one adapter."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return logits(model.merge_and_unload())


def peft_cat_logits(base: Path, adapters: list[Path], weights: list[float]) -> torch.Tensor:
    """peft's ``add_weighted_adapter(combination_type="cat")`` + ``merge_and_unload``."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0"
    )
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    model.set_adapter("cat")
    return logits(model.merge_and_unload())


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's own ``get_delta_weight`` per module, in the weight's layout, by base name."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in module.scaling:
            out[name + ".weight"] = module.get_delta_weight("default").detach()
    return out


def lora_orientation(delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    return delta.T if transposed else delta


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def edit_adapter(
    src: Path, dst: Path, config: dict[str, Any] | None = None, tensors: dict | None = None
) -> Path:
    """A copy of an adapter folder with config keys and tensors replaced (None deletes)."""
    cfg, state = read_adapter(src)
    for k, v in (config or {}).items():
        cfg[k] = v
    for k, v in (tensors or {}).items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(state, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst
