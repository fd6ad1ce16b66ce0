"""Model soup against an independent float64 numpy reference, through the library and the CLI.

Reference: decode every input to float64, weighted sum with weights w_i / sum(w) (accumulated
in input order), round to float32, then to the output dtype (torch for the bf16 rounding);
float64 outputs keep the float64 sum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import merge
from merge.errors import MismatchError, NonFiniteError, ParameterError

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BITS = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}
CHUNK_SHAPES = [(0,), (1,), (3, 5), (2, 0, 3), (16384,), (16385,), (2, 16385), (7, 3, 2)]


def reference(
    inputs: list[torch.Tensor], weights: list[float] | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """The soup computed independently: float64 weighted mean -> float32 -> out_dtype."""
    n = len(inputs)
    if weights is None:
        w = [1.0 / n] * n
    else:
        total = math.fsum(weights)
        w = [x / total for x in weights]
    acc = np.zeros(inputs[0].shape, np.float64)
    for wi, t in zip(w, inputs, strict=True):
        acc = acc + wi * t.to(torch.float64).numpy()
    if out_dtype == torch.float64:
        return torch.from_numpy(acc)  # float64 output: no float32 step
    f32 = acc.astype(np.float32)
    if out_dtype == torch.float32:
        return torch.from_numpy(f32)
    if out_dtype == torch.float16:
        return torch.from_numpy(f32.astype(np.float16))
    return torch.from_numpy(f32).to(out_dtype)  # bf16: torch's round-to-nearest-even


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits (so -0.0 vs 0.0 and NaN payloads count)."""
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    if want.dtype in BITS:
        got, want = (
            got.contiguous().view(BITS[want.dtype]),
            want.contiguous().view(BITS[want.dtype]),
        )
    assert torch.equal(got, want), f"first differing index: {(got != want).nonzero()[:1].tolist()}"


def _finite_bits(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    """One finite value of ``dtype`` drawn over its whole bit space (subnormals, extremes)."""
    if dtype == torch.float32:
        ints = st.integers(-(2**31), 2**31 - 1).filter(lambda b: (b >> 23) & 0xFF != 0xFF)
        return ints.map(lambda b: torch.tensor([b], dtype=torch.int32).view(dtype))
    exp_mask, exp_shift = (0x1F, 10) if dtype == torch.float16 else (0xFF, 7)
    ints = st.integers(-(2**15), 2**15 - 1).filter(
        lambda b: (b >> exp_shift) & exp_mask != exp_mask
    )
    return ints.map(lambda b: torch.tensor([b], dtype=torch.int16).view(dtype))


@st.composite
def soup_cases(draw):
    dtype = draw(st.sampled_from(FLOATS))
    n = draw(st.integers(1, 4))
    shape = draw(st.sampled_from(CHUNK_SHAPES))
    numel = math.prod(shape)
    inputs = []
    if numel <= 16:
        for _ in range(n):
            vals = draw(st.lists(_finite_bits(dtype), min_size=numel, max_size=numel))
            t = torch.cat(vals) if vals else torch.empty(0, dtype=dtype)
            inputs.append(t.reshape(shape))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        top = 4.0 if dtype == torch.float16 else 30.0
        for _ in range(n):
            mag = 10.0 ** rng.uniform(-top, top, size=shape)
            t = torch.from_numpy(rng.standard_normal(shape) * mag).to(dtype)
            inputs.append(t)
    weights = draw(
        st.none()
        | st.lists(
            st.floats(0, 100, allow_nan=False, allow_infinity=False), min_size=n, max_size=n
        ).filter(lambda w: math.fsum(w) > 0)
    )
    return dtype, inputs, weights


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(soup_cases())
def test_soup_matches_float64_reference(case):
    dtype, inputs, weights = case
    states = [{"w": t, "ids": torch.arange(3)} for t in inputs]
    got = merge.soup(states, weights=weights)
    assert set(got) == {"w", "ids"}
    assert_bits_equal(got["w"], reference(inputs, weights, dtype))
    assert torch.equal(got["ids"], torch.arange(3))
    assert got["ids"].dtype == torch.int64


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_hand_worked_example(dtype):
    a = {"x": torch.tensor([1.0, 2.0], dtype=dtype)}
    b = {"x": torch.tensor([3.0, 6.0], dtype=dtype)}
    got = merge.soup([a, b], weights=[0.75, 0.25])["x"]
    assert got.dtype == dtype
    assert got.tolist() == [1.5, 3.0]
    assert merge.soup([a, b])["x"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_weights_are_normalised(dtype):
    states = [random_state(s, dtype) for s in (1, 2)]
    uniform = merge.soup(states)
    for w in ([2, 2], [0.5, 0.5], [1e-3, 1e-3]):
        got = merge.soup(states, weights=w)
        for k in uniform:
            assert_bits_equal(got[k], uniform[k])
    scaled = merge.soup(states, weights=[3, 1])
    normal = merge.soup(states, weights=[0.75, 0.25])
    for k in scaled:
        assert_bits_equal(scaled[k], normal[k])


def test_zero_weight_drops_an_input():
    states = [random_state(s, torch.float32) for s in (1, 2, 3)]
    got = merge.soup(states, weights=[1, 0, 1])
    want = merge.soup([states[0], states[2]])
    for k in got:
        assert_bits_equal(got[k], want[k])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_soup_of_one_model_with_itself_is_identity(dtype):
    state = random_state(7, dtype)
    got = merge.soup([state, state, state], weights=[0.2, 0.3, 0.5])
    for k, t in state.items():
        assert_bits_equal(got[k], t)


def test_float64_soup_keeps_float64_precision():
    """Regression: F64 inputs used to be rounded to float32 in the kernel (soup(x, x) != x)."""
    x = torch.tensor([0.1, 1 / 3, math.pi], dtype=torch.float64)
    got = merge.soup([{"x": x}, {"x": x.clone()}])["x"]
    assert got.dtype == torch.float64
    assert_bits_equal(got, x)


def test_float64_matches_reference():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(16385, generator=g, dtype=torch.float64) * 1e5 for _ in range(2)]
    got = merge.soup([{"x": x} for x in xs], weights=[0.3, 0.9])["x"]
    assert_bits_equal(got, reference(xs, [0.3, 0.9], torch.float64))


def test_integer_and_bool_tensors_carried_through():
    carried = {
        "ids": torch.arange(5),
        "i32": torch.tensor([-7, 3], dtype=torch.int32),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([[True, False], [False, True]]),
    }
    a = {"w": torch.ones(2), **{k: v.clone() for k, v in carried.items()}}
    b = {"w": torch.zeros(2), **{k: v.clone() for k, v in carried.items()}}
    got = merge.soup([a, b])
    assert got["w"].tolist() == [0.5, 0.5]
    for k, t in carried.items():
        assert got[k].dtype == t.dtype
        assert torch.equal(got[k], t)


def test_differing_integer_tensor_is_an_error_naming_it():
    a = {"w": torch.ones(2), "ids": torch.arange(4)}
    b = {"w": torch.ones(2), "ids": torch.tensor([0, 1, 2, 4])}
    with pytest.raises(MismatchError, match="'ids'"):
        merge.soup([a, b])


def test_float8_carried_through_keeps_dtype(tmp_path):
    """Regression: the returned state dict used to hold float8 tensors as torch.uint8 bits."""
    f8 = torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn)
    path = tmp_path / "f8.safetensors"
    save_file({"w": torch.ones(2), "scale": f8}, str(path))
    got = merge.soup([path, path])
    assert got["scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(got["scale"].view(torch.uint8), f8.view(torch.uint8))


def test_returned_state_dict_does_not_alias_inputs():
    """Regression: carried-through tensors used to share memory with the caller's inputs."""
    ids = torch.arange(4)
    a = {"w": torch.ones(2), "ids": ids}
    got = merge.soup([a, {"w": torch.ones(2), "ids": ids.clone()}])
    got["ids"].add_(100)
    assert ids.tolist() == [0, 1, 2, 3]


# --- library with paths, state dicts and a mix ---------------------------------------------


def _files(make_file, dtype, seeds=(1, 2, 3)):
    states = [random_state(s, dtype) for s in seeds]
    paths = [make_file(f"m{s}.safetensors", st_) for s, st_ in zip(seeds, states, strict=True)]
    return states, paths


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_library_with_paths(make_file, dtype):
    states, paths = _files(make_file, dtype)
    weights = [0.5, 0.3, 0.2]
    got = merge.soup(paths, weights=weights)
    assert isinstance(got, dict)
    assert set(got) == set(states[0])
    for k, t in states[0].items():
        assert isinstance(got[k], torch.Tensor)
        assert got[k].shape == t.shape
        if t.dtype.is_floating_point:
            assert_bits_equal(got[k], reference([s[k] for s in states], weights, dtype))
        else:
            assert got[k].dtype == t.dtype
            assert torch.equal(got[k], t)


def test_library_with_state_dicts_and_mix(make_file):
    states, paths = _files(make_file, torch.bfloat16)
    from_dicts = merge.soup(states)
    mixed = merge.soup([paths[0], states[1], paths[2]])
    from_paths = merge.soup([str(p) for p in paths])
    for k in states[0]:
        if states[0][k].dtype.is_floating_point:
            want = reference([s[k] for s in states], None, torch.bfloat16)
        else:
            want = states[0][k]
        assert_bits_equal(from_dicts[k], want)
        assert_bits_equal(mixed[k], want)
        assert_bits_equal(from_paths[k], want)


def test_library_writes_file_when_out_given(make_file, tmp_path):
    states, paths = _files(make_file, torch.float16)
    out = tmp_path / "soup.safetensors"
    ret = merge.soup([paths[0], states[1]], weights=[1, 3], out=out)
    assert ret == out
    with safe_open(str(out), framework="pt") as f:
        for k in states[0]:
            if states[0][k].dtype.is_floating_point:
                want = reference([states[0][k], states[1][k]], [1, 3], torch.float16)
            else:
                want = states[0][k]
            assert_bits_equal(f.get_tensor(k), want)


def test_library_nonfinite_refused_then_allowed():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([1.0, math.nan])}
    with pytest.raises(NonFiniteError, match=r"<input 1>.*'w'"):
        merge.soup([a, b])
    got = merge.soup([a, b], allow_nonfinite=True)["w"]
    assert got[0].item() == 1.0
    assert math.isnan(got[1].item())


def test_library_bad_weights_and_no_inputs():
    states = [random_state(1), random_state(2)]
    for w in ([1.0], [1.0, -1.0], [0.0, 0.0], [math.inf, 1.0], [math.nan, 1.0]):
        with pytest.raises(ParameterError):
            merge.soup(states, weights=w)
    with pytest.raises(ParameterError):
        merge.soup([])


# --- dtype promotion and output dtype ------------------------------------------------------


def test_dtype_promotion_cli_bf16_and_f32(make_file, tmp_path, run_cli):
    a_state = random_state(11, torch.bfloat16)
    b_state = random_state(12, torch.float32)
    a = make_file("a.safetensors", a_state)
    b = make_file("b.safetensors", b_state)
    refused = run_cli("merge", a, b, "-o", tmp_path / "no.safetensors", "--quiet")
    assert refused.code != 0
    assert "--dtype" in refused.err
    out = tmp_path / "out.safetensors"
    res = run_cli("merge", a, b, "-o", out, "--dtype", "float32", "--weights", "0.7,0.3", "-q")
    assert res.code == 0, res.err
    with safe_open(str(out), framework="pt") as f:
        for k in a_state:
            got = f.get_tensor(k)
            if a_state[k].dtype.is_floating_point:
                want = reference([a_state[k], b_state[k]], [0.7, 0.3], torch.float32)
            else:
                want = a_state[k]
            assert_bits_equal(got, want)


@pytest.mark.parametrize(
    ("dtypes", "out"),
    [
        ((torch.bfloat16, torch.float16), torch.bfloat16),
        ((torch.float16, torch.float32, torch.bfloat16), torch.float16),
        ((torch.float32, torch.bfloat16), torch.bfloat16),
    ],
    ids=["bf16+f16->bf16", "f16+f32+bf16->f16", "f32+bf16->bf16"],
)
def test_dtype_promotion_library(dtypes, out):
    states = [random_state(20 + i, d) for i, d in enumerate(dtypes)]
    name = {torch.bfloat16: "bf16", torch.float16: "float16"}[out]
    got = merge.soup(states, dtype=name)
    for k in states[0]:
        if states[0][k].dtype.is_floating_point:
            assert_bits_equal(got[k], reference([s[k] for s in states], None, out))
        else:
            assert torch.equal(got[k], states[0][k])


def test_same_dtype_converted_by_dtype_option():
    states = [random_state(s, torch.bfloat16) for s in (31, 32)]
    got = merge.soup(states, dtype="float32")
    for k in ("layer.0.weight", "layer.1.weight"):
        assert_bits_equal(got[k], reference([s[k] for s in states], None, torch.float32))
    assert got["position_ids"].dtype == torch.int64


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_output_dtype_is_input_dtype_cli(make_file, tmp_path, run_cli, dtype):
    states, paths = _files(make_file, dtype, seeds=(41, 42))
    out = tmp_path / "out.safetensors"
    res = run_cli("merge", *paths, "-o", out, "-q")
    assert res.code == 0, res.err
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(states[0])
        for k, t in states[0].items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype
            if t.dtype.is_floating_point:
                assert_bits_equal(got, reference([s[k] for s in states], None, dtype))
            else:
                assert torch.equal(got, t)


def test_large_tensor_across_chunks_cli(make_file, tmp_path, run_cli):
    """A tensor spanning several 16384-element chunks, bf16, three inputs, through files."""
    g = torch.Generator().manual_seed(9)
    states = [{"big": torch.randn(3, 16385, generator=g).to(torch.bfloat16)} for _ in range(3)]
    paths = [make_file(f"big{i}.safetensors", s) for i, s in enumerate(states)]
    out = tmp_path / "big.safetensors"
    res = run_cli("merge", *paths, "-o", out, "--weights", "1,2,3", "-q")
    assert res.code == 0, res.err
    with safe_open(str(out), framework="pt") as f:
        want = reference([s["big"] for s in states], [1, 2, 3], torch.bfloat16)
        assert_bits_equal(f.get_tensor("big"), want)
