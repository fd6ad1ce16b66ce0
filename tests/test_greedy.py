"""Greedy soup (Wortsman et al. 2022, Recipe 1) through the library and ``adapt soup --greedy``.

The held-out score is the negative Euclidean distance of the soup's ``w`` to a target, so which
candidates are kept can be worked out by hand. Candidates, in list order:

    D = [3, 3]     alone: -2.8284
    C = [1, 1.75]  alone: -0.75
    B = [1, 0.5]   alone: -0.5   (first of the two best: the stable sort puts B before A)
    A = [1, 0.5]   alone: -0.5   (a duplicate of B: adding it leaves the soup, and its score,
                                  exactly unchanged)

target [1, 1]. ``>=`` (the paper): B, then A (score unchanged: kept), then C (soup [1, 11/12],
score -1/12: kept), then D (soup [1.5, 1.4375]: worse, skipped) -> ingredients B, A, C.
``>`` (the reference code): B, A skipped (not an improvement), C (soup [1, 1.125], score
-0.125: kept), D (soup [5/3, 1.75]: worse) -> ingredients B, C.
"""

from __future__ import annotations

import importlib
import math
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot
from safetensors.torch import load_file, save_file

import merge
from merge.errors import ParameterError

TARGET = np.array([1.0, 1.0])
D, C, B, A = [3.0, 3.0], [1.0, 1.75], [1.0, 0.5], [1.0, 0.5]
VALUES = [D, C, B, A]
EXPECTED = {">=": (2, 3, 1), ">": (2, 1)}


def state(w: list[float]) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor(w, dtype=torch.float32),
        "ids": torch.arange(3),  # carried through unchanged
    }


def distance_score(sd: dict[str, torch.Tensor]) -> float:
    return -float(np.linalg.norm(sd["w"].to(torch.float64).numpy() - TARGET))


def score_of(values: list[list[float]]) -> float:
    """The score of the uniform soup of ``values``, computed here in float64."""
    return -float(np.linalg.norm(np.mean(np.array(values), axis=0) - TARGET))


def uniform_soup(values: list[list[float]]) -> np.ndarray:
    return np.mean(np.array(values, np.float64), axis=0).astype(np.float32)


class Recorder:
    """An evaluate function that remembers every state it scored."""

    def __init__(self):
        self.seen: list[list[float]] = []

    def __call__(self, sd):
        self.seen.append(sd["w"].tolist())
        return distance_score(sd)


@pytest.mark.parametrize("compare", [">=", ">"])
def test_greedy_state_dicts(compare):
    rec = Recorder()
    result = merge.greedy_soup([state(v) for v in VALUES], rec, compare=compare)
    kept = EXPECTED[compare]
    assert result.ingredients == kept
    assert result.scores == pytest.approx([score_of([v]) for v in VALUES], abs=1e-12)
    # every candidate alone, then one trial per remaining candidate in score order
    assert len(rec.seen) == 4 + 3
    assert [t[0] for t in result.trials] == [3, 1, 0]
    trial_a, trial_c, trial_d = result.trials
    assert trial_a == (3, score_of([B]), compare == ">=")  # exactly unchanged
    with_a = [B, A] if compare == ">=" else [B]
    assert trial_c[1:] == (pytest.approx(score_of([*with_a, C]), abs=1e-6), True)
    assert trial_d[1:] == (pytest.approx(score_of([*with_a, C, D]), abs=1e-6), False)
    want = uniform_soup([VALUES[i] for i in kept])
    np.testing.assert_array_equal(result.soup["w"].numpy(), want)
    assert result.soup["ids"].tolist() == [0, 1, 2]
    assert result.soup_score == pytest.approx(score_of([VALUES[i] for i in kept]), abs=1e-6)


def test_default_compare_is_the_papers():
    result = merge.greedy_soup([state(v) for v in VALUES], distance_score)
    assert result.ingredients == EXPECTED[">="]


def write_candidates(folder: Path, values=VALUES) -> list[Path]:
    paths = []
    for name, v in zip("DCBA", values, strict=True):
        path = folder / f"cand_{name}.safetensors"
        save_file(state(v), str(path), metadata={"format": "pt"})
        paths.append(path)
    return paths


@pytest.mark.parametrize("compare", [">=", ">"])
def test_greedy_files_written_soup(tmp_path, compare):
    paths = write_candidates(tmp_path)
    before = snapshot(paths)
    out = tmp_path / "soup.safetensors"
    result = merge.greedy_soup(paths, distance_score, compare=compare, out=out)
    assert result.ingredients == EXPECTED[compare]
    assert Path(result.soup) == out
    got = load_file(out)
    np.testing.assert_array_equal(
        got["w"].numpy(), uniform_soup([VALUES[i] for i in EXPECTED[compare]])
    )
    assert got["ids"].tolist() == [0, 1, 2]
    assert snapshot(paths) == before


def test_greedy_bf16_dtype_option(tmp_path):
    paths = write_candidates(tmp_path)
    result = merge.greedy_soup(paths, distance_score, dtype="bf16")
    assert result.soup["w"].dtype == torch.bfloat16
    want = torch.from_numpy(uniform_soup([VALUES[i] for i in EXPECTED[">="]])).to(torch.bfloat16)
    assert torch.equal(result.soup["w"], want)


def test_greedy_every_candidate_worse_keeps_only_the_best():
    values = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    result = merge.greedy_soup([state(v) for v in values], distance_score)
    assert result.ingredients == (1,)
    assert [kept for _, _, kept in result.trials] == [False, False]
    np.testing.assert_array_equal(result.soup["w"].numpy(), [1.0, 1.0])
    assert result.soup_score == 0.0


def test_greedy_single_candidate():
    result = merge.greedy_soup([state(C)], distance_score)
    assert result.ingredients == (0,)
    assert result.trials == ()
    np.testing.assert_array_equal(result.soup["w"].numpy(), np.float32(C))


def test_greedy_longer_run_matches_hand_simulation():
    """Random candidates: simulate the recipe here (float64 soups) and compare the choice."""
    rng = np.random.default_rng(3)
    values = [list(TARGET + rng.normal(0, 1, 2)) for _ in range(7)]
    values = [list(np.float32(v).astype(np.float64)) for v in values]
    result = merge.greedy_soup([state(v) for v in values], distance_score)
    scores = [score_of([v]) for v in values]
    order = sorted(range(len(values)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        s = score_of([values[j] for j in [*kept, i]])
        if s >= best:
            kept, best = [*kept, i], s
    assert result.ingredients == tuple(kept)
    np.testing.assert_allclose(
        result.soup["w"].numpy(), uniform_soup([values[i] for i in kept]), rtol=1e-7
    )


@pytest.mark.parametrize(
    "bad", ["0.5", None, float("nan"), True, [1.0]], ids=["str", "none", "nan", "bool", "list"]
)
def test_greedy_evaluate_must_return_a_number(bad):
    def evaluate(sd):
        return bad

    with pytest.raises(ParameterError, match="number"):
        merge.greedy_soup([state(A), state(B)], evaluate)


def test_greedy_numpy_scalars_are_numbers():
    result = merge.greedy_soup(
        [state(v) for v in VALUES], lambda sd: np.float32(distance_score(sd))
    )
    assert result.ingredients == EXPECTED[">="]


def test_greedy_bad_arguments():
    with pytest.raises(ParameterError, match="candidate"):
        merge.greedy_soup([], distance_score)
    with pytest.raises(ParameterError, match="compare"):
        merge.greedy_soup([state(A)], distance_score, compare="<")


# --- CLI ---------------------------------------------------------------------------------------

EVAL_MODULE = """
import math
import numpy as np

TARGET = np.array([1.0, 1.0])


def score(sd):
    return -float(np.linalg.norm(sd["w"].double().numpy() - TARGET))


def as_string(sd):
    return "0.5"


def as_none(sd):
    return None


def as_nan(sd):
    return math.nan


def nan_for_soups(sd):
    return score(sd) if sd["w"].tolist() in ([3.0, 3.0], [1.0, 1.75], [1.0, 0.5]) else math.nan


not_callable = 3
"""


@pytest.fixture
def eval_module(tmp_path, monkeypatch) -> str:
    """A module of evaluate functions in its own folder on sys.path; returns its (unique) name."""
    name = f"heldout_{uuid.uuid4().hex[:12]}"
    folder = tmp_path / "evals"
    folder.mkdir()
    (folder / f"{name}.py").write_text(EVAL_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return name


@pytest.mark.parametrize("compare", [">=", ">"])
def test_cli_greedy_soup(tmp_path, run_cli, eval_module, compare):
    paths = write_candidates(tmp_path)
    out = tmp_path / "out" / "greedy.safetensors"
    out.parent.mkdir()
    res = run_cli(
        "soup",
        "--greedy",
        "--eval",
        f"{eval_module}:score",
        "--compare",
        compare,
        *paths,
        "-o",
        out,
    )
    assert res.code == 0, res.err
    kept = EXPECTED[compare]
    got = load_file(out)
    np.testing.assert_array_equal(got["w"].numpy(), uniform_soup([VALUES[i] for i in kept]))
    lines = res.out.splitlines()
    # every candidate's score is reported, best first
    for p, v in zip(paths, VALUES, strict=True):
        assert any(str(p) in line and f"{score_of([v]):.6g}" in line for line in lines), p
    added = [line for line in lines if line.strip().startswith("added")]
    skipped = [line for line in lines if line.strip().startswith("skipped")]
    assert len(added) == len(kept) - 1 and len(skipped) == 4 - len(kept)
    final = lines[-1]
    assert f"soup of {len(kept)}" in final
    assert ", ".join(str(paths[i]) for i in kept) in final
    assert str(out) in final


def test_cli_greedy_soup_cwd_module(tmp_path, run_cli, monkeypatch):
    """The current folder is importable (as for ``python -m``)."""
    name = f"cwd_eval_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(EVAL_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    importlib.invalidate_caches()
    paths = write_candidates(tmp_path)
    res = run_cli("soup", "--greedy", "--eval", f"{name}:score", *paths, "-o", "g.safetensors")
    assert res.code == 0, res.err
    assert (tmp_path / "g.safetensors").is_file()


def tree(root: Path) -> tuple[set[str], dict[Path, bytes]]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}, snapshot([root])


def assert_refused(run_cli, root: Path, *args, needles=()) -> str:
    before = tree(root)
    res = run_cli(*args)
    assert res.code != 0, res
    assert "Traceback" not in res.err
    lines = res.err.splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("adapt: error: "), res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert res.out == ""
    assert tree(root) == before, "files were created, removed or changed"
    return lines[0]


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("no_such_module_8c1f:score", ("no_such_module_8c1f",)),
        ("{mod}:missing", ("missing",)),
        ("{mod}:not_callable", ("not_callable",)),
        ("{mod}:as_string", ("as_string", "number")),
        ("{mod}:as_none", ("as_none", "number")),
        ("{mod}:as_nan", ("as_nan", "number")),
        ("{mod}:nan_for_soups", ("nan_for_soups", "number")),
        ("{mod}", ("package.module:function",)),
        (":score", ("package.module:function",)),
    ],
)
def test_cli_greedy_bad_eval(tmp_path, run_cli, eval_module, spec, needles):
    spec = spec.format(mod=eval_module)
    paths = write_candidates(tmp_path)
    out = tmp_path / "greedy.safetensors"
    assert_refused(
        run_cli, tmp_path, "soup", "--greedy", "--eval", spec, *paths, "-o", out, needles=needles
    )


def test_cli_eval_module_failing_at_import(tmp_path, run_cli, monkeypatch):
    name = f"broken_{uuid.uuid4().hex[:12]}"
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / f"{name}.py").write_text("raise RuntimeError('no data here')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "evals"))
    paths = write_candidates(tmp_path)
    assert_refused(
        run_cli,
        tmp_path,
        "soup",
        "--greedy",
        "--eval",
        f"{name}:score",
        *paths,
        "-o",
        tmp_path / "g.safetensors",
        needles=(name,),
    )


def test_cli_greedy_and_eval_need_each_other(tmp_path, run_cli, eval_module):
    paths = write_candidates(tmp_path)
    out = tmp_path / "g.safetensors"
    assert_refused(run_cli, tmp_path, "soup", "--greedy", *paths, "-o", out, needles=("--eval",))
    assert_refused(
        run_cli,
        tmp_path,
        "soup",
        "--eval",
        f"{eval_module}:score",
        *paths,
        "-o",
        out,
        needles=("--greedy",),
    )
    assert_refused(
        run_cli,
        tmp_path,
        "soup",
        "--greedy",
        "--eval",
        f"{eval_module}:score",
        "--compare",
        "<",
        *paths,
        "-o",
        out,
        needles=("compare",),
    )


def test_scores_are_finite_numbers_in_report():
    result = merge.greedy_soup([state(v) for v in VALUES], distance_score)
    assert all(isinstance(s, float) and math.isfinite(s) for s in result.scores)
    assert all(isinstance(s, float) for _, s, _ in result.trials)
