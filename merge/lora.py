"""PEFT LoRA adapters in and out.

In: an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is a lazy
source of task vectors named like the base model's parameters. Module ``m`` with factors
A (r, in) and B (out, r) holds dW = scale * B @ A, with scale = alpha / r (rsLoRA:
alpha / sqrt(r)), r and alpha per module from ``rank_pattern`` / ``alpha_pattern``;
embeddings and ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) store the transpose. dW is
computed only when the engine reads that tensor. ``modules_to_save`` tensors (and the copies
of a LoRA'd layer that peft saves as ``<m>.base_layer.weight``) are full weights: they are
listed in the source's ``replaced``.

Out: :func:`merge_to_lora` runs a task-vector method over adapters (and full fine-tunes or
task vectors, restricted to the adapters' modules) and writes one adapter. Linear merges
concatenate the factors exactly (A = concat(c_i A_i), B = concat(B_i), scale 1); other
methods factor each module's merged dW by truncated SVD and report the retained energy.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import dtypes
from .api import Input
from .api import plan as make_plan
from .engine import _merge_one, stream
from .errors import (
    CorruptFileError,
    InputError,
    MismatchError,
    NonFiniteError,
    ParameterError,
    SourceNotFoundError,
)
from .kernels.convert import from_float32, to_float32
from .methods.taskvec import TaskArithmetic, TaskVectorMethod, Ties
from .plan import ABSENT, Plan, PlannedTensor
from .progress import Progress
from .provenance import Provenance
from .safetensors_file import SafetensorsFile, TensorInfo
from .sources import Source, _Names
from .writer import SafetensorsSink, _Shard

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Options whose non-default value changes what the tensors mean (or adds tensors adapt
# cannot merge), with their defaults; any other value is refused by name.
UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "arrow_config": None,
    "use_bdlora": None,
    "megatron_config": None,
}
# init_lora_weights values that leave the adapter relative to a modified base (unless peft
# converted it on save, which rewrites the value to true)
_MUTATED_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Options that do not change the saved tensors' meaning (selection, training, bookkeeping).
_HARMLESS = frozenset(
    {
        "peft_type",
        "peft_version",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "auto_mapping",
        "inference_mode",
        "r",
        "lora_alpha",
        "use_rslora",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "lora_dropout",
        "init_lora_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "megatron_core",
        "qalora_group_size",
        "ensure_weight_tying",
    }
)

_FACTOR = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_[AB])")
_COPY = re.compile(r"(?P<module>.+)\.base_layer\.(?P<param>[^.]+)")
_SAVED_OLD = re.compile(r"(?P<module>.+)\.modules_to_save\.[^.]+\.(?P<param>[^.]+)")


def _is_default(key: str, value: Any) -> bool:
    return value == UNSUPPORTED[key] or value in (None, False, [], {})


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``):
    the value of the first key, in order, with ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _as_float32(a: np.ndarray, code: str) -> np.ndarray:
    if code == "F32":
        return a
    return to_float32(a) if code == "BF16" else a.astype(np.float32)


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: dW = scale * B @ A, transposed into the weight's layout when
    ``transposed`` (embeddings and ``fan_in_fan_out`` layers store ``(in, out)``)."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    embedding: bool
    transposed: bool
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        """The base model's parameter name this module updates."""
        return self.module + ".weight"

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the base weight (and of dW)."""
        o, i = self.out_features, self.in_features
        return (i, o) if self.transposed else (o, i)


class LoraSource(_Names):
    """A PEFT LoRA adapter folder seen as a source of task vectors (see the module docstring).

    Raises:
        InputError: a variant adapt does not merge (the message names the option).
        CorruptFileError: bad config, missing or inconsistent factors, unknown tensors.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder: Path | None = Path(folder)
        self.label = str(folder)
        self.kind = "LoRA adapter"
        self.delta = True
        config_path = Path(folder) / ADAPTER_CONFIG
        weights = Path(folder) / ADAPTER_WEIGHTS
        self.config = self._read_config(config_path)
        if not weights.is_file():
            raise SourceNotFoundError(
                f"{folder}: adapter folder has no {ADAPTER_WEIGHTS} (adapter_model.bin is a "
                "pickle and is not read: save the adapter with safetensors)"
            )
        self._file = SafetensorsFile(weights)
        self.files = (self._file.path, config_path)
        self.metadata = dict(self._file.metadata)
        self.modules_to_save: list[str] = list(self.config.get("modules_to_save") or [])
        self.modules: dict[str, LoraModule] = {}  # by base parameter name
        self.saved: dict[str, str] = {}  # modules_to_save tensors: base name -> key
        self.copies: dict[str, str] = {}  # <m>.base_layer.<p> copies: base name -> key
        self._parse()
        self.replaced = frozenset(self.saved) | frozenset(self.copies)
        order = {k: i for i, k in enumerate(self._file.names)}
        keyed = [(m.a_key, n) for n, m in self.modules.items()]
        keyed += [(k, n) for n, k in self.saved.items()]
        keyed += [(k, n) for n, k in self.copies.items() if n not in self.modules]
        self._names = [n for _, n in sorted(keyed, key=lambda kn: order[kn[0]])]

    def _read_config(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise SourceNotFoundError(f"{path}: no such file")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise TypeError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise CorruptFileError(f"{path}: bad adapter config ({e})") from None
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise InputError(f"{path}: peft_type {peft_type!r} is not supported (LoRA only)")
        for key, value in config.items():
            if key in UNSUPPORTED:
                if not _is_default(key, value):
                    raise InputError(
                        f"{path}: {key}={json.dumps(value)} is not supported: adapt merges plain "
                        "LoRA only (merge this adapter with peft's merge_and_unload instead)"
                    )
            elif key not in _HARMLESS and value not in (None, False, [], {}, ""):
                raise InputError(f"{path}: option {key}={json.dumps(value)} is unknown to adapt")
        init = str(config.get("init_lora_weights", True)).lower()
        if init.startswith(_MUTATED_INIT):
            raise InputError(
                f"{path}: init_lora_weights={init!r} is not supported: the adapter is relative to "
                "a modified base (save it with path_initial_model_for_weight_conversion)"
            )
        for key in ("rank_pattern", "alpha_pattern"):
            for pattern in config.get(key) or {}:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise CorruptFileError(f"{path}: {key} key {pattern!r}: {e}") from None
        return config

    def _parse(self) -> None:
        factors: dict[str, dict[str, str]] = {}
        where = self._file.path
        for key in self._file.names:
            name = key.removeprefix(PREFIX)
            if m := _FACTOR.fullmatch(name):
                factors.setdefault(m["module"], {})[m["part"]] = key
            elif m := _COPY.fullmatch(name):
                self.copies[f"{m['module']}.{m['param']}"] = key
            else:
                m = _SAVED_OLD.fullmatch(name)
                base_name = f"{m['module']}.{m['param']}" if m else name
                module = base_name.rpartition(".")[0]
                if not any(module.endswith(entry) for entry in self.modules_to_save):
                    raise CorruptFileError(
                        f"{where}: tensor {key!r} is neither a LoRA factor nor part of a module "
                        "in modules_to_save"
                    )
                self.saved[base_name] = key
        for module, parts in factors.items():
            lm = self._module(module, parts)
            if lm.name in self.saved:
                raise CorruptFileError(
                    f"{where}: module {module!r} has LoRA factors and a modules_to_save copy"
                )
            self.modules[lm.name] = lm

    def _module(self, module: str, parts: dict[str, str]) -> LoraModule:
        where = self._file.path
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None or len(parts) != 2:
            raise CorruptFileError(
                f"{where}: module {module!r} needs exactly one lora_A and one lora_B tensor, "
                f"found {sorted(parts)}"
            )
        a, b = self._file.info(a_key), self._file.info(b_key)
        for key, info in ((a_key, a), (b_key, b)):
            if len(info.shape) != 2:
                raise InputError(
                    f"{where}: tensor {key!r} has shape {list(info.shape)}: only LoRA on linear "
                    "and embedding layers is supported (not convolutions)"
                )
            if not dtypes.is_float(info.dtype):
                raise CorruptFileError(f"{where}: tensor {key!r} has non-float dtype {info.dtype}")
        default_r = int(self.config.get("r", 8))
        rank = int(pattern_value(self.config.get("rank_pattern") or {}, module, default_r))
        alpha = float(
            pattern_value(
                self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8)
            )
        )
        if a.shape[0] != rank or b.shape[1] != rank:
            raise CorruptFileError(
                f"{where}: module {module!r}: rank {rank} from the config but lora_A "
                f"{list(a.shape)} and lora_B {list(b.shape)}"
            )
        if rank < 1:
            raise CorruptFileError(f"{where}: module {module!r} has rank {rank}")
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        transposed = embedding or bool(self.config.get("fan_in_fan_out"))
        return LoraModule(
            module, a_key, b_key, rank, alpha, scale, embedding, transposed, a.shape[1], b.shape[0]
        )

    # -- Source -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return self._names

    def info(self, name: str) -> TensorInfo:
        lm = self.modules.get(name)
        if lm is not None:
            return TensorInfo("F32", lm.shape)
        return self._file.info(self.saved.get(name) or self.copies[name])

    def read(self, name: str) -> np.ndarray:
        """dW (float32, flat, the weight's layout) of a LoRA module, plus the saved copy of the
        layer when peft saved one; a modules_to_save tensor as stored."""
        lm = self.modules.get(name)
        if lm is None:
            return self._file.read(self.saved.get(name) or self.copies[name])
        a, b = self.factors(name)
        dw = b @ a  # float32 BLAS, like peft's get_delta_weight; scaled after, as peft does
        out = np.ascontiguousarray(dw.T if lm.transposed else dw).reshape(-1)
        out *= np.float32(lm.scale)
        if name in self.copies:
            out += self.raw_float32(self.copies[name])
        return out

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (r, in), B (out, r)) of a LoRA module as float32, unscaled."""
        lm = self.modules[name]
        a = self.raw_float32(lm.a_key).reshape(lm.rank, lm.in_features)
        b = self.raw_float32(lm.b_key).reshape(lm.out_features, lm.rank)
        return a, b

    def raw_float32(self, key: str) -> np.ndarray:
        """A stored tensor by its file key, flat float32."""
        return _as_float32(self._file.read(key), self._file.info(key).dtype)


def open_adapter(path: str | os.PathLike[str]) -> LoraSource:
    """Open a PEFT LoRA adapter folder (or a file inside it) as a lazy source of task vectors.

    Example:
        >>> src = merge.open_adapter("lora/")                       # doctest: +SKIP
        >>> src.info("model.layers.0.self_attn.q_proj.weight")      # doctest: +SKIP
        TensorInfo(dtype='F32', shape=(4096, 4096))
    """
    p = Path(path)
    if p.is_file() and p.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        p = p.parent
    if not p.is_dir():
        raise SourceNotFoundError(f"{p}: no such adapter folder")
    return LoraSource(p)


# --------------------------------------------------------------------------- merging to LoRA


@dataclass
class LoraMergeResult:
    """What :func:`merge_to_lora` wrote: per-module ranks, which modules were factored by SVD
    and the energy they kept (sum of kept singular values squared / total)."""

    path: Path
    ranks: dict[str, int]
    energy: dict[str, float] = field(default_factory=dict)  # SVD-factored modules only
    kept: float = 0.0  # squared Frobenius norm kept over the SVD-factored modules
    total: float = 0.0
    dropped: list[str] = field(default_factory=list)  # updated tensors outside the adapter

    @property
    def overall(self) -> float:
        """Retained energy over all SVD-factored modules (1.0 when none was factored)."""
        return self.kept / self.total if self.total > 0 else 1.0


@dataclass(frozen=True)
class _Target:
    """One output LoRA module: its shape facts and how it is made."""

    module: LoraModule  # orientation and sizes (from the first adapter holding it)
    rank: int
    concat: bool  # exact concatenation of the inputs' factors; else truncated SVD


class _AdapterSink(SafetensorsSink):
    """``adapter_model.safetensors`` + ``adapter_config.json`` in a folder, written atomically
    by :class:`SafetensorsSink`'s folder machinery (temporary folder, rename when complete)."""

    def __init__(self, out: Path, config: dict[str, Any], overwrite: bool):
        super().__init__(out, overwrite=overwrite)
        self.config = config

    def _split(self, tensors: Sequence[PlannedTensor]) -> list[_Shard]:  # type: ignore[override]
        return [_Shard(ADAPTER_WEIGHTS, list(tensors))]

    def _write_folder_extras(self) -> None:
        assert self._tmp is not None
        text = json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        (self._tmp / ADAPTER_CONFIG).write_text(text, encoding="utf-8")


def _encode(values: np.ndarray, code: str) -> np.ndarray:
    """Flat float32 values in the storage dtype of ``code``."""
    values = np.ascontiguousarray(values, np.float32).reshape(-1)
    if code == "F32":
        return values
    if code == "BF16":
        out = np.empty(values.size, dtypes.storage(code))
        from_float32(values, out)
        return out
    return values.astype(dtypes.storage(code))


def _factor_keys(lm: LoraModule) -> tuple[str, str]:
    if lm.embedding:
        return f"{PREFIX}{lm.module}.lora_embedding_A", f"{PREFIX}{lm.module}.lora_embedding_B"
    return f"{PREFIX}{lm.module}.lora_A.weight", f"{PREFIX}{lm.module}.lora_B.weight"


def _unique(values: list[Any], fallback: Any) -> Any:
    """The one value the inputs agree on (ignoring unset ones), else ``fallback``."""
    found = [v for v in values if v is not None]
    return found[0] if found and all(v == found[0] for v in found) else fallback


def _target_modules(targets: Mapping[str, _Target], base: Source) -> list[str]:
    """Leaf names (``q_proj``) where every base layer of that leaf is targeted, else full names."""
    by_leaf: dict[str, set[str]] = {}
    for t in targets.values():
        by_leaf.setdefault(t.module.module.rpartition(".")[2], set()).add(t.module.module)
    out = []
    for leaf, modules in sorted(by_leaf.items()):
        in_base = {
            n.removesuffix(".weight")
            for n in base.names
            if n.endswith(".weight") and n.removesuffix(".weight").rpartition(".")[2] == leaf
        }
        out += [leaf] if in_base == modules else sorted(modules)
    return out


def _adapter_config(
    adapters: list[LoraSource], targets: Mapping[str, _Target], base: Source
) -> dict[str, Any]:
    """A peft LoraConfig: scale 1 everywhere (lora_alpha = r per module), no rsLoRA."""
    counts = Counter(t.rank for t in targets.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 8
    pattern = {"^" + re.escape(t.module.module): t.rank for t in targets.values() if t.rank != r}
    saved = sorted({e for a in adapters for e in a.modules_to_save})
    configs = [a.config for a in adapters]
    return {
        "peft_type": "LORA",
        "task_type": _unique([c.get("task_type") for c in configs], None),
        "base_model_name_or_path": _unique(
            [c.get("base_model_name_or_path") for c in configs], base.label
        ),
        "revision": _unique([c.get("revision") for c in configs], None),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "fan_in_fan_out": any(
            t.module.transposed and not t.module.embedding for t in targets.values()
        ),
        "target_modules": _target_modules(targets, base),
        "modules_to_save": saved or None,
    }


def _check_copies(adapters: list[LoraSource], base: Source) -> None:
    """A layer copy saved by peft (``<m>.base_layer.weight``) must equal the base's layer:
    an adapter holds only factors and modules_to_save tensors."""
    for a in adapters:
        for name, key in a.copies.items():
            base_values = _as_float32(base.read(name), base.info(name).dtype)
            if not np.array_equal(a.raw_float32(key), base_values):
                raise ParameterError(
                    f"{a.label}: tensor {key!r} (a saved copy of {name!r}) differs from the base; "
                    "--to-lora cannot carry it: merge into a model instead"
                )


def _svd_factors(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A (k, in), B (out, k) with B @ A the best rank-k approximation of ``m`` (out, in), the
    singular values split as sqrt(S) on each side; and (kept, total) squared singular values."""
    import torch

    u, s, vh = torch.linalg.svd(torch.from_numpy(m), full_matrices=False)
    s64 = s.double()
    kept, total = float((s64[:rank] ** 2).sum()), float((s64**2).sum())
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).numpy(), (u[:, :rank] * root).numpy(), kept, total


def _plan_targets(plan: Plan, rank: int | None, linear: bool) -> dict[str, _Target]:
    """Every LoRA module of the adapters (modules_to_save excluded), with its output rank and
    whether it is an exact concatenation."""
    adapters = [s for s in plan.inputs if isinstance(s, LoraSource)]
    saved = {n for a in adapters for n in a.saved}
    max_rank = max((m.rank for a in adapters for m in a.modules.values()), default=1)
    contents = {t.name: t.contents[1:] for t in plan.tensors}
    targets: dict[str, _Target] = {}
    for a in adapters:
        for name, lm in a.modules.items():
            if name in saved or name in targets:
                continue
            holders = [s for s in adapters if name in s.modules]
            for other in holders:
                o = other.modules[name]
                if (o.embedding, o.transposed, o.shape) != (lm.embedding, lm.transposed, lm.shape):
                    raise MismatchError(
                        f"module {lm.module!r}: {a.label} and {other.label} disagree on its kind "
                        "or layout (embedding, fan_in_fan_out)"
                    )
            present = [s for s, c in zip(plan.inputs, contents[name], strict=True) if c != ABSENT]
            total = sum(s.modules[name].rank for s in holders)
            concat = linear and all(s in holders for s in present) and total <= (rank or total)
            k = total if concat else min(rank or max_rank, *lm.shape)
            targets[name] = _Target(lm, k, concat)
    return targets


def merge_to_lora(
    method: TaskVectorMethod,
    inputs: Sequence[Input],
    *,
    base: Input,
    out: str | os.PathLike[str],
    rank: int | None = None,
    dtype: str | None = None,
    deltas: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> LoraMergeResult:
    """Merge LoRA adapters (and full fine-tunes / task vectors) into one PEFT LoRA adapter.

    The output holds the update the same method gives in a model merge, on the adapters' LoRA
    modules and ``modules_to_save`` tensors only (updates of other tensors, from full
    fine-tunes or task vectors, are left out and listed in ``dropped``). With task arithmetic
    (LiNeS included), a module where every contributing input is a LoRA adapter is exact:
    A = concat_i(c_i A_i) with c_i = lambda(l) w_i scale_i, B = concat_i(B_i), rank sum_i r_i.
    Otherwise (TIES, DARE, full fine-tunes or task vectors at that module, or sum_i r_i above
    ``rank``) the merged dW is factored by truncated SVD to ``rank`` (default: the largest
    input rank). The output has scale 1 everywhere (lora_alpha = r per module, no rsLoRA).

    Args:
        method: a task-vector method (TaskArithmetic, Ties, DareLinear, DareTies).
        inputs: adapter folders, model folders, safetensors files, sources.
        base: the base model.
        out: the adapter folder to write (atomically; refused if it is an input).
        rank: rank of SVD-factored modules; linear merges above it are factored too.
        dtype: dtype of every output tensor (default: float32 factors, modules_to_save tensors
            in the base's dtype).

    Returns:
        The per-module ranks and, for SVD-factored modules, the retained energy
        (sum of kept singular values squared / total), also recorded in the adapter's
        ``__metadata__`` (``adapt_lora``).

    Raises:
        AdaptError: bad inputs or options (one line naming the file, tensor or option).

    Example:
        >>> merge.merge_to_lora(merge.TaskArithmetic(weights=(0.7, 0.3)), ["l1/", "l2/"],
        ...                     base="base/", out="merged-lora/")  # doctest: +SKIP
    """
    if not isinstance(method, TaskVectorMethod) or method.content != "model":
        raise ParameterError(
            f"--to-lora needs a task-vector method (task-arithmetic, ties, dare-*), not "
            f"{method.name!r}"
        )
    if rank is not None and rank < 1:
        raise ParameterError(f"--rank must be at least 1, got {rank}")
    out = Path(out)
    if out.suffix == ".safetensors":
        raise ParameterError(f"{out}: --to-lora writes an adapter folder, not a .safetensors file")
    plan = make_plan(inputs, base=base, dtype=dtype, deltas=deltas)
    if plan.base is None:
        raise ParameterError("--to-lora needs a base model (--base)")
    method.validate(len(plan.inputs))
    adapters = [s for s in plan.inputs if isinstance(s, LoraSource)]
    if not adapters:
        raise ParameterError("--to-lora needs at least one LoRA adapter input")
    _check_copies(adapters, plan.base)
    targets = _plan_targets(plan, rank, isinstance(method, TaskArithmetic))
    saved = {n for a in adapters for n in a.saved}

    factor_code = dtypes.parse(dtype) if dtype else "F32"
    out_tensors: list[PlannedTensor] = []
    for t in plan.tensors:
        if t.name in targets:
            tg = targets[t.name]
            a_key, b_key = _factor_keys(tg.module)
            shapes = (tg.rank, tg.module.in_features), (tg.module.out_features, tg.rank)
            out_tensors.append(PlannedTensor(a_key, shapes[0], (), factor_code, True))
            out_tensors.append(PlannedTensor(b_key, shapes[1], (), factor_code, True))
        elif t.name in saved:
            out_tensors.append(PlannedTensor(PREFIX + t.name, t.shape, (), t.out_dtype, True))
    result = LoraMergeResult(out, {tg.module.module: tg.rank for tg in targets.values()})
    result.dropped = [
        t.name
        for t in plan.tensors
        if t.name not in targets
        and t.name not in saved
        and any(
            c != ABSENT and not isinstance(s, LoraSource)
            for s, c in zip(plan.inputs, t.contents[1:], strict=True)
        )
    ]
    # TIES's global selection hands out its tie quota in stream order: it must see every tensor
    every = isinstance(method, Ties) and method.scope == "global"
    streamed = Plan(
        tuple(
            t
            for t in plan.tensors
            if (every and t.merged)
            or t.name in saved
            or (t.name in targets and not targets[t.name].concat)
        ),
        plan.inputs,
        plan.base,
    )
    streamed_names = {t.name for t in streamed.tensors}
    svd_modules = [tg.module.module for tg in targets.values() if not tg.concat]
    prov = Provenance(method, plan.sources, ("base",) + ("input",) * len(plan.inputs))

    def metadata(final: bool) -> dict[str, str]:
        # fixed-width numbers: the final header must have the reserved length
        energy = {m: f"{result.energy.get(m, 0.0):.6f}" for m in svd_modules}
        overall = f"{result.overall if final else 0.0:.6f}"
        lora = {"rank": rank, "energy": energy, "energy_overall": overall}
        return prov.metadata(final) | {"adapt_lora": json.dumps(lora, sort_keys=True)}

    check_finite = not allow_nonfinite
    sink = _AdapterSink(out, _adapter_config(adapters, targets, plan.base), overwrite)
    sink.begin(Plan(tuple(out_tensors), plan.inputs, plan.base))
    try:
        method.prepare(plan, lambda: stream(plan))
        sink.reserve(metadata(final=False))
        planned = iter(out_tensors)
        arrays_of = stream(streamed)
        with Progress(sum(t.out_info.nbytes for t in out_tensors), enabled=progress) as bar:
            for t in plan.tensors:
                item = next(arrays_of) if t.name in streamed_names else None
                if t.name in saved:
                    assert item is not None
                    datas = [_merge_one(streamed, method, *item, check_finite)]
                elif t.name in targets:
                    tg = targets[t.name]
                    if item is None:
                        a, b = _concat(method, t, plan, check_finite)
                    else:
                        dw = _merged_update(method, item, streamed, check_finite)
                        a, b = _factored(dw, tg, result)
                    datas = [_encode(a, factor_code), _encode(b, factor_code)]
                else:
                    if item is not None:
                        _merged_update(method, item, streamed, check_finite)
                    continue
                for data in datas:
                    pt = next(planned)
                    sink.write(pt, data)
                    bar.advance(pt.out_info.nbytes)
        sink.finish(metadata(final=True))
    except BaseException:
        prov.cancel()
        sink.abort()
        raise
    return result


def _concat(
    method: TaskVectorMethod, t: PlannedTensor, plan: Plan, check_finite: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact factors of lambda(l) sum_i w_i scale_i B_i A_i: A = concat_i(c_i A_i), B =
    concat_i(B_i), so B A has no cross terms B_i A_j and each scale is applied once."""
    w = method.w(len(plan.inputs))
    lam = method.scale(t)
    parts_a, parts_b = [], []
    for i, src in enumerate(plan.inputs):
        if not isinstance(src, LoraSource) or t.name not in src.modules:
            continue
        a, b = src.factors(t.name)
        if check_finite and not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise NonFiniteError(
                f"{src.label}: LoRA factors of {t.name!r} hold NaN or Inf "
                "(pass --allow-nonfinite to merge anyway)"
            )
        parts_a.append(a * np.float32(lam * w[i] * src.modules[t.name].scale))
        parts_b.append(b)
    return np.concatenate(parts_a, axis=0), np.concatenate(parts_b, axis=1)


def _merged_update(
    method: TaskVectorMethod,
    item: tuple[PlannedTensor, list[np.ndarray]],
    plan: Plan,
    check_finite: bool,
) -> np.ndarray:
    """lambda(l) * combine(tau_1..tau_N) of one tensor: the update a model merge adds."""
    t, arrays = item
    taus, bad = method.taus(t, arrays, check_finite)
    if bad >= 0:
        raise NonFiniteError(
            f"{plan.sources[bad].label}: tensor {t.name!r} holds NaN or Inf "
            "(pass --allow-nonfinite to merge anyway)"
        )
    merged = np.empty(taus.shape[1], np.float32)
    method.combine(t, taus, merged)
    merged *= np.float32(method.scale(t))
    return merged


def _factored(
    dw: np.ndarray, tg: _Target, result: LoraMergeResult
) -> tuple[np.ndarray, np.ndarray]:
    """A module's merged dW (flat, weight layout) factored by truncated SVD; the retained
    energy goes into ``result``."""
    lm = tg.module
    m = dw.reshape(lm.shape)
    a, b, kept, total = _svd_factors(np.ascontiguousarray(m.T) if lm.transposed else m, tg.rank)
    result.energy[lm.module] = kept / total if total > 0 else 1.0
    result.kept += kept
    result.total += total
    return a, b
