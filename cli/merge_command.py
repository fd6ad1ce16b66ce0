"""``adapt merge``: combine checkpoints, streaming tensor by tensor."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import merge
    from merge.methods import Method

EXAMPLES = (
    "Examples: adapt merge a.safetensors b.safetensors -o soup.safetensors · "
    "adapt merge ft1/ ft2/ --weights 0.7,0.3 -o merged/ · "
    "adapt merge --base base/ ft1/ ft2/ --method ties --density 0.2 -o ties/ · "
    "adapt merge --base base/ ft1/ ft2/ --method task-arithmetic --lines-beta 0.5 -o ta/"
)

OUTPUT = "Output"
METHOD = "Method parameters"
LINES = "LiNeS layer scaling"


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.7,0.3"`` -> ``(0.7, 0.3)``; a one-line error naming the option otherwise."""
    if text is None:
        return None
    from merge.errors import ParameterError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ParameterError(f"{option} must be comma-separated numbers, got {text!r}") from None


def build_method(
    method: str | None,
    *,
    has_base: bool,
    weights: str | None = None,
    lam: float | None = None,
    density: float | None = None,
    scope: str | None = None,
    sign: str | None = None,
    seed: int = 0,
    lines_alpha: float | None = None,
    lines_beta: float | None = None,
    layer_pattern: str | None = None,
) -> Method:
    """The method instance the options describe, with a one-line error for any misuse."""
    from merge.errors import ParameterError
    from merge.methods import METHODS, DareLinear, DareTies, Lines, Soup, TaskArithmetic, Ties

    name = method or ("task-arithmetic" if has_base else "soup")
    if name not in METHODS:
        raise ParameterError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    w = parse_floats(weights, "--weights")
    lines = None
    if lines_beta is not None:
        lines = Lines(beta=lines_beta, alpha=lines_alpha, pattern=layer_pattern)
    elif lines_alpha is not None or layer_pattern is not None:
        raise ParameterError("--lines-alpha and --layer-pattern need --lines-beta")
    if name == "soup":
        if lam is not None or density is not None or lines is not None:
            raise ParameterError(
                "soup takes only --weights; --lambda, --density and LiNeS need --base and a "
                "task-vector method"
            )
        return Soup(weights=w)
    if scope is not None and name != "ties":
        raise ParameterError("--scope applies to ties only")
    if sign is not None and name not in ("ties", "dare-ties"):
        raise ParameterError("--sign applies to ties and dare-ties only")
    common = {"weights": w, "lam": lam, "lines": lines}
    if name == "task-arithmetic":
        if density is not None:
            raise ParameterError("--density applies to ties, dare-linear and dare-ties")
        return TaskArithmetic(**common)
    if name == "ties":
        return Ties(
            **common,
            density=0.2 if density is None else density,
            scope="global" if scope is None else scope,
            sign="total" if sign is None else sign,
        )
    dare = {"density": 0.5 if density is None else density, "seed": seed}
    if name == "dare-linear":
        return DareLinear(**common, **dare)
    return DareTies(**common, **dare, sign="total" if sign is None else sign)


def merge(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Checkpoints: .safetensors files, model folders, hf://org/name@revision/path."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="A .safetensors file or a model folder.", rich_help_panel=OUTPUT
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model: inputs become task vectors FT - BASE.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="soup (default without --base), task-arithmetic (default with --base), ties, "
            "dare-linear, dare-ties."
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Per-input weights, e.g. 0.7,0.3 (normalised for soups, as given otherwise).",
            rich_help_panel=METHOD,
        ),
    ] = None,
    lam: Annotated[
        float | None,
        typer.Option(
            "--lambda", help="Scale of the merged task vector [1.0].", rich_help_panel=METHOD
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            help="TIES: fraction kept by magnitude [0.2]; DARE: keep probability [0.5].",
            rich_help_panel=METHOD,
        ),
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option(
            help="TIES trimming: global (whole model) or tensor [global].", rich_help_panel=METHOD
        ),
    ] = None,
    sign: Annotated[
        str | None,
        typer.Option(
            help="TIES sign election: total or frequency [total].", rich_help_panel=METHOD
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="DARE seed.", rich_help_panel=METHOD)] = 0,
    deltas: Annotated[
        bool,
        typer.Option(help="Inputs are task vectors (FT - BASE), not fine-tuned weights."),
    ] = False,
    lines_beta: Annotated[
        float | None,
        typer.Option(help="LiNeS: lambda(l) = alpha + beta (l-1)/(L-1).", rich_help_panel=LINES),
    ] = None,
    lines_alpha: Annotated[
        float | None,
        typer.Option(
            help="LiNeS alpha [computed: (|sum tau|_1 / |tau_merged|_1) / T].",
            rich_help_panel=LINES,
        ),
    ] = None,
    layer_pattern: Annotated[
        str | None,
        typer.Option(
            help=r"Regex with a (?P<block>\d+) group for the block index.", rich_help_panel=LINES
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Output dtype (bf16, float16, float32); default: input dtype.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="Largest shard of a folder output.", rich_help_panel=OUTPUT)
    ] = "50GB",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output.", rich_help_panel=OUTPUT)
    ] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option(help="Merge inputs holding NaN/Inf instead of refusing.")
    ] = False,
    to_lora: Annotated[
        bool,
        typer.Option(
            "--to-lora",
            help="Write one PEFT LoRA adapter folder instead of a model (see docs/lora.md).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    rank: Annotated[
        int | None,
        typer.Option(
            help="--to-lora: rank of SVD-factored modules (default: the largest input rank); "
            "linear merges above it are factored too.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Check inputs and print the plan only.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")
    ] = False,
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="Replay an adapt-recipe.json (written beside every model adapt writes): its "
            "inputs, method and options; only -o, --overwrite, --dry-run, -q, --offline go "
            "with it."
        ),
    ] = None,
    offline: Annotated[
        bool,
        typer.Option(help="hf:// inputs from the local cache only (as HF_HUB_OFFLINE=1)."),
    ] = False,
) -> None:
    """Merge checkpoints: model soups, or task arithmetic, TIES and DARE over a base."""
    args = dict(locals())  # the arguments as given, checked by --recipe
    import merge as engine
    from merge.api import check
    from merge.errors import ParameterError

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if recipe is not None:
        from .hub_command import replay

        replay(recipe, args)
        return
    if not inputs:
        raise ParameterError("missing INPUTS: the checkpoints to merge (or --recipe FILE)")
    chosen = build_method(
        method,
        has_base=base is not None,
        weights=weights,
        lam=lam,
        density=density,
        scope=scope,
        sign=sign,
        seed=seed,
        lines_alpha=lines_alpha,
        lines_beta=lines_beta,
        layer_pattern=layer_pattern,
    )
    plan = engine.plan(inputs, base=base, dtype=dtype, deltas=deltas)
    check(chosen, plan)
    if dry_run:
        print_plan(plan, chosen)
        return
    if output is None:
        raise ParameterError("missing --output/-o (or pass --dry-run)")
    if to_lora or rank is not None:
        if not to_lora:
            raise ParameterError("--rank needs --to-lora")
        merge_to_lora(
            chosen, inputs, base, output, rank, dtype, deltas, allow_nonfinite, overwrite, quiet
        )
        return
    start = time.perf_counter()
    out = engine.run(
        chosen,
        inputs,
        base=base,
        out=output,
        dtype=dtype,
        deltas=deltas,
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


def print_plan(plan: merge.Plan, method: Method) -> None:
    """The ``--dry-run`` report: method, inputs, tensor counts, memory estimate."""
    merged = sum(t.merged for t in plan.tensors)
    typer.echo(f"method: {method.name} {method.parameters()}")
    for src in plan.sources:
        role = "base" if src is plan.base else ("task vector" if src.delta else "input")
        typer.echo(f"{role}: {src.label} ({src.kind})")
    typer.echo(
        f"tensors: {len(plan.tensors)} ({merged} merged, {len(plan.tensors) - merged} carried "
        f"through), {plan.num_params:,} parameters, {plan.out_bytes:,} bytes out"
    )
    typer.echo(f"peak memory estimate: {plan.peak_estimate() / 1e6:.1f} MB")


def merge_to_lora(
    method: Method,
    inputs: list[str],
    base: str | None,
    output: Path,
    rank: int | None,
    dtype: str | None,
    deltas: bool,
    allow_nonfinite: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """``--to-lora``: write one adapter; print ranks and the retained energy of SVD modules."""
    from merge.errors import ParameterError
    from merge.lora import merge_to_lora as to_lora

    if base is None:
        raise ParameterError("--to-lora needs --base (the model the adapters were trained on)")
    start = time.perf_counter()
    res = to_lora(
        method,
        inputs,
        base=base,
        out=output,
        rank=rank,
        dtype=dtype,
        deltas=deltas,
        allow_nonfinite=allow_nonfinite,
        overwrite=overwrite,
        progress=not quiet,
    )
    if quiet:
        return
    for module, energy in res.energy.items():
        typer.echo(f"retained energy {energy:.6f}  rank {res.ranks[module]:<5d} {module}")
    if res.dropped:
        typer.echo(
            f"note: {len(res.dropped)} tensor(s) updated by non-adapter inputs lie outside the "
            f"adapter's modules and are left out (e.g. {res.dropped[0]!r})"
        )
    exact = len(res.ranks) - len(res.energy)
    ranks = sorted(set(res.ranks.values()))
    typer.echo(
        f"{method.name}: merged {len(inputs)} inputs -> LoRA adapter {res.path} "
        f"({len(res.ranks)} modules, rank {'/'.join(map(str, ranks))}: {exact} exact by "
        f"concatenation, {len(res.energy)} by truncated SVD, retained energy "
        f"{res.overall:.6f}) ({time.perf_counter() - start:.2f} s)"
    )
