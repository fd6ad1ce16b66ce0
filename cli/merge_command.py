"""``adapt merge``: combine checkpoints, streaming tensor by tensor."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = (
    "Examples: adapt merge a.safetensors b.safetensors -o soup.safetensors · "
    "adapt merge ft1/ ft2/ --weights 0.7,0.3 -o merged/"
)

_OUT = "Output"


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.7,0.3"`` -> ``(0.7, 0.3)``; a one-line error naming the option otherwise."""
    if text is None:
        return None
    from merge.errors import ParameterError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ParameterError(f"{option} must be comma-separated numbers, got {text!r}") from None


def merge(
    inputs: Annotated[list[str], typer.Argument(help="Checkpoints: .safetensors files or folders.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="A .safetensors file or a model folder.",
                     rich_help_panel=_OUT),
    ] = None,
    method: Annotated[str, typer.Option(help="Merge method.")] = "soup",
    weights: Annotated[
        str | None, typer.Option(help="Per-input weights, e.g. 0.7,0.3 (normalised for soups).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="Output dtype (bf16, float16, float32); default: input dtype.",
                     rich_help_panel=_OUT),
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="Largest shard of a folder output.", rich_help_panel=_OUT)
    ] = "50GB",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output.", rich_help_panel=_OUT)
    ] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option(help="Merge inputs holding NaN/Inf instead of refusing.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Check inputs and print the plan only.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Merge checkpoints into one (default: the uniform model soup)."""
    import merge
    from merge.errors import ParameterError
    from merge.methods import METHODS

    if method not in METHODS:
        raise ParameterError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    chosen = merge.Soup(weights=parse_floats(weights, "--weights"))
    plan = merge.plan(inputs, dtype=dtype)
    chosen.validate(len(plan.inputs))
    if dry_run:
        _print_plan(plan, chosen)
        return
    if output is None:
        raise ParameterError("missing --output/-o (or pass --dry-run)")
    start = time.perf_counter()
    out = merge.run(
        chosen,
        inputs,
        out=output,
        dtype=dtype,
        shard_size=shard_size,
        allow_nonfinite=allow_nonfinite,
        overwrite=overwrite,
        progress=not quiet,
    )
    if not quiet:
        typer.echo(
            f"{chosen.name}: merged {len(inputs)} inputs, {plan.num_params:,} parameters "
            f"-> {out} ({time.perf_counter() - start:.2f} s)"
        )


def _print_plan(plan: merge.Plan, method: merge.methods.Method) -> None:  # noqa: F821
    merged = sum(t.merged for t in plan.tensors)
    typer.echo(f"method: {method.name} {method.parameters()}")
    for src in plan.sources:
        typer.echo(f"input: {src.label} ({src.kind})")
    typer.echo(
        f"tensors: {len(plan.tensors)} ({merged} merged, {len(plan.tensors) - merged} carried "
        f"through), {plan.num_params:,} parameters, {plan.out_bytes:,} bytes out"
    )
    typer.echo(f"peak memory estimate: {plan.peak_estimate() / 1e6:.1f} MB")
