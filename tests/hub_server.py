"""A Hub-compatible HTTP server for tests: in-memory repos on 127.0.0.1, no network.

It answers the requests huggingface_hub makes for downloads (model info, tree, resolve) and
uploads (create repo, branch, preupload, LFS batch + PUT, NDJSON commit, pull requests), with
the real Hub's error headers (``X-Error-Code``) so the client raises its own exception classes.
Tokens are checked like the Hub: private repos answer ``RepoNotFound`` without access, gated
repos refuse downloads with ``GatedRepo``, writes need a token of the namespace.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

PR_REF = re.compile(r"refs/pr/(\d+)")
SHA = re.compile(r"[0-9a-f]{40}")


def git_blob_sha(data: bytes) -> str:
    """git's object id of a file (what the Hub reports as ``oid`` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin"))


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users allowed through the gate
    branches: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    refuse_commits: str | None = None  # a server-side rejection message for every commit

    def resolve(self, revision: str) -> str | None:
        """The commit sha of a branch, ``refs/pr/N`` or sha; None when unknown."""
        if revision in self.branches:
            return self.branches[revision]
        if m := PR_REF.fullmatch(revision):
            return self.prs.get(int(m.group(1)))
        return revision if revision in self.commits else None


class HubState:
    """Users, tokens and repositories of the fake Hub (mutable from tests)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[str, str] = {}  # token -> user
        self.orgs: dict[str, set[str]] = {}  # user -> orgs
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._counter = 0

    def add_user(self, user: str, token: str, orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = user
        self.orgs[user] = set(orgs)

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, ()))

    def can_read(self, user: str | None, repo: Repo) -> bool:
        return not repo.private or self.can_write(user, repo.id.split("/")[0])

    def commit(
        self, repo: Repo, parent: str | None, changes: dict[str, bytes | None], message: str
    ) -> str:
        """A new commit: the parent's files with ``changes`` (None deletes); returns its sha."""
        with self.lock:
            self._counter += 1
            files = dict(repo.commits[parent].files) if parent else {}
            for path, data in changes.items():
                if data is None:
                    files.pop(path, None)
                else:
                    files[path] = data
            digest = hashlib.sha1(f"{repo.id}\0{parent}\0{self._counter}\0{message}".encode())
            sha = digest.hexdigest()
            repo.commits[sha] = Commit(sha, files, message)
            return sha

    def create_repo(
        self, repo_id: str, files: dict[str, bytes] | None = None, **options: Any
    ) -> Repo:
        """A repo whose ``main`` holds ``.gitattributes`` (as the Hub's) plus ``files``."""
        repo = Repo(repo_id, **options)
        self.repos[repo_id] = repo
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        repo.branches["main"] = self.commit(repo, None, initial, "initial commit")
        if files:
            repo.branches["main"] = self.commit(repo, repo.branches["main"], files, "add files")
        return repo


class Handler(BaseHTTPRequestHandler):
    """One request against :class:`HubState` (``self.server.state``)."""

    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``state.requests`` instead."""

    # -- plumbing -------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        return self.server.url

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(
        self,
        status: int,
        payload: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.reply(status, {"error": message}, headers=headers)

    def user(self) -> str | None:
        """The token's user; None without a token. Raises PermissionError for a bad token."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        user = self.state.tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:
            raise PermissionError("Invalid credentials in Authorization header")
        return user

    def repo(self, repo_id: str, user: str | None) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or not self.state.can_read(user, repo):
            self.error(404, "RepoNotFound", "Repository not found")
            return None
        return repo

    def revision(self, repo: Repo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    # -- dispatch -------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_GET(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        self.state.requests.append((self.command, url.path))
        try:
            user = self.user()
        except PermissionError as e:
            self.body()
            self.error(401, None, str(e))
            return
        route = (self.command, *parts[:2])
        try:
            if parts[:2] == ["api", "whoami-v2"]:
                self.whoami(user)
            elif route == ("POST", "api", "repos") and parts[2:] == ["create"]:
                self.create_repo(user)
            elif route == ("POST", "api", "validate-yaml"):
                self.body()
                self.reply(200, {"errors": [], "warnings": []})
            elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                self.api_models(user, f"{parts[2]}/{parts[3]}", parts[4:])
            elif self.command == "PUT" and parts[0] == "lfs-upload":
                self.lfs_put(parts[1])
            elif len(parts) >= 4 and parts[1].endswith(".git") and parts[2:4] == ["info", "lfs"]:
                self.lfs_batch(user, f"{parts[0]}/{parts[1].removesuffix('.git')}")
            elif len(parts) >= 4 and parts[2] == "resolve":
                self.resolve(user, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self.body()
                self.error(404, None, f"no route {self.command} {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- endpoints ------------------------------------------------------------------------

    def whoami(self, user: str | None) -> None:
        if user is None:
            self.error(401, None, "Invalid credentials in Authorization header")
            return
        orgs = [{"name": o} for o in sorted(self.state.orgs.get(user, ()))]
        self.reply(200, {"type": "user", "name": user, "orgs": orgs, "auth": {}})

    def create_repo(self, user: str | None) -> None:
        body = json.loads(self.body() or b"{}")
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.base_url}/{repo_id}"
        if not self.state.can_write(user, namespace or ""):
            self.error(403, None, f"You don't have the rights to create a model under {namespace}")
        elif repo_id in self.state.repos:
            self.reply(409, {"error": "You already created this model repo", "url": url})
        else:
            private = body.get("private") or body.get("visibility") == "private"
            self.state.create_repo(repo_id, private=bool(private))
            self.reply(200, {"url": url, "name": repo_id})

    def api_models(self, user: str | None, repo_id: str, rest: list[str]) -> None:
        body = self.body() if self.command in ("POST", "PUT") else b""
        repo = self.repo(repo_id, user)
        if repo is None:
            return
        action = rest[0] if rest else "revision"
        revision = rest[1] if len(rest) > 1 else "main"
        if action == "revision" and self.command == "GET":
            self.model_info(repo, revision)
        elif action == "tree" and self.command == "GET":
            self.tree(repo, revision, "/".join(rest[2:]))
        elif action == "refs" and self.command == "GET":
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                for b, s in repo.branches.items()
            ]
            prs = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                for n, s in repo.prs.items()
            ]
            self.reply(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": prs})
        elif not self.state.can_write(user, repo_id.split("/")[0]):
            self.error(403, None, "You don't have write access to this repository")
        elif action == "branch":
            self.create_branch(repo, revision, json.loads(body or b"{}"))
        elif action == "preupload":
            self.preupload(repo, revision, json.loads(body))
        elif action == "commit":
            self.commit(repo, revision, body)
        else:
            self.error(404, None, f"no route {self.command} {action}")

    def model_info(self, repo: Repo, revision: str) -> None:
        sha = self.revision(repo, revision)
        if sha is None:
            return
        files = repo.commits[sha].files
        self.reply(
            200,
            {
                "id": repo.id,
                "sha": sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )

    def tree(self, repo: Repo, revision: str, path: str) -> None:
        sha = self.revision(repo, revision)
        if sha is None:
            return
        entries = []
        for p, data in sorted(repo.commits[sha].files.items()):
            if path and not p.startswith(path.rstrip("/") + "/"):
                continue
            entry: dict[str, Any] = {
                "type": "file",
                "path": p,
                "size": len(data),
                "oid": git_blob_sha(data),
            }
            if is_lfs(p):
                digest = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": digest, "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self.reply(200, entries)

    def resolve(self, user: str | None, repo_id: str, revision: str, path: str) -> None:
        repo = self.repo(repo_id, user)
        if repo is None:
            return
        if repo.gated and user not in repo.granted:
            self.error(403, "GatedRepo", "Access to this model is restricted")
            return
        sha = self.revision(repo, revision)
        if sha is None:
            return
        data = repo.commits[sha].files.get(path)
        if data is None:
            self.error(404, "EntryNotFound", f"{path} does not exist")
            return
        etag = hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_sha(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}
        self.reply(200, raw=data, headers=headers)

    def create_branch(self, repo: Repo, branch: str, body: dict[str, Any]) -> None:
        if branch in repo.branches:
            self.error(409, None, "Reference already exists")
            return
        start = repo.resolve(body.get("startingPoint") or "main")
        if start is None:
            self.error(404, "RevisionNotFound", "Invalid starting point")
            return
        repo.branches[branch] = start
        self.reply(200, {})

    def preupload(self, repo: Repo, revision: str, body: dict[str, Any]) -> None:
        if self.query.get("create_pr") != "1" and self.revision(repo, revision) is None:
            return
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if is_lfs(f["path"]) else "regular",
                "shouldIgnore": False,
            }
            for f in body["files"]
        ]
        self.reply(200, {"files": files})

    def lfs_batch(self, user: str | None, repo_id: str) -> None:
        body = json.loads(self.body())
        repo = self.repo(repo_id, user)
        if repo is None:
            return
        if not self.state.can_write(user, repo_id.split("/")[0]):
            self.error(403, None, "You don't have write access to this repository")
            return
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.blobs:
                href = f"{self.base_url}/lfs-upload/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        self.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str) -> None:
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            self.error(400, None, "sha256 mismatch")
            return
        self.state.blobs[oid] = data
        self.reply(200, {})

    def commit(self, repo: Repo, revision: str, body: bytes) -> None:
        if repo.refuse_commits:
            self.error(403, None, repo.refuse_commits)
            return
        create_pr = self.query.get("create_pr") == "1"
        parent = self.revision(repo, revision)
        if parent is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        changes: dict[str, bytes | None] = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self.state.blobs.get(value["oid"])
                if blob is None:
                    self.error(400, None, f"LFS object {value['oid']} was not uploaded")
                    return
                changes[value["path"]] = blob
            elif key == "deletedFile":
                changes[value["path"]] = None
        sha = self.state.commit(repo, parent, changes, header["summary"])
        pr_url = None
        if create_pr:
            number = max([0, *repo.prs]) + 1
            repo.prs[number] = sha
            pr_url = f"{self.base_url}/{repo.id}/discussions/{number}"
        elif PR_REF.fullmatch(revision):
            repo.prs[int(PR_REF.fullmatch(revision).group(1))] = sha  # type: ignore[union-attr]
        else:
            repo.branches[revision] = sha
        self.reply(
            200,
            {
                "commitUrl": f"{self.base_url}/{repo.id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": pr_url,
            },
        )


class HubServer(ThreadingHTTPServer):
    """``with HubServer() as hub:`` serves ``hub.state`` at ``hub.url`` on a free port."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
