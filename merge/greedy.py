"""Greedy soup (Wortsman et al., ICML 2022, arXiv:2203.05482, Recipe 1).

Score every candidate alone, sort by score (best first), start the soup with the best, and
try the others in order: a candidate joins when the uniform soup with it scores at least as
well as the soup without it (``compare=">="``, the paper's "does not decrease"; the
reference code uses ``">"``). One pass. The result is the uniform soup of the ingredients.

Each trial soup is the exact uniform soup of its ingredients, made by the streaming engine,
so the state that was scored is bit-identical to the one written. Only that trial state dict
and one tensor per ingredient are in memory at a time.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .api import Input, soup
from .errors import ParameterError

Evaluate = Callable[[dict[str, Any]], float]


@dataclass(frozen=True)
class GreedySoupResult:
    """Which candidates made the soup, every score, and the soup (state dict or path)."""

    ingredients: tuple[int, ...]  # positions in the candidate list, in the order added
    scores: tuple[float, ...]  # each candidate alone, in candidate order
    trials: tuple[tuple[int, float, bool], ...]  # (candidate, soup score with it, kept)
    soup_score: float
    soup: Path | dict[str, Any]


def _score(evaluate: Evaluate, state: dict[str, Any], what: str) -> float:
    value = evaluate(state)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        name = getattr(evaluate, "__qualname__", repr(evaluate))
        raise ParameterError(
            f"evaluate function {name} returned {value!r} for {what}: need a number"
        )
    return float(value)


def _label(c: Input, i: int) -> str:
    return str(c) if isinstance(c, (str, os.PathLike)) else f"candidate {i}"


def greedy_soup(
    candidates: Sequence[Input],
    evaluate: Evaluate,
    *,
    compare: Literal[">=", ">"] = ">=",
    out: str | os.PathLike[str] | None = None,
    **options: Any,
) -> GreedySoupResult:
    """Build a greedy soup of ``candidates`` scored by ``evaluate`` (higher is better).

    Args:
        candidates: paths or state dicts of fine-tunes of one base model.
        evaluate: takes a ``dict[str, torch.Tensor]`` and returns a held-out score.
        compare: ``">="`` keeps a candidate when the score does not drop (the paper's
            recipe); ``">"`` only when it improves (the reference code).
        out: where to write the final soup; ``None`` returns it as a state dict.
        options: passed to :func:`merge.run` (``dtype``, ``overwrite``, ``shard_size``...).

    Returns:
        A :class:`GreedySoupResult`.

    Raises:
        ParameterError: no candidates, a bad ``compare``, or a score that is not a number.
    """
    if not candidates:
        raise ParameterError("greedy soup needs at least one candidate")
    if compare not in (">=", ">"):
        raise ParameterError(f"compare must be '>=' or '>', got {compare!r}")
    scores = []
    for i, c in enumerate(candidates):
        state = soup([c], **_mem(options))
        scores.append(_score(evaluate, state, _label(c, i)))
        del state
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])  # stable: ties keep order
    kept = [order[0]]
    best = scores[order[0]]
    trials = []
    for i in order[1:]:
        state = soup([candidates[j] for j in [*kept, i]], **_mem(options))
        s = _score(evaluate, state, f"the soup with {_label(candidates[i], i)}")
        del state
        keep = s >= best if compare == ">=" else s > best
        trials.append((i, s, keep))
        if keep:
            kept.append(i)
            best = s
    final = soup([candidates[j] for j in kept], out=out, **options)
    return GreedySoupResult(tuple(kept), tuple(scores), tuple(trials), best, final)


def _mem(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options that apply to an in-memory trial soup."""
    return {k: v for k, v in options.items() if k in ("dtype", "allow_nonfinite")}
