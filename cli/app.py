"""The ``adapt`` Typer app and the one error funnel every command goes through.

Known errors (:class:`merge.errors.AdaptError` and OS errors) become one line on stderr and a
non-zero exit; ``--debug`` anywhere on the command line (or ``ADAPT_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.exceptions import TyperException

from . import (
    compress_command,
    demo_command,
    diff_command,
    hub_command,
    inspect_command,
    lines_command,
    merge_command,
    soup_command,
    sparse_command,
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
app.command("pull", epilog=hub_command.PULL_EXAMPLES)(hub_command.pull)
app.command("push", epilog=hub_command.PUSH_EXAMPLES)(hub_command.push)
app.command("compress", epilog=compress_command.COMPRESS_EXAMPLES)(compress_command.compress)
app.command("decompress", epilog=compress_command.DECOMPRESS_EXAMPLES)(compress_command.decompress)
app.command("apply", epilog=compress_command.APPLY_EXAMPLES)(compress_command.apply)
app.add_typer(sparse_command.app, name="sparse")


def _print_version(value: bool) -> None:
    if value:
        from merge.provenance import version

        typer.echo(f"adapt {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    """Global options (``--debug`` anywhere shows tracebacks)."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, map errors to one line and an exit code."""
    from merge.errors import AdaptError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ADAPT_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        # non-standalone: typer returns Exit codes (Ctrl-C is 130) and raises usage errors
        code = app(args=args, prog_name="adapt", standalone_mode=False)
    except AdaptError as e:
        if debug:
            raise
        print(f"adapt: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except TyperException as e:  # usage errors: typer's own message, exit 2
        e.show()  # type: ignore[attr-defined]
        sys.exit(getattr(e, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except OSError as e:
        if debug:
            raise
        print(f"adapt: error: {e}", file=sys.stderr)
        sys.exit(1)
    if code == 130:
        print("adapt: interrupted; nothing was written", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
