"""``adapt pull`` / ``adapt push``: Hugging Face Hub transfers; ``adapt merge --recipe``."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated, Any

import typer

PULL_EXAMPLES = (
    "Examples: adapt pull org/model · adapt pull org/model --revision refs/pr/1 --dir model/ · "
    "adapt pull org/model --include '*.json'"
)
PUSH_EXAMPLES = (
    "Examples: adapt push merged/ org/merged --private · "
    "adapt push merged/ org/merged --create-pr --commit-message 'TIES merge' · "
    "adapt push merged/ org/merged --revision dev --dry-run"
)
# options that may go with --recipe: where and how to write, not what to merge
REPLAY_OPTIONS = frozenset({"recipe", "output", "overwrite", "dry_run", "quiet", "offline"})


def pull(
    repo_id: Annotated[str, typer.Argument(help="The model repository, org/name.")],
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag, commit sha or refs/pr/N (default: main).")
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            help="Glob of files to get, repeatable; '*' for all (default: weights, config, "
            "tokenizer)."
        ),
    ] = None,
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Put the files in this folder (default: the HF cache)."),
    ] = None,
    offline: Annotated[
        bool, typer.Option(help="Use the local cache only (as HF_HUB_OFFLINE=1).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print the path only.")] = False,
) -> None:
    """Download a model repository at a revision; prints the local folder."""
    from merge import hub

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    got = hub.pull(repo_id, revision=revision, include=include, local_dir=directory)
    if not quiet:
        at = f"commit {got.revision}" if got.revision else "the cached revision"
        typer.echo(f"pulled {got.repo_id} at {at}", err=True)
    typer.echo(str(got.path))


def push(
    folder: Annotated[Path, typer.Argument(help="The folder to upload (e.g. an adapt output).")],
    repo_id: Annotated[str, typer.Argument(help="The model repository, org/name.")],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to commit to (created from main if needed).")
    ] = None,
    create_pr: Annotated[
        bool, typer.Option(help="Open a pull request against main instead of committing.")
    ] = False,
    commit_message: Annotated[
        str | None, typer.Option(help="Commit title (default: Upload FOLDER with adapt).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Glob of files to upload, repeatable (default: all).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Glob of files to leave out, repeatable.")
    ] = None,
    card: Annotated[
        bool,
        typer.Option("--card", help="Rewrite the folder's README.md model card for REPO_ID first."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="List the files that would be pushed; upload nothing.")
    ] = False,
) -> None:
    """Upload a folder to a model repository (created if needed); prints the commit or PR URL."""
    from merge import hub

    done = hub.push(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        include=include,
        exclude=exclude,
        card_for_repo=card,
        dry_run=dry_run,
    )
    if dry_run:
        for name in done.files:
            typer.echo(name)
        target = "a pull request against main" if create_pr else (revision or "main")
        typer.echo(f"dry run: would push {len(done.files)} files to {repo_id} ({target})")
        return
    typer.echo(done.url)


def replay(recipe: Path, args: dict[str, Any]) -> None:
    """``adapt merge --recipe FILE``: run the merge an ``adapt-recipe.json`` describes.

    ``args`` are all of ``merge``'s arguments; only output, overwrite, dry_run and quiet (and
    offline) may differ from their defaults: the recipe gives the inputs and everything else.
    """
    from merge.card import FLAGS, Recipe
    from merge.errors import ParameterError

    from .merge_command import merge

    defaults = inspect.signature(merge).parameters
    given = [
        "INPUTS" if name == "inputs" else FLAGS.get(name, "--" + name.replace("_", "-"))
        for name, value in args.items()
        if name not in REPLAY_OPTIONS and value not in (defaults[name].default, [])
    ]
    if given:
        raise ParameterError(
            f"--recipe {recipe} gives the inputs and options: drop {', '.join(given)} "
            "(or edit the recipe)"
        )
    keep = {name: args[name] for name in ("output", "overwrite", "dry_run", "quiet")}
    merge(**Recipe.load(recipe).merge_options(), **keep)
