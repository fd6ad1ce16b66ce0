"""sha256 of inputs: correct, cached by file identity, recomputed when a file changes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from merge.provenance import sha256_file


def test_hash_matches_hashlib_and_is_cached(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(10_000))
    expected = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_file(f) == expected
    assert sha256_file(f) == expected
    assert len(list(Path(os.environ["ADAPT_HASH_CACHE"]).iterdir())) >= 1


def test_changed_file_is_rehashed(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 4096)
    first = sha256_file(f)
    f.write_bytes(b"b" * 4096)  # same size, new content: new mtime/ctime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(f) == hashlib.sha256(b"b" * 4096).hexdigest() != first


@pytest.mark.parametrize("setting", ["0"])
def test_cache_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv("ADAPT_HASH_CACHE", setting)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    assert sha256_file(f) == hashlib.sha256(b"hello").hexdigest()
    assert not (tmp_path / "xdg").exists()
