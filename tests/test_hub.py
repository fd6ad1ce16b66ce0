"""Hub workflows end to end through the real huggingface_hub client, with no network.

A Hub-compatible server (tests/hub_server.py) runs on 127.0.0.1 for the session. Library
calls go through the ``api`` seam in this process; the CLI runs in subprocesses whose
environment points huggingface_hub at the server (it reads its settings at import), several
invocations per subprocess to keep the suite fast. Offline tests read a hand-built cache.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub import errors as hf_errors
from safetensors import safe_open

import merge
from merge import errors, hub

TOKEN = "hf_adaptTESTsecretToken0123456789"  # recognisable: must never leave the process
OTHER_TOKEN = "hf_bobTESTotherToken9876543210"
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"

DRIVER = """
import contextlib, io, json, os, sys
from cli.app import main

results = []
for job in json.loads(sys.argv[1]):
    saved = dict(os.environ)
    os.environ.update(job.get("env", {}))
    for name in job.get("unset", []):
        os.environ.pop(name, None)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(job["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    os.environ.clear()
    os.environ.update(saved)
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


@dataclass
class Run:
    code: int
    out: str
    err: str


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def hub_server(
    demo_models: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """The fake Hub: alice (TOKEN, member of org), bob; org/base, org/ft1 (a dev branch and a
    PR), org/ft2, org/private, org/gated, org/locked (refuses commits), org/layout (a sharded
    model with unusual shard names, and a model in a subfolder)."""
    base, (ft1, ft2) = demo_models
    sharded = tmp_path_factory.mktemp("sharded") / "model"
    merge.soup([ft1, ft2], out=sharded, shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        k: f"part-{v[6:11]}.bin.safetensors" for k, v in index["weight_map"].items()
    }
    layout = {"model.safetensors.index.json": json.dumps(index).encode()}
    for shard in sharded.glob("model-*.safetensors"):
        layout[f"part-{shard.name[6:11]}.bin.safetensors"] = shard.read_bytes()
    layout |= {f"sub/{k}": v for k, v in files_of(ft2).items()}
    layout["sub/deeper/model.safetensors"] = b"not fetched"
    with HubServer() as server:
        state = server.state
        state.add_user("alice", TOKEN, orgs=("org",))
        state.add_user("bob", OTHER_TOKEN)
        state.create_repo("org/base", files_of(base))
        repo = state.create_repo("org/ft1", files_of(ft1))
        main = repo.branches["main"]
        repo.branches["dev"] = state.commit(repo, main, {"notes.txt": b"dev notes"}, "dev")
        pr_files = {"model.safetensors": (ft2 / "model.safetensors").read_bytes()}
        repo.prs[1] = state.commit(repo, main, pr_files, "pr")
        state.create_repo("org/ft2", files_of(ft2))
        state.create_repo("org/private", files_of(ft1), private=True)
        state.create_repo("org/gated", files_of(ft1), gated=True)
        state.create_repo("org/locked", refuse_commits="pushes to this repository are disabled")
        state.create_repo("org/layout", layout)
        yield server


@pytest.fixture
def api(hub_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HfApi:
    """A client of the fake Hub for library calls in this process (cache in tmp_path)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return HfApi(endpoint=hub_server.url, token=TOKEN)


def hub_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment with huggingface_hub pointed at ``endpoint``, home in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    return env | extra


def adapt(env: dict[str, str], cwd: Path, *jobs: list[str] | dict[str, Any]) -> list[Run]:
    """Run ``adapt`` invocations in one subprocess (environment restored between them).

    A job is an argv list, or ``{"argv": [...], "env": {...}, "unset": [...]}``.
    """
    jobs_json = json.dumps([j if isinstance(j, dict) else {"argv": j} for j in jobs])
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, jobs_json],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [Run(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    runs[-1].err += proc.stderr  # anything logged outside the redirection
    return runs


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return dict(f.metadata())


def assert_no_token(root: Path, *texts: str) -> None:
    """The token appears in no text and in no file under ``root``."""
    for text in texts:
        assert TOKEN not in text
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert TOKEN.encode() not in p.read_bytes(), p


# --- the client's own exception classes --------------------------------------------------


def test_gated_repo_error_is_a_repository_not_found_error():
    """Why the mapping checks GatedRepoError first: the client's gated error is-a not-found."""
    assert issubclass(hf_errors.GatedRepoError, hf_errors.RepositoryNotFoundError)


def test_gated_and_missing_repos_map_to_distinct_errors(api):
    with pytest.raises(errors.GatedRepoError, match=r"^org/gated: gated repository") as gated:
        hub.pull("org/gated", api=api)
    with pytest.raises(errors.RepoNotFoundError, match="repository not found") as missing:
        hub.pull("org/missing", api=api)
    assert gated.value.exit_code != missing.value.exit_code
    assert not isinstance(gated.value, errors.RepoNotFoundError)


# --- pull -------------------------------------------------------------------------------


def test_pull_by_branch_sha_and_pr_ref(api, hub_server, demo_models):
    _, (ft1, ft2) = demo_models
    repo = hub_server.state.repos["org/ft1"]
    main = hub.pull("org/ft1", api=api)
    assert main.revision == repo.branches["main"]
    assert main.path.name == main.revision  # the standard cache: snapshots/<sha>
    assert sorted(p.name for p in main.path.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors"]
    )
    assert (main.path / "model.safetensors").read_bytes() == (
        ft1 / "model.safetensors"
    ).read_bytes()

    pinned = hub.pull("org/ft1", revision=repo.branches["dev"], api=api)
    assert pinned.revision == repo.branches["dev"]
    assert not (pinned.path / "notes.txt").exists()  # default: only what adapt reads

    dev = hub.pull("org/ft1", revision="dev", include=["*"], api=api)
    assert dev.path == pinned.path
    assert (dev.path / "notes.txt").read_bytes() == b"dev notes"

    pr = hub.pull("org/ft1", revision="refs/pr/1", api=api)
    assert pr.revision == repo.prs[1]
    assert (pr.path / "model.safetensors").read_bytes() == (ft2 / "model.safetensors").read_bytes()


def test_pull_include_patterns_and_local_dir(api, hub_server, tmp_path):
    got = hub.pull("org/ft1", include=["*.json"], local_dir=tmp_path / "dir", api=api)
    assert got.path == (tmp_path / "dir").resolve()
    assert got.revision == hub_server.state.repos["org/ft1"].branches["main"]
    assert sorted(p.name for p in got.path.iterdir() if p.is_file()) == [
        "config.json",
        "generation_config.json",
    ]
    with pytest.raises(errors.HubFileNotFoundError, match=r"org/ft1: no file matching nope\* in"):
        hub.pull("org/ft1", include=["nope*"], api=api)


def test_fetch_hf_refs_file_and_revision(api, hub_server, demo_models):
    _, (_, ft2) = demo_models
    repo = hub_server.state.repos["org/ft1"]
    got = hub.fetch("hf://org/ft1@refs/pr/1/model.safetensors", api=api)
    assert got.path.name == "model.safetensors" and got.revision == repo.prs[1]
    assert got.path.read_bytes() == (ft2 / "model.safetensors").read_bytes()
    with pytest.raises(errors.HubFileNotFoundError, match=r"hf://org/ft1/missing\.safetensors"):
        hub.fetch("hf://org/ft1/missing.safetensors", api=api)
    with pytest.raises(errors.HubFileNotFoundError, match=r"no model\.safetensors or"):
        hub.fetch("hf://org/locked", api=api)  # a repo without weights
    with pytest.raises(errors.BadRepoIdError, match="model repositories only"):
        hub.fetch("hf://datasets/org/data", api=api)


def test_fetch_shards_named_by_the_index_and_a_subfolder(api, demo_models):
    _, fts = demo_models
    sharded = merge.open(hub.fetch("hf://org/layout", api=api).path)
    assert sharded.kind == "sharded model folder" and len(sharded.files) >= 2
    assert merge.soup([sharded]).keys() == merge.soup(fts).keys()
    sub = hub.fetch("hf://org/layout/sub", api=api).path
    assert sub.name == "sub" and sorted(p.name for p in sub.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors"]
    )


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (
            lambda api: hub.pull(
                "org/private", api=HfApi(endpoint=api.endpoint, token=OTHER_TOKEN)
            ),
            errors.RepoNotFoundError,
            "no access",
        ),
        (
            lambda api: hub.pull("org/ft1", revision="nope", api=api),
            errors.RevisionNotFoundError,
            "org/ft1@nope: revision not found",
        ),
        (lambda api: hub.pull("not a repo", api=api), errors.BadRepoIdError, "bad repository id"),
        (lambda api: hub.fetch("hf://org", api=api), errors.BadRepoIdError, "hf://org"),
    ],
)
def test_pull_errors(api, call, error, words):
    with pytest.raises(error, match=words) as e:
        call(api)
    assert "\n" not in str(e.value)


def test_private_repo_with_token(api):
    assert hub.pull("org/private", api=api).path.is_dir()


# --- push -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(demo_models: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged model folder written by adapt (card and recipe included)."""
    base, fts = demo_models
    out = tmp_path_factory.mktemp("merged") / "ties-merge"
    merge.run(merge.Ties(density=0.5), fts, base=base, out=out)
    return out


def test_push_to_a_new_private_repo_then_an_existing_one(api, hub_server, merged):
    done = hub.push(merged, "org/pushed", private=True, api=api)
    repo = hub_server.state.repos["org/pushed"]
    assert repo.private
    assert done.commit == repo.branches["main"]
    assert done.url == f"{hub_server.url}/org/pushed/commit/{done.commit}"
    uploaded = repo.commits[done.commit].files
    assert {k: v for k, v in uploaded.items() if k != ".gitattributes"} == files_of(merged)
    assert done.files == tuple(sorted(files_of(merged)))

    again = hub.push(merged, "org/pushed", commit_message="second", api=api)
    assert repo.commits[again.commit].message == "second"
    assert repo.branches["main"] == again.commit


def test_push_to_a_branch_and_a_pr(api, hub_server, merged):
    hub.push(merged, "org/branched", api=api)
    done = hub.push(merged, "org/branched", revision="dev", include=["*.json"], api=api)
    repo = hub_server.state.repos["org/branched"]
    assert repo.branches["dev"] == done.commit != repo.branches["main"]
    assert "README.md" not in done.files and "config.json" in done.files

    pr = hub.push(merged, "org/branched", create_pr=True, exclude=["*.safetensors"], api=api)
    assert pr.url == f"{hub_server.url}/org/branched/discussions/1"
    assert repo.prs[1] == pr.commit
    assert "model.safetensors" not in pr.files
    pulled = hub.pull("org/branched", revision="refs/pr/1", include=["README.md"], api=api)
    assert pulled.revision == pr.commit
    with pytest.raises(errors.ParameterError, match="against main"):
        hub.push(merged, "org/branched", create_pr=True, revision="dev", api=api)


def test_push_leaves_the_card_unless_asked(api, hub_server, merged, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name, data in files_of(merged).items():
        (folder / name).write_bytes(data)
    done = hub.push(folder, "org/carded", api=api)
    readme = hub_server.state.repos["org/carded"].commits[done.commit].files["README.md"]
    assert readme == (merged / "README.md").read_bytes()

    done = hub.push(folder, "org/carded", card_for_repo=True, api=api)
    readme = hub_server.state.repos["org/carded"].commits[done.commit].files["README.md"]
    assert readme == (folder / "README.md").read_bytes() != (merged / "README.md").read_bytes()
    card = ModelCard(readme.decode())
    assert card.text.startswith("\n# carded\n")
    assert 'from_pretrained("org/carded")' in card.text


def test_push_dry_run_uploads_nothing(api, hub_server, merged):
    before = len(hub_server.state.requests)
    done = hub.push(merged, "org/dry", dry_run=True, exclude=["*.json"], api=api)
    assert done.dry_run and done.url is None
    assert done.files == ("README.md", "model.safetensors")
    assert len(hub_server.state.requests) == before


def test_push_errors(api, merged, tmp_path, monkeypatch):
    with pytest.raises(errors.UploadRefusedError, match=r"^someone/x: the Hub refused the push"):
        hub.push(merged, "someone/x", api=api)
    with pytest.raises(errors.UploadRefusedError, match="pushes to this repository are disabled"):
        hub.push(merged, "org/locked", api=api)
    with pytest.raises(errors.TokenRequiredError, match="no Hugging Face token"):
        hub.push(merged, "org/x", api=HfApi(endpoint=api.endpoint))
    with pytest.raises(errors.BadRepoIdError):
        hub.push(merged, "org/x/y", api=api)
    with pytest.raises(errors.SourceNotFoundError, match="no such folder"):
        hub.push(tmp_path / "missing", "org/x", api=api)
    with pytest.raises(errors.ParameterError, match="no files to upload"):
        hub.push(merged, "org/x", include=["*.bin"], api=api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(errors.HubError, match="offline"):
        hub.push(merged, "org/x", api=api)


# --- the CLI in subprocesses --------------------------------------------------------------


def test_cli_pull_merge_push_workflow(hub_server, tmp_path):
    state = hub_server.state
    env = hub_env(hub_server.url, tmp_path / "hf")
    runs = adapt(
        env,
        tmp_path,
        ["pull", "org/base", "--revision", "main"],
        ["pull", "org/ft1", "--revision", "refs/pr/1", "--dir", "ft1-pr", "-q"],
        [
            "merge",
            "--base",
            "hf://org/base",
            "hf://org/ft1@dev",
            "hf://org/ft2",
            "--method",
            "ties",
            "-o",
            "merged",
            "-q",
        ],
        ["push", "merged", "org/cli-merged", "--private", "--commit-message", "TIES"],
        ["push", "merged", "org/cli-merged", "--create-pr"],
        ["push", "merged", "org/cli-merged", "--revision", "dev", "--dry-run"],
    )
    assert [r.code for r in runs] == [0] * 6, [r.err for r in runs]
    base_sha = state.repos["org/base"].branches["main"]
    assert runs[0].err.strip() == f"pulled org/base at commit {base_sha}"
    assert runs[0].out.strip().endswith(f"models--org--base/snapshots/{base_sha}")
    assert runs[1].out.strip() == str(tmp_path / "ft1-pr")
    assert (tmp_path / "ft1-pr" / "model.safetensors").is_file()

    meta = metadata_of(tmp_path / "merged" / "model.safetensors")
    inputs = json.loads(meta["adapt_inputs"])
    assert [(i["path"], i["repo"], i["revision"]) for i in inputs] == [
        ("hf://org/base", "org/base", base_sha),
        ("hf://org/ft1@dev", "org/ft1", state.repos["org/ft1"].branches["dev"]),
        ("hf://org/ft2", "org/ft2", state.repos["org/ft2"].branches["main"]),
    ]
    card = ModelCard((tmp_path / "merged" / "README.md").read_text())
    assert card.data.base_model == ["org/base", "org/ft1", "org/ft2"]
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["adapt", "merge", "ties"]
    assert f"`org/ft1` at commit `{state.repos['org/ft1'].branches['dev']}`" in card.text

    repo = state.repos["org/cli-merged"]
    assert repo.private and repo.commits[repo.branches["main"]].message == "TIES"
    assert runs[3].out.strip() == f"{hub_server.url}/org/cli-merged/commit/{repo.branches['main']}"
    assert runs[4].out.strip() == f"{hub_server.url}/org/cli-merged/discussions/1"
    assert runs[5].out.splitlines()[-1] == "dry run: would push 5 files to org/cli-merged (dev)"
    assert "dev" not in repo.branches
    assert_no_token(tmp_path, *(r.out + r.err for r in runs))


def test_cli_errors_have_one_line_and_distinct_exit_codes(hub_server, tmp_path, merged):
    env = hub_env(hub_server.url, tmp_path / "hf")
    cases = [
        (11, ["pull", "org/missing"], "org/missing: repository not found"),
        (11, ["pull", "org/private"], "no access", {"HF_TOKEN": OTHER_TOKEN}),
        (12, ["pull", "org/gated"], "org/gated: gated repository"),
        (13, ["pull", "org/ft1", "--revision", "v9"], "org/ft1@v9: revision not found"),
        (14, ["merge", "hf://org/ft1/x.safetensors", "hf://org/ft2", "-o", "o"], "no file"),
        (15, ["merge", "--offline", "hf://org/ft2", "hf://org/base", "-o", "o"], "offline"),
        (16, ["pull", "org/"], "bad repository id"),
        (16, ["merge", "hf://org", "hf://org/ft2", "-o", "o"], "bad repository id 'hf://org'"),
        (17, ["push", str(merged), "org/new"], "no Hugging Face token", None, ["HF_TOKEN"]),
        (18, ["push", str(merged), "someone/new"], "the Hub refused the push"),
        (18, ["push", str(merged), "org/locked"], "pushes to this repository are disabled"),
    ]
    jobs = [
        {
            "argv": c[1],
            "env": c[3] if len(c) > 3 and c[3] else {},
            "unset": c[4] if len(c) > 4 else [],
        }
        for c in cases
    ]
    runs = adapt(env, tmp_path, *jobs)
    for (code, argv, words, *_), run in zip(cases, runs, strict=True):
        assert run.code == code, (argv, run.err)
        lines = [line for line in run.err.splitlines() if line.startswith("adapt: error: ")]
        assert len(lines) == 1 and words in lines[0], (argv, run.err)
        assert "Traceback" not in run.err
    assert len({c[0] for c in cases}) == 8
    assert not (tmp_path / "o").exists()
    assert_no_token(tmp_path, *(r.out + r.err for r in runs))


def hand_built_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], sha: str = FAKE_SHA
) -> Path:
    """The layout huggingface_hub's cache uses: refs/main holds the sha; plain files in
    snapshots/<sha>/ (no blobs, no tree listing)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(sha)
    snapshot = storage / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_offline_merge_and_pull_from_a_hand_built_cache(demo_models, tmp_path):
    base, (ft1, ft2) = demo_models
    home = tmp_path / "hf"
    hand_built_cache(home / "hub", "org/offline-base", files_of(base))
    hand_built_cache(home / "hub", "org/offline-ft1", files_of(ft1))
    hand_built_cache(home / "hub", "org/offline-ft2", files_of(ft2), sha="f" * 40)
    hand_built_cache(home / "hub", "org/no-weights", {"config.json": b"{}"})
    # nothing listens there: any request would fail
    env = hub_env("http://127.0.0.1:9", home, HF_HUB_OFFLINE="1")
    runs = adapt(
        env,
        tmp_path,
        [
            "merge",
            "--base",
            "hf://org/offline-base",
            "hf://org/offline-ft1",
            "hf://org/offline-ft2",
            "-o",
            "out",
            "-q",
        ],
        ["pull", "org/offline-ft1"],
        ["merge", "hf://org/offline-ft1", "hf://org/never-pulled", "-o", "o2"],
        ["merge", "hf://org/offline-ft1", "hf://org/no-weights", "-o", "o3"],
        ["merge", "hf://org/offline-ft1@v2", "hf://org/offline-ft2", "-o", "o4"],
        ["push", "out", "org/x"],
    )
    assert [r.code for r in runs] == [0, 0, 15, 15, 15, 10], [r.err for r in runs]
    inputs = json.loads(metadata_of(tmp_path / "out" / "model.safetensors")["adapt_inputs"])
    assert [i["revision"] for i in inputs] == [FAKE_SHA, FAKE_SHA, "f" * 40]
    assert runs[1].out.strip().endswith(f"models--org--offline-ft1/snapshots/{FAKE_SHA}")
    assert "hf://org/never-pulled: not in the cache" in runs[2].err
    assert "offline mode is on" in runs[2].err
    assert "model.safetensors or model.safetensors.index.json or" in runs[3].err
    assert f"missing from the cached snapshot of org/no-weights at {FAKE_SHA}" in runs[3].err
    assert "hf://org/offline-ft1@v2: not in the cache" in runs[4].err
    assert "offline mode is on" in runs[5].err
    assert not any((tmp_path / name).exists() for name in ("o2", "o3", "o4"))


def test_unreachable_hub_falls_back_to_the_cache(demo_models, tmp_path):
    _, (ft1, ft2) = demo_models
    home = tmp_path / "hf"
    hand_built_cache(home / "hub", "org/a", files_of(ft1))
    hand_built_cache(home / "hub", "org/b", files_of(ft2))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = hub_env(f"http://127.0.0.1:{port}", home)
    runs = adapt(
        env,
        tmp_path,
        ["merge", "hf://org/a", "hf://org/b", "-o", "out", "-q"],
        ["merge", "hf://org/a", "hf://org/c", "-o", "o2"],
    )
    assert [r.code for r in runs] == [0, 15], [r.err for r in runs]
    assert "the Hub could not be reached" in runs[1].err
