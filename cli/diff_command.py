"""``adapt diff``: write the task vector FT - BASE of a fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXAMPLES = "Example: adapt diff ft/ --base base/ -o tau.safetensors  (float32 unless --dtype)"


def diff(
    finetune: Annotated[str, typer.Argument(help="The fine-tuned checkpoint.")],
    base: Annotated[str, typer.Option(help="The base model it was fine-tuned from.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write tau.")],
    dtype: Annotated[
        str, typer.Option(help="dtype of the task vector (float32 keeps bf16 differences exact).")
    ] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Task vector tau = FT - BASE, marked so `adapt merge --base` reads it back as one."""
    import merge
    from merge.methods import TaskVector

    merge.run(
        TaskVector(),
        [finetune],
        base=base,
        out=output,
        dtype=dtype,
        overwrite=overwrite,
        progress=not quiet,
    )
    if not quiet:
        typer.echo(f"task vector {finetune} - {base} -> {output}")
