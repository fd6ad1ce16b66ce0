"""PEFT LoRA adapters: read as task vectors, merged into models and into one adapter, checked
against peft's own merge_and_unload / add_weighted_adapter("cat") on tiny random models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import snapshot
from lora_helpers import (
    ALL_LINEAR,
    ATTN,
    edit_adapter,
    make_adapter,
    model_logits,
    peft_cat_logits,
    peft_deltas,
    peft_logits,
    peft_merged_logits,
    read_adapter,
    save_gpt2,
    save_llama,
)
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file

import merge
from merge.lora import LoraSource, open_adapter, pattern_value

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny Llama base and adapters covering every supported LoRA feature."""
    root = tmp_path_factory.mktemp("llama")
    base = save_llama(root / "base")
    return SimpleNamespace(
        base=base,
        # per-module r and alpha (peft's pattern rules: suffix, regex, anchored)
        plain=make_adapter(
            base,
            root / "plain",
            1,
            r=4,
            lora_alpha=8,
            target_modules=ALL_LINEAR,
            rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
            alpha_pattern={"v_proj": 3, "^model.layers.1.mlp.up_proj": 16},
        ),
        # embedding LoRA (peft also saves the embedding's base layer) + modules_to_save
        rich=make_adapter(
            base,
            root / "rich",
            2,
            r=4,
            lora_alpha=4,
            target_modules=[*ATTN, "embed_tokens"],
            modules_to_save=["lm_head"],
        ),
        rs=make_adapter(
            base, root / "rs", 3, r=8, lora_alpha=4, use_rslora=True, target_modules=ALL_LINEAR
        ),
        other=make_adapter(
            base, root / "other", 4, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]
        ),
        # a large scale (alpha/r = 4): applying it twice would be obvious
        big=make_adapter(base, root / "big", 5, r=4, lora_alpha=16, target_modules=ATTN),
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("gpt2")
    base = save_gpt2(root / "base")
    targets = ["c_attn", "c_proj", "c_fc"]
    return SimpleNamespace(
        base=base,
        a=make_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=targets),
        b=make_adapter(base, root / "b", 2, r=2, lora_alpha=2, target_modules=["c_attn"]),
    )


def lora_product(folder: Path, module: str) -> torch.Tensor:
    """B @ A of one module of a written adapter (scale 1), in LoRA orientation (out, in)."""
    config, state = read_adapter(folder)
    assert config["use_rslora"] is False
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" in state:
        a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
    else:
        a, b = state[f"{key}.lora_embedding_A"], state[f"{key}.lora_embedding_B"]
    return b.double() @ a.double()


# --- reading adapters -------------------------------------------------------------------------


def test_adapter_opens_as_task_vectors_named_like_the_base(llama):
    src = merge.open(llama.rich)
    assert isinstance(src, LoraSource) and src.delta and src.kind == "LoRA adapter"
    base = merge.open(llama.base)
    assert set(src.names) <= set(base.names)
    assert "model.embed_tokens.weight" in src.names and "lm_head.weight" in src.names
    assert src.replaced == {"lm_head.weight", "model.embed_tokens.weight"}
    for name in src.names:
        assert src.info(name).shape == base.info(name).shape
    assert src.info("model.layers.0.self_attn.k_proj.weight").dtype == "F32"
    assert {f.name for f in src.files} == {"adapter_model.safetensors", "adapter_config.json"}


def test_rank_and_alpha_patterns_and_deltas_match_peft(llama):
    src = open_adapter(llama.plain / "adapter_config.json")
    mods = src.modules
    assert mods["model.layers.0.self_attn.q_proj.weight"].rank == 2
    assert mods["model.layers.1.self_attn.q_proj.weight"].rank == 4
    assert mods["model.layers.0.mlp.down_proj.weight"].scale == 8 / 6
    assert mods["model.layers.1.self_attn.v_proj.weight"].scale == 3 / 4
    assert mods["model.layers.1.mlp.up_proj.weight"].scale == 16 / 4
    assert mods["model.layers.0.mlp.up_proj.weight"].scale == 8 / 4
    for name, delta in peft_deltas(llama.base, llama.plain).items():
        got = src.read(name).reshape(src.info(name).shape)
        np.testing.assert_allclose(got, delta.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("patterns", "module"),
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj"),
        (["layers.0.self_attn.q_proj", "q_proj"], "model.layers.1.self_attn.q_proj"),
        (["^model.layers.1.mlp.up_proj"], "model.layers.1.mlp.up_proj"),
        (["^layers.1.mlp.up_proj"], "model.layers.1.mlp.up_proj"),
        (["proj"], "model.layers.1.mlp.up_proj"),
        (["model.layers.1.*"], "model.layers.1.self_attn.k_proj"),
        ([r".*\.k_proj", "k_proj"], "model.layers.0.self_attn.k_proj"),
        (["1.self_attn.k_proj"], "model.layers.11.self_attn.k_proj"),
    ],
)
def test_pattern_lookup_follows_peft(patterns, module):
    table = {p: i for i, p in enumerate(patterns)}
    want = table.get(get_pattern_key(list(table), module), -1)
    assert pattern_value(table, module, -1) == want


def test_embedding_and_modules_to_save_match_peft_merge(llama, tmp_path, run_cli):
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", llama.base, llama.rich, "-o", out, "-q")
    assert res.code == 0, res.err
    torch.testing.assert_close(model_logits(out), peft_merged_logits(llama.base, llama.rich), **TOL)


@pytest.mark.parametrize("adapter", ["plain", "rs", "big"])
def test_one_adapter_matches_peft_merge_and_unload(llama, adapter, tmp_path, run_cli):
    folder = getattr(llama, adapter)
    before = snapshot([folder, llama.base])
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", llama.base, folder, "-o", out, "-q")
    assert res.code == 0, res.err
    torch.testing.assert_close(model_logits(out), peft_merged_logits(llama.base, folder), **TOL)
    assert (out / "config.json").is_file()
    assert snapshot([folder, llama.base]) == before


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(gpt2, tmp_path, run_cli):
    assert json.loads((gpt2.a / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    out = tmp_path / "merged"
    assert run_cli("merge", "--base", gpt2.base, gpt2.a, "-o", out, "-q").code == 0
    torch.testing.assert_close(model_logits(out), peft_merged_logits(gpt2.base, gpt2.a), **TOL)


def test_weighted_linear_merge_matches_peft_cat(llama, tmp_path, run_cli):
    out = tmp_path / "merged"
    args = ["merge", "--base", llama.base, llama.plain, llama.other, "--weights", "0.7,0.3"]
    assert run_cli(*args, "-o", out, "-q").code == 0
    want = peft_cat_logits(llama.base, [llama.plain, llama.other], [0.7, 0.3])
    torch.testing.assert_close(model_logits(out), want, **TOL)


def test_library_run_with_adapters(llama):
    state = merge.run(merge.TaskArithmetic(lam=0.5), [llama.big], base=llama.base)
    base = load_file(str(llama.base / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    delta = peft_deltas(llama.base, llama.big)[name]
    torch.testing.assert_close(state[name], base[name] + 0.5 * delta, atol=1e-6, rtol=1e-5)
    assert torch.equal(state["model.norm.weight"], base["model.norm.weight"])


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare-linear", "dare-ties"])
def test_every_method_merges_adapters_into_a_loadable_model(llama, method, tmp_path, run_cli):
    out = tmp_path / method
    args = ["merge", "--base", llama.base, llama.plain, llama.rs, llama.rich]
    res = run_cli(*args, "--method", method, "--lines-beta", "0.5", "-o", out, "-q")
    assert res.code == 0, res.err
    got = model_logits(out)
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, model_logits(llama.base))


def test_adapter_and_full_finetune_in_one_merge(llama, tmp_path, run_cli):
    base = load_file(str(llama.base / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft_dir = tmp_path / "ft"
    ft_dir.mkdir()
    merge.run(merge.Soup(), [ft], out=ft_dir / "model.safetensors")
    out = tmp_path / "merged"
    args = ["merge", "--base", llama.base, llama.big, ft_dir, "--weights", "1,0.5", "-o", out]
    assert run_cli(*args, "-q").code == 0
    merged = load_file(str(out / "model.safetensors"))
    deltas = peft_deltas(llama.base, llama.big)
    for name, b in base.items():
        want = b + 0.5 * (ft[name] - b) + deltas.get(name, 0)
        torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(model_logits(out)).all()


# --- writing one adapter (--to-lora) ------------------------------------------------------------


def test_to_lora_linear_is_exact_concatenation_without_cross_terms(llama, tmp_path, run_cli):
    out = tmp_path / "lora"
    inputs = [llama.plain, llama.rs, llama.other]
    weights = [0.7, -0.4, 0.5]
    args = ["merge", "--base", llama.base, *inputs, "--weights", "0.7,-0.4,0.5", "--to-lora"]
    res = run_cli(*args, "-o", out, "-q")
    assert res.code == 0, res.err
    config, state = read_adapter(out)
    assert (config["use_rslora"], config["peft_type"]) == (False, "LORA")
    srcs = [open_adapter(a) for a in inputs]
    deltas = [peft_deltas(llama.base, a) for a in inputs]
    for name in set().union(*(s.modules for s in srcs)):
        module = name.removesuffix(".weight")
        want = sum(w * d[name].double() for w, d in zip(weights, deltas, strict=True) if name in d)
        torch.testing.assert_close(lora_product(out, module), want, atol=1e-6, rtol=1e-5)
        rank = sum(s.modules[name].rank for s in srcs if name in s.modules)
        assert state[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank
        assert pattern_value(config["rank_pattern"], module, config["r"]) == rank
        assert pattern_value(config["alpha_pattern"], module, config["lora_alpha"]) == rank
    full = tmp_path / "full"
    assert run_cli(*args[:-1], "-o", full, "-q").code == 0
    torch.testing.assert_close(peft_logits(llama.base, out), model_logits(full), **TOL)


def test_to_lora_rslora_merged_scale_is_one(llama, tmp_path, run_cli):
    """peft's add_weighted_adapter keeps use_rslora, so its merged adapter is scaled by
    r_new / sqrt(r_new) = sqrt(r_new) instead of 1; adapt writes scale 1."""
    out = tmp_path / "lora"
    assert run_cli("merge", "--base", llama.base, llama.rs, "--to-lora", "-o", out, "-q").code == 0
    config, _ = read_adapter(out)
    assert (config["use_rslora"], config["r"], config["lora_alpha"]) == (False, 8, 8)
    torch.testing.assert_close(
        peft_logits(llama.base, out), peft_merged_logits(llama.base, llama.rs), **TOL
    )


@pytest.mark.parametrize("method", ["ties", "dare-linear", "dare-ties"])
def test_to_lora_svd_applies_each_scale_once(llama, method, tmp_path, run_cli):
    """One adapter of scale 4, density 1: the merge is the adapter itself, of rank r, so the
    rank-r SVD is exact and must equal peft's merge (a second scale would give 16x)."""
    out = tmp_path / "lora"
    args = ["merge", "--base", llama.base, llama.big, "--method", method, "--density", "1"]
    res = run_cli(*args, "--to-lora", "-o", out)
    assert res.code == 0, res.err
    assert "by truncated SVD, retained energy 1.000000" in res.out
    config, _ = read_adapter(out)
    assert (config["r"], config["lora_alpha"]) == (4, 4)
    torch.testing.assert_close(
        peft_logits(llama.base, out), peft_merged_logits(llama.base, llama.big), **TOL
    )


def test_to_lora_svd_of_a_merge_within_rank_is_exact(llama, tmp_path, run_cli):
    """dare-linear at density 1 is a linear merge through the SVD path: rank 4 + 4 fits 8."""
    out = tmp_path / "lora"
    args = ["merge", "--base", llama.base, llama.big, llama.other, "--weights", "0.6,0.9"]
    assert (
        run_cli(
            *args,
            "--method",
            "dare-linear",
            "--density",
            "1",
            "--to-lora",
            "--rank",
            "8",
            "-o",
            out,
            "-q",
        ).code
        == 0
    )
    assert run_cli(*args, "--to-lora", "-o", tmp_path / "cat", "-q").code == 0
    torch.testing.assert_close(
        peft_logits(llama.base, out), peft_logits(llama.base, tmp_path / "cat"), **TOL
    )


def test_to_lora_truncation_reports_energy(llama, tmp_path, run_cli):
    out = tmp_path / "lora"
    args = ["merge", "--base", llama.base, llama.big, llama.other, "--to-lora", "--rank", "3"]
    res = run_cli(*args, "-o", out)
    assert res.code == 0, res.err
    module = "model.layers.0.self_attn.q_proj"
    dw = sum(
        peft_deltas(llama.base, a)[module + ".weight"].double() for a in (llama.big, llama.other)
    )
    s = torch.linalg.svdvals(dw)
    want = float((s[:3] ** 2).sum() / (s**2).sum())
    line = next(ln for ln in res.out.splitlines() if ln.endswith(" " + module))
    assert float(line.split()[2]) == pytest.approx(want, abs=2e-6)
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        meta = json.loads(f.metadata()["adapt_lora"])
    assert float(meta["energy"][module]) == pytest.approx(want, abs=2e-6)
    assert 0 < float(meta["energy_overall"]) < 1
    assert f"retained energy {meta['energy_overall']}" in res.out
    u, sv, vh = torch.linalg.svd(dw)
    best = u[:, :3] @ torch.diag(sv[:3]) @ vh[:3]
    torch.testing.assert_close(lora_product(out, module), best, atol=1e-5, rtol=1e-4)
    assert read_adapter(out)[0]["r"] == 3
    untouched = "model.layers.0.self_attn.k_proj"  # only in llama.big: rank 4 > 3, factored too
    assert read_adapter(out)[1][f"base_model.model.{untouched}.lora_A.weight"].shape[0] == 3


@pytest.mark.parametrize("method", ["ties", "dare-ties"])
def test_to_lora_at_full_rank_equals_the_model_merge(llama, method, tmp_path, run_cli):
    args = ["merge", "--base", llama.base, llama.plain, llama.rich, llama.rs, "--method", method]
    args += ["--density", "0.4", "--weights", "1,0.8,0.6"]
    assert run_cli(*args, "-o", tmp_path / "full", "-q").code == 0
    res = run_cli(*args, "--to-lora", "--rank", "128", "-o", tmp_path / "lora", "-q")
    assert res.code == 0, res.err
    config, state = read_adapter(tmp_path / "lora")
    assert config["modules_to_save"] == ["lm_head"] and "base_model.model.lm_head.weight" in state
    torch.testing.assert_close(
        peft_logits(llama.base, tmp_path / "lora"), model_logits(tmp_path / "full"), **TOL
    )


def test_to_lora_lines_is_exact_per_layer(llama, tmp_path, run_cli):
    args = ["merge", "--base", llama.base, llama.plain, llama.rich, "--lines-beta", "0.6"]
    assert run_cli(*args, "-o", tmp_path / "full", "-q").code == 0
    res = run_cli(*args, "--to-lora", "-o", tmp_path / "lora")
    assert res.code == 0, res.err
    assert "0 by truncated SVD" in res.out
    torch.testing.assert_close(
        peft_logits(llama.base, tmp_path / "lora"), model_logits(tmp_path / "full"), **TOL
    )


def test_to_lora_gpt2_conv1d(gpt2, tmp_path, run_cli):
    args = ["merge", "--base", gpt2.base, gpt2.a, gpt2.b, "--weights", "0.5,2"]
    assert run_cli(*args, "-o", tmp_path / "full", "-q").code == 0
    assert run_cli(*args, "--to-lora", "-o", tmp_path / "lora", "-q").code == 0
    config, _ = read_adapter(tmp_path / "lora")
    assert config["fan_in_fan_out"] is True
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    torch.testing.assert_close(
        peft_logits(gpt2.base, tmp_path / "lora"), model_logits(tmp_path / "full"), **TOL
    )


def test_to_lora_with_full_finetune_and_bf16(llama, tmp_path, run_cli):
    """A full fine-tune's update is kept on the adapter's modules (by SVD) and dropped elsewhere."""
    base = load_file(str(llama.base / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ft_file = tmp_path / "ft.safetensors"
    merge.run(merge.Soup(), [ft], out=ft_file)
    out = tmp_path / "lora"
    args = ["merge", "--base", llama.base, llama.big, ft_file, "--to-lora", "--rank", "32"]
    res = run_cli(*args, "--dtype", "bf16", "-o", out)
    assert res.code == 0, res.err
    assert "tensor(s) updated by non-adapter inputs lie outside" in res.out
    config, state = read_adapter(out)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    name = "model.layers.1.self_attn.v_proj"
    want = (
        peft_deltas(llama.base, llama.big)[name + ".weight"]
        + ft[name + ".weight"]
        - base[name + ".weight"]
    )
    torch.testing.assert_close(lora_product(out, name).float(), want, atol=2e-2, rtol=2e-2)
    assert "gate_proj" not in json.dumps(config["target_modules"])


# --- errors -----------------------------------------------------------------------------------


def one_line_error(res, *words: str) -> None:
    assert res.code != 0
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    for w in words:
        assert w in lines[0], lines[0]


def test_dora_adapter_is_refused_naming_use_dora(llama, tmp_path, run_cli):
    dora = make_adapter(
        llama.base, tmp_path / "dora", 1, r=4, target_modules=["q_proj"], use_dora=True
    )
    res = run_cli("merge", "--base", llama.base, dora, "-o", tmp_path / "out")
    one_line_error(res, "use_dora", "adapter_config.json")
    assert res.code == 3
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"bias": "lora_only"}, "bias"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
        ({"velora_config": {"num_groups": 2}}, "velora_config"),
        ({"some_future_config": {"x": 1}}, "some_future_config"),
        ({"peft_type": "IA3"}, "peft_type"),
    ],
)
def test_unsupported_options_are_refused_by_name(llama, tmp_path, run_cli, change, word):
    bad = edit_adapter(llama.other, tmp_path / "bad", config=change)
    one_line_error(run_cli("merge", "--base", llama.base, bad, "-o", tmp_path / "o"), word)


def test_harmless_options_are_accepted(llama, tmp_path):
    change = {"init_lora_weights": "gaussian", "layers_to_transform": [0, 1], "lora_dropout": 0.1}
    ok = edit_adapter(llama.other, tmp_path / "ok", config=change | {"eva_config": None})
    assert open_adapter(ok).names == open_adapter(llama.other).names


def test_corrupt_adapters_are_refused_by_file_and_tensor(llama, tmp_path, run_cli):
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = {
        "missing_b": ({f"{key}.lora_B.weight": None}, "needs exactly one lora_A and one lora_B"),
        "rank": ({f"{key}.lora_A.weight": torch.zeros(3, 32)}, "rank 4 from the config"),
        "unknown": ({"base_model.model.model.norm.weight": torch.ones(32)}, "modules_to_save"),
        "conv": ({f"{key}.lora_A.weight": torch.zeros(4, 32, 1, 1)}, "convolutions"),
    }
    for case, (tensors, words) in cases.items():
        bad = edit_adapter(llama.other, tmp_path / case, tensors=tensors)
        res = run_cli("merge", "--base", llama.base, bad, "-o", tmp_path / "o")
        one_line_error(res, words, str(bad))
    no_weights = tmp_path / "bin"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(
        (llama.other / "adapter_config.json").read_text()
    )
    one_line_error(
        run_cli("merge", "--base", llama.base, no_weights, "-o", tmp_path / "o"), "pickle"
    )


def test_modules_to_save_under_the_wrapper_key(llama, tmp_path):
    """Keys saved as ``<m>.modules_to_save.default.<p>`` read like peft 0.21's ``<m>.<p>``."""
    _, state = read_adapter(llama.rich)
    head = state["base_model.model.lm_head.weight"]
    tensors = {
        "base_model.model.lm_head.weight": None,
        "base_model.model.lm_head.modules_to_save.default.weight": head,
    }
    edited = open_adapter(edit_adapter(llama.rich, tmp_path / "edited", tensors=tensors))
    assert edited.names_set == open_adapter(llama.rich).names_set
    assert "lm_head.weight" in edited.replaced
    np.testing.assert_array_equal(edited.read("lm_head.weight"), head.numpy().reshape(-1))


def test_changed_layer_copy_is_merged_like_peft_but_refused_by_to_lora(llama, tmp_path, run_cli):
    """peft loads the embedding copy it saved next to an embedding LoRA; adapt merges it too,
    but an adapter cannot carry a changed copy, so --to-lora refuses it."""
    _, state = read_adapter(llama.rich)
    copy_key = "base_model.model.model.embed_tokens.base_layer.weight"
    edited = edit_adapter(
        llama.rich, tmp_path / "edited", tensors={copy_key: state[copy_key] + 0.5}
    )
    out = tmp_path / "merged"
    assert run_cli("merge", "--base", llama.base, edited, "-o", out, "-q").code == 0
    torch.testing.assert_close(model_logits(out), peft_merged_logits(llama.base, edited), **TOL)
    res = run_cli("merge", "--base", llama.base, edited, "--to-lora", "-o", tmp_path / "lora")
    one_line_error(res, copy_key, "differs from the base")
    assert not (tmp_path / "lora").exists()


def test_to_lora_refusals(llama, tmp_path, run_cli):
    base, a = llama.base, llama.other
    cases = [
        (["merge", a, "--to-lora", "-o", tmp_path / "x"], "--base"),
        (
            ["merge", "--base", base, a, "--rank", "4", "-o", tmp_path / "x"],
            "--rank needs --to-lora",
        ),
        (["merge", "--base", base, a, "--to-lora", "--rank", "0", "-o", tmp_path / "x"], "--rank"),
        (["merge", "--base", base, a, "--to-lora", "-o", tmp_path / "x.safetensors"], "folder"),
        (["merge", "--base", base, base, "--to-lora", "-o", tmp_path / "x"], "LoRA adapter input"),
        (["merge", "--base", base, a, "--to-lora", "-o", a, "--overwrite"], "overwrite input"),
    ]
    for args, words in cases:
        one_line_error(run_cli(*args), words)
    (tmp_path / "exists").mkdir()
    one_line_error(
        run_cli("merge", "--base", base, a, "--to-lora", "-o", tmp_path / "exists"), "--overwrite"
    )
    assert list((tmp_path / "exists").iterdir()) == []
    with pytest.raises(merge.ParameterError, match="task-vector method"):
        merge.merge_to_lora(merge.Soup(), [a], base=base, out=tmp_path / "y")


def test_to_lora_nan_leaves_nothing_and_inputs_untouched(llama, tmp_path, run_cli):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _, state = read_adapter(llama.other)
    bad_b = state[key].clone()
    bad_b[0, 0] = float("nan")
    bad = edit_adapter(llama.other, tmp_path / "bad", tensors={key: bad_b})
    before = snapshot([bad, llama.base, llama.plain])
    for extra in ([], ["--method", "ties"]):
        res = run_cli(
            "merge",
            "--base",
            llama.base,
            llama.plain,
            bad,
            *extra,
            "--to-lora",
            "-o",
            tmp_path / "out",
        )
        one_line_error(res, "NaN", str(bad), "v_proj")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    assert snapshot([bad, llama.base, llama.plain]) == before


def test_to_lora_overwrite_and_provenance(llama, tmp_path, run_cli):
    out = tmp_path / "lora"
    args = ["merge", "--base", llama.base, llama.other, "--to-lora", "-o", out, "-q"]
    assert run_cli(*args).code == 0
    assert run_cli(*args, "--overwrite").code == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not any(n.startswith(".") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["adapt_method"] == "task-arithmetic"
    inputs = json.loads(meta["adapt_inputs"])
    assert [i["role"] for i in inputs] == ["base", "input"]
    assert set(inputs[1]["sha256"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert all(re.fullmatch("[0-9a-f]{64}", h) for i in inputs for h in i["sha256"].values())


def test_inspect_shows_an_adapter(llama, run_cli):
    res = run_cli("inspect", llama.rich, "--json")
    assert res.code == 0, res.err
    info = json.loads(res.out)
    assert info["format"] == "LoRA adapter"
    assert info["tensors"] == len(open_adapter(llama.rich).names)
