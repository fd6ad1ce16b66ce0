"""ComPEFT compression: exact top-k of an update, kept entries -> sign * alpha * sigma, coded.

The update ``tau`` is read tensor by tensor (names sorted) and never held whole:

- global scope: pass 1 adds every tensor to the moments (for sigma) and to the high-bits
  histogram of :class:`~merge.kernels.select.GlobalTopK`; pass 2 (only when the threshold's
  bin is not kept whole) adds the low bits; pass 3 selects and codes each tensor;
- tensor scope: one pass; each tensor keeps ``round(density * numel)`` entries.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from ..api import Input, _as_source
from ..engine import _check_carried, kernel_arrays
from ..errors import InputError, NonFiniteError, ParameterError, SourceNotFoundError
from ..kernels.convert import to_float32
from ..kernels.moments import Moments, chunk_moments, residual
from ..kernels.positions import encode_selection
from ..kernels.select import GlobalTopK, count_for_density, topk_threshold
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..plan import Plan, build_plan
from ..provenance import Provenance
from ..sources import FileSource, Source
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

    def tau(self, t: Any, moments: Moments | None = None) -> np.ndarray:
        """The update of one tensor (a view of a scratch buffer or of the input); with
        ``moments``, its moments are added (NaN/Inf raise NonFiniteError)."""
        if self.kind == "full":
            base, ft = kernel_arrays(t, [src.read(t.name) for src in self.plan.sources])
            tau = self._scratch[: t.out_info.numel]
            stats = residual(base, ft, tau, moments is not None)
        else:
            tau = _float32(self.plan.inputs[0].read(t.name), t.in_dtypes[0])
            if self.baseline:
                tau = tau - np.float32(self.baseline)
            stats = chunk_moments(tau) if moments is not None else (0, 0.0, 0.0, True)
        if not stats[3]:
            self.nonfinite(t)
        if moments is not None:
            moments.add(*stats[:3])
        return tau

    def nonfinite(self, t: Any) -> None:
        """Raise NonFiniteError naming the input that holds NaN/Inf in tensor ``t``."""
        for src, code in zip(self.plan.sources, t.in_dtypes, strict=True):
            if not chunk_moments(_float32(src.read(t.name), code))[3]:
                raise NonFiniteError(
                    f"{src.label}: tensor {t.name!r} holds NaN or Inf; cannot compress it"
                )
        raise NonFiniteError(f"{self.label}: tensor {t.name!r}: the update overflows float32")


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

    def add(self, t: Any, positions: np.ndarray, signs: np.ndarray, count: int, m: int) -> None:
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
        self._spool = open(temp_path(self.out, ".payload"), "w+b")  # noqa: SIM115 - see abort

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


def _code(u: _Update, sink: _Sink, density: float, scope: str) -> tuple[Moments, int]:
    """Select and code every tensor into ``sink``; returns the moments and the kept count."""
    moments = Moments()
    if scope == "tensor":
        kept = 0
        for t in u.tensors:
            tau = u.tau(t, moments)
            k = count_for_density(density, tau.size)
            kept += k
            sink.add(t, *encode_selection(tau, *topk_threshold(tau, k)))
        return moments, kept
    g = GlobalTopK(density=density)
    for t in u.tensors:
        g.add_high(u.tau(t, moments))
    g.finish_high()
    if g.needs_low_pass:
        for t in u.tensors:
            g.add_low(u.tau(t))
    g.finish_low()
    for t in u.tensors:
        tau = u.tau(t)
        sink.add(t, *encode_selection(tau, *g.selection(tau)))
    g.finish_selection()
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
