"""LiNeS schedule (merge.lines): worked values, block parsing on real model names, patterns."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from merge.lines import LayerSchedule, block_of, lines_alpha

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

LLAMA_NON_BLOCK = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}

# --- schedule values ------------------------------------------------------------------------


def test_worked_values_l12():
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(12)]
    schedule = LayerSchedule.from_names([*names, *LLAMA_NON_BLOCK], alpha=0.1, beta=0.9)
    expected = [0.1, 0.181818, 0.263636, 0.345455, 0.427273, 0.509091]
    expected += [0.590909, 0.672727, 0.754545, 0.836364, 0.918182, 1.0]
    assert schedule.depths == {"model.layers": 12}
    assert [schedule.scale(n) for n in names] == pytest.approx(expected, abs=1e-6)
    for name in LLAMA_NON_BLOCK:
        assert schedule.scale(name) == 0.1
        assert schedule.describe(name) == (None, None, 0.1)
    assert schedule.describe(names[4]) == ("model.layers", 5, pytest.approx(0.427273, abs=1e-6))


def test_single_block_gets_alpha_plus_beta():
    schedule = LayerSchedule.from_names(["h.0.attn.c_attn.weight", "wte.weight"], 0.25, 0.75)
    assert schedule.scale("h.0.attn.c_attn.weight") == 1.0
    assert schedule.scale("wte.weight") == 0.25


@given(
    depth=st.integers(1, 96),
    alpha=st.floats(-2, 2),
    beta=st.floats(0, 2),
)
def test_schedule_is_monotone_from_alpha_to_alpha_plus_beta(depth, alpha, beta):
    names = [f"blocks.{i}.mlp.fc1.weight" for i in range(depth)]
    schedule = LayerSchedule.from_names(names, alpha, beta)
    scales = [schedule.scale(n) for n in names]
    assert scales[-1] == pytest.approx(alpha + beta)
    if depth > 1:
        assert scales[0] == alpha
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(scales))


def test_names_outside_the_schedule_raise():
    schedule = LayerSchedule.from_names(["model.layers.1.mlp.up_proj.weight"], 0.1, 0.9)
    with pytest.raises(ValueError, match="built with 2 blocks"):
        schedule.scale("model.layers.2.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"'decoder\.block'"):
        schedule.scale("decoder.block.0.layer.0.SelfAttention.q.weight")


# --- multi-task alpha -----------------------------------------------------------------------


def test_lines_alpha_ties_example():
    tau1, tau2 = [1, -2, 0.5, 0], [1, 2, -0.5, 3]
    summed = [a + b for a, b in zip(tau1, tau2, strict=True)]
    assert summed == [2, 0, 0, 3]
    tau_ties = [1, 2, 0.5, 3]
    alpha = lines_alpha(sum(map(abs, summed)), sum(map(abs, tau_ties)), num_tasks=2)
    assert alpha == pytest.approx(5 / 6.5 / 2)
    assert alpha == pytest.approx(0.384615, abs=1e-6)


def test_lines_alpha_of_task_arithmetic_is_one_over_t():
    assert lines_alpha(7.0, 7.0, num_tasks=4) == 0.25


@pytest.mark.parametrize(
    ("sum_l1", "merged_l1", "num_tasks", "message"),
    [
        (5.0, 0.0, 2, "merged task vector has L1 norm 0.0"),
        (5.0, float("nan"), 2, "L1 norm nan"),
        (-1.0, 2.0, 2, ">= 0"),
        (5.0, 2.0, 0, "at least 1"),
    ],
)
def test_lines_alpha_rejects_bad_input(sum_l1, merged_l1, num_tasks, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lines_alpha(sum_l1, merged_l1, num_tasks)


# --- block parsing on real parameter names --------------------------------------------------

_TINY = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
_DECODER = {**_TINY, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
_DECODER |= {"num_key_value_heads": 1, "num_hidden_layers": 3}
_ENCODER = {**_DECODER, "num_hidden_layers": 2, "max_position_embeddings": 16}
del _ENCODER["num_key_value_heads"]
_CLIP_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
_CLIP_VISION |= {"num_hidden_layers": 3, "image_size": 8, "patch_size": 4}


def _t5():
    config = tf.T5Config(**_TINY, d_model=16, d_kv=8, d_ff=32, num_heads=2)
    config.num_layers, config.num_decoder_layers = 4, 3
    return tf.T5ForConditionalGeneration(config)


def _clip():
    text = {**_ENCODER, "num_hidden_layers": 2}
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=_CLIP_VISION))


def _llava():
    text = {**_DECODER, "model_type": "llama", "num_hidden_layers": 2}
    vision = {**_CLIP_VISION, "model_type": "clip_vision_model"}
    config = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_id=3)
    return tf.LlavaForConditionalGeneration(config)


_BUILDERS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_DECODER)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DECODER)),
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(**_TINY, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    ),
    "bert": lambda: tf.BertModel(tf.BertConfig(**_ENCODER)),
    "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**_ENCODER)),
    "roberta-mlm": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**_ENCODER)),
    "t5": _t5,
    "clip": _clip,
    "llava": _llava,
}


@functools.cache
def _names(arch: str) -> tuple[str, ...]:
    """State-dict names of a tiny model, built once on the meta device (no data, no network)."""
    with torch.device("meta"):
        return tuple(_BUILDERS[arch]().state_dict())


@pytest.mark.parametrize(
    ("arch", "depths", "non_block"),
    [
        ("llama", {"model.layers": 3}, LLAMA_NON_BLOCK),
        ("mistral", {"model.layers": 3}, LLAMA_NON_BLOCK),
        ("qwen2", {"model.layers": 3}, LLAMA_NON_BLOCK),
        (
            "gpt2",
            {"transformer.h": 2},
            {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
            | {"transformer.ln_f.weight", "transformer.ln_f.bias"},
        ),
        ("bert", {"encoder.layer": 2}, None),
        ("roberta", {"encoder.layer": 2}, None),
        ("roberta-mlm", {"roberta.encoder.layer": 2}, None),
        ("t5", {"encoder.block": 4, "decoder.block": 3}, None),
        ("clip", {"text_model.encoder.layers": 2, "vision_model.encoder.layers": 3}, None),
        ("llava", {"model.language_model.layers": 2, "model.vision_tower.encoder.layers": 3}, None),
    ],
)
def test_real_model_names(arch, depths, non_block):
    names = _names(arch)
    schedule = LayerSchedule.from_names(names, alpha=0.0, beta=1.0)
    assert schedule.depths == depths
    found = {name: block_of(name) for name in names}
    for name, block in found.items():
        if block is None:
            assert not any(f"{stack}." in name for stack in depths), name
        else:
            stack, index = block
            assert name.startswith(f"{stack}.{index}."), name
    if non_block is not None:
        assert {name for name, block in found.items() if block is None} == non_block
    for stack, depth in depths.items():
        last = next(n for n in names if n.startswith(f"{stack}.{depth - 1}."))
        assert schedule.describe(last) == (stack, depth, 1.0)


def test_t5_block_is_not_the_inner_layer_index():
    names = _names("t5")
    name = "encoder.block.3.layer.1.DenseReluDense.wi.weight"
    assert name in names
    assert block_of(name) == ("encoder.block", 3)
    assert block_of("decoder.block.2.layer.2.DenseReluDense.wo.weight") == ("decoder.block", 2)
    assert block_of("encoder.final_layer_norm.weight") is None
    assert block_of("shared.weight") is None
    schedule = LayerSchedule.from_names(names, alpha=0.1, beta=0.9)
    # Encoder L=4 and decoder L=3: block 2 (0-based) is 2/3 of the way in one, last in the other.
    assert schedule.scale("encoder.block.2.layer.0.SelfAttention.q.weight") == pytest.approx(0.7)
    assert schedule.scale("decoder.block.2.layer.0.SelfAttention.q.weight") == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_lora_names():
    peft = pytest.importorskip("peft")
    with torch.device("meta"):
        model = peft.get_peft_model(
            tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER)),
            peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        )
        names = list(peft.get_peft_model_state_dict(model))
    assert names[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    schedule = LayerSchedule.from_names(names, alpha=0.5, beta=0.5)
    assert schedule.depths == {"base_model.model.model.layers": 3}
    assert schedule.scale(names[0]) == 0.5
    assert schedule.scale(names[-1]) == 1.0


def test_gpt2_bare_model_names():
    assert block_of("h.11.mlp.c_fc.weight") == ("h", 11)
    assert block_of("wte.weight") is None
    assert block_of("ln_f.bias") is None


OPEN_CLIP = [
    "positional_embedding",
    "text_projection",
    "logit_scale",
    "token_embedding.weight",
    "ln_final.weight",
    "transformer.resblocks.0.attn.in_proj_weight",
    "transformer.resblocks.3.mlp.c_fc.weight",
    "transformer.resblocks.3.ln_2.bias",
    "visual.class_embedding",
    "visual.conv1.weight",
    "visual.proj",
    "visual.ln_post.weight",
    "visual.transformer.resblocks.0.ln_1.weight",
    "visual.transformer.resblocks.11.attn.in_proj_weight",
    "visual.transformer.resblocks.11.attn.out_proj.bias",
]


def test_open_clip_text_and_vision_stacks():
    schedule = LayerSchedule.from_names(OPEN_CLIP, alpha=0.2, beta=0.8)
    assert schedule.depths == {"transformer.resblocks": 4, "visual.transformer.resblocks": 12}
    assert block_of("visual.transformer.resblocks.11.attn.in_proj_weight") == (
        "visual.transformer.resblocks",
        11,
    )
    assert schedule.scale("transformer.resblocks.3.mlp.c_fc.weight") == pytest.approx(1.0)
    assert schedule.scale("visual.transformer.resblocks.0.ln_1.weight") == pytest.approx(0.2)
    assert schedule.scale("visual.proj") == 0.2
    assert block_of("visual.conv1.weight") is None


def test_timm_vit_blocks():
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"]
    names += [f"blocks.{i}.attn.qkv.weight" for i in range(8)]
    schedule = LayerSchedule.from_names(names, alpha=0.3, beta=0.7)
    assert schedule.depths == {"blocks": 8}
    assert block_of("blocks.7.attn.qkv.weight") == ("blocks", 7)
    assert schedule.describe("blocks.7.attn.qkv.weight") == ("blocks", 8, 1.0)
    assert schedule.scale("patch_embed.proj.weight") == 0.3
    assert schedule.scale("cls_token") == 0.3


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.5.block_sparse_moe.experts.7.w1.weight", ("model.layers", 5)),
        ("module.backbone.layers.2.mixer.in_proj.weight", ("module.backbone.layers", 2)),
        ("swin.encoder.layers.1.blocks.0.attention.self.query.weight", ("swin.encoder.layers", 1)),
        ("gpt_neox.layers.10.attention.query_key_value.weight", ("gpt_neox.layers", 10)),
        ("model.layers.4", ("model.layers", 4)),
        ("model.layers_norm.3.weight", None),
        ("model.embed_tokens.weight", None),
    ],
)
def test_generic_fallback(name, expected):
    assert block_of(name) == expected


# --- user patterns --------------------------------------------------------------------------


def test_custom_pattern_with_stack_group():
    names = ["stem.weight", "net.stage0.conv.weight", "net.stage2.conv.weight", "aux.stage0.w"]
    pattern = r"^(?P<stack>\w+)\.stage(?P<block>\d+)\."
    schedule = LayerSchedule.from_names(names, alpha=0.0, beta=1.0, pattern=pattern)
    assert schedule.depths == {"net": 3, "aux": 1}
    assert schedule.describe("net.stage2.conv.weight") == ("net", 3, 1.0)
    assert schedule.scale("net.stage0.conv.weight") == 0.0
    assert schedule.scale("stem.weight") == 0.0


def test_custom_pattern_overrides_known_layouts():
    pattern = re.compile(r"layer\.(?P<block>\d+)\.")
    name = "encoder.block.3.layer.1.DenseReluDense.wi.weight"
    assert block_of(name, pattern) == ("encoder.block.3.layer", 1)
    assert block_of("model.layers.3.mlp.up_proj.weight", pattern) is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"layers\.(\d+)\.", "has no named group 'block'"),
        (r"layers\.(?P<block>\d+", "invalid layer pattern"),
        (r"layers\.(?P<stack>\d+)", "has no named group 'block'"),
    ],
)
def test_bad_pattern(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        LayerSchedule.from_names(["model.layers.0.mlp.up_proj.weight"], 0.1, 0.9, pattern)
    assert "\n" not in str(info.value)


def test_pattern_block_group_must_match_digits():
    with pytest.raises(ValueError, match="must match digits"):
        LayerSchedule.from_names(["model.layers.x.w"], 0.1, 0.9, r"layers\.(?P<block>\w+)\.")
    with pytest.raises(ValueError, match="no named group 'block'"):
        block_of("model.layers.0.w", re.compile(r"layers\.(\d+)"))
