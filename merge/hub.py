"""The Hugging Face Hub: ``hf://`` inputs, pull and push, through huggingface_hub's client.

``hf://org/name[@revision][/path]`` (parsed by huggingface_hub's ``parse_hf_uri``) names a
model repository, optionally a branch, tag, commit sha or ``refs/pr/N``, and a file or folder
in it. Only the files a merge needs are downloaded (safetensors weights and index, config,
generation config and tokenizer files, or a PEFT adapter), into the standard Hugging Face
cache; the resolved commit sha is recorded in the output's provenance.

Offline (``HF_HUB_OFFLINE=1``, which ``--offline`` sets) only the cache is used, and what is
missing from it is named. Every client error becomes a one-line :class:`merge.errors.HubError`
with its own exit code. Tokens are read by huggingface_hub (``HF_TOKEN`` or the token file)
and never printed, logged or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, HfUri, constants, get_token, parse_hf_uri
from huggingface_hub import errors as hf
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

try:  # huggingface_hub 2.x talks HTTP through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover
    from httpx import TransportError

from . import card
from .errors import (
    BadRepoIdError,
    GatedRepoError,
    HubError,
    HubFileNotFoundError,
    NotCachedError,
    ParameterError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SourceNotFoundError,
    TokenRequiredError,
    UploadRefusedError,
)
from .sources import INDEX_NAME, SINGLE_NAME, Source, open_source
from .writer import COPIED_FILES

WEIGHT_FILES = (SINGLE_NAME, INDEX_NAME, card.ADAPTER_WEIGHTS)
NEEDED_FILES = (*WEIGHT_FILES, card.ADAPTER_CONFIG, *COPIED_FILES)


@dataclass(frozen=True)
class Pulled:
    """Where :func:`pull` (or :func:`fetch`) put files, and the commit they come from."""

    path: Path
    repo_id: str
    revision: str | None  # the resolved commit sha; None offline into a --dir folder


@dataclass(frozen=True)
class Pushed:
    """What :func:`push` uploaded (or, with ``dry_run``, would upload)."""

    repo_id: str
    files: tuple[str, ...]
    url: str | None = None  # the commit's URL, or the pull request's
    commit: str | None = None  # the commit sha
    dry_run: bool = False


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` is on, at huggingface_hub's import or set since (``--offline``)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return constants.HF_HUB_OFFLINE or flag


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


@contextmanager
def hub_errors(what: str, *, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line :class:`HubError` subclasses.

    Args:
        what: the repository or reference the message names.
        writing: a push: 401/403 answers and rejected files are :class:`UploadRefusedError`.
    """
    where = f"the cache ({constants.HF_HUB_CACHE})"
    try:
        yield
    except hf.GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        raise GatedRepoError(
            f"{what}: gated repository: accept its conditions on the Hub and use a token that "
            "was granted access (HF_TOKEN or `hf auth login`)"
        ) from None
    except hf.RepositoryNotFoundError:
        raise RepoNotFoundError(
            f"{what}: repository not found, or no access to it (a private repository needs a "
            "token: HF_TOKEN or `hf auth login`)"
        ) from None
    except hf.RevisionNotFoundError:
        raise RevisionNotFoundError(
            f"{what}: revision not found (give a branch, tag, commit sha or refs/pr/N)"
        ) from None
    except hf.RemoteEntryNotFoundError:
        raise HubFileNotFoundError(f"{what}: file not found in the repository") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
        reason = "offline mode is on" if is_offline() else "the Hub could not be reached"
        raise NotCachedError(
            f"{what}: not in {where} and {reason}: run `adapt pull` with network access first"
        ) from None
    except TransportError as e:
        raise HubError(
            f"{what}: cannot reach the Hub at {constants.ENDPOINT}: {_one_line(str(e))}"
        ) from None
    except (hf.HFValidationError, hf.HfUriError) as e:
        raise BadRepoIdError(f"bad repository id {what!r}: {_one_line(str(e))}") from None
    except hf.LocalTokenNotFoundError:
        raise TokenRequiredError(
            f"{what}: no Hugging Face token: set HF_TOKEN or run `hf auth login`"
        ) from None
    except hf.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no answer"
        detail = _one_line(e.server_message) or _one_line(str(e).splitlines()[0])
        if writing and status in (401, 403):
            raise UploadRefusedError(
                f"{what}: the Hub refused the push ({status}: {detail}); check that the token "
                "has write access to this namespace"
            ) from None
        raise HubError(f"{what}: the Hub answered {status}: {detail}") from None
    except ValueError as e:
        if not writing:
            raise
        # raised by upload_folder for a README.md whose metadata the Hub rejects
        raise UploadRefusedError(f"{what}: the Hub refused the push: {_one_line(str(e))}") from None


def parse(ref: str) -> HfUri:
    """``hf://org/name[@revision][/path]`` parsed by huggingface_hub (model repos only).

    Raises:
        BadRepoIdError: malformed, or not a model repository.
    """
    with hub_errors(ref):
        uri = parse_hf_uri(ref)
    if uri.type != "model":
        raise BadRepoIdError(f"bad repository id {ref!r}: adapt reads model repositories only")
    return uri


def _download(
    api: HfApi,
    repo_id: str,
    revision: str | None,
    patterns: Sequence[str],
    what: str,
    local_dir: Path | None = None,
    wanted: str | None = None,
) -> tuple[Path, str | None, bool]:
    """``snapshot_download`` of the files matching ``patterns``: (folder, commit sha, whether
    only the cache was read).

    Online, the revision is resolved first, so patterns that match no file of that commit are
    a :class:`HubFileNotFoundError` (naming ``wanted``, default: the patterns). Offline (or
    with the Hub unreachable) only the cache is read; the sha is then known for cache folders
    only (``snapshots/<sha>``).
    """
    patterns = list(patterns)
    offline = is_offline()
    with hub_errors(what):
        info = None
        if not offline:
            try:
                info = api.model_info(repo_id, revision=revision)
            except TransportError:  # unreachable: the cache may hold it (as huggingface_hub)
                offline = True
        if info is not None:
            names = [s.rfilename for s in info.siblings or ()]
            if not list(filter_repo_objects(names, allow_patterns=patterns)):
                wanted = wanted or "file matching " + " or ".join(patterns)
                raise HubFileNotFoundError(f"{what}: no {wanted} in {repo_id} at {info.sha}")
        folder = api.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            local_dir=local_dir,
            local_files_only=offline,
        )
    path = Path(folder)
    # a cache folder is snapshots/<sha>: what was read, offline too
    sha = path.name if local_dir is None else (info.sha if info is not None else None)
    return path, sha, offline


def _shards(index: Path) -> list[str]:
    """Shard names listed by an index (none when it is unreadable: opening it says why)."""
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def fetch(ref: str, api: HfApi | None = None) -> Pulled:
    """Download what an ``hf://`` input needs into the cache; the local file or folder.

    A reference to a ``.safetensors`` file gets that file; any other reference (the repo, or a
    folder in it) gets its weights (``model.safetensors``, or the index and its shards, or a
    PEFT adapter) with config and tokenizer files.

    Raises:
        HubError: a subclass naming the reference and what is wrong (see :mod:`merge.errors`).
    """
    api = api or HfApi()
    uri = parse(ref)
    sub = uri.path_in_repo
    single = sub.endswith(".safetensors")
    prefix = f"{sub}/" if sub else ""
    wanted = f"file {sub}" if single else " or ".join(WEIGHT_FILES)
    patterns = [sub] if single else [prefix + name for name in NEEDED_FILES]
    folder, sha, cached = _download(api, uri.id, uri.revision, patterns, ref, wanted=wanted)
    target = folder / sub if sub else folder
    missing: list[str] = []
    if single or not any((target / name).is_file() for name in WEIGHT_FILES):  # file or no weights
        missing = [] if target.is_file() else [wanted]
    elif (target / INDEX_NAME).is_file():
        shards = [s for s in _shards(target / INDEX_NAME) if not (target / s).is_file()]
        if shards and not cached:
            _download(api, uri.id, sha, [prefix + s for s in shards], ref)
        missing = [s for s in shards if not (target / s).is_file()]
    where = f"{uri.id} at {sha}"
    if missing and cached:
        raise NotCachedError(
            f"{ref}: not fully cached: {', '.join(missing)} missing from the cached snapshot of "
            f"{where} (run `adapt pull {uri.id}` with network access first)"
        )
    if missing:
        raise HubFileNotFoundError(f"{ref}: no {', '.join(missing)} in {where}")
    return Pulled(target, uri.id, sha)


def open_hub(ref: str) -> Source:
    """An ``hf://`` reference as a lazy source (label: the reference as given; ``repo`` and
    ``revision``, the commit sha, recorded in provenance)."""
    got = fetch(ref)
    src = open_source(got.path)
    src.label = ref
    src.repo = got.repo_id  # type: ignore[attr-defined]
    src.revision = got.revision  # type: ignore[attr-defined]
    return src


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    include: Sequence[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    api: HfApi | None = None,
) -> Pulled:
    """Download a model repository (by default the files adapt reads) at a revision.

    Args:
        repo_id: ``org/name``.
        revision: a branch, tag, commit sha or ``refs/pr/N`` (default: main).
        include: glob patterns of the files to get (default: weights, index, adapter,
            config and tokenizer files); ``["*"]`` gets everything.
        local_dir: a folder to put the files in; default: the Hugging Face cache.
        api: the client to use (tests pass their own).

    Returns:
        The folder and the commit sha it holds.

    Raises:
        HubError: a subclass naming the repository and what is wrong.

    Example:
        >>> merge.hub.pull("org/model", revision="refs/pr/1").path  # doctest: +SKIP
    """
    what = f"{repo_id}@{revision}" if revision else repo_id
    patterns = list(include) if include else list(NEEDED_FILES)
    dest = Path(local_dir) if local_dir is not None else None
    path, sha, _ = _download(api or HfApi(), repo_id, revision, patterns, what, dest)
    return Pulled(path, repo_id, sha)


def upload_files(
    folder: Path, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The files of ``folder`` that ``upload_folder`` sends with these patterns (sorted)."""
    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    ignore = [*(exclude or ()), *DEFAULT_IGNORE_PATTERNS]
    allow = list(include) if include else None
    return tuple(filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore))


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    card_for_repo: bool = False,
    dry_run: bool = False,
    api: HfApi | None = None,
) -> Pushed:
    """Upload a folder to a model repository in one commit, creating what is missing.

    The repository is created if needed (``private`` applies to a new one), the branch
    ``revision`` too (from main); ``create_pr`` opens a pull request against main instead of
    committing to it. The folder's ``README.md`` is uploaded as it is, unless
    ``card_for_repo`` rewrites it first for ``repo_id`` (an adapt output folder's card).

    Args:
        folder: the folder to upload (e.g. an adapt output).
        repo_id: ``org/name``.
        include / exclude: glob patterns of the files to upload / leave out.
        dry_run: check everything that needs no network and list the files only.
        api: the client to use (tests pass their own).

    Returns:
        The files and the commit (or pull request) URL.

    Raises:
        TokenRequiredError: no token.
        UploadRefusedError: the Hub refused (no write access, rejected token or files).
        HubError: another subclass naming the repository and what is wrong.

    Example:
        >>> merge.hub.push("merged/", "org/merged", private=True).url  # doctest: +SKIP
    """
    path = Path(folder)
    if not path.is_dir():
        raise SourceNotFoundError(f"{path}: no such folder")
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ParameterError("--create-pr opens a pull request against main: drop --revision")
    with hub_errors(repo_id):
        validate_repo_id(repo_id)
    api = api or HfApi()
    if not (api.token or get_token()):
        raise TokenRequiredError(
            f"{repo_id}: no Hugging Face token to push with: set HF_TOKEN or run `hf auth login`"
        )
    if is_offline() and not dry_run:
        raise HubError(f"{repo_id}: offline mode is on (HF_HUB_OFFLINE=1): push needs the Hub")
    if card_for_repo and not dry_run:
        card.refresh(path, repo_id)
    files = upload_files(path, include, exclude)
    if not files:
        raise ParameterError(f"{path}: no files to upload (check --include/--exclude)")
    if dry_run:
        return Pushed(repo_id, files, dry_run=True)
    with hub_errors(repo_id, writing=True):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, constants.DEFAULT_REVISION):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=path,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {path.resolve().name} with adapt",
            allow_patterns=list(include) if include else None,
            ignore_patterns=list(exclude) if exclude else None,
        )
    return Pushed(repo_id, files, info.pr_url or info.commit_url, info.oid)
