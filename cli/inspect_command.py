"""``adapt inspect``: what a checkpoint holds, from its headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = "Examples: adapt inspect model/ · adapt inspect out.safetensors --json"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def inspect(
    path: Annotated[Path, typer.Argument(help="A .safetensors file or model folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    layers: Annotated[
        bool, typer.Option("--layers", help="Each tensor's LiNeS block and scale.")
    ] = False,
    alpha: Annotated[float, typer.Option(help="LiNeS alpha for --layers.")] = 0.0,
    beta: Annotated[float, typer.Option(help="LiNeS beta for --layers.")] = 1.0,
    layer_pattern: Annotated[
        str | None, typer.Option(help=r"Regex with a (?P<block>\d+) group.")
    ] = None,
) -> None:
    """Show format, tensor and parameter counts, dtypes, bytes and metadata."""
    import merge
    from merge.summary import compression_summary, summarize

    source = merge.open(path)
    info = summarize(source)
    if (compressed := compression_summary(source)) is not None:
        info["compression"] = compressed
    if layers:
        from merge.summary import layer_table

        info["layers"] = layer_table(source, alpha, beta, layer_pattern)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"[bold]{info['path']}[/bold]  ({info['format']}, {len(info['files'])} file(s))")
    console.print(
        f"{info['tensors']} tensors, {info['parameters']:,} parameters, {_size(info['bytes'])}"
    )
    if compressed is not None:
        from .compress_command import describe

        console.print(f"ComPEFT ({compressed['update']}): {describe(compressed)}", markup=False)
    table = Table("dtype", "tensors", "parameters", "bytes")
    for code, d in info["dtypes"].items():
        table.add_row(code, str(d["tensors"]), f"{d['parameters']:,}", _size(d["bytes"]))
    console.print(table)
    if info["metadata"]:
        console.print("[bold]metadata[/bold]")
        for key, value in info["metadata"].items():
            text = value if isinstance(value, str) else json.dumps(value)
            console.print(f"  {key}: {text}", markup=False)
    if layers:
        table = Table("tensor", "stack", "block", "scale")
        for row in info["layers"]:
            block = "-" if row["block"] is None else str(row["block"])
            table.add_row(row["name"], row["stack"] or "-", block, f"{row['scale']:.6f}")
        console.print(table)
