"""Task-vector merge methods end to end against independent float64 numpy references.

Every method runs through the library (``merge.run``) on state dicts of float32 tensors and on
bf16 safetensors files. The references are written here in plain numpy (float64):

- task arithmetic: theta_0 + lambda * sum_i w_i tau_i;
- TIES: exact top-k per tensor or over the concatenation of every tensor in plan order (stable
  argsort of -|tau|, lowest index first on ties), weights applied after trimming, sign election
  ("total" / "frequency", a zero sum elects +1), mean over the agreeing nonzero entries,
  theta_0 + lambda * tau_m;
- DARE: the documented counter RNG (``merge.kernels.dare.uniform`` / ``dare_key``) gives the mask,
  survivors are divided by the density (rounded once to float32, as documented), then the linear
  sum or the TIES election and disjoint mean as above;
- LiNeS: lambda(l) = alpha + beta (l-1)/(L-1) per block, alpha outside blocks, and the automatic
  alpha = (||sum_t tau_t||_1 / ||tau_m||_1) / T over the whole model.

Test data for TIES and DARE sits on a dyadic grid, so tau_i = theta_i - theta_0 is exact in
float32 (and in bf16) and the trimming order is unambiguous; ties in magnitude are frequent on
the coarse grid, which exercises the tie break. Tolerances: one float32 ulp of the result plus
lambda times one ulp of the merged task vector (the documented single rounding of tau_m to
float32 before theta_0 + lambda * tau_m); bf16 outputs may differ by one bf16 ulp from the
reference rounded with torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge
from merge.errors import ParameterError
from merge.kernels.dare import dare_key, uniform

F32 = np.float32
REPO = Path(__file__).resolve().parents[1]
SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (16,), (4, 4), (0,), (2, 0)]
SETTINGS = settings(max_examples=40, deadline=None)
FILE_SETTINGS = settings(max_examples=15, deadline=None)
# weights are 0 or at least 1e-3 in magnitude (a 1e-300 weight rounds every update to zero)
WEIGHT = st.floats(-1.0, 2.0, allow_nan=False).map(lambda w: round(w, 3))


# --- data ------------------------------------------------------------------------------------


class Problem:
    """A base and N fine-tunes (float64 numpy arrays on a grid), names in plan order."""

    def __init__(self, names, base, fts, weights, lam):
        self.names: list[str] = names
        self.base: dict[str, np.ndarray] = base
        self.fts: list[dict[str, np.ndarray]] = fts
        self.weights: tuple[float, ...] | None = weights
        self.lam: float | None = lam

    @property
    def n(self) -> int:
        return len(self.fts)

    @property
    def w(self) -> np.ndarray:
        return np.ones(self.n) if self.weights is None else np.array(self.weights, np.float64)

    @property
    def scale(self) -> float:
        return 1.0 if self.lam is None else self.lam

    def taus(self, name: str) -> np.ndarray:
        """(N, numel) float64 task vectors of one tensor, flattened."""
        return np.stack([ft[name].reshape(-1) - self.base[name].reshape(-1) for ft in self.fts])

    def state(self, arrays: dict[str, np.ndarray], dtype=torch.float32) -> dict:
        return {k: torch.from_numpy(arrays[k].astype(F32)).to(dtype) for k in self.names}


def grid_values(rng, shape, step: float, bound: int) -> np.ndarray:
    """Integers in [-bound, bound] times ``step`` (exact in float32; in bf16 when bound <= 128)."""
    return rng.integers(-bound, bound + 1, size=shape).astype(np.float64) * step


@st.composite
def problems(draw, *, names=None, max_inputs=4, coarse_only=False, with_zero=True):
    """Random small models on a grid: coarse (many magnitude ties) or fine (few ties)."""
    n = draw(st.integers(1, max_inputs))
    if names is None:
        count = draw(st.integers(1, 3))
        names = [f"t{j}.weight" for j in range(count)]
    pool = SHAPES if with_zero else [s for s in SHAPES if 0 not in s]
    shapes = [draw(st.sampled_from(pool)) for _ in names]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    coarse = coarse_only or draw(st.booleans())
    step, bound = (0.25, 8) if coarse else (2.0**-12, 8192)
    base = {k: grid_values(rng, s, 0.25, 16) for k, s in zip(names, shapes, strict=True)}
    fts = []
    for _ in range(n):
        ft = {}
        for k, s in zip(names, shapes, strict=True):
            tau = grid_values(rng, s, step, bound)
            tau[rng.random(s) < 0.2] = 0.0  # some exact zeros: they never agree in TIES
            ft[k] = base[k] + tau
        fts.append(ft)
    weights = draw(st.none() | st.lists(WEIGHT, min_size=n, max_size=n).map(tuple))
    lam = draw(st.none() | st.floats(-1.0, 2.0, allow_nan=False, allow_infinity=False))
    return Problem(list(names), base, fts, weights, lam)


# --- references ------------------------------------------------------------------------------


def topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """The k entries of largest |x|; ties keep the lowest index first (stable argsort)."""
    keep = np.zeros(x.size, bool)
    keep[np.argsort(-np.abs(x), kind="stable")[:k]] = True
    return keep


def trim_masks(p: Problem, density: float, scope: str) -> dict[str, np.ndarray]:
    """Per tensor: (N, numel) keep masks of TIES trimming."""
    taus = {k: p.taus(k) for k in p.names}
    if scope == "tensor":
        return {
            k: np.stack([topk_mask(row, round(density * row.size)) for row in t])
            for k, t in taus.items()
        }
    sizes = [taus[k].shape[1] for k in p.names]
    total = sum(sizes)
    masks = []
    for i in range(p.n):
        flat = np.concatenate([taus[k][i] for k in p.names]) if p.names else np.zeros(0)
        masks.append(np.split(topk_mask(flat, round(density * total)), np.cumsum(sizes)[:-1]))
    return {k: np.stack([masks[i][j] for i in range(p.n)]) for j, k in enumerate(p.names)}


def elect_and_mean(vals: np.ndarray, sign: str) -> np.ndarray:
    """TIES election and disjoint mean over (N, d) weighted, trimmed values (float64)."""
    score = np.zeros(vals.shape[1])
    for row in vals:  # input order
        score = score + (row if sign == "total" else np.sign(row))
    elected = np.where(score >= 0, 1.0, -1.0)
    agree = np.sign(vals) == elected
    acc = np.zeros(vals.shape[1])
    for row, ok in zip(vals, agree, strict=True):
        acc = acc + np.where(ok, row, 0.0)
    return acc / np.maximum(agree.sum(axis=0), 1)


def ref_ta_merged(p: Problem) -> dict[str, np.ndarray]:
    return {k: (p.w[:, None] * p.taus(k)).sum(axis=0) for k in p.names}


def ref_ties_merged(p: Problem, density: float, scope: str, sign: str) -> dict[str, np.ndarray]:
    masks = trim_masks(p, density, scope)
    return {
        k: elect_and_mean(p.w[:, None] * np.where(masks[k], p.taus(k), 0.0), sign) for k in p.names
    }


def dare_mask(seed: int, name: str, i: int, n: int, density: float) -> np.ndarray:
    key = np.uint64(dare_key(seed, name, i))
    return np.array([uniform(key, j) < density for j in range(n)], bool)


def dropped(p: Problem, name: str, density: float, seed: int) -> np.ndarray:
    """DARE: tau kept with the documented counter RNG, survivors float32(tau / density)."""
    taus = p.taus(name)
    out = np.zeros_like(taus)
    for i, tau in enumerate(taus):
        keep = dare_mask(seed, name, i, tau.size, density)
        out[i, keep] = (tau[keep] / density).astype(F32)
    return out


def ref_dare_merged(p: Problem, density: float, seed: int, ties: str | None):
    merged = {}
    for k in p.names:
        vals = p.w[:, None] * dropped(p, k, density, seed)
        merged[k] = vals.sum(axis=0) if ties is None else elect_and_mean(vals, ties)
    return merged


def block_scale(name: str, depth: int, alpha: float, beta: float) -> float:
    """LiNeS scale of the test's names ``model.layers.{i}.*`` (others: outside blocks)."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return alpha
    index = int(parts[2])
    return alpha + beta * (index / (depth - 1) if depth > 1 else 1.0)


# --- comparison ------------------------------------------------------------------------------


def ulp32(x) -> np.ndarray:
    return np.spacing(np.abs(np.asarray(x, np.float64)).astype(F32)).astype(np.float64)


def ulp_bf16(x) -> np.ndarray:
    a = np.maximum(np.abs(np.asarray(x, np.float64)), 2.0**-126)
    return 2.0 ** (np.floor(np.log2(a)) - 7)


def expected_theta(p: Problem, merged: dict[str, np.ndarray], scales: dict[str, float]):
    return {k: p.base[k].reshape(-1) + scales[k] * merged[k] for k in p.names}


def tolerance(p: Problem, merged, scales, want, rel_scale: float = 0.0):
    """1 ulp of the result + |s| * 1 ulp of tau_m (+ float64 noise, + a relative scale error)."""
    tol = {}
    for k in p.names:
        m = np.abs(merged[k])
        s = abs(scales[k])
        noise = 1e-13 * (np.abs(p.base[k].reshape(-1)) + s * np.abs(p.taus(k)).sum(axis=0) * 4)
        tol[k] = ulp32(want[k]) + s * ulp32(m) + noise + rel_scale * s * m
    return tol


def assert_close(p: Problem, got: dict, merged, scales, rel_scale: float = 0.0) -> None:
    """float32 outputs within the tolerance of theta_0 + s * tau_m."""
    want = expected_theta(p, merged, scales)
    tol = tolerance(p, merged, scales, want, rel_scale)
    assert list(got) == p.names
    for k in p.names:
        g = got[k]
        assert g.dtype == torch.float32 and tuple(g.shape) == p.base[k].shape, k
        diff = np.abs(g.numpy().astype(np.float64).reshape(-1) - want[k])
        bad = np.nonzero(diff > tol[k])[0]
        assert bad.size == 0, (k, bad[:5], g.reshape(-1)[bad[:5]], want[k][bad[:5]])


def assert_close_bf16(p: Problem, got: dict, merged, scales) -> None:
    """bf16 outputs: the reference rounded to bf16 with torch, within one bf16 ulp."""
    want = expected_theta(p, merged, scales)
    tol = tolerance(p, merged, scales, want)
    for k in p.names:
        g = got[k]
        assert g.dtype == torch.bfloat16 and tuple(g.shape) == p.base[k].shape, k
        want_bf = torch.from_numpy(want[k]).to(torch.bfloat16).to(torch.float64).numpy()
        diff = np.abs(g.to(torch.float64).numpy().reshape(-1) - want_bf)
        bad = np.nonzero(diff > ulp_bf16(want_bf) + tol[k])[0]
        assert bad.size == 0, (k, bad[:5], g.reshape(-1)[bad[:5]], want_bf[bad[:5]])


def run_sd(method, p: Problem, **kw) -> dict:
    return merge.run(method, [p.state(ft) for ft in p.fts], base=p.state(p.base), **kw)


def const(p: Problem, value: float) -> dict[str, float]:
    return dict.fromkeys(p.names, value)


def to_state(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v).astype(F32)) for k, v in arrays.items()}


def write(path: Path, state: dict, metadata: dict | None = None) -> Path:
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def run_files(method, p: Problem, folder: Path, dtype=torch.bfloat16) -> dict:
    """Write base and fine-tunes as safetensors files and merge them with the library."""
    base = write(folder / "base.safetensors", p.state(p.base, dtype))
    fts = [write(folder / f"ft{i}.safetensors", p.state(ft, dtype)) for i, ft in enumerate(p.fts)]
    return merge.run(method, fts, base=base)


def file_order(path: Path) -> list[str]:
    """Tensor names of a safetensors file in data order, parsed from its header here."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


# --- task arithmetic -------------------------------------------------------------------------


@SETTINGS
@given(p=problems())
def test_task_arithmetic_state_dicts(p):
    got = run_sd(merge.TaskArithmetic(weights=p.weights, lam=p.lam), p)
    assert_close(p, got, ref_ta_merged(p), const(p, p.scale))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 4),
    lam=st.floats(-1.0, 2.0, allow_nan=False),
    weights=st.lists(WEIGHT, min_size=4, max_size=4),
)
def test_task_arithmetic_continuous_values(seed, n, lam, weights):
    """Arbitrary float32 values (not on a grid): the fused kernel is still ~1 ulp off."""
    rng = np.random.default_rng(seed)
    names = ["a", "b"]
    shapes = [(5, 3), (9,)]
    base = {
        k: rng.standard_normal(s).astype(F32).astype(np.float64)
        for k, s in zip(names, shapes, strict=True)
    }
    fts = [
        {k: (base[k] + rng.standard_normal(base[k].shape) * 0.1).astype(F32) for k in names}
        for _ in range(n)
    ]
    p = Problem(
        names,
        base,
        [{k: v.astype(np.float64) for k, v in ft.items()} for ft in fts],
        tuple(weights[:n]),
        lam,
    )
    got = run_sd(merge.TaskArithmetic(weights=p.weights, lam=p.lam), p)
    assert_close(p, got, ref_ta_merged(p), const(p, p.scale))


@FILE_SETTINGS
@given(p=problems(coarse_only=True))
def test_task_arithmetic_bf16_files(p):
    with tempfile.TemporaryDirectory() as d:
        got = run_files(merge.TaskArithmetic(weights=p.weights, lam=p.lam), p, Path(d))
    assert_close_bf16(p, got, ref_ta_merged(p), const(p, p.scale))


def test_task_arithmetic_hand_example():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    fts = [{"w": torch.tensor([2.0, 2.0, 0.0])}, {"w": torch.tensor([1.0, 4.0, 3.0])}]
    got = merge.run(merge.TaskArithmetic(weights=(1.0, 0.5), lam=0.5), fts, base=base)
    # tau1 = [1, 0, -3], tau2 = [0, 2, 0]; sum w tau = [1, 1, -3]; theta = base + 0.5 * that
    assert got["w"].tolist() == [1.5, 2.5, 1.5]


# --- TIES ------------------------------------------------------------------------------------


@SETTINGS
@given(
    p=problems(),
    density=st.sampled_from([0.05, 0.2, 0.3, 0.5, 0.9, 1.0]) | st.floats(0.01, 1.0),
    scope=st.sampled_from(["tensor", "global"]),
    sign=st.sampled_from(["total", "frequency"]),
)
def test_ties_state_dicts(p, density, scope, sign):
    method = merge.Ties(weights=p.weights, lam=p.lam, density=density, scope=scope, sign=sign)
    got = run_sd(method, p)
    assert_close(p, got, ref_ties_merged(p, density, scope, sign), const(p, p.scale))


@FILE_SETTINGS
@given(
    p=problems(coarse_only=True, names=["b.weight", "a.weight", "c.bias"]),
    density=st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    scope=st.sampled_from(["tensor", "global"]),
    sign=st.sampled_from(["total", "frequency"]),
)
def test_ties_bf16_files(p, density, scope, sign):
    """bf16 files; global trimming follows the files' tensor order (read from the header here)."""
    method = merge.Ties(weights=p.weights, lam=p.lam, density=density, scope=scope, sign=sign)
    with tempfile.TemporaryDirectory() as d:
        got = run_files(method, p, Path(d))
        order = file_order(Path(d) / "base.safetensors")
    p = Problem(order, p.base, p.fts, p.weights, p.lam)
    got = {k: got[k] for k in order}
    assert_close_bf16(p, got, ref_ties_merged(p, density, scope, sign), const(p, p.scale))


def test_ties_global_and_tensor_scope_differ_as_expected():
    """A big-magnitude tensor takes the whole global budget; per tensor each keeps its top 50%."""
    base = {"small": torch.zeros(4), "big": torch.zeros(4)}
    ft = {"small": torch.tensor([0.1, 0.2, 0.3, 0.4]), "big": torch.tensor([10.0, 20, 30, 40])}
    glob = merge.run(merge.Ties(density=0.5, scope="global"), [ft], base=base)
    tens = merge.run(merge.Ties(density=0.5, scope="tensor"), [ft], base=base)
    assert glob["small"].tolist() == [0, 0, 0, 0]
    assert glob["big"].tolist() == [10, 20, 30, 40]
    assert tens["small"].tolist() == [0, 0, F32(0.3), F32(0.4)]
    assert tens["big"].tolist() == [0, 0, 30, 40]


def test_ties_global_ties_keep_earlier_tensors_first():
    """Equal magnitudes across tensors: the earlier tensor in plan order is kept first."""
    base = {"first": torch.zeros(3), "second": torch.zeros(3)}
    ft = {"first": torch.tensor([1.0, -1.0, 1.0]), "second": torch.tensor([-1.0, 1.0, 1.0])}
    got = merge.run(merge.Ties(density=4 / 6, scope="global"), [ft], base=base)
    assert got["first"].tolist() == [1, -1, 1]
    assert got["second"].tolist() == [-1, 0, 0]


def test_ties_weights_enter_the_sign_election():
    """Weighted values elect the sign: 0.1 * 1 + 1 * (-0.5) < 0 elects minus."""
    base = {"w": torch.zeros(1)}
    fts = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([-0.5])}]
    got = merge.run(merge.Ties(weights=(0.1, 1.0), density=1.0), fts, base=base)
    assert got["w"].tolist() == [-0.5]
    got = merge.run(merge.Ties(weights=(0.1, 1.0), density=1.0, sign="frequency"), fts, base=base)
    assert got["w"].tolist() == [F32(0.1)]  # one vote each: a tie elects +1


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_worked_example_from_notes(scope, sign):
    base = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, -2, 0.5, 0])}, {"w": torch.tensor([1.0, 2, -0.5, 3])}]
    got = merge.run(merge.Ties(density=1.0, scope=scope, sign=sign), fts, base=base)
    assert got["w"].tolist() == [1, 2, 0.5, 3]


# --- DARE ------------------------------------------------------------------------------------


@SETTINGS
@given(
    p=problems(),
    density=st.sampled_from([0.1, 0.5, 0.9, 1.0]) | st.floats(0.05, 1.0),
    seed=st.integers(0, 2**63),
    ties=st.sampled_from([None, "total", "frequency"]),
)
def test_dare_state_dicts(p, density, seed, ties):
    if ties is None:
        method = merge.DareLinear(weights=p.weights, lam=p.lam, density=density, seed=seed)
    else:
        method = merge.DareTies(weights=p.weights, lam=p.lam, density=density, seed=seed, sign=ties)
    got = run_sd(method, p)
    assert_close(p, got, ref_dare_merged(p, density, seed, ties), const(p, p.scale))


@FILE_SETTINGS
@given(
    p=problems(coarse_only=True),
    density=st.sampled_from([0.3, 0.5, 0.8]),
    seed=st.integers(0, 1000),
    ties=st.sampled_from([None, "total"]),
)
def test_dare_bf16_files(p, density, seed, ties):
    if ties is None:
        method = merge.DareLinear(weights=p.weights, lam=p.lam, density=density, seed=seed)
    else:
        method = merge.DareTies(weights=p.weights, lam=p.lam, density=density, seed=seed, sign=ties)
    with tempfile.TemporaryDirectory() as d:
        got = run_files(method, p, Path(d))
    assert_close_bf16(p, got, ref_dare_merged(p, density, seed, ties), const(p, p.scale))


def dare_ones(method, n: int = 200_000, inputs: int = 1, names=("x.weight",)) -> dict:
    base = {k: torch.zeros(n) for k in names}
    return merge.run(method, [{k: torch.ones(n) for k in names}] * inputs, base=base)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("cls", [merge.DareLinear, merge.DareTies])
def test_dare_keep_rate_and_rescale(cls, density):
    n = 200_000
    out = dare_ones(cls(density=density, seed=3), n)["x.weight"].numpy()
    kept = out != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.mean() - density) < 5 * sigma
    # survivors are rescaled by 1 / density; the expectation of the update is preserved
    assert np.all(out[kept] == F32(1.0 / density))
    assert abs(out.mean() - 1.0) < 5 * sigma / density


def test_dare_masks_independent_across_inputs_and_tensors():
    n, density = 200_000, 0.5
    got = dare_ones(
        merge.DareLinear(density=density, weights=(1.0, 2.0)),
        n,
        inputs=2,
        names=("a.weight", "b.weight"),
    )
    a, b = got["a.weight"].numpy(), got["b.weight"].numpy()
    # a = 2 m1 + 4 m2 with m1, m2 the masks of inputs 0 and 1: each of the four values ~ n / 4
    sigma = math.sqrt(0.25 * 0.75 / n)
    for value in (0.0, 2.0, 4.0, 6.0):
        assert abs((a == value).mean() - 0.25) < 5 * sigma
    # tensors get different masks (the key includes the tensor name)
    assert abs(((a != 0) & (b != 0)).mean() - 0.75**2) < 5 * math.sqrt(0.75**2 * (1 - 0.75**2) / n)


def test_dare_density_one_is_task_arithmetic():
    rng = np.random.default_rng(0)
    base = {"w": torch.from_numpy(rng.standard_normal(50).astype(F32))}
    fts = [
        {"w": base["w"] + torch.from_numpy(rng.standard_normal(50).astype(F32))} for _ in range(2)
    ]
    dl = merge.run(merge.DareLinear(density=1.0, lam=0.5, weights=(1.0, 0.5)), fts, base=base)
    taus = [ft["w"].double() - base["w"].double() for ft in fts]
    want = base["w"].double() + 0.5 * (taus[0] + 0.5 * taus[1])
    np.testing.assert_allclose(dl["w"].double().numpy(), want.numpy(), rtol=2e-7, atol=1e-7)


def test_dare_determinism(tmp_path):
    state = {
        "x.weight": torch.from_numpy(np.random.default_rng(1).standard_normal(5000).astype(F32))
    }
    base = write(tmp_path / "base.safetensors", {"x.weight": torch.zeros(5000)})
    ft = write(tmp_path / "ft.safetensors", state)
    outs = []
    for i, seed in enumerate([7, 7, 8]):
        out = tmp_path / f"o{i}.safetensors"
        merge.run(merge.DareTies(density=0.4, seed=seed), [ft, ft], base=base, out=out)
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    a, c = load_file(outs[0])["x.weight"], load_file(outs[2])["x.weight"]
    assert not torch.equal(a, c)
    assert abs((a != 0).float().mean().item() - (c != 0).float().mean().item()) < 0.05


def test_dare_same_bytes_for_any_thread_count(tmp_path):
    """``python -m cli merge --method dare-ties`` gives identical bytes with 1 and N threads."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: the default thread count is 1 as well")
    rng = np.random.default_rng(5)
    n = 300_001  # several chunks of every kernel
    base = {"model.layers.0.w": torch.from_numpy(rng.standard_normal(n).astype(F32))}
    paths = [write(tmp_path / "base.safetensors", base)]
    for i in range(2):
        ft = {k: v + torch.from_numpy(rng.standard_normal(n).astype(F32)) for k, v in base.items()}
        paths.append(write(tmp_path / f"ft{i}.safetensors", ft))
    outs = []
    for threads in ("1", None):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NUMBA_NUM_THREADS", None)
        if threads is not None:
            env["NUMBA_NUM_THREADS"] = threads
        out = tmp_path / f"out{threads}.safetensors"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                "merge",
                "--base",
                paths[0],
                paths[1],
                paths[2],
                "--method",
                "dare-ties",
                "--density",
                "0.3",
                "--seed",
                "11",
                "--weights",
                "1,0.7",
                "--lines-beta",
                "0.5",
                "-o",
                out,
                "-q",
            ],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=300,
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# --- LiNeS -----------------------------------------------------------------------------------


def lines_names(depth: int) -> list[str]:
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.mlp.weight" for i in range(depth)]
    return [*names, "model.norm.weight", "lm_head.weight"]


@st.composite
def lines_problems(draw, **kw):
    depth = draw(st.integers(1, 5))
    return depth, draw(problems(names=lines_names(depth), with_zero=False, **kw))


def method_for(kind: str, p: Problem, lines: merge.Lines, density: float = 0.5, scope="tensor"):
    if kind == "ta":
        return merge.TaskArithmetic(weights=p.weights, lines=lines)
    return merge.Ties(weights=p.weights, lines=lines, density=density, scope=scope)


def merged_for(kind: str, p: Problem, density: float = 0.5, scope="tensor"):
    return ref_ta_merged(p) if kind == "ta" else ref_ties_merged(p, density, scope, "total")


@SETTINGS
@given(
    case=lines_problems(),
    kind=st.sampled_from(["ta", "ties"]),
    alpha=st.floats(-0.5, 1.5, allow_nan=False),
    beta=st.floats(-0.5, 1.5, allow_nan=False),
    scope=st.sampled_from(["tensor", "global"]),
)
def test_lines_explicit_alpha_beta(case, kind, alpha, beta, scope):
    depth, p = case
    p.lam = None
    got = run_sd(method_for(kind, p, merge.Lines(beta=beta, alpha=alpha), scope=scope), p)
    scales = {k: block_scale(k, depth, alpha, beta) for k in p.names}
    assert_close(p, got, merged_for(kind, p, scope=scope), scales)


def auto_alpha(p: Problem, merged: dict[str, np.ndarray]) -> float:
    sum_l1 = sum(np.abs(p.taus(k).sum(axis=0)).sum() for k in p.names)
    merged_l1 = sum(np.abs(merged[k]).sum() for k in p.names)
    return sum_l1 / merged_l1 / p.n


@SETTINGS
@given(
    case=lines_problems(),
    kind=st.sampled_from(["ta", "ties"]),
    beta=st.floats(0.0, 1.5, allow_nan=False),
    scope=st.sampled_from(["tensor", "global"]),
)
def test_lines_automatic_alpha(case, kind, beta, scope):
    depth, p = case
    p.lam = None
    merged = merged_for(kind, p, scope=scope)
    if sum(np.abs(m).sum() for m in merged.values()) == 0:
        with pytest.raises(ParameterError, match="alpha"):
            run_sd(method_for(kind, p, merge.Lines(beta=beta), scope=scope), p)
        return
    alpha = auto_alpha(p, merged)
    got = run_sd(method_for(kind, p, merge.Lines(beta=beta), scope=scope), p)
    scales = {k: block_scale(k, depth, alpha, beta) for k in p.names}
    assert_close(p, got, merged, scales, rel_scale=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_lines_task_arithmetic_auto_alpha_is_one_over_t(n):
    rng = np.random.default_rng(n)
    names = lines_names(3)
    base = {k: rng.standard_normal(6).astype(F32).astype(np.float64) for k in names}
    fts = [
        {k: (v + rng.standard_normal(6)).astype(F32).astype(np.float64) for k, v in base.items()}
        for _ in range(n)
    ]
    p = Problem(names, base, fts, None, None)
    method = merge.TaskArithmetic(lines=merge.Lines(beta=0.6))
    got = run_sd(method, p)
    assert method.parameters()["lines"]["alpha"] == pytest.approx(1 / n, rel=1e-12)
    scales = {k: block_scale(k, 3, 1 / n, 0.6) for k in names}
    assert_close(p, got, ref_ta_merged(p), scales)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_lines_worked_ties_example(scope):
    """Notes: tau1=[1,-2,0.5,0], tau2=[1,2,-0.5,3], no trim -> tau_TIES=[1,2,0.5,3],
    alpha = (5 / 6.5) / 2 = 0.384615..."""
    base = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, -2, 0.5, 0])}, {"w": torch.tensor([1.0, 2, -0.5, 3])}]
    method = merge.Ties(density=1.0, scope=scope, lines=merge.Lines(beta=0.7))
    got = merge.run(method, fts, base=base)
    alpha = (5 / 6.5) / 2
    assert alpha == pytest.approx(0.384615, abs=1e-6)
    assert method.parameters()["lines"]["alpha"] == pytest.approx(alpha, rel=1e-12)
    want = np.array([1, 2, 0.5, 3]) * alpha  # "w" lies outside any block: scale alpha
    np.testing.assert_allclose(got["w"].numpy(), want, rtol=1e-7)


def test_lines_custom_layer_pattern():
    names = ["enc.blk0.w", "enc.blk1.w", "enc.blk2.w", "head.w"]
    base = {k: torch.zeros(3) for k in names}
    ft = {k: torch.ones(3) for k in names}
    lines = merge.Lines(beta=1.0, alpha=0.0, pattern=r"blk(?P<block>\d+)\.")
    got = merge.run(merge.TaskArithmetic(lines=lines), [ft], base=base)
    assert [got[k][0].item() for k in names] == [0.0, 0.5, 1.0, 0.0]


def test_lines_method_instance_can_run_twice():
    base = {"model.layers.0.w": torch.zeros(3), "model.layers.1.w": torch.zeros(3)}
    ft = {k: torch.ones(3) for k in base}
    method = merge.TaskArithmetic(lines=merge.Lines(beta=0.5))
    first = merge.run(method, [ft, ft], base=base)
    second = merge.run(method, [ft, ft], base=base)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_lines_provenance_records_the_alpha_used(tmp_path):
    base = {"model.layers.0.w": torch.zeros(3), "model.layers.1.w": torch.zeros(3)}
    fts = [{k: torch.ones(3) for k in base}, {k: torch.full((3,), 2.0) for k in base}]
    out = merge.run(
        merge.TaskArithmetic(lines=merge.Lines(beta=0.5)),
        fts,
        base=base,
        out=tmp_path / "o.safetensors",
    )
    with safe_open(out, "pt") as f:
        params = json.loads(f.metadata()["adapt_parameters"])
    assert params["lines"]["alpha"] == pytest.approx(0.5)


# --- task-vector (delta) inputs --------------------------------------------------------------

METHODS = {
    "task-arithmetic": lambda: merge.TaskArithmetic(weights=(0.5, 1.5), lam=0.8),
    "ties-global": lambda: merge.Ties(density=0.4, weights=(1.0, 0.5)),
    "ties-tensor": lambda: merge.Ties(density=0.4, scope="tensor", sign="frequency"),
    "dare-linear": lambda: merge.DareLinear(density=0.6, seed=4, lam=0.9),
    "dare-ties": lambda: merge.DareTies(density=0.6, seed=4, weights=(2.0, 1.0)),
    "lines-auto": lambda: merge.Ties(density=0.5, lines=merge.Lines(beta=0.4)),
}


def delta_problem(seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    names = lines_names(2)
    shapes = [(6, 4), (5,), (3, 3), (4,), (6, 4)]
    base = {k: grid_values(rng, s, 2.0**-6, 200) for k, s in zip(names, shapes, strict=True)}
    fts = [
        {k: v + grid_values(rng, v.shape, 2.0**-8, 300) for k, v in base.items()} for _ in range(2)
    ]
    return Problem(names, base, fts, None, None)


def assert_same(a: dict, b: dict, exact: bool) -> None:
    assert list(a) == list(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=2e-7, atol=1e-30)


@pytest.mark.parametrize("name", list(METHODS))
def test_delta_inputs_equal_finetunes(name, tmp_path):
    p = delta_problem()
    exact = name != "task-arithmetic"  # the fused kernel sums the raw inputs: ulp-level only
    want = run_sd(METHODS[name](), p)
    deltas = [p.state({k: ft[k] - p.base[k] for k in p.names}) for ft in p.fts]
    base = p.state(p.base)
    got = merge.run(METHODS[name](), deltas, base=base, deltas=True)
    assert_same(got, want, exact)
    # files marked as task vectors in their metadata need no flag; mixing with a checkpoint
    tv = write(tmp_path / "tv.safetensors", deltas[1], {"adapt_content": "task_vector"})
    ft0 = write(tmp_path / "ft0.safetensors", p.state(p.fts[0]))
    got = merge.run(METHODS[name](), [ft0, tv], base=base)  # plan order: the base's
    assert_same(got, want, exact)


@pytest.mark.parametrize("name", list(METHODS))
def test_delta_missing_tensors_are_zero_updates(name, tmp_path):
    p = delta_problem(1)
    missing = ["model.layers.1.mlp.weight", "lm_head.weight"]
    for k in missing:
        p.fts[1][k] = p.base[k].copy()  # the equivalent fine-tune leaves them unchanged
    want = run_sd(METHODS[name](), p)
    partial = {k: p.fts[1][k] - p.base[k] for k in p.names if k not in missing}
    tv = write(tmp_path / "tv.safetensors", to_state(partial), {"adapt_content": "task_vector"})
    got = merge.run(METHODS[name](), [p.state(p.fts[0]), tv], base=p.state(p.base))
    assert_same(got, want, name != "task-arithmetic")
    delta0 = p.state({k: p.fts[0][k] - p.base[k] for k in p.names})
    got = merge.run(
        METHODS[name](),
        [delta0, to_state(partial)],
        base=p.state(p.base),
        deltas=True,
    )
    assert_same(got, want, name != "task-arithmetic")


def test_delta_file_against_reference_values(tmp_path):
    """A task-vector file alone: theta_0 + lambda * tau, with absent tensors left at theta_0."""
    base = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
    tv = write(
        tmp_path / "tv.safetensors",
        {"a": torch.tensor([0.5, -1.0])},
        {"adapt_content": "task_vector"},
    )
    got = merge.run(merge.TaskArithmetic(lam=2.0), [tv], base=base)
    assert got["a"].tolist() == [2.0, 0.0]
    assert got["b"].tolist() == [3.0, 4.0]


# --- adapt lines -----------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, None), (0.1, 0.9), (0.25, 2.0), (1.0, None)])
def test_adapt_lines_command(tmp_path, run_cli, alpha, beta):
    depth = 4
    rng = np.random.default_rng(9)
    names = lines_names(depth)
    base = {k: rng.standard_normal((3, 2)).astype(F32) for k in names}
    ft = {k: (v + rng.standard_normal(v.shape)).astype(F32) for k, v in base.items()}
    bpath = write(tmp_path / "base.safetensors", {k: torch.from_numpy(v) for k, v in base.items()})
    fpath = write(tmp_path / "ft.safetensors", {k: torch.from_numpy(v) for k, v in ft.items()})
    out = tmp_path / "out.safetensors"
    extra = () if beta is None else ("--beta", beta)
    res = run_cli("lines", fpath, "--base", bpath, "--alpha", alpha, *extra, "-o", out, "-q")
    assert res.code == 0, res.err
    b = 1.0 - alpha if beta is None else beta
    got = load_file(out)
    for k in names:
        scale = block_scale(k, depth, alpha, b)
        want = base[k].astype(np.float64) + scale * (ft[k].astype(np.float64) - base[k])
        diff = np.abs(got[k].numpy().astype(np.float64) - want)
        assert np.all(diff <= ulp32(want) + 1e-12), k
    if beta is None:  # the last block is the fine-tune itself
        last = f"model.layers.{depth - 1}.mlp.weight"
        np.testing.assert_allclose(got[last].numpy(), ft[last], rtol=2e-7)
