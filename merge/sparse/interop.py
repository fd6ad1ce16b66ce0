"""Other tools' sparse fine-tunes, read as :class:`SparseSource`s in adapt's layout.

- composable-sft (Ansell et al. 2022): ``pytorch_diff.bin``, a ``torch.save`` pickle of
  ``{"diffs": {name: {"size": torch.Size, "index_steps": list | tensor, "values": tensor}},
  "abs": {name: tensor}}``. The flat index is COLUMN-major (first dimension fastest), sorted,
  delta-coded (``index_steps`` = first index, then differences); ``abs`` holds tensors stored
  whole (heads). Loaded only when asked (``allow_pickle``), and only with
  ``torch.load(weights_only=True)`` (numpy integer scalars allowed: composable-sft saves the
  first step as one).
- SpIEL / PEFT-SFT (Ansell et al. 2024, the ``AlanAnsell/peft`` fork): a PEFT adapter folder,
  ``adapter_config.json`` with ``"peft_type": "SFT"`` and ``adapter_model.safetensors`` with
  ``base_model.model.<module>.sft_delta.indices`` (ROW-major flat indices into
  ``<module>.weight``, int32 or int64) and ``...sft_delta.values``; any other key
  (``modules_to_save``) is a tensor stored whole. The adapter does not record the weights'
  shapes, so reading one needs the base model.

Indices are checked (range, duplicates), sorted to row-major order with their values, and
coded with the position code on demand.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import dtypes
from ..api import Input, _as_source
from ..errors import (
    CorruptFileError,
    InputError,
    MismatchError,
    ParameterError,
    SourceNotFoundError,
)
from ..kernels.positions import encode_positions, golomb_parameter
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from ..provenance import Provenance
from ..safetensors_file import SafetensorsFile
from ..sources import Source, open_source
from .container import (
    CONTENT,
    VALUE_DTYPES,
    Builder,
    Entry,
    Header,
    Record,
    SparseFineTune,
    SparseSource,
)

DIFF_FILE = "pytorch_diff.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SPIEL_INDICES, SPIEL_VALUES = ".sft_delta.indices", ".sft_delta.values"


def open_sparse(
    path: str | os.PathLike[str] | SparseSource,
    *,
    base: Input | None = None,
    allow_pickle: bool = False,
) -> SparseSource:
    """Open a sparse fine-tune: an adapt container, a composable-sft ``pytorch_diff.bin`` (or
    its folder), or a SpIEL adapter folder or ``.safetensors`` file.

    Args:
        base: the base model; needed for SpIEL adapters (their shapes), checked against
            otherwise.
        allow_pickle: load composable-sft pickles (with ``torch.load(weights_only=True)``).

    Raises:
        ParameterError: a pickle without ``allow_pickle``, a SpIEL adapter without ``base``.
        InputError: the path holds no sparse fine-tune.
        CorruptFileError: the file does not follow its format.
    """
    if isinstance(path, SparseSource):
        return path
    p = Path(path)
    if p.is_dir() and (p / ADAPTER_CONFIG).is_file():
        return _spiel(p / ADAPTER_WEIGHTS, p / ADAPTER_CONFIG, base)
    if p.is_dir() and (p / DIFF_FILE).is_file():
        return _composable(p / DIFF_FILE, base, allow_pickle)
    if p.is_file() and p.suffix in PICKLE_SUFFIXES:
        return _composable(p, base, allow_pickle)
    src = open_source(p)
    if isinstance(src, SparseSource):
        return src
    if src.kind == "safetensors file" and any(n.endswith(SPIEL_INDICES) for n in src.names):
        config = p.parent / ADAPTER_CONFIG
        return _spiel(p, config if config.is_file() else None, base)
    raise InputError(
        f"{src.label}: not a sparse fine-tune (an adapt .sft.safetensors container, a "
        f"composable-sft {DIFF_FILE} or a SpIEL adapter)"
    )


def _header(origin: str, entries: list[Entry]) -> Header:
    sparse = [e for e in entries if not e.dense]
    coded = sum(e.count for e in sparse)
    return Header(origin, None, None, None, None, (), sum(e.numel for e in sparse), coded, coded)


def _sorted(
    where: str, positions: np.ndarray, values: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions checked to lie in ``[0, n)`` and be distinct, sorted with their values."""
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        bad = positions[(positions < 0) | (positions >= n)][0]
        raise CorruptFileError(f"{where}: index {bad} out of range for a tensor of {n} entries")
    if positions.size > 1 and not (np.diff(positions) > 0).all():
        order = np.argsort(positions, kind="stable")
        positions, values = positions[order], values[order]
        if not (np.diff(positions) > 0).all():
            dup = positions[1:][np.diff(positions) == 0][0]
            raise CorruptFileError(f"{where}: index {dup} appears twice")
    return positions, values


def _coded(where: str, positions: np.ndarray, values: np.ndarray, e: Entry) -> Record:
    positions, values = _sorted(where, positions, values, e.numel)
    return encode_positions(positions, e.numel, e.m)[0], values


def _value_code(where: str, dtype: Any) -> str:
    code = dtypes.code_of_torch(dtype)
    if code not in VALUE_DTYPES:
        raise CorruptFileError(f"{where}: values of dtype {dtype} (float values expected)")
    return code


def _model_dtype(base: Source | None, name: str, shape: tuple[int, ...], fallback: str) -> str:
    """The base's dtype of tensor ``name`` (its shape checked), or ``fallback`` without a base."""
    if base is None:
        return fallback
    if name not in base.names_set:
        raise MismatchError(f"tensor {name!r} is not in the base {base.label}")
    info = base.info(name)
    if info.shape != shape:
        raise MismatchError(
            f"tensor {name!r}: shape {list(info.shape)} in {base.label} but {list(shape)} in the "
            "sparse fine-tune"
        )
    return info.dtype if dtypes.is_float(info.dtype) else fallback


# --------------------------------------------------------------------------- composable-sft


def _torch_load(path: Path) -> Any:
    import torch

    scalar = np.dtype(np.int64).type(0).__reduce__()[0]  # numpy's scalar reconstructor
    allowed = [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),  # pickled by numpy 1
        np.dtype,
        type(np.dtype(np.int64)),
        type(np.dtype(np.int32)),
    ]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": not one line
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        raise CorruptFileError(
            f"{path}: not loadable with torch.load(weights_only=True): {reason}"
        ) from None


def _composable(path: Path, base: Input | None, allow_pickle: bool) -> SparseSource:
    if not allow_pickle:
        raise ParameterError(
            f"{path}: is a pickle (composable-sft {DIFF_FILE}); pass --allow-pickle to load it "
            "with torch.load(weights_only=True)"
        )
    if not path.is_file():
        raise SourceNotFoundError(f"{path}: no such file")
    obj = _torch_load(path)
    base_src = _as_source(base, "<base>") if base is not None else None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("diffs", {}), Mapping):
        raise CorruptFileError(f"{path}: not a composable-sft file (no 'diffs' mapping)")
    abs_ = obj.get("abs") or {}
    if not isinstance(abs_, Mapping):
        raise CorruptFileError(f"{path}: 'abs' is not a mapping")
    entries: list[Entry] = []
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, d in (obj.get("diffs") or {}).items():
        where = f"{path}: tensor {name!r}"
        try:
            shape = tuple(int(s) for s in d["size"])
            steps = np.asarray(d["index_steps"], dtype=np.int64).reshape(-1)
            values = d["values"]
            code = _value_code(where, values.dtype)
            values = dtypes.to_numpy(values, code)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptFileError(f"{where}: bad diff entry ({e})") from None
        if steps.size != values.size:
            raise CorruptFileError(f"{where}: {steps.size} index steps but {values.size} values")
        numel = int(np.prod(shape))
        if steps.size > numel:
            raise CorruptFileError(f"{where}: {steps.size} indices for {numel} entries")
        dtype = _model_dtype(base_src, name, shape, code)
        m = golomb_parameter(steps.size, numel)
        entries.append(Entry(name, dtype, shape, False, steps.size, m, code, None, None))
        parts[name] = (steps, values)
    for name, t in abs_.items():
        where = f"{path}: tensor {name!r}"
        code = _value_code(where, getattr(t, "dtype", None))
        shape = tuple(int(s) for s in t.shape)
        parts[name] = (dtypes.to_numpy(t, code),)  # type: ignore[assignment]
        _model_dtype(base_src, name, shape, code)
        entries.append(Entry(name, code, shape, True, int(np.prod(shape)), 0, code, None, None))
    by_name = {e.name: e for e in entries}

    def fetch(name: str) -> Record:
        e = by_name[name]
        if e.dense:
            return parts[name]
        steps, values = parts[name]
        where = f"{path}: tensor {name!r}"
        flat = np.cumsum(steps)
        if steps.size > 1 and (steps[1:] <= 0).any():
            raise CorruptFileError(f"{where}: index_steps are not increasing (unsorted indices)")
        if flat.size and (flat[0] < 0 or flat[-1] >= e.numel):
            bad = flat[0] if flat[0] < 0 else flat[-1]
            raise CorruptFileError(
                f"{where}: index {bad} out of range for a tensor of {e.numel} entries"
            )
        if len(e.shape) > 1:  # column-major (first dimension fastest) -> row-major
            flat = np.ravel_multi_index(np.unravel_index(flat, e.shape, order="F"), e.shape)
        return _coded(where, flat, values, e)

    return SparseSource(
        _header("composable-sft", entries),
        entries,
        fetch,
        label=str(path),
        kind="composable-sft file",
        files=(path,),
    )


# --------------------------------------------------------------------------- SpIEL


def _spiel(weights: Path, config: Path | None, base: Input | None) -> SparseSource:
    if config is not None:
        try:
            peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            raise CorruptFileError(f"{config}: bad adapter config ({e})") from None
        if peft_type != "SFT":
            raise InputError(
                f'{config}: peft_type {peft_type!r} is not a SpIEL sparse fine-tune ("SFT")'
            )
    if not weights.is_file():
        raise SourceNotFoundError(f"{weights}: no such file")
    if base is None:
        raise ParameterError(
            f"{weights}: a SpIEL adapter does not record its weights' shapes: give the base "
            "model (--base)"
        )
    base_src = _as_source(base, "<base>")
    file = SafetensorsFile(weights)
    modules: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for key in file.names:
        name = key.removeprefix(PREFIX)
        for suffix in (SPIEL_INDICES, SPIEL_VALUES):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)] + ".weight", {})[suffix] = key
                break
        else:
            whole[name] = key
    entries: list[Entry] = []
    for name, keys in modules.items():
        where = f"{weights}: tensor {name!r}"
        if len(keys) != 2:
            raise CorruptFileError(f"{where}: needs both sft_delta.indices and sft_delta.values")
        idx, val = file.info(keys[SPIEL_INDICES]), file.info(keys[SPIEL_VALUES])
        if idx.dtype not in ("I32", "I64") or len(idx.shape) != 1:
            raise CorruptFileError(f"{where}: indices must be 1-D int32 or int64")
        if val.dtype not in VALUE_DTYPES or val.shape != idx.shape:
            raise CorruptFileError(f"{where}: values must be 1-D floats, one per index")
        if name not in base_src.names_set:
            raise MismatchError(f"{where}: the base {base_src.label} has no such tensor")
        info = base_src.info(name)
        if idx.numel > info.numel:
            raise CorruptFileError(f"{where}: {idx.numel} indices for {info.numel} entries")
        m = golomb_parameter(idx.numel, info.numel)
        entries.append(
            Entry(name, info.dtype, info.shape, False, idx.numel, m, val.dtype, None, None)
        )
    for name, key in whole.items():
        info = file.info(key)
        if not dtypes.is_float(info.dtype):
            raise CorruptFileError(f"{weights}: tensor {key!r} is not a float tensor")
        _model_dtype(base_src, name, info.shape, info.dtype)
        entries.append(
            Entry(name, info.dtype, info.shape, True, info.numel, 0, info.dtype, None, None)
        )
    by_name = {e.name: e for e in entries}

    def fetch(name: str) -> Record:
        e = by_name[name]
        if e.dense:
            return (file.read(whole[name]),)
        keys = modules[name]
        positions = file.read(keys[SPIEL_INDICES]).astype(np.int64)
        return _coded(f"{weights}: tensor {name!r}", positions, file.read(keys[SPIEL_VALUES]), e)

    return SparseSource(
        _header("spiel", entries),
        entries,
        fetch,
        label=str(weights.parent if config is not None else weights),
        kind="SpIEL adapter",
        files=(weights,) + ((config,) if config is not None else ()),
    )


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Convert:
    """Provenance of :func:`convert`."""

    origin: str
    name: ClassVar[str] = "sparse-convert"
    content: ClassVar[str] = CONTENT

    def parameters(self) -> dict[str, Any]:
        return {"from": self.origin}


def convert(
    path: str | os.PathLike[str] | SparseSource,
    out: str | os.PathLike[str] | None = None,
    *,
    base: Input | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path | SparseFineTune:
    """Rewrite any sparse fine-tune :func:`open_sparse` reads as an adapt container.

    Returns:
        The output path, or a :class:`SparseFineTune` when ``out`` is None.

    Example:
        >>> convert("l/pytorch_diff.bin", "l.sft.safetensors", allow_pickle=True)  # doctest: +SKIP
    """
    base_src = _as_source(base, "<base>") if base is not None else None
    src = open_sparse(path, base=base_src, allow_pickle=allow_pickle)
    sources: tuple[Source, ...] = (src,) + ((base_src,) if base_src is not None else ())
    builder = Builder(Path(out) if out is not None else None, overwrite, sources)
    roles = ("sft",) + (("base",) if base_src is not None else ())
    prov = Provenance(Convert(src.header.origin), sources, roles)  # type: ignore[arg-type]
    try:
        builder.begin()
        for name, e in src.entries.items():
            builder.add(e, src.record(name))
        return builder.finish(src.header, prov.metadata(final=True))
    except BaseException:
        prov.cancel()
        builder.abort()
        raise
