"""Lazy sources of named tensors: safetensors files, model folders, sharded folders, state dicts.

A source knows every tensor's name, shape and dtype without reading tensor data, and reads
one tensor at a time as a flat numpy array of its storage dtype (bf16 as ``uint16`` bits).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import dtypes
from .errors import CorruptFileError, InputError, SourceNotFoundError
from .safetensors_file import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONTENT_KEY = "adapt_content"  # __metadata__ key saying what a file holds
TASK_VECTOR = "task_vector"


@runtime_checkable
class Source(Protocol):
    """A lazy mapping from tensor name to tensor."""

    label: str  # how errors and provenance name this input
    kind: str  # "safetensors file", "model folder", "sharded model folder", "state dict"
    folder: Path | None  # the model folder (config.json etc.) when there is one
    files: tuple[Path, ...]  # the files whose bytes make up the source (for sha256)
    metadata: dict[str, str]
    delta: bool  # holds task vectors (theta_i - theta_0) rather than weights

    @property
    def names(self) -> list[str]: ...

    @property
    def names_set(self) -> frozenset[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> np.ndarray: ...


class _Names:
    """``names_set``, cached, for any source with a ``names`` list."""

    @property
    def names_set(self) -> frozenset[str]:
        cached = self.__dict__.get("_names_set")
        if cached is None:
            cached = self.__dict__["_names_set"] = frozenset(self.names)  # type: ignore[attr-defined]
        return cached


class FileSource(_Names):
    """One ``.safetensors`` file (or a folder holding ``model.safetensors``)."""

    def __init__(self, path: Path, folder: Path | None = None):
        self._file = SafetensorsFile(path)
        self.label = str(folder if folder is not None else path)
        self.kind = "model folder" if folder is not None else "safetensors file"
        self.folder = folder
        self.files = (self._file.path,)
        self.metadata = dict(self._file.metadata)
        self.delta = self.metadata.get(CONTENT_KEY) == TASK_VECTOR

    @property
    def names(self) -> list[str]:
        return self._file.names

    def info(self, name: str) -> TensorInfo:
        return self._file.info(name)

    def read(self, name: str) -> np.ndarray:
        return self._file.read(name)

    def read_into(self, name: str, out: np.ndarray) -> None:
        self._file.read_into(name, out)


class ShardedSource(_Names):
    """A model folder with ``model.safetensors.index.json`` and its shards."""

    def __init__(self, folder: Path):
        index_path = folder / INDEX_NAME
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{index_path}: bad index file ({e})") from None
        self.label = str(folder)
        self.kind = "sharded model folder"
        self.folder = folder
        shard_names = sorted(set(weight_map.values()))
        self._shards: dict[str, SafetensorsFile] = {}
        for shard in shard_names:
            p = folder / shard
            if not p.is_file():
                raise SourceNotFoundError(f"{index_path}: shard {shard!r} is missing")
            self._shards[shard] = SafetensorsFile(p)
        self._where: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            f = self._shards[shard]
            if name not in f.names:
                raise CorruptFileError(
                    f"{f.path}: tensor {name!r} is listed in {INDEX_NAME} but not in the shard"
                )
            self._where[name] = f
        for f in self._shards.values():
            extra = sorted(set(f.names) - set(self._where))
            if extra:
                raise CorruptFileError(
                    f"{f.path}: tensor {extra[0]!r} is in the shard but not in {INDEX_NAME}"
                )
        self.files = tuple(f.path for f in self._shards.values())
        self.metadata = dict(index.get("metadata") or {})
        first = next(iter(self._shards.values()))
        self.delta = first.metadata.get(CONTENT_KEY) == TASK_VECTOR
        self._names = [n for f in self._shards.values() for n in f.names]

    @property
    def names(self) -> list[str]:
        return self._names

    def info(self, name: str) -> TensorInfo:
        return self._where[name].info(name)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def read_into(self, name: str, out: np.ndarray) -> None:
        self._where[name].read_into(name, out)


class StateDictSource(_Names):
    """An in-memory ``dict[str, torch.Tensor]`` (or numpy arrays) seen as a source."""

    def __init__(self, state: Mapping[str, Any], label: str = "<state dict>"):
        self.label = label
        self.kind = "state dict"
        self.folder = None
        self.files = ()
        self.metadata = {}
        self.delta = False
        self._state = state
        self._infos = {name: self._info_of(name, t) for name, t in state.items()}

    def _info_of(self, name: str, t: Any) -> TensorInfo:
        # numpy and torch share dtype names (float32, int64, bool...): one table serves both
        dtype = f"torch.{t.dtype}" if isinstance(t, np.ndarray) else getattr(t, "dtype", None)
        code = dtypes.code_of_torch(dtype)
        if code is None:
            raise InputError(f"{self.label}: tensor {name!r}: unsupported type or dtype")
        return TensorInfo(code, tuple(int(s) for s in t.shape))

    @property
    def names(self) -> list[str]:
        return list(self._state)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def read(self, name: str) -> np.ndarray:
        t = self._state[name]
        if isinstance(t, np.ndarray):
            return np.ascontiguousarray(t).reshape(-1)
        return dtypes.to_numpy(t, self._infos[name].dtype)


def open_source(path: str | os.PathLike[str] | Mapping[str, Any]) -> Source:
    """Open anything a user can name as a lazy tensor source.

    Args:
        path: a ``.safetensors`` file, a model folder holding ``model.safetensors`` or
            ``model.safetensors.index.json`` (sharded), a PEFT LoRA adapter folder
            (``adapter_config.json``: see :mod:`merge.lora`), an in-memory state dict, or a
            Hub reference ``hf://org/name[@revision][/path]`` (see :mod:`merge.hub`; such a
            source also has ``repo`` and ``revision``, the resolved commit sha).

    Returns:
        A source whose names, shapes and dtypes are known; tensor data is read on demand.

    Raises:
        SourceNotFoundError: the path does not exist or holds no safetensors weights.
        CorruptFileError: a file is not a valid safetensors file.

    Example:
        >>> src = merge.open("model/")            # doctest: +SKIP
        >>> src.info("lm_head.weight").shape      # doctest: +SKIP
        (32000, 1024)
    """
    if isinstance(path, Mapping):
        return StateDictSource(path)
    if isinstance(path, str) and path.startswith("hf://"):
        from .hub import open_hub

        return open_hub(path)
    p = Path(path)
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            from .lora import LoraSource

            return LoraSource(p)
        if (p / INDEX_NAME).is_file():
            return ShardedSource(p)
        if (p / SINGLE_NAME).is_file():
            return FileSource(p / SINGLE_NAME, folder=p)
        raise SourceNotFoundError(f"{p}: folder has neither {SINGLE_NAME} nor {INDEX_NAME}")
    if not p.exists():
        raise SourceNotFoundError(f"{p}: no such file or folder")
    source = FileSource(p)
    if source.metadata.get("adapt_format") == "compeft":  # a ComPEFT container
        from .compeft import CompressedSource

        return CompressedSource.from_file(source)
    if source.metadata.get("adapt_format") == "sparse":  # a sparse fine-tune container
        from .sparse import SparseSource

        return SparseSource.from_file(source)
    return source
