"""ComPEFT: the formula, the container, compress / decompress / apply, adapters, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np
import pytest
import torch
from compeft_helpers import (
    assert_one_line_error,
    data_offset,
    entropy_bound,
    header_size,
    leftovers,
    reference,
    rewrite_metadata,
    sigma,
)
from conftest import snapshot, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import merge
from merge import compeft
from merge.errors import CorruptFileError, InputError, MismatchError, ParameterError
from merge.summary import compression_summary

WORKED = [0.5, -1.2, 0.03, 2.0, -0.7, 0.1, -0.05, 0.9, -2.5, 0.0]


def as_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in state.items()}


def decoded(expert: compeft.CompressedSource) -> dict[str, np.ndarray]:
    return {name: expert.read(name).reshape(expert.info(name).shape) for name in expert.names}


def assert_equal_states(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_worked_example(dtype: torch.dtype) -> None:
    """The notes' example: sigma (ddof 1) and exact k = 2 keeping {3, 8}."""
    expert = compeft.compress({"tau": torch.tensor(WORKED, dtype=dtype)}, density=0.2)
    h = expert.header
    assert h.sigma == pytest.approx(1.2096262048895747, rel=1e-8)  # ddof 0: 1.14755...
    assert (h.parameters, h.kept, h.coded) == (10, 2, 2)  # the reference's int(d*k)+1 keeps 3
    s = np.float32(h.sigma)
    np.testing.assert_array_equal(
        expert.to_state_dict(dtype="float32")["tau"].numpy(),
        np.array([0, 0, 0, s, 0, 0, 0, 0, -s, 0], np.float32),
    )
    assert expert.to_state_dict()["tau"].dtype == dtype


def test_alpha_scales_sigma() -> None:
    expert = compeft.compress({"tau": torch.tensor(WORKED)}, density=0.2, alpha=2.5)
    assert expert.header.scale == np.float32(2.5 * expert.header.sigma)
    assert set(expert.read("tau")) == {0.0, np.float32(expert.header.scale), -expert.header.scale}


ELEMENTS = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3e-3, -7.0, 1e-30])


@st.composite
def updates(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """2-3 float32 tensors with ties, zeros and random values (names out of order)."""
    names = draw(
        st.lists(
            st.sampled_from(["b.w", "a.w", "c.bias", "z"]), min_size=2, max_size=3, unique=True
        )
    )
    state = {}
    for i, name in enumerate(names):
        n = draw(st.integers(1, 60))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0 ** (i - 1))
        ties = draw(st.lists(ELEMENTS, min_size=n, max_size=n))
        use = rng.random(n) < draw(st.floats(0, 1))
        state[name] = np.where(use, np.array(ties, np.float32), x).reshape(-1)
    return state


@settings(max_examples=60, deadline=None)
@given(updates(), st.floats(0.01, 0.99), st.sampled_from(["global", "tensor"]))
def test_decode_of_encode_is_the_formula(
    update: dict[str, np.ndarray], density: float, scope: str
) -> None:
    if sum(v.size for v in update.values()) < 2:
        return
    expert = compeft.compress(update, density=density, scope=scope)
    h = expert.header
    want_sigma = sigma(update)
    assert h.sigma == pytest.approx(want_sigma, rel=1e-12, abs=1e-300)
    assert h.scale == np.float32(h.sigma)
    assert_equal_states(decoded(expert), reference(update, density, h.scale, scope))
    if scope == "global":
        assert h.kept == round(density * h.parameters)
    else:
        assert h.kept == sum(round(density * v.size) for v in update.values())


def test_global_and_tensor_scope_differ() -> None:
    rng = np.random.default_rng(0)
    update = {
        "big": rng.standard_normal(1000).astype(np.float32) * 10,
        "small": rng.standard_normal(1000).astype(np.float32),
    }
    glob = compeft.compress(update, density=0.1)
    per = compeft.compress(update, density=0.1, scope="tensor")
    assert glob.header.kept == per.header.kept == 200
    assert glob.codes["big"].count > 190 and glob.codes["small"].count < 10
    assert per.codes["big"].count == per.codes["small"].count == 100
    assert glob.header.sigma == per.header.sigma
    assert_equal_states(decoded(per), reference(update, 0.1, per.header.scale, "tensor"))


def test_thread_count_does_not_change_the_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    update = {f"t{i}": rng.standard_normal(300_000).astype(np.float32) for i in range(2)}
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        compeft.compress(update, density=0.1, out=tmp_path / "one.safetensors")
    finally:
        numba.set_num_threads(threads)
    compeft.compress(update, density=0.1, out=tmp_path / "all.safetensors")
    assert (tmp_path / "one.safetensors").read_bytes() == (
        tmp_path / "all.safetensors"
    ).read_bytes()


# --------------------------------------------------------------------------- the container


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2])
def test_file_size_near_entropy_bound(tmp_path: Path, density: float) -> None:
    """~1e6 random parameters: bits/parameter within 3% of H(d) + d plus the fixed header."""
    rng = np.random.default_rng(2)
    update = {
        f"layer.{i}.weight": rng.standard_normal((500, 500)).astype(np.float32) for i in range(4)
    }
    out = compeft.compress(update, density=density, out=tmp_path / "x.safetensors")
    n = 10**6
    size, header = out.stat().st_size, header_size(out)
    assert (size - header) * 8 / n <= 1.03 * entropy_bound(density)
    assert size * 8 / n <= 1.03 * entropy_bound(density) + header * 8 / n
    stats = compression_summary(merge.open(out))
    assert stats["bits_per_parameter"] == pytest.approx(size * 8 / n)
    assert stats["bound_bits_per_parameter"] == pytest.approx(entropy_bound(density))
    assert stats["ratio"] == pytest.approx(4 * n / size)


def test_any_safetensors_tool_opens_the_container(tmp_path: Path) -> None:
    update = {"w": np.random.default_rng(3).standard_normal((40, 30)).astype(np.float32)}
    out = compeft.compress(update, density=0.1, out=tmp_path / "x.cpeft.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["w.positions", "w.signs"]
        assert f.get_tensor("w.signs").dtype == torch.uint8
    assert meta["adapt_format"] == "compeft" and meta["adapt_format_version"] == "1"
    (entry,) = json.loads(meta["adapt_compeft_tensors"])
    assert entry["name"] == "w" and entry["shape"] == [40, 30] and entry["dtype"] == "F32"
    header = json.loads(meta["adapt_compeft"])
    assert header["density"] == 0.1 and header["scope"] == "global"
    assert json.loads(meta["adapt_parameters"])["sigma_ddof"] == 1


def test_save_matches_compress_to_file(tmp_path: Path) -> None:
    update = {"w": np.random.default_rng(4).standard_normal(5000).astype(np.float32)}
    expert = compeft.compress(update, density=0.1)
    expert.save(tmp_path / "a.safetensors")
    compeft.compress(update, density=0.1, out=tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert_equal_states(decoded(merge.open(tmp_path / "a.safetensors")), decoded(expert))


def test_in_memory_experts_merge_like_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = {"w": torch.randn(50, 20, generator=torch.Generator().manual_seed(0))}
    experts = [
        compeft.compress({"w": rng.standard_normal((50, 20)).astype(np.float32)}, density=0.2)
        for _ in range(2)
    ]
    paths = [e.save(tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    a = merge.run(merge.Ties(density=0.5), experts, base=base)
    b = merge.run(merge.Ties(density=0.5), paths, base=base)
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)


# --------------------------------------------------------------------------- full fine-tunes


@pytest.fixture(scope="module")
def full(demo_models: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory):
    """The demo base, two fine-tunes, their updates and their compressed experts."""
    base, fts = demo_models
    work = tmp_path_factory.mktemp("compeft")
    b = load_file(str(base / "model.safetensors"))
    updates, experts = [], []
    for i, ft in enumerate(fts):
        f = load_file(str(ft / "model.safetensors"))
        updates.append({k: (to_numpy(f[k]) - to_numpy(b[k])).astype(np.float32) for k in b})
        experts.append(
            compeft.compress(ft, base=base, density=0.1, out=work / f"ft{i + 1}.cpeft.safetensors")
        )
    return SimpleNamespace(base=base, fts=fts, work=work, b=b, updates=updates, experts=experts)


def test_full_finetune_compress_then_apply(full, run_cli) -> None:
    src = merge.open(full.experts[0])
    assert src.header.update == "full"
    want = reference(full.updates[0], 0.1, src.header.scale)
    assert_equal_states(decoded(src), want)
    r = run_cli("apply", full.experts[0], "--base", full.base, "-o", full.work / "applied")
    assert r.code == 0, r.err
    assert (full.work / "applied" / "config.json").is_file()
    got = load_file(str(full.work / "applied" / "model.safetensors"))
    for k, t in full.b.items():
        exact = (to_numpy(t) + want[k].astype(np.float64)).astype(np.float32)
        expected = torch.from_numpy(exact).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k].view(torch.int16), expected.view(torch.int16)), k
    # the same through adapt merge, where a compressed expert is a task vector
    r = run_cli("merge", "--base", full.base, full.experts[0], "-o", full.work / "ta.safetensors")
    assert r.code == 0, r.err
    merged = load_file(str(full.work / "ta.safetensors"))
    for k in got:
        assert torch.equal(merged[k].view(torch.int16), got[k].view(torch.int16)), k


def test_decompress_gives_a_task_vector(full, run_cli) -> None:
    out = full.work / "delta.safetensors"
    r = run_cli("decompress", full.experts[0], "-o", out, "--dtype", "float32")
    assert r.code == 0, r.err
    src = merge.open(out)
    assert src.delta and src.metadata["adapt_content"] == "task_vector"
    assert_equal_states(as_numpy(load_file(str(out))), decoded(merge.open(full.experts[0])))
    r = run_cli("decompress", full.experts[0], "-o", full.work / "delta-bf16.safetensors")
    assert r.code == 0, r.err
    assert {t.dtype for t in load_file(str(full.work / "delta-bf16.safetensors")).values()} == {
        torch.bfloat16
    }


def test_ties_over_compressed_experts(full, run_cli) -> None:
    deltas = []
    for i, e in enumerate(full.experts):
        deltas.append(compeft.decompress(e, full.work / f"d{i}.safetensors", dtype="float32"))
    out = full.work / "ties.safetensors"
    r = run_cli("merge", "--base", full.base, *full.experts, "--method", "ties", "-o", out)
    assert r.code == 0, r.err
    want = merge.run(merge.Ties(), deltas, base=full.base)
    got = load_file(str(out))
    for k, t in want.items():
        assert torch.equal(got[k].view(torch.int16), t.view(torch.int16)), k


def test_inspect_reports_size_against_the_bound(full, run_cli) -> None:
    r = run_cli("inspect", full.experts[0])
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    assert "bits/parameter" in text and "bound H(d)+d = 0.5690" in text
    assert "smaller than BF16" in text
    r = run_cli("inspect", full.experts[0], "--json")
    stats = json.loads(r.out)["compression"]
    assert stats["kept"] == round(0.1 * stats["parameters"])
    assert stats["ratio"] == pytest.approx(stats["original_bytes"] / stats["file_bytes"])


# --------------------------------------------------------------------------- adapters


def tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def peft_adapter(base: Path, out: Path, config: object, init: float) -> Path:
    """A peft adapter of ``base`` whose trainable tensors are ``init + 0.3 * noise``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                p.copy_(init + 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def loaded_adapter(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    """The adapter tensors as peft loads them on the base."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return as_numpy(get_peft_model_state_dict(model))


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_adapter_round_trip_through_peft(tmp_path: Path, run_cli, kind: str) -> None:
    from peft import IA3Config, LoraConfig

    base = tiny_llama(tmp_path / "base")
    if kind == "lora":
        config, baseline = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), 0.0
    else:
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
        baseline = 1.0
    adapter = peft_adapter(base, tmp_path / "adapter", config, baseline)
    before = snapshot([adapter])
    cpeft = tmp_path / f"{kind}.cpeft.safetensors"
    r = run_cli("compress", adapter, "--density", "0.2", "-o", cpeft)
    assert r.code == 0, r.err
    src = merge.open(cpeft)
    assert (src.header.update, src.header.baseline) == (kind, baseline)
    # A and B (or the (IA)3 vectors) jointly: one sigma, one global top-k, baseline 0 / 1
    raw = as_numpy(load_file(str(adapter / "adapter_model.safetensors")))
    update = {k: v - np.float32(baseline) for k, v in raw.items()}
    assert src.header.sigma == pytest.approx(sigma(update), rel=1e-12)
    want = {
        k: v + np.float32(baseline) for k, v in reference(update, 0.2, src.header.scale).items()
    }
    r = run_cli("decompress", cpeft, "-o", tmp_path / "decoded")
    assert r.code == 0, r.err
    files = {p.name for p in (tmp_path / "decoded").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert_equal_states(loaded_adapter(base, tmp_path / "decoded"), want)
    r = run_cli("apply", cpeft, "--base", base, "-o", tmp_path / "applied")
    assert_one_line_error(r, "adapt decompress")
    assert not (tmp_path / "applied").exists()
    assert snapshot([adapter]) == before


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small(tmp_path: Path, make_file) -> SimpleNamespace:
    """A task-vector file and its compressed expert."""
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(64, generator=g)}
    delta = make_file("delta.safetensors", state)
    cpeft = compeft.compress(
        delta, density=0.1, kind="task_vector", out=tmp_path / "x.cpeft.safetensors"
    )
    base = make_file("base.safetensors", {k: torch.zeros_like(v) for k, v in state.items()})
    return SimpleNamespace(root=tmp_path, delta=delta, cpeft=cpeft, base=base)


def run_bad(run_cli, small, args: list[object], *needles: str) -> None:
    """A failing command: one-line error, no output written, inputs untouched."""
    before = snapshot([small.root])
    r = run_cli(*args)
    assert_one_line_error(r, *needles)
    assert snapshot([small.root]) == before
    assert leftovers(small.root) == []


def test_truncated_payload(small, run_cli) -> None:
    raw = small.cpeft.read_bytes()
    small.cpeft.write_bytes(raw[:-5])
    run_bad(
        run_cli, small, ["decompress", small.cpeft, "-o", small.root / "o.safetensors"], "truncated"
    )


def test_corrupted_payload(small, run_cli) -> None:
    begin, end = data_offset(small.cpeft, "a.weight.positions")
    raw = bytearray(small.cpeft.read_bytes())
    raw[(begin + end) // 2] ^= 0x10
    small.cpeft.write_bytes(bytes(raw))
    run_bad(
        run_cli,
        small,
        ["apply", small.cpeft, "--base", small.base, "-o", small.root / "o"],
        "a.weight",
        "checksum mismatch",
    )


def test_payload_with_a_matching_checksum_still_checked(small) -> None:
    """A payload rewritten consistently with its CRC is still decoded with every check."""
    _, end = data_offset(small.cpeft, "a.weight.positions")
    raw = bytearray(small.cpeft.read_bytes())
    raw[end - 1] = 0xFF  # non-zero padding / codes running past the stream
    small.cpeft.write_bytes(bytes(raw))
    src = merge.open(small.cpeft)
    positions, signs = src._payload("a.weight")
    crc = compeft.container.checksum(positions, signs)

    def fix(meta: dict[str, str]) -> None:
        tensors = json.loads(meta["adapt_compeft_tensors"])
        for t in tensors:
            if t["name"] == "a.weight":
                t["crc32"] = crc
        meta["adapt_compeft_tensors"] = json.dumps(tensors)

    rewrite_metadata(small.cpeft, fix)
    with pytest.raises(CorruptFileError, match=r"'a\.weight'.*corrupt payload"):
        merge.open(small.cpeft).read("a.weight")


@pytest.mark.parametrize("version", ["2", "0", None])
def test_unknown_format_version(small, run_cli, version: str | None) -> None:
    def edit(meta: dict[str, str]) -> None:
        if version is None:
            del meta["adapt_format_version"]
        else:
            meta["adapt_format_version"] = version

    rewrite_metadata(small.cpeft, edit)
    run_bad(
        run_cli,
        small,
        ["decompress", small.cpeft, "-o", small.root / "o.safetensors"],
        "ComPEFT format version",
        "upgrade adapt",
    )
    with pytest.raises(InputError):
        merge.open(small.cpeft)


def test_corrupt_header(small) -> None:
    rewrite_metadata(small.cpeft, lambda m: m.update(adapt_compeft="{}"))
    with pytest.raises(CorruptFileError, match="corrupt ComPEFT header"):
        merge.open(small.cpeft)


@pytest.mark.parametrize("density", ["0", "1", "1.5", "-0.1", "nan"])
def test_density_outside_the_open_interval(small, run_cli, density: str) -> None:
    run_bad(
        run_cli,
        small,
        [
            "compress",
            small.delta,
            "--deltas",
            "--density",
            density,
            "-o",
            small.root / "o.safetensors",
        ],
        "--density must be in (0, 1)",
    )


def test_bad_alpha_and_scope(small, run_cli) -> None:
    out = small.root / "o.safetensors"
    run_bad(
        run_cli, small, ["compress", small.delta, "--deltas", "--alpha", "0", "-o", out], "--alpha"
    )
    run_bad(
        run_cli,
        small,
        ["compress", small.delta, "--deltas", "--scope", "rows", "-o", out],
        "--scope",
    )


def test_base_that_does_not_match(small, run_cli, make_file) -> None:
    make_file("other.safetensors", {"a.weight": torch.zeros(32, 64), "b.bias": torch.zeros(64)})
    run_bad(
        run_cli,
        small,
        ["apply", small.cpeft, "--base", small.root / "other.safetensors", "-o", small.root / "o"],
        "a.weight",
        "[32, 64]",
        "[64, 32]",
    )
    with pytest.raises(MismatchError):
        compeft.apply(small.cpeft, {"a.weight": torch.zeros(3)})


def test_weights_without_base_and_other_misuse(small, run_cli) -> None:
    out = small.root / "o.safetensors"
    run_bad(run_cli, small, ["compress", small.base, "-o", out], "--base")
    run_bad(run_cli, small, ["compress", small.cpeft, "--deltas", "-o", out], "already")
    run_bad(run_cli, small, ["compress", small.delta, "--deltas", "-o", small.cpeft], "exists")
    run_bad(run_cli, small, ["compress", small.delta, "--deltas", "-o", small.delta], "overwrite")
    run_bad(run_cli, small, ["decompress", small.delta, "-o", out], "not a ComPEFT file")
    run_bad(run_cli, small, ["compress", small.delta, "--deltas"], "--output")
    with pytest.raises(ParameterError):
        compeft.compress(small.delta, density=0.1)


def test_nonfinite_update(small, run_cli, make_file) -> None:
    make_file(
        "nan.safetensors",
        {"a.weight": torch.full((64, 32), float("nan")), "b.bias": torch.zeros(64)},
    )
    run_bad(
        run_cli,
        small,
        [
            "compress",
            small.root / "nan.safetensors",
            "--base",
            small.base,
            "-o",
            small.root / "o.safetensors",
        ],
        "nan.safetensors",
        "NaN",
    )


def test_window_miss_falls_back_to_a_low_bits_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass 1's window of low-bits histograms is an optimisation: a wrong prediction costs one
    more pass and changes nothing."""
    import sys

    from merge.kernels.compeft import FirstPass

    rng = np.random.default_rng(8)
    update = {f"t{i}": rng.standard_normal(70_000).astype(np.float32) for i in range(3)}
    served = compeft.compress(update, density=0.1)
    module = sys.modules["merge.compeft.compress"]
    low_passes = []
    monkeypatch.setattr(module, "_predict", lambda u, density: FirstPass(0, 1))
    monkeypatch.setattr(
        module._TopK,
        "add_low",
        lambda self, x: low_passes.append(x.size) or module.GlobalTopK.add_low(self, x),
    )
    missed = compeft.compress(update, density=0.1)
    assert low_passes == [70_000] * 3
    assert missed.header == served.header
    for name in update:
        for a, b in zip(missed.payloads[name], served.payloads[name], strict=True):
            np.testing.assert_array_equal(a, b)
