"""``adapt soup``: uniform or greedy model soups."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

EXAMPLES = (
    "Examples: adapt soup ft1/ ft2/ ft3/ -o soup/ · "
    "adapt soup --greedy --eval myproject.evals:heldout_accuracy ft*/ -o greedy/"
)


def load_function(spec: str) -> Callable[[dict[str, Any]], float]:
    """Import ``package.module:function`` (the current folder is importable)."""
    from merge.errors import ParameterError

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ParameterError(f"--eval must look like package.module:function, got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code is the user's to see
        raise ParameterError(f"--eval {spec}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ParameterError(f"--eval {spec}: {module_name!r} has no function {attr!r}")
    return fn


def soup(
    candidates: Annotated[list[str], typer.Argument(help="Fine-tunes of one base model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the soup.")],
    greedy: Annotated[
        bool, typer.Option(help="Greedy soup: add a candidate only if the score does not drop.")
    ] = False,
    eval_fn: Annotated[
        str | None,
        typer.Option(
            "--eval", help="package.module:function taking a state dict, returning a score."
        ),
    ] = None,
    compare: Annotated[
        str, typer.Option(help="Keep a candidate when score >= best (paper) or > best (ref. code).")
    ] = ">=",
    dtype: Annotated[str | None, typer.Option(help="Output dtype.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Uniform soup of the candidates, or with --greedy the greedy soup (Wortsman et al. 2022)."""
    import merge
    from merge.errors import ParameterError

    if not greedy:
        if eval_fn is not None:
            raise ParameterError("--eval needs --greedy")
        merge.soup(candidates, out=output, dtype=dtype, overwrite=overwrite, progress=not quiet)
        if not quiet:
            typer.echo(f"uniform soup of {len(candidates)} candidates -> {output}")
        return
    if eval_fn is None:
        raise ParameterError("--greedy needs --eval package.module:function")
    result = merge.greedy_soup(
        candidates,
        load_function(eval_fn),
        compare=compare,  # type: ignore[arg-type]
        out=output,
        dtype=dtype,
        overwrite=overwrite,
    )
    typer.echo("candidate scores:")
    for i, s in sorted(enumerate(result.scores), key=lambda p: -p[1]):
        typer.echo(f"  {s:.6g}  {candidates[i]}")
    typer.echo("greedy pass:")
    for i, s, kept in result.trials:
        typer.echo(f"  {'added ' if kept else 'skipped'} {candidates[i]}: soup score {s:.6g}")
    names = ", ".join(candidates[i] for i in result.ingredients)
    typer.echo(
        f"soup of {len(result.ingredients)} ({names}), score {result.soup_score:.6g} -> {output}"
    )
