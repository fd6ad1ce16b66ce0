"""Shared fixtures: tiny checkpoints written in the test, and the CLI run in-process."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cli.app import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep adapt's sha256 cache out of the user's home during tests."""
    monkeypatch.setenv("ADAPT_HASH_CACHE", str(tmp_path_factory.getbasetemp() / "sha256-cache"))


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``adapt ARGS...`` in-process through the real entry point (error funnel included)."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def random_state(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A small state dict with a matrix, a vector and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(8, 6, generator=g).to(dtype),
        "layer.0.bias": torch.randn(8, generator=g).to(dtype),
        "layer.1.weight": torch.randn(5, 8, generator=g).to(dtype),
        "position_ids": torch.arange(7),
    }


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a state dict to ``tmp_path/NAME`` and return the path."""

    def make(name: str, state: dict[str, torch.Tensor]) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": "pt"})
        return path

    return make


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The built-in demo's tiny Llama base and two fine-tunes (built once per session)."""
    from merge import demo

    return demo.build(tmp_path_factory.mktemp("demo"))


def snapshot(paths: list[Path]) -> dict[Path, bytes]:
    """Bytes of every file under ``paths`` (to prove inputs are untouched)."""
    files: dict[Path, bytes] = {}
    for p in paths:
        for f in [p] if p.is_file() else sorted(p.rglob("*")):
            if f.is_file():
                files[f] = f.read_bytes()
    return files


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """float64 numpy copy of a tensor of any float dtype."""
    return t.to(torch.float64).numpy()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
