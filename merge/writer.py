"""Streaming safetensors output: one file or HF shards, written atomically.

The header of each file is laid out before any data (all shapes are known from the plan),
tensor bytes are streamed in plan order, and the final ``__metadata__`` (whose input hashes
are only known at the end) is written over a same-length placeholder. Everything goes to a
temporary name in the target's folder and is renamed into place when complete; an error or
Ctrl-C removes the temporary files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import card, dtypes
from .errors import OutputError, ParameterError
from .plan import Plan, PlannedTensor
from .sources import INDEX_NAME, SINGLE_NAME

DEFAULT_SHARD_SIZE = 50 * 10**9  # transformers 5 save_pretrained's default "50GB"

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Parse ``"5GB"`` (decimal), ``"2GiB"`` (binary) or a byte count."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
        if not m:
            raise ParameterError(f"bad size {text!r}: use e.g. 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size <= 0:
        raise ParameterError(f"bad size {text!r}: must be positive")
    return size


class Sink(Protocol):
    """Where the engine puts finished tensors."""

    def begin(self, plan: Plan) -> None: ...

    def reserve(self, metadata: dict[str, str]) -> None: ...

    def write(self, tensor: PlannedTensor, data: np.ndarray) -> None: ...

    def finish(self, metadata: dict[str, str]) -> Any: ...

    def abort(self) -> None: ...


def _header(
    entries: list[tuple[str, str, tuple[int, ...], int, int]], meta: dict[str, str]
) -> bytes:
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


@dataclass
class _Shard:
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)
    header_len: int = 0
    handle: Any = None


def check_output(out: Path, plan: Plan, overwrite: bool) -> None:
    """Refuse outputs that would overwrite an input or that exist without ``overwrite``."""
    target = out.resolve()
    for src in plan.sources:
        paths = list(src.files) + ([src.folder] if src.folder is not None else [])
        for p in paths:
            p = p.resolve()
            if p == target or target in p.parents:
                raise OutputError(f"{out}: output would overwrite input {src.label}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")


class SafetensorsSink:
    """Writes a ``.safetensors`` file, or a model folder (single file or shards + index).

    Args:
        out: a path ending in ``.safetensors`` (one file) or a folder.
        shard_size: largest shard in bytes when writing a folder.
        copy_from: a model folder whose config and tokenizer files are copied (folder output).
        overwrite: replace an existing output (atomically, after the new one is complete).
        recipe_options: merge options recorded in a folder output's recipe and model card
            (see :mod:`merge.card`).
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        copy_from: Path | None = None,
        out_dtype: str | None = None,
        overwrite: bool = False,
        recipe_options: Mapping[str, Any] | None = None,
    ):
        self.out = Path(out)
        self.is_file = self.out.suffix == ".safetensors"
        self.shard_size = shard_size
        self.copy_from = copy_from
        self.out_dtype = out_dtype
        self.overwrite = overwrite
        self.recipe_options = recipe_options
        self._tmp: Path | None = None
        self._shards: list[_Shard] = []
        self._where: dict[str, _Shard] = {}

    def begin(self, plan: Plan) -> None:
        check_output(self.out, plan, self.overwrite)
        parent = self.out.parent
        if not parent.is_dir():
            what = "is not a folder" if parent.exists() else "does not exist"
            raise OutputError(f"{self.out}: {parent} {what}")
        tmp_name = f".{self.out.name}.adapt-tmp-{os.getpid()}"
        try:
            self._tmp = parent / tmp_name
            if self.is_file:
                self._shards = [_Shard(tmp_name, list(plan.tensors))]
            else:
                self._tmp.mkdir()
                self._shards = self._split(plan.tensors)
            self._open_all()
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.out}: cannot write: {e.strerror or e}") from None

    def _split(self, tensors: Iterable[PlannedTensor]) -> list[_Shard]:
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:
            n = t.out_info.nbytes
            if groups[-1] and size + n > self.shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += n
        if len(groups) == 1:
            return [_Shard(SINGLE_NAME, groups[0])]
        k = len(groups)
        return [_Shard(f"model-{i:05d}-of-{k:05d}.safetensors", g) for i, g in enumerate(groups, 1)]

    def _path(self, shard: _Shard) -> Path:
        assert self._tmp is not None
        return self._tmp if self.is_file else self._tmp / shard.name

    def _entries(self, shard: _Shard) -> list[tuple[str, str, tuple[int, ...], int, int]]:
        entries, offset = [], 0
        for t in shard.tensors:
            n = t.out_info.nbytes
            entries.append((t.name, t.out_dtype, t.shape, offset, offset + n))
            offset += n
        return entries

    def _open_all(self) -> None:
        # placeholder metadata of the final length is written by finish(); reserve the header
        for shard in self._shards:
            shard.handle = open(self._path(shard), "wb")  # noqa: SIM115 - closed in finish/abort
            for t in shard.tensors:
                self._where[t.name] = shard

    def reserve(self, metadata: dict[str, str]) -> None:
        """Write each header with ``metadata`` as a placeholder of the final length."""
        for shard in self._shards:
            raw = _header(self._entries(shard), metadata)
            shard.header_len = len(raw)
            shard.handle.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, tensor: PlannedTensor, data: np.ndarray) -> None:
        shard = self._where[tensor.name]
        try:
            shard.handle.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        except OSError as e:
            raise OutputError(f"{self.out}: write failed: {e.strerror or e}") from None

    def finish(self, metadata: dict[str, str]) -> Path:
        try:
            for shard in self._shards:
                raw = _header(self._entries(shard), metadata)
                if len(raw) != shard.header_len:
                    raise AssertionError("final metadata must match the reserved header length")
                shard.handle.seek(8)
                shard.handle.write(raw)
                shard.handle.close()
            if not self.is_file:
                self._write_folder_extras()
                card.write(self._tmp, metadata, self.recipe_options)
            self._commit()
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.out}: write failed: {e.strerror or e}") from None
        return self.out

    def _write_folder_extras(self) -> None:
        assert self._tmp is not None
        if len(self._shards) > 1:
            index = {
                "metadata": {
                    "total_size": sum(
                        t.out_info.nbytes for t in (t for s in self._shards for t in s.tensors)
                    )
                },
                "weight_map": {t.name: s.name for s in self._shards for t in s.tensors},
            }
            (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.copy_from is None:
            return
        for name in COPIED_FILES:
            src = self.copy_from / name
            if not src.is_file():
                continue
            if name == "config.json" and self.out_dtype is not None:
                config = json.loads(src.read_text(encoding="utf-8"))
                for key in ("torch_dtype", "dtype"):
                    if key in config:
                        config[key] = dtypes.torch_name(self.out_dtype)
                (self._tmp / name).write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copyfile(src, self._tmp / name)

    def _commit(self) -> None:
        assert self._tmp is not None
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.adapt-old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self._tmp, self.out)
        self._tmp = None
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()

    def abort(self) -> None:
        for shard in self._shards:
            if shard.handle is not None and not shard.handle.closed:
                shard.handle.close()
        if self._tmp is not None and self._tmp.exists():
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                self._tmp.unlink(missing_ok=True)
        self._tmp = None


class StateDictSink:
    """Collects the output as a ``dict[str, torch.Tensor]`` (the library's ``out=None``)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def begin(self, plan: Plan) -> None:
        self.state = {}

    def reserve(self, metadata: dict[str, str]) -> None:
        """Nothing to reserve in memory."""

    def write(self, tensor: PlannedTensor, data: np.ndarray) -> None:
        if not data.flags.owndata:  # a carried-through input: never alias the caller's tensors
            data = data.copy()
        self.state[tensor.name] = dtypes.to_torch(data, tensor.out_dtype, tensor.shape)

    def finish(self, metadata: dict[str, str]) -> dict[str, Any]:
        return self.state

    def abort(self) -> None:
        self.state = {}
