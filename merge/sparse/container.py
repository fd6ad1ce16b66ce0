"""The sparse fine-tune container: a safetensors file of coded positions and contiguous values.

Layout (byte for byte in docs/formats.md): for every tensor ``NAME``, in the order of the
``adapt_sparse_tensors`` list, either ``NAME.positions`` (``U8``, the Golomb code of its
increasing flat row-major positions, :mod:`merge.kernels.positions`, the ComPEFT code) and
``NAME.values`` (1-D, ``F32``/``F64``/``BF16``/``F16``, one value per position, in position
order), optionally followed by ``NAME.wide_index`` (``I64``) and ``NAME.wide_values``
(``F64``): float64 values that replace the values at those indices (the few entries whose
float32 value would not reproduce the fine-tune exactly); or, for a tensor stored whole,
``NAME.dense`` (its dtype and shape). ``__metadata__``
holds the format name and version, how the fine-tune was made (density or count, scope,
value policy, dense patterns), every original name, dtype, shape, count, Golomb parameter
and CRC-32, and the provenance.

A :class:`SparseSource` is a lazy source of task vectors (``delta = True``): a sparse tensor
reads as its dense float32 delta, a dense tensor as its full weights (listed in
``replaced``), so ``adapt merge --base`` takes sparse fine-tunes as task vectors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .. import dtypes
from ..compeft.container import (
    FORMAT_KEY,
    VERSION_KEY,
    check_target,
    check_version,
    temp_path,
    write_atomically,
)
from ..errors import CorruptFileError, NonFiniteError
from ..kernels.convert import to_float32
from ..kernels.positions import MAX_M, CodeError, decode_positions
from ..kernels.sparse import check_status, compose
from ..safetensors_file import TensorInfo
from ..sources import FileSource, _Names

FORMAT = "sparse"
VERSION = 1
HEADER_KEY = "adapt_sparse"
TENSORS_KEY = "adapt_sparse_tensors"
CONTENT = "sparse_fine_tune"
POSITIONS, VALUES, DENSE = ".positions", ".values", ".dense"
WIDE_INDEX, WIDE_VALUES = ".wide_index", ".wide_values"
VALUE_DTYPES = ("F32", "F64", "BF16", "F16")
ORIGINS = ("extract", "composable-sft", "spiel", "restrict")


@dataclass(frozen=True)
class Header:
    """How the fine-tune was made and what it holds."""

    origin: str  # "extract", "composable-sft", "spiel" or "restrict"
    density: float | None  # requested fraction kept (extract --density)
    count: int | None  # requested number kept (extract --count)
    scope: str | None  # "global" or "tensor" top-k (extract)
    values: str | None  # the value dtype policy (extract --values)
    dense_patterns: tuple[str, ...]  # regexes of the tensors stored whole (extract --dense)
    parameters: int  # entries of the sparse tensors
    kept: int  # entries selected by top-k (the coded ones plus kept zeros)
    coded: int  # entries stored

    def entry(self) -> dict[str, Any]:
        return asdict(self) | {"dense_patterns": list(self.dense_patterns)}


@dataclass(frozen=True)
class Entry:
    """One tensor of the fine-tune: sparse (positions + values) or dense (whole weights)."""

    name: str
    dtype: str  # the tensor's dtype in the model
    shape: tuple[int, ...]
    dense: bool
    count: int  # stored values (numel when dense)
    m: int  # Golomb parameter (0 when dense)
    values: str  # dtype of the stored values (``dtype`` when dense)
    inexact: int | None  # kept entries apply/revert do not reproduce exactly; None: unknown
    crc32: int | None  # of the stored bytes, in file order; None: not yet stored
    wide: int = 0  # values replaced by float64 ones (NAME.wide_index / NAME.wide_values)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "dense" if self.dense else "sparse",
            "dtype": self.dtype,
            "shape": list(self.shape),
            "count": self.count,
            "m": self.m,
            "values": self.values,
            "inexact": self.inexact,
            "crc32": self.crc32,
            "wide": self.wide,
        }


Record = tuple[np.ndarray, ...]  # (positions, values[, wide index, wide values]) or (data,)


def checksum(record: Record) -> int:
    """CRC-32 of a tensor's stored bytes, in file order."""
    crc = 0
    for part in record:
        crc = zlib.crc32(np.ascontiguousarray(part).view(np.uint8), crc)
    return crc


class SparseSource(_Names):
    """A sparse fine-tune as a lazy source of task vectors (see the module docstring).

    ``fetch(name)`` gives a tensor's raw record; records are checked (CRC-32 when stored,
    finite values) before use.
    """

    def __init__(
        self,
        header: Header,
        entries: Iterable[Entry],
        fetch: Callable[[str], Record],
        *,
        label: str,
        kind: str,
        files: tuple[Path, ...] = (),
        metadata: Mapping[str, str] | None = None,
    ):
        self.header = header
        self.entries = {e.name: e for e in entries}
        self.label = label
        self.kind = kind
        self.folder = None
        self.files = files
        self.metadata = dict(metadata or {})
        self.delta = True
        self.replaced = frozenset(n for n, e in self.entries.items() if e.dense)
        self._fetch = fetch

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def sparse_names(self) -> list[str]:
        """Names of the tensors stored as positions and values."""
        return [n for n, e in self.entries.items() if not e.dense]

    def info(self, name: str) -> TensorInfo:
        e = self.entries[name]
        return TensorInfo(e.dtype if e.dense else "F32", e.shape)

    def record(self, name: str) -> Record:
        """The checked record of a tensor: ``(positions payload, values)`` or ``(data,)``.

        Raises:
            CorruptFileError: the CRC-32 does not match.
            NonFiniteError: a value is NaN or Inf.
        """
        e = self.entries[name]
        record = self._fetch(name)
        if e.crc32 is not None and checksum(record) != e.crc32:
            raise CorruptFileError(
                f"{self.label}: tensor {name!r}: payload checksum mismatch (corrupt file)"
            )
        if e.wide:
            index = record[2]
            if index[0] < 0 or index[-1] >= e.count or not (np.diff(index) > 0).all():
                raise CorruptFileError(f"{self.label}: tensor {name!r}: bad wide_index")
        values = record if e.dense else record[1::2]  # the data, or the values and overrides
        if not all(np.isfinite(as_float(part, e.values)).all() for part in values):
            raise NonFiniteError(f"{self.label}: tensor {name!r} holds NaN or Inf values")
        return record

    def positions(self, name: str, record: Record | None = None) -> np.ndarray:
        """Increasing flat row-major positions of a sparse tensor (int64), decoded from its
        ``record`` when given."""
        e = self.entries[name]
        payload = (record if record is not None else self.record(name))[0]
        try:
            return decode_positions(payload, e.count, e.numel, e.m)
        except CodeError as err:
            raise CorruptFileError(f"{self.label}: tensor {name!r}: {err}") from None

    def values(self, name: str, record: Record | None = None) -> np.ndarray:
        """The values of a sparse tensor as float64, in position order."""
        record = record if record is not None else self.record(name)
        return full_values(self.entries[name], record, np.float64)

    def read(self, name: str) -> np.ndarray:
        """A sparse tensor as its dense float32 delta (flat); a dense tensor as stored."""
        e = self.entries[name]
        if e.dense:
            return self.record(name)[0]
        out = np.zeros(e.numel, np.float32)
        add_records(out, [(self, name, 1.0)])
        return out

    @classmethod
    def from_file(cls, file: FileSource) -> SparseSource:
        """Validate a container's header (no payload is read) and wrap it.

        Raises:
            InputError: the format version is not one this adapt reads.
            CorruptFileError: the header is inconsistent with the stored tensors.
        """
        path = file.label
        meta = file.metadata
        check_version(file, "sparse fine-tune", VERSION)
        try:
            header, entries = parse_metadata(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path}: corrupt sparse fine-tune header ({e})") from None
        expected: set[str] = set()
        for entry in entries:
            expected |= _check_stored(file, entry)
        extra = sorted(set(file.names) - expected)
        if extra:
            raise CorruptFileError(f"{path}: tensor {extra[0]!r} is not part of the fine-tune")

        def fetch(name: str) -> Record:
            return tuple(file.read(name + suffix) for suffix in parts[name])

        parts = {e.name: _suffixes(e) for e in entries}
        return cls(
            header,
            entries,
            fetch,
            label=path,
            kind="sparse fine-tune",
            files=file.files,
            metadata=meta,
        )


class SparseFineTune(SparseSource):
    """A sparse fine-tune held in memory (what :func:`merge.sparse.extract` and friends return
    without ``out``); :meth:`save` writes the container byte for byte as ``out=path`` would."""

    def __init__(
        self,
        header: Header,
        entries: list[Entry],
        records: dict[str, Record],
        metadata: Mapping[str, str],
    ):
        super().__init__(
            header,
            entries,
            records.__getitem__,
            label="<sparse fine-tune>",
            kind="sparse fine-tune (in memory)",
            metadata=metadata,
        )
        self.records = records

    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the container file atomically.

        Raises:
            OutputError: the output exists (without ``overwrite``) or cannot be written.
        """
        out = Path(out)
        check_target(out, (), overwrite)
        entries = list(self.entries.values())

        def data(f: IO[bytes]) -> None:
            for e in entries:
                for part in self.records[e.name]:
                    f.write(memoryview(np.ascontiguousarray(part)).cast("B"))

        sizes = {e.name: self.records[e.name][0].size for e in entries if not e.dense}
        return write_atomically(out, _filler(entries, sizes, self.metadata, data))


def add_records(out: np.ndarray, streams: list[tuple[SparseSource, str, float]]) -> None:
    """``out += sum_j scale_j * delta_j`` for the sparse tensors ``(source, name, scale)``:
    decoding fused with the add, the sum exact and rounded once per touched entry.

    ``out`` is flat, of a kernel storage dtype (bf16 bits, float32, float64).

    Raises:
        CorruptFileError: a record is corrupt (checksum, truncated code, position past the end).
    """
    if not streams:
        return
    records = [src.record(name) for src, name, _ in streams]
    entries = [src.entries[name] for src, name, _ in streams]
    kind = np.float64 if any(e.values == "F64" or e.wide for e in entries) else np.float32
    values = [full_values(e, r, kind) for r, e in zip(records, entries, strict=True)]
    payloads = [r[0] for r in records]
    counts = np.array([e.count for e in entries], np.int64)
    status, j = compose(
        out,
        payloads[0] if len(payloads) == 1 else np.concatenate(payloads),
        _offsets([p.size for p in payloads]),
        counts,
        np.array([e.m for e in entries], np.int64),
        values[0] if len(values) == 1 else np.concatenate(values),
        _offsets(counts),
        np.array([s for _, _, s in streams], np.float64),
    )
    if status:
        src, name, _ = streams[j]
        try:
            check_status(status)
        except CodeError as err:
            raise CorruptFileError(f"{src.label}: tensor {name!r}: {err}") from None


def _offsets(sizes: Iterable[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(list(sizes), dtype=np.int64)]).astype(np.int64)


def full_values(e: Entry, record: Record, kind: type) -> np.ndarray:
    """A sparse tensor's values as ``kind`` (float32 or float64), float64 overrides applied."""
    values = as_float(record[1], e.values).astype(kind, copy=False)
    if e.wide:
        values = values.astype(np.float64)
        values[record[2]] = record[3]
    return values


def _suffixes(e: Entry) -> tuple[str, ...]:
    """The stored tensors of an entry, in file order."""
    if e.dense:
        return (DENSE,)
    return (POSITIONS, VALUES) + ((WIDE_INDEX, WIDE_VALUES) if e.wide else ())


def as_float(values: np.ndarray, code: str) -> np.ndarray:
    """A flat storage array of float dtype ``code`` as float32 (bf16, f16: exact) or float64."""
    if code == "BF16":
        return to_float32(values)
    if code == "F16":
        return values.astype(np.float32)
    return values


def _check_stored(file: FileSource, e: Entry) -> set[str]:
    where = f"{file.label}: tensor {e.name!r}"
    if e.dense:
        name = e.name + DENSE
        if name not in file.names_set:
            raise CorruptFileError(f"{where}: {name!r} is missing")
        if file.info(name) != TensorInfo(e.dtype, e.shape):
            raise CorruptFileError(f"{where}: {name!r} is not {e.dtype}{list(e.shape)}")
        return {name}
    if e.name + POSITIONS not in file.names_set:
        raise CorruptFileError(f"{where}: {e.name + POSITIONS!r} is missing")
    positions = file.info(e.name + POSITIONS)
    if positions.dtype != "U8" or len(positions.shape) != 1:
        raise CorruptFileError(f"{where}: {e.name + POSITIONS!r} is not 1-D U8")
    if (positions.numel == 0) != (e.count == 0):
        raise CorruptFileError(f"{where}: position payload does not match the count")
    shapes = {
        VALUES: TensorInfo(e.values, (e.count,)),
        WIDE_INDEX: TensorInfo("I64", (e.wide,)),
        WIDE_VALUES: TensorInfo("F64", (e.wide,)),
    }
    for suffix in _suffixes(e)[1:]:
        info = shapes[suffix]
        if e.name + suffix not in file.names_set:
            raise CorruptFileError(f"{where}: {e.name + suffix!r} is missing")
        if file.info(e.name + suffix) != info:
            raise CorruptFileError(
                f"{where}: {e.name + suffix!r} is not {info.dtype}{list(info.shape)}"
            )
    return {e.name + suffix for suffix in _suffixes(e)}


def _int(value: Any, what: str, lo: int, hi: float = math.inf) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"bad {what} {value!r}")
    return value


def _opt(value: Any, kind: type) -> Any:
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ValueError(f"bad value {value!r}")
    return value


def parse_metadata(meta: Mapping[str, str]) -> tuple[Header, list[Entry]]:
    """Header and entries from a container's ``__metadata__``.

    Raises:
        KeyError, TypeError, ValueError: a field is missing or malformed.
    """
    h = json.loads(meta[HEADER_KEY])
    density = h["density"]
    header = Header(
        origin=str(h["origin"]),
        density=None if density is None else float(density),
        count=_opt(h["count"], int),
        scope=_opt(h["scope"], str),
        values=_opt(h["values"], str),
        dense_patterns=tuple(str(p) for p in h["dense_patterns"]),
        parameters=_int(h["parameters"], "parameters", 0),
        kept=_int(h["kept"], "kept", 0),
        coded=_int(h["coded"], "coded", 0),
    )
    if header.origin not in ORIGINS:
        raise ValueError(f"unknown origin {header.origin!r}")
    entries, seen = [], set()
    for r in json.loads(meta[TENSORS_KEY]):
        name, dtype, kind = r["name"], r["dtype"], r["kind"]
        if not isinstance(name, str) or name in seen:
            raise ValueError(f"bad or repeated tensor name {name!r}")
        if kind not in ("sparse", "dense"):
            raise ValueError(f"tensor {name!r}: bad kind {kind!r}")
        dense = kind == "dense"
        if not isinstance(dtype, str) or not dtypes.is_float(dtype):
            raise ValueError(f"tensor {name!r}: bad dtype {dtype!r}")
        shape = tuple(_int(s, "shape", 0) for s in r["shape"])
        numel = math.prod(shape)
        values = r["values"]
        if (dense and values != dtype) or (not dense and values not in VALUE_DTYPES):
            raise ValueError(f"tensor {name!r}: bad value dtype {values!r}")
        count = _int(r["count"], f"tensor {name!r} count", numel if dense else 0, numel)
        m = _int(
            r["m"], f"tensor {name!r} Golomb parameter", 0 if dense else 1, 0 if dense else MAX_M
        )
        inexact = r["inexact"]
        if inexact is not None:
            inexact = _int(inexact, f"tensor {name!r} inexact count", 0, count)
        crc = _int(r["crc32"], f"tensor {name!r} crc32", 0, 2**32 - 1)
        wide = _int(r["wide"], f"tensor {name!r} wide count", 0, 0 if dense else count)
        entries.append(Entry(name, dtype, shape, dense, count, m, values, inexact, crc, wide))
        seen.add(name)
    sparse = [e for e in entries if not e.dense]
    if (
        sum(e.numel for e in sparse) != header.parameters
        or sum(e.count for e in sparse) != header.coded
    ):
        raise ValueError("tensor sizes or counts do not add up to the header's")
    return header, entries


def container_metadata(
    header: Header, entries: Iterable[Entry], provenance: Mapping[str, str]
) -> dict[str, str]:
    """The ``__metadata__`` of a container: provenance, format, header, tensor list."""
    meta = dict(provenance)
    meta[FORMAT_KEY] = FORMAT
    meta[VERSION_KEY] = str(VERSION)
    meta[HEADER_KEY] = _dump(header.entry())
    meta[TENSORS_KEY] = _dump([e.record() for e in entries])
    return meta


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def header_bytes(
    entries: Iterable[Entry], sizes: Mapping[str, int], metadata: Mapping[str, str]
) -> bytes:
    """The 8-byte header length and the JSON header, space-padded to a multiple of 8 bytes;
    ``sizes`` gives the positions payload bytes of every sparse tensor."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        if e.dense:
            parts = [(DENSE, e.dtype, list(e.shape), e.numel * dtypes.itemsize(e.dtype))]
        else:
            n = sizes[e.name]
            parts = [
                (POSITIONS, "U8", [n], n),
                (VALUES, e.values, [e.count], e.count * dtypes.itemsize(e.values)),
            ]
            if e.wide:
                parts += [(WIDE_INDEX, "I64", [e.wide], 8 * e.wide)]
                parts += [(WIDE_VALUES, "F64", [e.wide], 8 * e.wide)]
        for suffix, dtype, shape, nbytes in parts:
            header[e.name + suffix] = {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _filler(
    entries: list[Entry],
    sizes: Mapping[str, int],
    metadata: Mapping[str, str],
    data: Callable[[IO[bytes]], None],
) -> Callable[[IO[bytes]], None]:
    def fill(f: IO[bytes]) -> None:
        f.write(header_bytes(entries, sizes, metadata))
        data(f)

    return fill


class Builder:
    """Collects a fine-tune's tensors, in memory or spooled next to ``out``, and finishes it as
    a :class:`SparseFineTune` or an atomically written container."""

    def __init__(self, out: Path | None, overwrite: bool = False, inputs: Iterable[Any] = ()):
        self.out = out
        self.overwrite = overwrite
        self.inputs = tuple(inputs)
        self.entries: list[Entry] = []
        self.records: dict[str, Record] = {}
        self.sizes: dict[str, int] = {}
        self._spool: IO[bytes] | None = None

    def begin(self) -> None:
        """Check the output (before any work) and open the spool."""
        if self.out is not None:
            check_target(self.out, self.inputs, self.overwrite)
            self._spool = open(temp_path(self.out, ".payload"), "w+b")  # noqa: SIM115 - abort

    def add(self, entry: Entry, record: Record) -> None:
        """Add a tensor; its CRC-32 is computed here."""
        record = tuple(np.ascontiguousarray(part) for part in record)
        entry = Entry(**(asdict(entry) | {"crc32": checksum(record)}))
        self.entries.append(entry)
        if not entry.dense:
            self.sizes[entry.name] = record[0].size
        if self._spool is None:
            self.records[entry.name] = record
            return
        for part in record:
            self._spool.write(memoryview(part).cast("B"))

    def finish(self, header: Header, provenance: Mapping[str, str]) -> Path | SparseFineTune:
        """The container (in memory, or written atomically to ``out``)."""
        meta = container_metadata(header, self.entries, provenance)
        if self._spool is None:
            return SparseFineTune(header, self.entries, self.records, meta)
        spool = self._spool
        assert self.out is not None

        def data(f: IO[bytes]) -> None:
            spool.seek(0)
            shutil.copyfileobj(spool, f, 1 << 22)

        write_atomically(self.out, _filler(self.entries, self.sizes, meta, data))
        self.abort()
        return self.out

    def abort(self) -> None:
        """Remove the spool."""
        if self._spool is not None:
            self._spool.close()
            Path(self._spool.name).unlink(missing_ok=True)
            self._spool = None
