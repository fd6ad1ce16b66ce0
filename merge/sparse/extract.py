"""Extract a sparse fine-tune: keep the K entries of largest |theta - theta0| (the LT-SFT rule).

The update is read tensor by tensor (names sorted) and never held whole:

- global scope: pass 1 adds every tensor's float32 ``|theta - theta0|`` to the high-bits
  histogram of :class:`~merge.kernels.select.GlobalTopK`, pass 2 (only when needed) the low
  bits, pass 3 selects each tensor's entries, computes their values and codes them;
- tensor scope: one pass; each tensor keeps ``round(density * numel)`` entries.

Values are the float64 differences ``theta - theta0`` at the kept entries, stored in the value
dtype of the policy. The default policy ``auto`` stores float32 values (float64 for float64
models) and, for the few entries where the float32 value would not reproduce the fine-tune
(``apply``) or the base (``revert``) exactly, checked entry by entry with the rounding
``apply`` uses, float64 overrides; the entries even float64 does not reproduce are counted
(``inexact``), as are those a fixed value dtype misses. Tensors matching a ``dense``
pattern (task heads) are stored whole, like composable-sft's ``abs``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import dtypes
from ..api import Input, _as_source
from ..engine import _check_carried, stream
from ..errors import NonFiniteError, ParameterError
from ..kernels.convert import from_float32, to_float32
from ..kernels.positions import encode_positions
from ..kernels.select import GlobalTopK, count_for_density, threshold_key, topk_threshold
from ..kernels.sparse import add_at, delta_at, kept_positions, update
from ..plan import Plan, PlannedTensor, build_plan
from ..provenance import Provenance
from .container import CONTENT, Builder, Entry, Header, SparseFineTune, SparseSource, as_float

CITATION = (
    "Ansell et al., Composable Sparse Fine-Tuning for Cross-Lingual Transfer, ACL 2022, "
    "arXiv:2110.07560"
)
SCOPES = ("global", "tensor")
POLICIES = ("auto", "same", "float32", "float64", "bf16", "float16")


@dataclass(frozen=True)
class Extract:
    """The extraction's parameters, as provenance records them."""

    density: float | None
    count: int | None
    scope: str
    values: str
    dense: tuple[str, ...]
    name: ClassVar[str] = "sparse-extract"
    citation: ClassVar[str] = CITATION
    content: ClassVar[str] = CONTENT

    def parameters(self) -> dict[str, Any]:
        return {
            "density": self.density,
            "count": self.count,
            "scope": self.scope,
            "values": self.values,
            "dense": list(self.dense),
        }


def _check(density: float | None, count: int | None, scope: str, values: str) -> str:
    """Validate the parameters; returns the value policy: ``auto``, ``same`` or a dtype code."""
    if (density is None) == (count is None):
        raise ParameterError("give exactly one of --density and --count")
    if density is not None and not 0.0 < density <= 1.0:
        raise ParameterError(f"--density must be in (0, 1], got {density}")
    if count is not None and count < 0:
        raise ParameterError(f"--count must be >= 0, got {count}")
    if scope not in SCOPES:
        raise ParameterError(f"--scope must be global or tensor, got {scope!r}")
    if count is not None and scope != "global":
        raise ParameterError("--count keeps K entries over the whole model: use --scope global")
    if values in ("auto", "same"):
        return values
    try:
        return dtypes.parse(values)
    except ParameterError:
        raise ParameterError(
            f"--values must be one of {', '.join(POLICIES)}, got {values!r}"
        ) from None


def _patterns(dense: tuple[str, ...]) -> list[re.Pattern[str]]:
    compiled = []
    for p in dense:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ParameterError(f"--dense {p!r}: bad regex ({e})") from None
    return compiled


class _Updates:
    """The maskable tensors of a (base, finetuned) plan, streamed by the engine in sorted name
    order (rows in reused buffers), each with its float32 ``theta - theta0``."""

    def __init__(self, plan: Plan, tensors: list[PlannedTensor]):
        self.plan = replace(plan, tensors=tuple(tensors))
        largest = max((t.out_info.numel for t in tensors), default=0)
        self._tau = np.empty(largest, np.float32)

    def __call__(
        self, check: bool = False
    ) -> Iterator[tuple[PlannedTensor, np.ndarray, np.ndarray, np.ndarray]]:
        """``(tensor, base, finetuned, tau)``, the arrays valid until the next item;
        ``check``: refuse NaN/Inf."""
        base, ft = self.plan.sources
        for t, (b, f) in stream(self.plan):
            tau = self._tau[: t.out_info.numel]
            if not update(b, f, tau) and check:
                for src, a in ((base, b), (ft, f)):
                    if not np.isfinite(_numeric(a)).all():
                        raise NonFiniteError(f"{src.label}: tensor {t.name!r} holds NaN or Inf")
                raise NonFiniteError(f"{ft.label}: tensor {t.name!r}: the update overflows")
            yield t, b, f, tau


def _numeric(a: np.ndarray) -> np.ndarray:
    """A kernel array's values (bf16 bits decoded)."""
    return to_float32(a) if a.dtype == np.uint16 else a


def _round_to(x: np.ndarray, code: str) -> np.ndarray:
    """float32/float64 values rounded to ``code`` as the engine's output does, as numbers."""
    if code == "BF16":
        bits = np.empty(x.size, np.uint16)
        from_float32(x.astype(np.float32), bits)
        return to_float32(bits)
    if code == "F16":
        return x.astype(np.float32).astype(np.float16).astype(np.float32)
    return x.astype(np.float32) if code == "F32" else x


def _convert(d: np.ndarray, code: str) -> np.ndarray:
    """float64 deltas to stored values of dtype ``code`` (storage array)."""
    if code == "F64":
        return d
    with np.errstate(over="ignore"):  # an overflow to inf is reported by the caller
        v = d.astype(np.float16 if code == "F16" else np.float32)
    if code == "F16":
        return v
    if code == "BF16":
        bits = np.empty(v.size, np.uint16)
        from_float32(v, bits)
        return bits
    return v


def _misses(t: PlannedTensor, gb: np.ndarray, gf: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Where ``base + v`` (rounded to the fine-tune's dtype) is not the fine-tune or
    ``finetuned - v`` (rounded to the base's dtype) is not the base, computed as ``apply``
    computes them (``values`` float32 or float64). Zeros of either sign count as equal."""
    fwd = gb.copy()
    add_at(fwd, values, 1.0)
    bwd = gf.copy()
    add_at(bwd, values, -1.0)
    base_code, ft_code = t.in_dtypes
    bad = _round_to(_numeric(fwd), ft_code) != _numeric(gf)
    bad |= _round_to(_numeric(bwd), base_code) != _numeric(gb)
    return bad


def _values(
    t: PlannedTensor, b: np.ndarray, f: np.ndarray, positions: np.ndarray, policy: str
) -> tuple[np.ndarray, str, int, np.ndarray, np.ndarray]:
    """``(stored values, their dtype code, inexact count, wide index, wide values)`` of the
    kept entries: with ``auto``, float32 values plus float64 ones where float32 would miss."""
    d = np.empty(positions.size, np.float64)
    delta_at(b, f, positions, d)
    gb, gf = b[positions], f[positions]
    code = {"same": t.in_dtypes[1], "auto": "F64" if "F64" in t.in_dtypes else "F32"}.get(
        policy, policy
    )
    stored = _convert(d, code)
    if not np.isfinite(as_float(stored, code)).all():
        raise ParameterError(
            f"tensor {t.name!r}: a delta overflows {code} values: choose a wider --values"
        )
    bad = _misses(t, gb, gf, as_float(stored, code))
    wide = np.zeros(0, np.int64)
    if policy == "auto" and code == "F32" and bad.any():
        wide = np.flatnonzero(bad)
        values = stored.astype(np.float64)
        values[wide] = d[wide]
        bad = _misses(t, gb, gf, values)
    return stored, code, int(np.count_nonzero(bad)), wide, d[wide]


def extract(
    finetuned: Input,
    *,
    base: Input,
    out: str | os.PathLike[str] | None = None,
    density: float | None = None,
    count: int | None = None,
    scope: str = "global",
    values: str = "auto",
    dense: tuple[str, ...] | list[str] = (),
    overwrite: bool = False,
) -> Path | SparseFineTune:
    """Extract the sparse fine-tune of ``finetuned`` against ``base`` (LT-SFT's top-K rule).

    Args:
        finetuned: the fine-tuned model (file, folder, sharded folder or state dict).
        base: the model it was fine-tuned from.
        out: a ``.safetensors`` path for the container; ``None`` returns it in memory.
        density: fraction of the maskable entries kept, in (0, 1] (``round(density * d)``).
        count: number of entries kept over the whole model (instead of ``density``).
        scope: top-K over all maskable tensors together (``"global"``) or per tensor.
        values: value dtype: ``"auto"`` (float32 where exact, else float64; see the module
            docstring), ``"same"`` (the model's dtype), ``"float32"``, ``"float64"``,
            ``"bf16"`` or ``"float16"``.
        dense: regexes (``re.search``) of tensors stored whole (e.g. ``"classifier"``).
        overwrite: replace an existing output.

    Returns:
        The output path, or a :class:`SparseFineTune` when ``out`` is None.

    Raises:
        AdaptError: bad parameters, models that do not match, NaN/Inf, an output that cannot
            be written (nothing is left behind).

    Example:
        >>> extract("ft/", base="base/", density=0.05, out="ft.sft.safetensors")  # doctest: +SKIP
    """
    dense = tuple(dense)
    policy = _check(density, count, scope, values)
    patterns = _patterns(dense)
    ft_src = _as_source(finetuned, "<finetuned>")
    if ft_src.delta or isinstance(ft_src, SparseSource):
        raise ParameterError(
            f"{ft_src.label}: holds an update, not fine-tuned weights: extract takes a "
            "fine-tuned model and its --base"
        )
    base_src = _as_source(base, "<base>")
    plan = build_plan([ft_src], base_src)
    floats = [t for t in plan.tensors if t.merged]
    stored_whole = sorted(
        (t for t in floats if any(p.search(t.name) for p in patterns)), key=lambda t: t.name
    )
    whole = {t.name for t in stored_whole}
    maskable = sorted((t for t in floats if t.name not in whole), key=lambda t: t.name)
    params = Extract(density, count, scope, values, dense)
    builder = Builder(Path(out) if out is not None else None, overwrite, plan.sources)
    prov = Provenance(params, (ft_src, base_src), ("finetuned", "base"))  # type: ignore[arg-type]
    try:
        builder.begin()
        for t in plan.tensors:
            if not t.merged:
                _check_carried(plan, t, [src.read(t.name) for src in plan.sources])
        kept = _select(_Updates(plan, maskable), builder, density, count, scope, policy)
        for t in stored_whole:
            data = ft_src.read(t.name)
            code = t.in_dtypes[1]
            if not np.isfinite(as_float(data, code)).all():
                raise NonFiniteError(f"{ft_src.label}: tensor {t.name!r} holds NaN or Inf")
            entry = Entry(t.name, code, t.shape, True, t.out_info.numel, 0, code, 0, None)
            builder.add(entry, (data,))
        sparse = [e for e in builder.entries if not e.dense]
        header = Header(
            origin="extract",
            density=density,
            count=count,
            scope=scope,
            values=values,
            dense_patterns=dense,
            parameters=sum(e.numel for e in sparse),
            kept=kept,
            coded=sum(e.count for e in sparse),
        )
        return builder.finish(header, prov.metadata(final=True))
    except BaseException:
        prov.cancel()
        builder.abort()
        raise


def _select(
    updates: _Updates,
    builder: Builder,
    density: float | None,
    count: int | None,
    scope: str,
    policy: str,
) -> int:
    """Select and store every maskable tensor; returns the number of entries selected."""
    if scope == "tensor":
        assert density is not None
        kept = 0
        for t, b, f, tau in updates(check=True):
            k = count_for_density(density, tau.size)
            kept += k
            _store(t, b, f, tau, topk_threshold(tau, k), builder, policy)
        return kept
    g = GlobalTopK(count) if count is not None else GlobalTopK(density=density)
    for _, _, _, tau in updates(check=True):
        g.add_high(tau)
    try:
        g.finish_high()
    except ValueError:
        raise ParameterError(
            f"--count {count} exceeds the {g.n_total} entries of the maskable tensors"
        ) from None
    if g.needs_low_pass:
        for _, _, _, tau in updates():
            g.add_low(tau)
    g.finish_low()
    for t, b, f, tau in updates():
        _store(t, b, f, tau, g.selection(tau), builder, policy)
    g.finish_selection()
    assert g.total_k is not None
    return g.total_k


def _store(
    t: PlannedTensor,
    b: np.ndarray,
    f: np.ndarray,
    tau: np.ndarray,
    selection: tuple[np.float32, int],
    builder: Builder,
    policy: str,
) -> None:
    thr, cut = selection
    positions = kept_positions(tau, np.int64(threshold_key(thr)), np.int64(cut))
    stored, code, bad, wide, wide_values = _values(t, b, f, positions, policy)
    payload, m = encode_positions(positions, t.out_info.numel)
    n = positions.size
    entry = Entry(t.name, t.in_dtypes[1], t.shape, False, n, m, code, bad, None, wide.size)
    builder.add(entry, (payload, stored) + ((wide, wide_values) if wide.size else ()))
