"""``adapt compress`` / ``decompress`` / ``apply``: ComPEFT experts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

COMPRESS_EXAMPLES = (
    "Examples: adapt compress ft/ --base base/ --density 0.1 -o ft.cpeft.safetensors · "
    "adapt compress lora_adapter/ -o lora.cpeft.safetensors · "
    "adapt compress delta.safetensors --alpha 2 -o delta.cpeft.safetensors"
)
DECOMPRESS_EXAMPLES = (
    "Examples: adapt decompress ft.cpeft.safetensors -o delta.safetensors · "
    "adapt decompress lora.cpeft.safetensors -o lora_adapter/"
)
APPLY_EXAMPLES = "Example: adapt apply ft.cpeft.safetensors --base base/ -o ft-compeft/"

OUTPUT = "Output"
Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="Where to write.", rich_help_panel=OUTPUT)
]
Overwrite = Annotated[
    bool, typer.Option(help="Replace an existing output.", rich_help_panel=OUTPUT)
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]


def _required(output: Path | None) -> Path:
    if output is None:
        from merge.errors import ParameterError

        raise ParameterError("missing --output/-o")
    return output


def describe(stats: dict[str, Any]) -> str:
    """One line: size, bits per parameter against the bound, ratio against the original."""
    from .inspect_command import _size

    dtypes = "/".join(stats["original_dtypes"])
    return (
        f"{_size(stats['file_bytes'])}, {stats['bits_per_parameter']:.4f} bits/parameter "
        f"(bound H(d)+d = {stats['bound_bits_per_parameter']:.4f}), "
        f"{stats['ratio']:.1f}x smaller than {dtypes}"
    )


def compress(
    update: Annotated[
        str,
        typer.Argument(
            help="A fine-tuned model (with --base), a PEFT LoRA/(IA)3 adapter folder, or a "
            "task-vector .safetensors file."
        ),
    ],
    output: Output = None,
    base: Annotated[
        str | None, typer.Option(help="Base model: compress the residual UPDATE - BASE.")
    ] = None,
    density: Annotated[float, typer.Option(help="Fraction of entries kept, in (0, 1).")] = 0.1,
    alpha: Annotated[float, typer.Option(help="Kept entries become sign * alpha * sigma.")] = 1.0,
    scope: Annotated[
        str, typer.Option(help="Top-k over the whole update (global) or per tensor.")
    ] = "global",
    deltas: Annotated[
        bool, typer.Option(help="UPDATE is a task vector even without adapt's metadata.")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Compress a fine-tune, an adapter or a task vector with ComPEFT (signs + one scale)."""
    import merge
    from merge.compeft import compress as run
    from merge.summary import compression_summary

    out = _required(output)
    start = time.perf_counter()
    path = run(
        update,
        base=base,
        out=out,
        density=density,
        alpha=alpha,
        scope=scope,
        kind="task_vector" if deltas else None,
        overwrite=overwrite,
    )
    if quiet:
        return
    src = merge.open(path)
    stats = compression_summary(src)
    assert stats is not None
    h = src.header  # type: ignore[attr-defined]
    typer.echo(
        f"compeft ({h.update}): {h.parameters:,} parameters, {h.kept:,} kept ({scope} top-k), "
        f"sigma {h.sigma:.6g} -> {path}: {describe(stats)} ({time.perf_counter() - start:.2f} s)"
    )


def decompress(
    expert: Annotated[str, typer.Argument(help="A ComPEFT file.")],
    output: Output = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Output dtype; default: the original (float32 is exact).", rich_help_panel=OUTPUT
        ),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Decode to a dense task-vector file, or to a PEFT adapter folder for an adapter."""
    from merge.compeft import decompress as run

    out = _required(output)
    path = run(expert, out, dtype=dtype, overwrite=overwrite, progress=not quiet)
    if not quiet:
        typer.echo(f"decompressed {expert} -> {path}")


def apply(
    expert: Annotated[str, typer.Argument(help="A ComPEFT file of a fine-tune or task vector.")],
    base: Annotated[str, typer.Option(help="The base model the update applies to.")],
    output: Output = None,
    shard_size: Annotated[
        str, typer.Option(help="Largest shard of a folder output.", rich_help_panel=OUTPUT)
    ] = "50GB",
    overwrite: Overwrite = False,
    allow_nonfinite: Annotated[
        bool, typer.Option(help="Apply onto a base holding NaN/Inf instead of refusing.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Write BASE + the decoded update (decoding fused with the add), tensor by tensor."""
    from merge.compeft import apply as run

    out = _required(output)
    start = time.perf_counter()
    path = run(
        expert,
        base,
        out,
        overwrite=overwrite,
        shard_size=shard_size,
        allow_nonfinite=allow_nonfinite,
        progress=not quiet,
    )
    if not quiet:
        typer.echo(f"applied {expert} to {base} -> {path} ({time.perf_counter() - start:.2f} s)")
