"""The ComPEFT container: a safetensors file of uint8 payloads, read lazily, written atomically.

Layout (byte for byte in docs/formats.md): for every compressed tensor ``NAME``, in the order
of the ``adapt_compeft_tensors`` list, the tensors ``NAME.positions`` (the Golomb code of its
kept positions, ``merge.kernels.positions``) and ``NAME.signs`` (one bit per coded position),
both ``U8`` and 1-D, contiguous; ``__metadata__`` holds the format name and version, the
parameters (density, alpha, sigma, scale...), every original name, dtype, shape, coded count,
Golomb parameter and CRC-32, and the provenance.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .. import dtypes
from ..errors import CorruptFileError, InputError, OutputError
from ..kernels.positions import MAX_M, CodeError, scatter_add_ternary, scatter_ternary
from ..plan import Plan
from ..safetensors_file import TensorInfo
from ..sources import FileSource, Source, _Names
from ..writer import check_output

FORMAT = "compeft"
VERSION = 1
FORMAT_KEY = "adapt_format"
VERSION_KEY = "adapt_format_version"
HEADER_KEY = "adapt_compeft"
TENSORS_KEY = "adapt_compeft_tensors"
ADAPTER_KEY = "adapt_compeft_adapter_config"
POSITIONS, SIGNS = ".positions", ".signs"
UPDATES = ("full", "task_vector", "lora", "ia3")  # what was compressed (see compress)


def bound_bits(density: float) -> float:
    """The entropy bound of a ternary update per parameter: H(d) + d bits (0 at d = 0 or 1)."""
    if density <= 0.0:
        return 0.0
    if density >= 1.0:
        return 1.0
    return -density * math.log2(density) - (1 - density) * math.log2(1 - density) + density


@dataclass(frozen=True)
class Header:
    """File-level facts: the update kind, the parameters and the one scale."""

    update: str  # "full" (fine-tune - base), "task_vector", "lora" or "ia3"
    baseline: float  # decoded adapter values are baseline + update (0 LoRA, 1 (IA)3)
    density: float
    alpha: float
    scope: str  # "global" or "tensor"
    sigma: float  # std of the unpruned update, ddof = 1
    scale: float  # float32(alpha * sigma): every kept entry decodes to +-scale
    parameters: int  # entries in the compressed tensors
    kept: int  # entries selected by top-k (exactly round(density * parameters) when global)
    coded: int  # kept entries that are nonzero (the ones stored)


@dataclass(frozen=True)
class TensorCode:
    """One compressed tensor: its original name, dtype and shape, and how it is coded."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    count: int  # coded positions
    m: int  # Golomb parameter
    crc32: int  # of the positions payload followed by the signs payload

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def entry(self) -> dict[str, Any]:
        return asdict(self) | {"shape": list(self.shape)}


def checksum(positions: np.ndarray, signs: np.ndarray) -> int:
    """CRC-32 of a tensor's positions payload followed by its signs payload."""
    return zlib.crc32(signs, zlib.crc32(positions))


Payload = tuple[np.ndarray, np.ndarray]


class CompressedSource(_Names):
    """A compressed update as a lazy source of task vectors (``delta = True``).

    Every tensor reads back as float32 ``±scale`` at its coded positions and 0 elsewhere, so
    a compressed expert is accepted wherever a task vector is (``adapt merge --base``).
    """

    def __init__(
        self,
        header: Header,
        codes: Iterable[TensorCode],
        payload: Callable[[str], Payload],
        sizes: Mapping[str, tuple[int, int]],
        *,
        label: str,
        kind: str,
        files: tuple[Path, ...] = (),
        metadata: Mapping[str, str] | None = None,
        adapter_config: dict[str, Any] | None = None,
    ):
        self.header = header
        self.codes = {c.name: c for c in codes}
        self.adapter_config = adapter_config
        self.label = label
        self.kind = kind
        self.folder = None
        self.files = files
        self.metadata = dict(metadata or {})
        self.delta = True
        self.sizes = dict(sizes)  # name -> (positions bytes, signs bytes)
        self._payload = payload

    @property
    def names(self) -> list[str]:
        return list(self.codes)

    def info(self, name: str) -> TensorInfo:
        return TensorInfo("F32", self.codes[name].shape)

    def payload(self, name: str) -> Payload:
        """The checked ``(positions, signs)`` payloads of a tensor."""
        code = self.codes[name]
        positions, signs = self._payload(name)
        if checksum(positions, signs) != code.crc32:
            raise CorruptFileError(
                f"{self.label}: tensor {name!r}: payload checksum mismatch (corrupt file)"
            )
        return positions, signs

    def read(self, name: str) -> np.ndarray:
        """The decoded update of one tensor, float32, flat."""
        out = np.zeros(self.codes[name].numel, np.float32)
        self._decode(name, out, scatter_ternary)
        return out

    def add_into(self, name: str, out: np.ndarray) -> None:
        """``out += decoded update`` for one tensor, decoding fused with the add (O(kept)).

        ``out`` is flat, of a kernel storage dtype (bf16 bits, float32, float64); each touched
        entry is computed in float64 and rounded once.
        """
        self._decode(name, out, scatter_add_ternary)

    def _decode(self, name: str, out: np.ndarray, kernel: Callable[..., None]) -> None:
        code = self.codes[name]
        positions, signs = self.payload(name)
        try:
            kernel(positions, code.count, code.m, signs, np.float32(self.header.scale), out)
        except CodeError as e:
            raise CorruptFileError(f"{self.label}: tensor {name!r}: {e}") from None

    @property
    def payload_bytes(self) -> int:
        """Bytes of all position and sign payloads."""
        return sum(p + s for p, s in self.sizes.values())

    @classmethod
    def from_file(cls, file: FileSource) -> CompressedSource:
        """Validate a container's header (no payload is read) and wrap it.

        Raises:
            InputError: the format version is not one this adapt reads.
            CorruptFileError: the header is inconsistent with the payload tensors.
        """
        path = file.label
        meta = file.metadata
        check_version(file, "ComPEFT", VERSION)
        try:
            header, codes, adapter_config = parse_metadata(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path}: corrupt ComPEFT header ({e})") from None
        expected = set()
        for code in codes:
            _check_payloads(file, code)
            expected |= {code.name + POSITIONS, code.name + SIGNS}
        extra = sorted(set(file.names) - expected)
        if extra:
            raise CorruptFileError(f"{path}: tensor {extra[0]!r} is not part of the ComPEFT data")

        def payload(name: str) -> Payload:
            return file.read(name + POSITIONS), file.read(name + SIGNS)

        sizes = {
            c.name: (_numel(file, c.name + POSITIONS), _numel(file, c.name + SIGNS)) for c in codes
        }
        return cls(
            header,
            codes,
            payload,
            sizes,
            label=path,
            kind="ComPEFT file",
            files=file.files,
            metadata=meta,
            adapter_config=adapter_config,
        )


class CompressedExpert(CompressedSource):
    """A compressed update held in memory (what :func:`merge.compeft.compress` returns without
    ``out``): a source like a container file, which :meth:`save` writes byte for byte as
    ``compress(..., out=path)`` would."""

    def __init__(
        self,
        header: Header,
        codes: list[TensorCode],
        payloads: dict[str, Payload],
        metadata: Mapping[str, str],
        adapter_config: dict[str, Any] | None = None,
    ):
        sizes = {name: (p.size, s.size) for name, (p, s) in payloads.items()}
        super().__init__(
            header,
            codes,
            payloads.__getitem__,
            sizes,
            label="<compressed expert>",
            kind="ComPEFT expert",
            metadata=metadata,
            adapter_config=adapter_config,
        )
        self.payloads = payloads

    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the container file atomically.

        Raises:
            OutputError: the output exists (without ``overwrite``) or cannot be written.
        """
        out = Path(out)
        check_target(out, (), overwrite)
        codes = list(self.codes.values())

        def data(f: IO[bytes]) -> None:
            for code in codes:
                for part in self.payloads[code.name]:
                    f.write(memoryview(part))

        return write_container(out, codes, self.sizes, self.metadata, data)

    def to_state_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The decoded tensors as ``torch`` tensors: the task vector (``±scale`` and 0), or
        the adapter's parameters (baseline + update), in the original dtypes or ``dtype``."""
        from .use import decompress

        return decompress(self, dtype=dtype)  # type: ignore[return-value]


def _numel(file: FileSource, name: str) -> int:
    return file.info(name).numel


def _check_payloads(file: FileSource, code: TensorCode) -> None:
    where = f"{file.label}: tensor {code.name!r}"
    for suffix in (POSITIONS, SIGNS):
        if code.name + suffix not in file.names_set:
            raise CorruptFileError(f"{where}: payload {code.name + suffix!r} is missing")
        info = file.info(code.name + suffix)
        if info.dtype != "U8" or len(info.shape) != 1:
            raise CorruptFileError(f"{where}: payload {code.name + suffix!r} is not 1-D U8")
    if file.info(code.name + SIGNS).numel != (code.count + 7) // 8:
        raise CorruptFileError(f"{where}: {code.count} signs need {(code.count + 7) // 8} bytes")
    if (file.info(code.name + POSITIONS).numel == 0) != (code.count == 0):
        raise CorruptFileError(f"{where}: position payload does not match the count")


def _int(value: Any, what: str, lo: int, hi: float = math.inf) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"bad {what} {value!r}")
    return value


def parse_metadata(
    meta: Mapping[str, str],
) -> tuple[Header, list[TensorCode], dict[str, Any] | None]:
    """Header, tensor codes and adapter config from a container's ``__metadata__``.

    Raises:
        KeyError, TypeError, ValueError: a field is missing or malformed.
    """
    h = json.loads(meta[HEADER_KEY])
    header = Header(
        update=str(h["update"]),
        baseline=float(h["baseline"]),
        density=float(h["density"]),
        alpha=float(h["alpha"]),
        scope=str(h["scope"]),
        sigma=float(h["sigma"]),
        scale=float(h["scale"]),
        parameters=_int(h["parameters"], "parameters", 0),
        kept=_int(h["kept"], "kept", 0),
        coded=_int(h["coded"], "coded", 0),
    )
    if header.update not in UPDATES:
        raise ValueError(f"unknown update kind {header.update!r}")
    codes, seen = [], set()
    for e in json.loads(meta[TENSORS_KEY]):
        name, dtype, shape = e["name"], e["dtype"], e["shape"]
        if not isinstance(name, str) or name in seen:
            raise ValueError(f"bad or repeated tensor name {name!r}")
        if not isinstance(dtype, str) or not dtypes.is_float(dtype):
            raise ValueError(f"tensor {name!r}: bad dtype {dtype!r}")
        shape = tuple(_int(s, "shape", 0) for s in shape)
        count = _int(e["count"], f"tensor {name!r} count", 0, math.prod(shape))
        codes.append(
            TensorCode(
                name,
                dtype,
                shape,
                count,
                _int(e["m"], f"tensor {name!r} Golomb parameter", 1, MAX_M),
                _int(e["crc32"], f"tensor {name!r} crc32", 0, 2**32 - 1),
            )
        )
        seen.add(name)
    if (
        sum(c.numel for c in codes) != header.parameters
        or sum(c.count for c in codes) != header.coded
    ):
        raise ValueError("tensor sizes or counts do not add up to the header's")
    config = json.loads(meta[ADAPTER_KEY]) if ADAPTER_KEY in meta else None
    return header, codes, config


def container_metadata(
    header: Header,
    codes: Iterable[TensorCode],
    adapter_config: dict[str, Any] | None,
    provenance: Mapping[str, str],
) -> dict[str, str]:
    """The ``__metadata__`` of a container: provenance, format, header, tensor list."""
    meta = dict(provenance)
    meta[FORMAT_KEY] = FORMAT
    meta[VERSION_KEY] = str(VERSION)
    meta[HEADER_KEY] = _dump(asdict(header))
    meta[TENSORS_KEY] = _dump([c.entry() for c in codes])
    if adapter_config is not None:
        meta[ADAPTER_KEY] = _dump(adapter_config)
    return meta


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def header_bytes(
    codes: Iterable[TensorCode], sizes: Mapping[str, tuple[int, int]], metadata: Mapping[str, str]
) -> bytes:
    """The 8-byte header length and the JSON header, space-padded to a multiple of 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for code in codes:
        for suffix, n in zip((POSITIONS, SIGNS), sizes[code.name], strict=True):
            header[code.name + suffix] = {
                "dtype": "U8",
                "shape": [n],
                "data_offsets": [offset, offset + n],
            }
            offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def check_version(file: FileSource, what: str, version: int) -> None:
    """Refuse a container whose format version this adapt does not read.

    Raises:
        InputError: naming the file, the format and both versions.
    """
    found = file.metadata.get(VERSION_KEY)
    if found != str(version):
        raise InputError(
            f"{file.label}: {what} format version {found!r} is not supported (this adapt reads "
            f"version {version}); upgrade adapt"
        )


def check_target(out: Path, inputs: Iterable[Source], overwrite: bool) -> None:
    """Refuse an output that overwrites an input, exists, is a folder or has no folder."""
    check_output(out, Plan((), tuple(inputs), None), overwrite)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name ending in .safetensors")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")


def temp_path(out: Path, suffix: str = "") -> Path:
    """A temporary name next to ``out`` (same folder, so the final rename is atomic)."""
    return out.parent / f".{out.name}.adapt-tmp-{os.getpid()}{suffix}"


def write_atomically(out: Path, fill: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``fill`` to a temporary name next to ``out``, then rename it.

    Raises:
        OutputError: the output cannot be written; nothing is left behind.
    """
    tmp = temp_path(out)
    try:
        with open(tmp, "wb") as f:
            fill(f)
        os.replace(tmp, out)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_container(
    out: Path,
    codes: list[TensorCode],
    sizes: Mapping[str, tuple[int, int]],
    metadata: Mapping[str, str],
    data: Callable[[IO[bytes]], None],
) -> Path:
    """Write a container atomically: header, then the payloads ``data`` writes in code order."""

    def fill(f: IO[bytes]) -> None:
        f.write(header_bytes(codes, sizes, metadata))
        data(f)

    return write_atomically(out, fill)
