"""ComPEFT compression: exact top-k of an update, kept entries -> sign * alpha * sigma, coded.

The update ``tau`` is computed tensor by tensor (names sorted) and never held whole:

- global scope: a ~2M-entry sample predicts the threshold; pass 1 (``FirstPass``) gathers the
  moments (sigma), the high-bits histogram of :class:`~merge.kernels.select.GlobalTopK` and
  the low-bits histograms of a window of bins around the prediction; an extra low-bits pass
  runs only when the threshold's bin is outside the window; the last pass selects and codes
  each tensor;
- tensor scope: one pass; each tensor keeps ``round(density * numel)`` entries.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from .. import dtypes
from ..api import Input, _as_source
from ..engine import _check_carried
from ..errors import (
    InputError,
    NonFiniteError,
    OutputError,
    ParameterError,
    SourceNotFoundError,
)
from ..kernels.compeft import FirstPass, Moments, residual
from ..kernels.convert import to_float32
from ..kernels.positions import encode_difference, encode_selection
from ..kernels.select import GlobalTopK, count_for_density, topk_threshold
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..plan import Plan, PlannedTensor, build_plan
from ..provenance import Provenance
from ..safetensors_file import SafetensorsFile
from ..sources import FileSource, ShardedSource, Source
from .container import (
    CompressedExpert,
    CompressedSource,
    Header,
    Payload,
    TensorCode,
    check_target,
    checksum,
    container_metadata,
    temp_path,
    write_container,
)

CITATION = (
    "Yadav et al., ComPEFT: Compression for Communicating Parameter Efficient Updates via "
    "Sparsification and Quantization, arXiv:2311.13171"
)
SCOPES = ("global", "tensor")
SAMPLE = 1 << 21  # entries sampled to predict the global threshold
BLOCK = 1 << 12  # sampled in contiguous blocks of this many entries
MARGIN = 0.1  # relative error of the predicted rank that the window covers
WINDOW_BYTES = 64 << 20  # at most this much memory for the window's per-thread counts
_PEFT_TYPES = {"LORA": ("lora", 0.0), "IA3": ("ia3", 1.0)}


@dataclass(frozen=True)
class ComPEFT:
    """ComPEFT's parameters, as provenance records them."""

    density: float
    alpha: float
    scope: str
    update: str
    name: ClassVar[str] = "compeft"
    citation: ClassVar[str] = CITATION
    content: ClassVar[str] = "compeft"

    def parameters(self) -> dict[str, Any]:
        return {
            "density": self.density,
            "alpha": self.alpha,
            "scope": self.scope,
            "update": self.update,
            "sigma_ddof": 1,
        }


def check_parameters(density: float, alpha: float, scope: str) -> None:
    """Raise ParameterError unless 0 < density < 1, alpha > 0 (finite), scope is known."""
    if not 0.0 < density < 1.0:
        raise ParameterError(f"--density must be in (0, 1), got {density}")
    if not (np.isfinite(alpha) and alpha > 0.0):
        raise ParameterError(f"--alpha must be a positive number, got {alpha}")
    if scope not in SCOPES:
        raise ParameterError(f"--scope must be global or tensor, got {scope!r}")


class _Reader:
    """Reads a source's tensors into one reused buffer (no fresh pages to fault in for every
    tensor of every pass), and samples blocks of a tensor with positioned reads."""

    def __init__(self, src: Source):
        self.src = src
        self._bufs = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
        self._where: dict[str, tuple[Path, int]] = {}  # safetensors-backed: file, data start
        if isinstance(src, (FileSource, ShardedSource)):
            for path in src.files:
                f = SafetensorsFile(path)
                for name in f.names:
                    if name in src.names_set and f.info(name) == src.info(name):
                        self._where[name] = (path, f.span(name)[0])

    def read(self, name: str, code: str, slot: int) -> np.ndarray:
        """The tensor as a flat array of its storage dtype, in buffer ``slot`` (0 or 1): valid
        until that slot is read into again."""
        read_into = getattr(self.src, "read_into", None)
        if read_into is None:
            return self.src.read(name)
        storage = dtypes.storage(code)
        nbytes = self.src.info(name).numel * storage.itemsize
        if self._bufs[slot].size < nbytes:
            self._bufs[slot] = np.empty(nbytes, np.uint8)
        out = self._bufs[slot][:nbytes].view(storage)
        read_into(name, out)
        return out

    def blocks(self, name: str, code: str, starts: range, block: int) -> np.ndarray:
        """Entries ``[s, s + block)`` for every ``s`` in ``starts``, concatenated."""
        where = self._where.get(name)
        if where is None:
            return _blocks(self.src.read(name), starts, block)
        path, begin = where
        storage = dtypes.storage(code)
        n = self.src.info(name).numel
        parts = [np.empty(min(n, s + block) - s, storage) for s in starts]
        with open(path, "rb", buffering=0) as f:
            for s, part in zip(starts, parts, strict=True):
                offset = begin + s * storage.itemsize
                got = os.preadv(f.fileno(), [memoryview(part).cast("B")], offset)
                if got != part.nbytes:  # truncated since opened: the source reports it
                    return _blocks(self.src.read(name), starts, block)
        return np.concatenate(parts)


def _blocks(x: np.ndarray, starts: range, block: int) -> np.ndarray:
    return np.concatenate([x[s : s + block] for s in starts])


class _Update:
    """The update, tensor by tensor: ``finetuned - base``, a task vector, or an adapter's
    parameters minus their baseline (0 for LoRA, 1 for (IA)3), as flat float32."""

    def __init__(
        self,
        kind: str,
        plan: Plan,
        roles: tuple[str, ...],
        baseline: float = 0.0,
        adapter_config: dict[str, Any] | None = None,
    ):
        self.kind = kind
        self.plan = plan
        self.roles = roles
        self.baseline = baseline
        self.adapter_config = adapter_config
        self.tensors = sorted((t for t in plan.tensors if t.merged), key=lambda t: t.name)
        self.parameters = sum(t.out_info.numel for t in self.tensors)
        largest = max((t.out_info.numel for t in self.tensors), default=0)
        self._scratch = np.empty(largest if kind == "full" else 0, np.float32)
        self._readers = [_Reader(src) for src in plan.sources]

    @property
    def label(self) -> str:
        return self.plan.inputs[0].label

    def check_carried(self) -> None:
        """A full fine-tune must not change integer or bool tensors (no update can say so)."""
        if self.kind != "full":
            return
        for t in self.plan.tensors:
            if not t.merged:
                _check_carried(self.plan, t, [src.read(t.name) for src in self.plan.sources])

    def stream(self) -> Iterator[tuple[PlannedTensor, list[np.ndarray]]]:
        """Every tensor with its inputs' arrays (storage dtypes), valid until the next step;
        the next tensor is read on a thread meanwhile (file reads only: numba's workqueue
        layer serves one calling thread, so kernels stay on this one)."""
        tensors = self.tensors
        with ThreadPoolExecutor(1, thread_name_prefix="adapt-read") as pool:
            ahead = pool.submit(self._read, tensors[0], 0) if tensors else None
            for i, t in enumerate(tensors):
                assert ahead is not None
                arrays = ahead.result()
                if i + 1 < len(tensors):
                    ahead = pool.submit(self._read, tensors[i + 1], (i + 1) % 2)
                yield t, arrays

    def first_pass(
        self, t: PlannedTensor, arrays: list[np.ndarray], first: FirstPass, moments: Moments
    ) -> None:
        """Add one tensor's update to pass 1 and to the moments (NaN/Inf raise
        NonFiniteError); the update itself is never written."""
        x = _kernel_arrays(arrays, t.in_dtypes)
        stats = (
            first.add(x[1], x[0]) if self.kind == "full" else first.add(x[0], None, self.baseline)
        )
        if not stats[3]:
            self.nonfinite(t)
        moments.add(*stats[:3])

    def tau(self, t: PlannedTensor, arrays: list[np.ndarray]) -> np.ndarray:
        """The update of one tensor, flat float32 (a view of a scratch buffer or its own)."""
        return self._compute(t, arrays, self._scratch[: t.out_info.numel])

    def sample(self, t: PlannedTensor, block: int, stride: int, first: int) -> np.ndarray:
        """The update at entries ``[s, s + block)`` of one tensor, for ``s = first, first +
        stride, ...`` (float32, flat; not checked for NaN/Inf)."""
        starts = range(first, t.out_info.numel, stride)
        if not starts:
            return np.zeros(0, np.float32)
        parts = [
            r.blocks(t.name, code, starts, block)
            for r, code in zip(self._readers, t.in_dtypes, strict=True)
        ]
        return self._compute(t, parts, np.empty(parts[0].size, np.float32))

    def _read(self, t: PlannedTensor, slot: int) -> list[np.ndarray]:
        return [
            r.read(t.name, code, slot) for r, code in zip(self._readers, t.in_dtypes, strict=True)
        ]

    def _compute(self, t: PlannedTensor, arrays: list[np.ndarray], out: np.ndarray) -> np.ndarray:
        """The update from the inputs' arrays (into ``out`` for a fine-tune)."""
        if self.kind == "full":
            base, ft = _kernel_arrays(arrays, t.in_dtypes)
            residual(base, ft, out)
            return out
        tau = _float32(arrays[0], t.in_dtypes[0])
        if self.baseline:
            return tau - np.float32(self.baseline)
        return tau.copy() if tau.base is not None else tau  # own it past the next read

    def nonfinite(self, t: PlannedTensor) -> None:
        """Raise NonFiniteError naming the input that holds NaN/Inf in tensor ``t``."""
        for src, code in zip(self.plan.sources, t.in_dtypes, strict=True):
            if not np.isfinite(_float32(src.read(t.name), code)).all():
                raise NonFiniteError(
                    f"{src.label}: tensor {t.name!r} holds NaN or Inf; cannot compress it"
                )
        raise NonFiniteError(f"{self.label}: tensor {t.name!r}: the update overflows float32")


def _kernel_arrays(arrays: list[np.ndarray], codes: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays as stored when they share a bf16/f32/f64 dtype, else all as float32."""
    if len(set(codes)) == 1 and codes[0] in ("BF16", "F32", "F64"):
        return arrays
    return [_float32(a, code) for a, code in zip(arrays, codes, strict=True)]


def _float32(x: np.ndarray, code: str) -> np.ndarray:
    """A flat storage array as float32 (no copy when it already is)."""
    return to_float32(x) if code in ("BF16", "F64") else x.astype(np.float32, copy=False)


class _Sink:
    """Collects each tensor's code; subclasses keep the payloads in memory or in a spool."""

    def __init__(self) -> None:
        self.codes: list[TensorCode] = []
        self.sizes: dict[str, tuple[int, int]] = {}

    def begin(self) -> None:
        """Check the output before any work."""

    def add(
        self, t: PlannedTensor, positions: np.ndarray, signs: np.ndarray, count: int, m: int
    ) -> None:
        code = TensorCode(t.name, t.in_dtypes[-1], t.shape, count, m, checksum(positions, signs))
        self.codes.append(code)
        self.sizes[t.name] = (positions.size, signs.size)
        self.store(positions, signs)

    def store(self, positions: np.ndarray, signs: np.ndarray) -> None:
        raise NotImplementedError

    def finish(
        self, header: Header, adapter_config: dict[str, Any] | None, provenance: dict[str, str]
    ) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        """Remove anything written."""


class _MemorySink(_Sink):
    def __init__(self) -> None:
        super().__init__()
        self.payloads: dict[str, Payload] = {}

    def store(self, positions: np.ndarray, signs: np.ndarray) -> None:
        self.payloads[self.codes[-1].name] = (positions, signs)

    def finish(
        self, header: Header, adapter_config: dict[str, Any] | None, provenance: dict[str, str]
    ) -> CompressedExpert:
        meta = container_metadata(header, self.codes, adapter_config, provenance)
        return CompressedExpert(header, self.codes, self.payloads, meta, adapter_config)


class _FileSink(_Sink):
    """Spools payloads next to the output, then writes header + payloads and renames."""

    def __init__(self, out: Path, overwrite: bool, inputs: tuple[Source, ...]):
        super().__init__()
        self.out = out
        self.overwrite = overwrite
        self.inputs = inputs
        self._spool: IO[bytes] | None = None

    def begin(self) -> None:
        check_target(self.out, self.inputs, self.overwrite)
        try:
            self._spool = open(temp_path(self.out, ".payload"), "w+b")  # noqa: SIM115 - abort
        except OSError as e:
            raise OutputError(f"{self.out}: cannot write: {e.strerror or e}") from None

    def store(self, positions: np.ndarray, signs: np.ndarray) -> None:
        assert self._spool is not None
        self._spool.write(memoryview(positions))
        self._spool.write(memoryview(signs))

    def finish(
        self, header: Header, adapter_config: dict[str, Any] | None, provenance: dict[str, str]
    ) -> Path:
        spool = self._spool
        assert spool is not None
        meta = container_metadata(header, self.codes, adapter_config, provenance)

        def data(f: IO[bytes]) -> None:
            spool.seek(0)
            shutil.copyfileobj(spool, f, 1 << 22)

        write_container(self.out, self.codes, self.sizes, meta, data)
        self.abort()
        return self.out

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
            Path(self._spool.name).unlink(missing_ok=True)
            self._spool = None


def _open_adapter(folder: Path, kind: str | None) -> _Update:
    config_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        peft_type = config.get("peft_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise InputError(f"{config_path}: bad adapter config ({e})") from None
    if peft_type not in _PEFT_TYPES:
        raise ParameterError(
            f"{folder}: PEFT type {peft_type!r} is not supported: ComPEFT compresses LoRA and "
            "(IA)3 adapters"
        )
    if config.get("use_dora"):
        raise ParameterError(f"{folder}: DoRA magnitude vectors have no zero baseline")
    update, baseline = _PEFT_TYPES[peft_type]
    if kind not in (None, update):
        raise ParameterError(f"{folder}: is a {peft_type} adapter, not kind {kind!r}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise SourceNotFoundError(
            f"{folder}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not read)"
        )
    src = FileSource(weights, folder=folder)
    src.kind = "PEFT adapter folder"
    plan = build_plan([src])
    return _Update(update, plan, ("adapter",), baseline, config)


def _open(update: Input, base: Input | None, kind: str | None) -> _Update:
    if kind is not None and kind not in ("full", "task_vector", "lora", "ia3"):
        raise ParameterError(f"unknown update kind {kind!r}")
    if isinstance(update, (str, os.PathLike)) and (Path(update) / ADAPTER_CONFIG).is_file():
        if base is not None:
            raise ParameterError(
                f"{update}: is a PEFT adapter, compressed against its own baseline (0 for LoRA, "
                "1 for (IA)3); drop --base"
            )
        return _open_adapter(Path(update), kind)
    src = _as_source(update, "<update>")
    if isinstance(src, CompressedSource):
        raise ParameterError(f"{src.label}: is already a ComPEFT file")
    if base is not None:
        if kind not in (None, "full"):
            raise ParameterError(f"--base compresses a fine-tune's residual, not kind {kind!r}")
        base_src = _as_source(base, "<base>")
        return _Update("full", build_plan([src], base_src), ("finetuned", "base"))
    if kind is None:
        if not (src.delta or isinstance(update, Mapping)):
            raise ParameterError(
                f"{src.label}: holds weights, not an update: give --base BASE (or --deltas if "
                "it is a task vector)"
            )
        kind = "task_vector"
    if kind == "full":
        raise ParameterError("kind 'full' needs a base model (--base)")
    baseline = 1.0 if kind == "ia3" else 0.0
    role = "task_vector" if kind == "task_vector" else "adapter"
    return _Update(kind, build_plan([src]), (role,), baseline)


class _TopK(GlobalTopK):
    """:class:`GlobalTopK` whose passes 1 and 2 may be served by :class:`FirstPass`."""

    def adopt_high(self, first: FirstPass) -> None:
        """Take pass 1's high-bits histogram and tensor sizes as this selection's pass 1."""
        self._expect("high", "adopt_high")
        self.hist_high += first.high()
        self.sizes += first.sizes
        self.n_total += sum(first.sizes)

    def adopt_low(self, hist_low: np.ndarray) -> None:
        """Take ``hist_low`` (the low-bits histogram of bin ``high``) as pass 2's result."""
        self._expect("low", "adopt_low")
        self.hist_low += hist_low
        self.position = len(self.sizes)


def _predict(u: _Update, density: float) -> FirstPass:
    """Pass 1 with a window around the threshold predicted from a sample of the update: the
    high-bit bins of the sample's magnitudes at ranks ``k (1 ± MARGIN)`` (scaled to the
    sample), widened by one bin each side, at most ``WINDOW_BYTES`` of per-thread counts.

    The sample: blocks of ``BLOCK`` entries every ``stride`` entries of the whole update in
    stream order (so every tensor is sampled in proportion to its size), about ``SAMPLE``."""
    stride = BLOCK * max(1, u.parameters // SAMPLE)
    parts, offset = [], 0
    for t in u.tensors:
        parts.append(u.sample(t, BLOCK, stride, -offset % stride))
        offset += t.out_info.numel
    mags = np.abs(np.concatenate(parts))
    rank = density * mags.size
    ranks = [round(rank * (1 + MARGIN)), round(rank), round(rank * (1 - MARGIN))]
    order = np.sort(np.clip(mags.size - np.array(ranks), 0, mags.size - 1))
    lo, mid, hi = (int(v) >> 16 for v in np.partition(mags, order)[order].view(np.uint32))
    return FirstPass.around(lo - 1, mid, hi + 1, WINDOW_BYTES)


def _code(u: _Update, sink: _Sink, density: float, scope: str) -> tuple[Moments, int]:
    """Select and code every tensor into ``sink``; returns the moments and the kept count."""
    moments = Moments()
    if scope == "tensor":
        first, kept = FirstPass(), 0
        for t, arrays in u.stream():
            u.first_pass(t, arrays, first, moments)
            tau = u.tau(t, arrays)
            k = count_for_density(density, tau.size)
            kept += k
            sink.add(t, *encode_selection(tau, *topk_threshold(tau, k)))
        return moments, kept
    first = _predict(u, density)
    for t, arrays in u.stream():
        u.first_pass(t, arrays, first, moments)
    g = _TopK(density=density)
    g.adopt_high(first)
    g.finish_high()
    if g.needs_low_pass:
        counts = first.low(g.high)
        if counts is not None:
            g.adopt_low(counts)
        else:
            for t, arrays in u.stream():
                g.add_low(u.tau(t, arrays))
    g.finish_low()
    # g.tie_quota entries tied at the threshold are kept, earliest first; ties at 0 are zeros,
    # never coded, so the quota does not matter then
    quota = None if g.thr == 0 else g.tie_quota
    for t, arrays in u.stream():  # tau written first: a vectorised sweep beats two on the fly
        tau = u.tau(t, arrays)
        payload, signs, count, m, used = encode_difference(tau, None, 0.0, g.thr, quota)
        sink.add(t, payload, signs, count, m)
        quota = None if quota is None else quota - used
    if quota not in (None, 0):
        raise AssertionError(f"{quota} tied entries were not found in the last pass")
    assert g.total_k is not None
    return moments, g.total_k


def compress(
    update: Input,
    *,
    base: Input | None = None,
    out: str | os.PathLike[str] | None = None,
    density: float = 0.1,
    alpha: float = 1.0,
    scope: str = "global",
    kind: str | None = None,
    overwrite: bool = False,
) -> Path | CompressedExpert:
    """Compress an update with ComPEFT: keep the top ``density`` fraction by magnitude, store
    each kept entry as its sign; every kept entry decodes to ``± alpha * sigma``.

    Args:
        update: a fine-tuned model (with ``base``), a task-vector file or state dict, or a
            PEFT LoRA / (IA)3 adapter folder (compressed against 0 / 1, A and B jointly).
        base: the base model of a full fine-tune.
        out: a ``.safetensors`` path for the container; ``None`` returns it in memory.
        density: fraction kept, in (0, 1): exactly ``round(density * d)`` entries over the
            whole update (``scope="global"``) or per tensor (``scope="tensor"``).
        alpha: multiplier of sigma, the standard deviation (ddof=1) of the unpruned update.
        kind: ``"full"``, ``"task_vector"``, ``"lora"`` or ``"ia3"``; inferred when None
            (adapter folders from their config; files without ``base`` must be task vectors,
            i.e. carry ``adapt_content: task_vector``, unless ``kind`` says so).
        overwrite: replace an existing output.

    Returns:
        The output path, or a :class:`CompressedExpert` when ``out`` is None.

    Raises:
        AdaptError: bad parameters, inputs that do not match, NaN/Inf in the update, an
            output that cannot be written (nothing is left behind).

    Example:
        >>> compress("ft/", base="base/", out="ft.cpeft.safetensors")  # doctest: +SKIP
    """
    check_parameters(density, alpha, scope)
    u = _open(update, base, kind)
    if u.parameters < 2:
        raise InputError(
            f"{u.label}: the update has {u.parameters} float entries; sigma (ddof=1) needs 2"
        )
    sink: _Sink = (
        _FileSink(Path(out), overwrite, u.plan.sources) if out is not None else _MemorySink()
    )
    params = ComPEFT(density, alpha, scope, u.kind)
    sources = u.plan.inputs + ((u.plan.base,) if u.plan.base is not None else ())
    prov = Provenance(params, sources, u.roles)  # type: ignore[arg-type]
    try:
        sink.begin()
        u.check_carried()
        moments, kept = _code(u, sink, density, scope)
        sigma = moments.std(ddof=1)
        header = Header(
            update=u.kind,
            baseline=u.baseline,
            density=density,
            alpha=alpha,
            scope=scope,
            sigma=sigma,
            scale=float(np.float32(alpha * sigma)),
            parameters=u.parameters,
            kept=kept,
            coded=sum(c.count for c in sink.codes),
        )
        return sink.finish(header, u.adapter_config, prov.metadata(final=True))
    except BaseException:
        prov.cancel()
        sink.abort()
        raise
