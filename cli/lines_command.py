"""``adapt lines``: LiNeS edit of one fine-tune (scale each layer's update)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = "Example: adapt lines ft/ --base base/ --alpha 0.3 -o ft-lines/  (beta = 1 - alpha)"


def lines(
    finetune: Annotated[str, typer.Argument(help="The fine-tuned checkpoint.")],
    base: Annotated[str, typer.Option(help="The base model it was fine-tuned from.")],
    alpha: Annotated[float, typer.Option(help="Scale of the first block and of non-block params.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.")],
    beta: Annotated[
        float | None, typer.Option(help="lambda(L) = alpha + beta [default 1 - alpha].")
    ] = None,
    layer_pattern: Annotated[
        str | None, typer.Option(help=r"Regex with a (?P<block>\d+) group.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Output dtype.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """LiNeS: theta = theta_0 + lambda(l) tau_l, lambda(l) = alpha + beta (l-1)/(L-1)."""
    import merge
    from merge.methods import Lines, TaskArithmetic

    b = 1.0 - alpha if beta is None else beta
    method = TaskArithmetic(lines=Lines(beta=b, alpha=alpha, pattern=layer_pattern))
    merge.run(
        method,
        [finetune],
        base=base,
        out=output,
        dtype=dtype,
        overwrite=overwrite,
        progress=not quiet,
    )
    if not quiet:
        typer.echo(f"LiNeS alpha={alpha:g} beta={b:g}: {finetune} -> {output}")
