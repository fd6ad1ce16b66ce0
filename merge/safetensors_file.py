"""Reading safetensors files lazily, with every header defect reported by file and tensor.

The header is parsed and checked here (not by the safetensors library) so that a bad file
gets a one-line message naming the file, the tensor and the defect, before any work starts.
Tensor data is then read one tensor at a time into a fresh numpy buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dtypes
from .errors import CorruptFileError, SourceNotFoundError

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Name-independent facts about one stored tensor."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    begin: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """A safetensors file whose header is parsed and validated; data is read on demand."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceNotFoundError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise SourceNotFoundError(f"{self.path}: not a file")
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(
                    f"{self.path}: not a safetensors file ({self.size} bytes, no header)"
                )
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER:
                raise CorruptFileError(
                    f"{self.path}: not a safetensors file (header length {n} is implausible)"
                )
            raw = f.read(n)
        if len(raw) < n:
            raise CorruptFileError(
                f"{self.path}: truncated file: the header needs {n} bytes, "
                f"the file has {self.size - 8}"
            )
        if raw[:1] != b"{":
            raise CorruptFileError(f"{self.path}: not a safetensors file (header is not JSON)")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{self.path}: corrupt header JSON ({e})") from None
        if not isinstance(header, dict):
            raise CorruptFileError(f"{self.path}: corrupt header JSON (not an object)")
        self.data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CorruptFileError(f"{self.path}: corrupt header: __metadata__ must map str to str")
        self.metadata: dict[str, str] = meta
        self._entries = {name: self._entry(name, spec) for name, spec in header.items()}
        self._check_layout()

    def _entry(self, name: str, spec: object) -> _Entry:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(spec, dict):
            raise CorruptFileError(f"{where}: corrupt header entry")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or not dtypes.known(dtype):
            raise CorruptFileError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise CorruptFileError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CorruptFileError(f"{where}: bad data_offsets {offsets!r}")
        info = TensorInfo(dtype, tuple(shape))
        begin, end = offsets
        if end - begin != info.nbytes:
            raise CorruptFileError(
                f"{where}: data_offsets span {end - begin} bytes but {dtype}{list(shape)} "
                f"needs {info.nbytes}"
            )
        return _Entry(info, self.data_start + begin, self.data_start + end)

    def _check_layout(self) -> None:
        last_end, last_name = self.data_start, None
        for name, e in sorted(self._entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
            if e.begin < last_end and e.end > e.begin:
                raise CorruptFileError(
                    f"{self.path}: tensor {name!r} overlaps tensor {last_name!r} in the data"
                )
            if e.end > self.size:
                raise CorruptFileError(
                    f"{self.path}: tensor {name!r} ends at byte {e.end} past the end of the "
                    f"file ({self.size} bytes): truncated file or bad data_offsets"
                )
            if e.end > e.begin:
                last_end, last_name = e.end, name

    @property
    def names(self) -> list[str]:
        """Tensor names in the order their data is stored."""
        return [n for n, _ in sorted(self._entries.items(), key=lambda kv: kv[1].begin)]

    def info(self, name: str) -> TensorInfo:
        return self._entries[name].info

    def span(self, name: str) -> tuple[int, int]:
        """Absolute byte range of a tensor's data in the file."""
        e = self._entries[name]
        return e.begin, e.end

    def read(self, name: str) -> np.ndarray:
        """Read one tensor into a new flat numpy array of its storage dtype."""
        e = self._entries[name]
        out = np.empty(e.info.numel, dtypes.storage(e.info.dtype))
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read one tensor's bytes into ``out`` (flat, contiguous, of its storage dtype)."""
        e = self._entries[name]
        buf = memoryview(out).cast("B")
        assert len(buf) == e.end - e.begin
        with open(self.path, "rb", buffering=0) as f:
            f.seek(e.begin)
            got = 0
            while got < len(buf):
                n = f.readinto(buf[got:])
                if not n:
                    raise CorruptFileError(
                        f"{self.path}: tensor {name!r}: file ended while reading (truncated "
                        "while in use?)"
                    )
                got += n
