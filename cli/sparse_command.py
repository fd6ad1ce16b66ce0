"""``adapt sparse extract|apply|stats|convert``: composable sparse fine-tunes."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from .compress_command import OUTPUT, Output, Overwrite, Quiet, _required

app = typer.Typer(
    name="sparse",
    help="Composable sparse fine-tunes: extract, apply (compose, revert), stats, convert.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

AllowPickle = Annotated[
    bool,
    typer.Option(
        help="Read composable-sft pickles (pytorch_diff.bin) with torch.load(weights_only=True)."
    ),
]


def _scales(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from merge.errors import ParameterError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ParameterError(f"--scale must be numbers separated by commas, got {text!r}") from None


@app.command(
    epilog="Examples: adapt sparse extract ft/ --base base/ --density 0.05 -o task.sft.safetensors"
    " · adapt sparse extract ft/ --base base/ --count 1000000 --dense classifier"
    " -o task.sft.safetensors"
)
def extract(
    finetuned: Annotated[str, typer.Argument(help="The fine-tuned model.")],
    base: Annotated[str, typer.Option(help="The model it was fine-tuned from.")],
    output: Output = None,
    density: Annotated[
        float | None, typer.Option(help="Fraction of the entries kept, in (0, 1].")
    ] = None,
    count: Annotated[int | None, typer.Option(help="Number of entries kept (K).")] = None,
    scope: Annotated[
        str, typer.Option(help="Top-K over the whole model (global) or per tensor.")
    ] = "global",
    values: Annotated[
        str,
        typer.Option(
            help="Value dtype: auto (float32, plus float64 for the entries float32 would not "
            "reproduce exactly), same, float32, float64, bf16, float16."
        ),
    ] = "auto",
    dense: Annotated[
        list[str] | None,
        typer.Option(help="Regex of tensors stored whole (e.g. a task head); repeatable."),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Keep the K entries of largest |FINETUNED - BASE| (LT-SFT) as a sparse fine-tune."""
    from merge import sparse

    out = _required(output)
    start = time.perf_counter()
    path = sparse.extract(
        finetuned,
        base=base,
        out=out,
        density=density,
        count=count,
        scope=scope,
        values=values,
        dense=tuple(dense or ()),
        overwrite=overwrite,
    )
    if quiet:
        return
    src = sparse.open_sparse(path)
    h = src.header
    inexact = sum(e.inexact or 0 for e in src.entries.values())
    wide = sum(e.wide for e in src.entries.values())
    kinds = "/".join(sorted({e.values for e in src.entries.values() if not e.dense})) or "-"
    kinds += f" (+{wide:,} float64)" if wide else ""
    typer.echo(
        f"sparse fine-tune: {h.coded:,} of {h.parameters:,} entries "
        f"({h.coded / max(h.parameters, 1):.4%}, {scope} top-K), values {kinds}, "
        f"{len(src.replaced)} tensor(s) stored whole -> {path} "
        f"({time.perf_counter() - start:.2f} s)"
    )
    if inexact:
        typer.echo(
            f"warning: {inexact:,} kept entries are not reproduced exactly by apply/revert with "
            f"these values (see docs/sparse.md)",
            err=True,
        )


@app.command(
    epilog="Examples: adapt sparse apply base/ lang.sft.safetensors task.sft.safetensors -o out/"
    " · adapt sparse apply out/ task.sft.safetensors --revert -o lang-only/"
    " · adapt sparse apply base/ lang/pytorch_diff.bin --allow-pickle --scale 0.5 -o out/"
)
def apply(
    base: Annotated[str, typer.Argument(help="The base model.")],
    sfts: Annotated[list[str], typer.Argument(help="Sparse fine-tunes, composed in one pass.")],
    output: Output = None,
    scale: Annotated[
        str | None, typer.Option(help="One multiplier per fine-tune, e.g. 1,0.5 (default 1).")
    ] = None,
    revert: Annotated[bool, typer.Option(help="Subtract the fine-tunes instead.")] = False,
    dtype: Annotated[
        str | None,
        typer.Option(help="Output dtype; default: the base's.", rich_help_panel=OUTPUT),
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="Largest shard of a folder output.", rich_help_panel=OUTPUT)
    ] = "50GB",
    allow_pickle: AllowPickle = False,
    allow_nonfinite: Annotated[
        bool, typer.Option(help="Apply onto a base holding NaN/Inf instead of refusing.")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write BASE + sum of the fine-tunes (exact, order-independent); --revert subtracts."""
    from merge import sparse

    out = _required(output)
    start = time.perf_counter()
    path = sparse.apply(
        base,
        sfts,
        out,
        scales=_scales(scale),
        revert=revert,
        dtype=dtype,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        shard_size=shard_size,
        allow_nonfinite=allow_nonfinite,
        progress=not quiet,
    )
    if not quiet:
        verb = "reverted" if revert else "applied"
        typer.echo(
            f"{verb} {len(sfts)} sparse fine-tune(s) to {base} -> {path} "
            f"({time.perf_counter() - start:.2f} s)"
        )


def _table(report: dict[str, Any], tensors: bool) -> str:
    lines = []
    for i, s in enumerate(report["sfts"]):
        inexact = "unknown" if s["inexact"] is None else f"{s['inexact']:,}"
        lines.append(
            f"[{i}] {s['path']} ({s['origin']}): {s['count']:,} of {s['parameters']:,} entries "
            f"({s['density']:.4%}), L2 {s['l2']:.6g}, L1 {s['l1']:.6g}, max |v| "
            f"{s['max_abs']:.6g}, inexact {inexact}, {len(s['dense'])} tensor(s) stored whole"
        )
        rows = s["tensors"] if tensors else s["blocks"]
        key = "name" if tensors else "block"
        for r in rows:
            lines.append(
                f"    {r[key]:<60} {r['count']:>12,} / {r['numel']:<12,} {r['density']:.4%}"
            )
    for p in report["pairs"]:
        lines.append(
            f"[{p['a']}] & [{p['b']}]: {p['shared']:,} shared of {p['union']:,} (Jaccard "
            f"{p['jaccard']:.4f}), {p['sign_conflicts']:,} sign conflicts on shared entries"
        )
    return "\n".join(lines)


@app.command(
    epilog="Examples: adapt sparse stats lang.sft.safetensors task.sft.safetensors"
    " · adapt sparse stats task.sft.safetensors --tensors --json"
)
def stats(
    sfts: Annotated[list[str], typer.Argument(help="Sparse fine-tunes.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    tensors: Annotated[
        bool, typer.Option("--tensors", help="One row per tensor instead of per block.")
    ] = False,
    base: Annotated[
        str | None, typer.Option(help="Base model (needed for SpIEL adapters' shapes).")
    ] = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Density per tensor and block, norms, pairwise overlap (Jaccard) and sign conflicts."""
    from merge import sparse

    report = sparse.stats(sfts, base=base, allow_pickle=allow_pickle)
    typer.echo(json.dumps(report, indent=2) if as_json else _table(report, tensors))


@app.command(
    epilog="Examples: adapt sparse convert lang/pytorch_diff.bin --allow-pickle"
    " -o lang.sft.safetensors · adapt sparse convert spiel/ --base base/ -o task.sft.safetensors"
)
def convert(
    sft: Annotated[
        str, typer.Argument(help="A composable-sft pytorch_diff.bin (or folder) or SpIEL adapter.")
    ],
    output: Output = None,
    base: Annotated[
        str | None, typer.Option(help="Base model (needed for SpIEL; checked otherwise).")
    ] = None,
    allow_pickle: AllowPickle = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Rewrite another tool's sparse fine-tune as adapt's container."""
    from merge import sparse

    out = _required(output)
    path = sparse.convert(sft, out, base=base, allow_pickle=allow_pickle, overwrite=overwrite)
    if not quiet:
        h = sparse.open_sparse(path).header
        typer.echo(f"converted {sft} ({h.origin}, {h.coded:,} entries) -> {path}")
