"""``adapt merge --base`` end to end on tiny checkpoints: every task-vector method, provenance,
``--dry-run``, task-vector inputs, ``adapt inspect --layers``, and every bad input as a clean
one-line refusal (exit != 0, no traceback, nothing written, inputs untouched).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge

DEPTH = 4  # the demo Llama has 4 layers


def tree(root: Path) -> tuple[set[str], dict[Path, bytes]]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}, snapshot([root])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def assert_states_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


# (CLI options, library method, recorded parameters)
CASES = {
    "task-arithmetic": (
        ["--lambda", "0.7", "--weights", "1,0.5"],
        lambda: merge.TaskArithmetic(weights=(1.0, 0.5), lam=0.7),
        {"weights": [1.0, 0.5], "lambda": 0.7},
    ),
    "default-with-base": (
        [],
        lambda: merge.TaskArithmetic(),
        {"weights": None, "lambda": 1.0},
    ),
    "ties-global": (
        ["--method", "ties", "--density", "0.3"],
        lambda: merge.Ties(density=0.3),
        {"weights": None, "lambda": 1.0, "density": 0.3, "scope": "global", "sign": "total"},
    ),
    "ties-defaults": (
        ["--method", "ties"],
        lambda: merge.Ties(),
        {"weights": None, "lambda": 1.0, "density": 0.2, "scope": "global", "sign": "total"},
    ),
    "ties-tensor": (
        [
            "--method",
            "ties",
            "--density",
            "0.3",
            "--scope",
            "tensor",
            "--sign",
            "frequency",
            "--lambda",
            "0.9",
            "--weights",
            "0.8,1.1",
        ],
        lambda: merge.Ties(
            density=0.3, scope="tensor", sign="frequency", lam=0.9, weights=(0.8, 1.1)
        ),
        {
            "weights": [0.8, 1.1],
            "lambda": 0.9,
            "density": 0.3,
            "scope": "tensor",
            "sign": "frequency",
        },
    ),
    "dare-linear": (
        ["--method", "dare-linear", "--density", "0.4", "--seed", "3"],
        lambda: merge.DareLinear(density=0.4, seed=3),
        {"weights": None, "lambda": 1.0, "density": 0.4, "seed": 3},
    ),
    "dare-ties": (
        [
            "--method",
            "dare-ties",
            "--density",
            "0.4",
            "--seed",
            "3",
            "--sign",
            "frequency",
            "--weights",
            "0.6,1.2",
        ],
        lambda: merge.DareTies(density=0.4, seed=3, sign="frequency", weights=(0.6, 1.2)),
        {"weights": [0.6, 1.2], "lambda": 1.0, "density": 0.4, "seed": 3, "sign": "frequency"},
    ),
    "dare-defaults": (
        ["--method", "dare-ties"],
        lambda: merge.DareTies(),
        {"weights": None, "lambda": 1.0, "density": 0.5, "seed": 0, "sign": "total"},
    ),
    "ta-lines-auto": (
        ["--lines-beta", "0.5"],
        lambda: merge.TaskArithmetic(lines=merge.Lines(beta=0.5)),
        {
            "weights": None,
            "lambda": None,
            "lines": {"alpha": 0.5, "beta": 0.5, "layer_pattern": None},
        },
    ),
    "ties-lines": (
        ["--method", "ties", "--density", "0.5", "--lines-beta", "0.8", "--lines-alpha", "0.1"],
        lambda: merge.Ties(density=0.5, lines=merge.Lines(beta=0.8, alpha=0.1)),
        {
            "weights": None,
            "lambda": None,
            "density": 0.5,
            "scope": "global",
            "sign": "total",
            "lines": {"alpha": 0.1, "beta": 0.8, "layer_pattern": None},
        },
    ),
    "dare-lines-pattern": (
        [
            "--method",
            "dare-linear",
            "--lines-beta",
            "1",
            "--lines-alpha",
            "0",
            "--layer-pattern",
            r"layers\.(?P<block>\d+)\.mlp",
        ],
        lambda: merge.DareLinear(
            lines=merge.Lines(beta=1.0, alpha=0.0, pattern=r"layers\.(?P<block>\d+)\.mlp")
        ),
        {
            "weights": None,
            "lambda": None,
            "density": 0.5,
            "seed": 0,
            "lines": {"alpha": 0.0, "beta": 1.0, "layer_pattern": r"layers\.(?P<block>\d+)\.mlp"},
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_equals_library_and_records_provenance(demo_models, tmp_path, run_cli, case):
    base, fts = demo_models
    options, method, params = CASES[case]
    before = snapshot([base, *fts])
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, *fts, *options, "-o", out, "-q")
    assert res.code == 0, res.err
    assert res.out == ""
    got = load_file(out)
    want = merge.run(method(), fts, base=base)
    assert_states_equal(got, want)
    assert all(t.dtype == torch.bfloat16 for t in got.values())  # the inputs' dtype
    meta = metadata(out)
    assert meta["adapt_method"] == method().name
    recorded = json.loads(meta["adapt_parameters"])
    assert recorded == params
    inputs = json.loads(meta["adapt_inputs"])
    assert [i["role"] for i in inputs] == ["base", "input", "input"]
    assert [i["path"] for i in inputs] == [str(p) for p in (base, *fts)]
    for entry, folder in zip(inputs, (base, *fts), strict=True):
        assert entry["sha256"] == {"model.safetensors": sha256(folder / "model.safetensors")}
    assert snapshot([base, *fts]) == before


def test_cli_task_arithmetic_against_numpy(demo_models, tmp_path, run_cli):
    """The CLI output is theta_0 + lambda * sum w_i tau_i, rounded to bf16 (1 bf16 ulp)."""
    base, fts = demo_models
    out = tmp_path / "ta.safetensors"
    res = run_cli(
        "merge", "--base", base, *fts, "--weights", "0.5,0.25", "--lambda", "1.5", "-o", out, "-q"
    )
    assert res.code == 0, res.err
    b = load_file(base / "model.safetensors")
    f1, f2 = (load_file(f / "model.safetensors") for f in fts)
    got = load_file(out)
    for k, t in b.items():
        theta0 = t.double()
        want = theta0 + 1.5 * (0.5 * (f1[k].double() - theta0) + 0.25 * (f2[k].double() - theta0))
        want_bf = want.to(torch.bfloat16).double()
        ulp = 2.0 ** (torch.floor(torch.log2(want_bf.abs().clamp_min(2.0**-126))) - 7)
        noise = 1e-15 * (theta0.abs() + f1[k].double().abs() + f2[k].double().abs())
        assert torch.all((got[k].double() - want_bf).abs() <= ulp + noise), k


def test_cli_lines_scales_each_block(demo_models, tmp_path, run_cli):
    """With alpha = 0 and beta = 1 on a single fine-tune, block l gets (l-1)/(L-1) of tau."""
    base, fts = demo_models
    out = tmp_path / "lines.safetensors"
    res = run_cli(
        "merge", "--base", base, fts[0], "--lines-beta", "1", "--lines-alpha", "0", "-o", out, "-q"
    )
    assert res.code == 0, res.err
    b = load_file(base / "model.safetensors")
    f = load_file(fts[0] / "model.safetensors")
    got = load_file(out)
    for k in b:
        inside = k.startswith("model.layers.")
        scale = int(k.split(".")[2]) / (DEPTH - 1) if inside else 0.0
        want = (b[k].double() + scale * (f[k].double() - b[k].double())).to(torch.bfloat16)
        diff = (got[k].double() - want.double()).abs()
        # float64 noise of the fused kernel where the result cancels to ~0
        noise = 1e-15 * (b[k].double().abs() + f[k].double().abs())
        assert torch.all(diff <= want.double().abs() * 2**-7 + noise), (k, scale)
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    last = f"model.layers.{DEPTH - 1}.mlp.up_proj.weight"
    assert torch.equal(got[last], f[last])


def test_cli_folder_output(demo_models, tmp_path, run_cli):
    base, fts = demo_models
    out = tmp_path / "ties-model"
    res = run_cli("merge", "--base", base, *fts, "--method", "ties", "-o", out, "-q")
    assert res.code == 0, res.err
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert_states_equal(
        load_file(out / "model.safetensors"), merge.run(merge.Ties(), fts, base=base)
    )


def test_cli_prints_summary(demo_models, tmp_path, run_cli):
    base, fts = demo_models
    out = tmp_path / "o.safetensors"
    res = run_cli("merge", "--base", base, *fts, "--method", "dare-linear", "-o", out)
    assert res.code == 0, res.err
    assert "dare-linear" in res.out and str(out) in res.out


@pytest.mark.parametrize("method", ["ties", "dare-ties"])
def test_cli_task_vector_inputs(demo_models, tmp_path, run_cli, method):
    """``adapt diff`` task vectors (marked in their metadata) and ``--deltas`` files merge to
    the same bytes as the fine-tunes."""
    base, fts = demo_models
    want = tmp_path / "from-finetunes.safetensors"
    assert run_cli("merge", "--base", base, *fts, "--method", method, "-o", want, "-q").code == 0
    taus = []
    for i, ft in enumerate(fts):
        tau = tmp_path / f"tau{i}.safetensors"
        res = run_cli("diff", ft, "--base", base, "-o", tau, "-q")
        assert res.code == 0, res.err
        assert metadata(tau).get("adapt_content") == "task_vector"
        taus.append(tau)
    got = tmp_path / "from-taus.safetensors"
    res = run_cli("merge", "--base", base, *taus, "--method", method, "-o", got, "-q")
    assert res.code == 0, res.err
    assert_states_equal(load_file(got), load_file(want))
    # unmarked files holding tau, with --deltas; tau computed here in float64 -> float32
    b = load_file(base / "model.safetensors")
    plain = []
    for i, ft in enumerate(fts):
        f = load_file(ft / "model.safetensors")
        tau = {k: (f[k].double() - b[k].double()).float() for k in b}
        path = tmp_path / f"plain{i}.safetensors"
        save_file(tau, str(path), metadata={"format": "pt"})
        plain.append(path)
    got2 = tmp_path / "from-deltas.safetensors"
    res = run_cli("merge", "--base", base, "--deltas", *plain, "--method", method, "-o", got2, "-q")
    assert res.code == 0, res.err
    assert_states_equal(load_file(got2), load_file(want))
    # the dry run names them as task vectors
    res = run_cli("merge", "--base", base, "--deltas", *plain, "--method", method, "--dry-run")
    assert res.code == 0, res.err
    assert res.out.count("task vector: ") == 2


def test_cli_partial_task_vector(tmp_path, run_cli):
    """A task-vector file without some tensors leaves them at theta_0."""
    base = tmp_path / "base.safetensors"
    save_file({"a": torch.ones(3), "b": torch.full((2,), 2.0)}, str(base))
    tau = tmp_path / "tau.safetensors"
    save_file(
        {"a": torch.tensor([0.5, -1.0, 0.0])}, str(tau), metadata={"adapt_content": "task_vector"}
    )
    out = tmp_path / "o.safetensors"
    res = run_cli("merge", "--base", base, tau, "--lambda", "2", "-o", out, "-q")
    assert res.code == 0, res.err
    got = load_file(out)
    assert got["a"].tolist() == [2.0, -1.0, 1.0]
    assert got["b"].tolist() == [2.0, 2.0]


def test_cli_dry_run(demo_models, tmp_path, run_cli):
    base, fts = demo_models
    before = tree(tmp_path)
    out = tmp_path / "never.safetensors"
    res = run_cli(
        "merge",
        "--base",
        base,
        *fts,
        "--method",
        "ties",
        "--density",
        "0.3",
        "--scope",
        "tensor",
        "-o",
        out,
        "--dry-run",
    )
    assert res.code == 0, res.err
    assert not out.exists()
    assert tree(tmp_path) == before
    lines = res.out.splitlines()
    assert lines[0].startswith("method: ties")
    assert "0.3" in lines[0] and "tensor" in lines[0]
    assert f"base: {base}" in res.out
    for ft in fts:
        assert f"input: {ft}" in res.out
    assert "247,360 parameters" in res.out  # the demo model's size
    # the dry run refuses what the real run refuses
    res = run_cli("merge", "--base", base, *fts, "--method", "ties", "--density", "2", "--dry-run")
    assert res.code != 0 and "--density" in res.err


# --- inspect --layers --------------------------------------------------------------------------


def test_inspect_layers_json(demo_models, run_cli):
    base, _ = demo_models
    res = run_cli("inspect", base, "--layers", "--alpha", "0.2", "--beta", "0.8", "--json")
    assert res.code == 0, res.err
    rows = {r["name"]: r for r in json.loads(res.out)["layers"]}
    names = load_file(base / "model.safetensors").keys()
    assert set(rows) == set(names)
    for name, row in rows.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            assert (row["stack"], row["block"]) == ("model.layers", i + 1), name
            assert row["scale"] == pytest.approx(0.2 + 0.8 * i / (DEPTH - 1)), name
        else:
            assert (row["stack"], row["block"]) == (None, None), name
            assert row["scale"] == pytest.approx(0.2), name


def test_inspect_layers_text_and_defaults(demo_models, run_cli):
    base, _ = demo_models
    res = run_cli("inspect", base, "--layers")
    assert res.code == 0, res.err
    for header in ("tensor", "stack", "block", "scale"):
        assert header in res.out
    norm = next(line for line in res.out.splitlines() if "model.norm.weight" in line)
    assert "0.000000" in norm  # default alpha 0 outside blocks
    scales = {f"{i / (DEPTH - 1):.6f}" for i in range(DEPTH)}  # default beta 1
    assert all(s in res.out for s in scales)


def test_inspect_layers_custom_pattern(demo_models, run_cli):
    base, _ = demo_models
    res = run_cli(
        "inspect", base, "--layers", "--json", "--layer-pattern", r"layers\.(?P<block>[0-1])\."
    )
    assert res.code == 0, res.err
    rows = {r["name"]: r for r in json.loads(res.out)["layers"]}
    assert rows["model.layers.1.mlp.up_proj.weight"]["scale"] == pytest.approx(1.0)
    assert rows["model.layers.0.mlp.up_proj.weight"]["scale"] == pytest.approx(0.0)
    assert rows["model.layers.3.mlp.up_proj.weight"]["block"] is None


# --- bad input ---------------------------------------------------------------------------------


class Env:
    """A tiny float32 base and two fine-tunes in ``tmp_path``; an empty output folder."""

    def __init__(self, tmp_path: Path, run_cli):
        self.root = tmp_path
        self.run_cli = run_cli
        rng = np.random.default_rng(0)
        self.base_state = {
            "model.embed_tokens.weight": torch.from_numpy(rng.standard_normal((5, 3)).astype("f4")),
            "model.layers.0.mlp.weight": torch.from_numpy(rng.standard_normal((4, 3)).astype("f4")),
            "model.layers.1.mlp.weight": torch.from_numpy(rng.standard_normal((4, 3)).astype("f4")),
        }
        self.base = self.write("base.safetensors", self.base_state)
        self.fts = [
            self.write(
                f"ft{i}.safetensors", {k: v + 0.1 * (i + 1) for k, v in self.base_state.items()}
            )
            for i in range(2)
        ]
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()
        self.out = self.out_dir / "merged.safetensors"

    def write(self, name: str, state: dict, meta: dict | None = None) -> Path:
        path = self.root / name
        save_file(state, str(path), metadata={"format": "pt", **(meta or {})})
        return path

    def refused(self, *args: object, needles: tuple[str, ...] = ()) -> str:
        before = tree(self.root)
        res = self.run_cli(*args)
        assert res.code != 0, res
        assert "Traceback" not in res.err
        lines = res.err.splitlines()
        assert len(lines) == 1, res.err
        assert lines[0].startswith("adapt: error: "), res.err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        assert res.out == ""
        after = tree(self.root)
        assert after[0] == before[0], "files were created or removed"
        assert after[1] == before[1], "a file changed"
        return lines[0]

    def merge_refused(self, *options: object, needles: tuple[str, ...] = ()) -> str:
        return self.refused(
            "merge", "--base", self.base, *self.fts, *options, "-o", self.out, needles=needles
        )


@pytest.fixture
def env(tmp_path, run_cli) -> Env:
    return Env(tmp_path, run_cli)


def test_env_merges(env):
    """The bad-input fixture is itself a valid merge (so each refusal is due to one change)."""
    res = env.run_cli("merge", "--base", env.base, *env.fts, "--method", "ties", "-o", env.out)
    assert res.code == 0, res.err
    env.out.unlink()


def test_base_missing_a_tensor(env):
    state = dict(env.base_state)
    del state["model.layers.1.mlp.weight"]
    short = env.write("short-base.safetensors", state)
    env.refused(
        "merge",
        "--base",
        short,
        *env.fts,
        "--method",
        "ties",
        "-o",
        env.out,
        needles=("model.layers.1.mlp.weight",),
    )


def test_base_shape_differs(env):
    state = dict(env.base_state)
    state["model.layers.0.mlp.weight"] = torch.zeros(3, 4)
    odd = env.write("odd-base.safetensors", state)
    env.refused(
        "merge",
        "--base",
        odd,
        *env.fts,
        "-o",
        env.out,
        needles=("model.layers.0.mlp.weight", "[3, 4]", "[4, 3]"),
    )


@pytest.mark.parametrize("density", ["0", "-0.1", "1.5", "nan"])
@pytest.mark.parametrize("method", ["ties", "dare-linear", "dare-ties"])
def test_density_outside_range(env, method, density):
    env.merge_refused("--method", method, f"--density={density}", needles=("--density",))


def test_density_negative_as_separate_argument(env):
    env.merge_refused("--method", "ties", "--density", "-0.1", needles=("--density",))


@pytest.mark.parametrize("method", ["nonsense", "TIES", "dare"])
def test_unknown_method(env, method):
    env.merge_refused("--method", method, needles=(repr(method), "task-arithmetic"))


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare-linear", "dare-ties"])
@pytest.mark.parametrize("weights", ["1", "1,2,3"])
def test_weights_count_differs(env, method, weights):
    env.merge_refused("--method", method, "--weights", weights, needles=("--weights",))


def test_weights_not_finite(env):
    env.merge_refused("--weights", "nan,1", needles=("--weights",))


def test_lambda_with_lines_beta(env):
    env.merge_refused("--lambda", "0.5", "--lines-beta", "0.5", needles=("--lambda",))


@pytest.mark.parametrize("option", ["--lines-alpha", "--layer-pattern"])
def test_lines_options_need_lines_beta(env, option):
    value = r"layers\.(?P<block>\d+)" if option == "--layer-pattern" else "0.3"
    env.merge_refused(option, value, needles=("--lines-beta",))


@pytest.mark.parametrize("method", [None, "task-arithmetic"])
def test_density_with_task_arithmetic(env, method):
    extra = () if method is None else ("--method", method)
    env.merge_refused(*extra, "--density", "0.5", needles=("--density",))


def test_base_with_soup(env):
    env.merge_refused("--method", "soup", needles=("--base",))


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare-linear", "dare-ties"])
def test_task_vector_method_without_base(env, method):
    env.refused("merge", *env.fts, "--method", method, "-o", env.out, needles=("--base",))


@pytest.mark.parametrize(
    ("option", "needle"),
    [("--lambda", "--lambda"), ("--density", "--density"), ("--lines-beta", "LiNeS")],
)
def test_soup_rejects_task_vector_options(env, option, needle):
    env.refused("merge", *env.fts, option, "0.5", "-o", env.out, needles=(needle,))


def test_task_vector_file_given_to_soup(env):
    tau = env.write(
        "tau.safetensors",
        {k: torch.full_like(v, 0.1) for k, v in env.base_state.items()},
        {"adapt_content": "task_vector"},
    )
    env.refused("merge", tau, env.fts[0], "-o", env.out, needles=(str(tau), "task vector"))
    env.refused("soup", tau, env.fts[0], "-o", env.out, needles=(str(tau), "task vector"))
    env.refused("merge", "--deltas", *env.fts, "-o", env.out, needles=("task vector",))


def test_lines_alpha_undefined_when_merge_is_zero(env):
    """Fine-tunes equal to the base: the automatic LiNeS alpha divides by ||tau_m|| = 0."""
    same = env.write("same.safetensors", env.base_state)
    env.refused(
        "merge", "--base", env.base, same, "--lines-beta", "0.5", "-o", env.out, needles=("alpha",)
    )


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--method", "ties", "--scope", "model"], "--scope"),
        (["--method", "ties", "--scope", ""], "--scope"),
        (["--method", "ties", "--sign", "majority"], "--sign"),
        (["--method", "dare-ties", "--sign", "majority"], "--sign"),
    ],
)
def test_scope_and_sign_invalid(env, options, needle):
    env.merge_refused(*options, needles=(needle,))


@pytest.mark.parametrize("option", ["--scope", "--sign"])
def test_scope_and_sign_invalid_value_with_other_methods(env, option):
    env.merge_refused("--method", "task-arithmetic", option, "majority", needles=(option,))


BAD_PATTERNS = {
    "not-a-regex": "(",
    "no-block-group": r"layers\.\d+",
    "block-not-digits": r"model\.(?P<block>\w+)\.",
}


@pytest.mark.parametrize("pattern", list(BAD_PATTERNS))
def test_bad_layer_pattern_in_inspect(env, pattern):
    env.refused(
        "inspect",
        env.base,
        "--layers",
        "--layer-pattern",
        BAD_PATTERNS[pattern],
        needles=("pattern",),
    )


@pytest.mark.parametrize("pattern", list(BAD_PATTERNS))
@pytest.mark.parametrize("command", ["merge", "lines"])
def test_bad_layer_pattern_in_merge_and_lines(env, command, pattern):
    if command == "merge":
        env.merge_refused(
            "--lines-beta", "0.5", "--layer-pattern", BAD_PATTERNS[pattern], needles=("pattern",)
        )
    else:
        env.refused(
            "lines",
            env.fts[0],
            "--base",
            env.base,
            "--alpha",
            "0.3",
            "--layer-pattern",
            BAD_PATTERNS[pattern],
            "-o",
            env.out,
            needles=("pattern",),
        )


@pytest.mark.parametrize(
    "options",
    [
        ["--method", "soup"],  # with --base
        ["--lines-beta", "0.5", "--layer-pattern", "("],
    ],
    ids=["base-with-soup", "bad-layer-pattern"],
)
def test_dry_run_refuses_what_the_run_refuses(env, options):
    env.refused("merge", "--base", env.base, *env.fts, *options, "--dry-run")


def test_dry_run_refuses_task_vector_method_without_base(env):
    env.refused("merge", *env.fts, "--method", "ties", "--dry-run", needles=("--base",))


def test_inputs_untouched_after_successful_merges(env):
    before = snapshot([env.base, *env.fts])
    for method in ("task-arithmetic", "ties", "dare-linear", "dare-ties"):
        out = env.out_dir / f"{method}.safetensors"
        res = env.run_cli("merge", "--base", env.base, *env.fts, "--method", method, "-o", out)
        assert res.code == 0, res.err
    assert snapshot([env.base, *env.fts]) == before


@pytest.mark.parametrize(
    "options",
    [
        ["--lambda", "nan"],
        ["--lambda", "inf"],
        ["--lines-beta", "nan"],
        ["--lines-beta", "0.5", "--lines-alpha", "inf"],
    ],
    ids=["lambda-nan", "lambda-inf", "lines-beta-nan", "lines-alpha-inf"],
)
def test_non_finite_scale_refused(env, options):
    env.merge_refused(*options)


@pytest.mark.parametrize("option", ["--alpha", "--beta"])
def test_lines_command_non_finite_refused(env, option):
    values = {"--alpha": "0.3", "--beta": "0.7"} | {option: "nan"}
    args = [x for pair in values.items() for x in pair]
    env.refused("lines", env.fts[0], "--base", env.base, *args, "-o", env.out)
