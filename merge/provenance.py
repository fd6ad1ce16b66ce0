"""What made an output: tool version, method, parameters, inputs with sha256.

Input files are hashed on a background thread while the merge runs (hashlib releases the
GIL), and the result is written into the output's ``__metadata__`` at the end. Nothing
time-dependent is recorded, so identical runs give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sources import CONTENT_KEY, Source

if TYPE_CHECKING:
    from .methods.base import Method

_BLOCK = 1 << 22
_PLACEHOLDER = "0" * 64


def version() -> str:
    """The installed adapt version."""
    try:
        return importlib_metadata.version("adapt")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def _cache_dir() -> Path | None:
    """Where file hashes are remembered; ``ADAPT_HASH_CACHE=0`` turns the cache off."""
    setting = os.environ.get("ADAPT_HASH_CACHE", "")
    if setting == "0":
        return None
    if setting:
        return Path(setting)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "adapt" / "sha256"


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in blocks.

    Remembered per (real path, device, inode, size, mtime_ns, ctime_ns), as git does for its
    index: a file rewritten in any way gets a new stat and is hashed again.
    """
    st = os.stat(path)
    stamp = f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}"
    stamp += f"\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    cache = _cache_dir()
    entry = cache / hashlib.sha256(stamp.encode()).hexdigest() if cache else None
    if entry is not None:
        try:
            cached = entry.read_text().strip()
            if len(cached) == 64:
                return cached
        except OSError:
            pass
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            if stop is not None and stop.is_set():
                raise CancelledError
            h.update(block)
    digest = h.hexdigest()
    if entry is not None:
        try:  # best effort: a read-only home only costs the next run a re-hash
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(digest)
            os.replace(tmp, entry)
        except OSError:
            pass
    return digest


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Provenance:
    """Starts hashing the inputs at once; ``metadata()`` gives the ``__metadata__``.

    The method's parameters are read when the metadata is made, after the method's prepare
    passes (LiNeS records the alpha it computed).
    """

    def __init__(
        self,
        method: Method,
        sources: tuple[Source, ...],
        roles: tuple[str, ...],
    ):
        self.method = method
        self.sources = sources
        self.roles = roles
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapt-sha256")
        self._hashes: dict[Path, Future[str]] = {}
        for src in sources:
            for f in src.files:
                if f not in self._hashes:
                    self._hashes[f] = self._pool.submit(sha256_file, f, self._stop)
        self._pool.shutdown(wait=False)

    def _inputs(self, final: bool) -> list[dict[str, Any]]:
        out = []
        for role, src in zip(self.roles, self.sources, strict=True):
            entry: dict[str, Any] = {"role": role, "path": src.label}
            if getattr(src, "repo", None):  # an hf:// input: its repo and commit sha
                entry |= {"repo": src.repo, "revision": src.revision}  # type: ignore[attr-defined]
            if src.files:
                root = src.folder
                entry["sha256"] = {
                    str(f.relative_to(root) if root else f.name): (
                        self._hashes[f].result() if final else _PLACEHOLDER
                    )
                    for f in src.files
                }
            out.append(entry)
        return out

    def metadata(self, final: bool = True) -> dict[str, str]:
        """The ``__metadata__`` dict; ``final=False`` gives a same-length placeholder."""
        meta = {
            "format": "pt",
            "adapt_version": version(),
            "adapt_method": self.method.name,
            "adapt_parameters": _dump(self.method.parameters()),
            "adapt_inputs": _dump(self._inputs(final)),
        }
        if self.method.content != "model":
            meta[CONTENT_KEY] = self.method.content
        return meta

    def cancel(self) -> None:
        """Stop hashing (on error or Ctrl-C) so the process can exit at once."""
        self._stop.set()
        for fut in self._hashes.values():
            fut.cancel()
