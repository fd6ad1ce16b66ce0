"""The ``adapt`` Typer app and the one error funnel every command goes through.

Known errors (:class:`merge.errors.AdaptError` and OS errors) become one line on stderr and a
non-zero exit; ``--debug`` anywhere on the command line (or ``ADAPT_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from . import (
    demo_command,
    diff_command,
    inspect_command,
    lines_command,
    merge_command,
    soup_command,
)

app = typer.Typer(
    name="adapt",
    help="Merge, compress and ship fine-tunes (model soups, task arithmetic, TIES, DARE, LiNeS).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("merge", epilog=merge_command.EXAMPLES)(merge_command.merge)
app.command("inspect", epilog=inspect_command.EXAMPLES)(inspect_command.inspect)
app.command("soup", epilog=soup_command.EXAMPLES)(soup_command.soup)
app.command("lines", epilog=lines_command.EXAMPLES)(lines_command.lines)
app.command("diff", epilog=diff_command.EXAMPLES)(diff_command.diff)
app.command("demo")(demo_command.demo)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Global options (``--debug`` anywhere shows tracebacks)."""
    if version:
        from merge.provenance import version as v

        typer.echo(f"adapt {v()}")
        raise typer.Exit()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, map errors to one line and an exit code."""
    from merge.errors import AdaptError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ADAPT_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="adapt", standalone_mode=False)
    except AdaptError as e:
        if debug:
            raise
        print(f"adapt: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("adapt: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if debug:
            raise
        print(f"adapt: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
