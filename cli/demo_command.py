"""``adapt demo``: build a tiny random Llama base and two fine-tunes, then merge them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder for the example (created; reused if present).")
    ] = Path("adapt-demo"),
) -> None:
    """Build a small offline example (base + 2 fine-tunes of a tiny Llama) and merge it."""
    import merge
    from merge import demo as example

    start = time.perf_counter()
    base, fts = example.build(directory)
    typer.echo(f"built a tiny random Llama base and {len(fts)} fine-tunes in {directory}/")
    for p in (base, *fts):
        s = merge.open(p)
        n = sum(s.info(k).numel for k in s.names)
        typer.echo(f"  {p}: {len(s.names)} tensors, {n:,} parameters, bf16")
    out = directory / "soup"
    merge.soup(fts, out=out, overwrite=True)
    typer.echo(f"uniform soup of {', '.join(str(f) for f in fts)} -> {out}/")
    typer.echo(f"done in {time.perf_counter() - start:.1f} s. Next:")
    typer.echo(f"  adapt inspect {out}")
    typer.echo(f"  adapt merge {fts[0]} {fts[1]} --weights 0.7,0.3 -o {directory}/weighted")
    typer.echo(
        '  python -c "import transformers; '
        f"print(transformers.AutoModelForCausalLM.from_pretrained('{out}'))\""
    )
