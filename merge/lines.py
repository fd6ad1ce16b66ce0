"""LiNeS: layer-increasing network scaling of task vectors.

LiNeS (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
Model Merging", ICLR 2025, arXiv:2410.17146) scales the update of block ``l`` (1..L) of a
stack of ``L`` blocks by

    lambda(l) = alpha + beta * (l - 1) / (L - 1)

so shallow blocks keep little of the fine-tune and the last block gets ``alpha + beta``.
Parameters outside the blocks (embeddings, final norms, heads, projections) get ``alpha``.

The block of a parameter is parsed from its name per known layout, never by the reference
code's first ``.{i}.`` substring (which reads T5 ``encoder.block.3.layer.1.`` as block 1).
Each stack (T5 encoder and decoder, CLIP text and vision towers, ...) has its own ``L``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["LayerSchedule", "block_of", "lines_alpha"]

_END = r"(?:\.|$)"
_DIGIT = re.compile(r"\d")

# Known layouts, tried in order; the stack is the name prefix up to and including the container.
_LAYOUTS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        # Llama / Mistral / Qwen, optionally PEFT-wrapped or inside a multimodal model.
        r"^(?P<stack>(?:base_model\.model\.)?model(?:\.language_model)?\.layers)\.(?P<block>\d+)"
        + _END,
        # GPT-2 (GPT2LMHeadModel and bare GPT2Model).
        r"^(?P<stack>(?:transformer\.)?h)\.(?P<block>\d+)" + _END,
        # BERT / RoBERTa (task heads and bare encoders).
        r"^(?P<stack>(?:bert\.|roberta\.)?encoder\.layer)\.(?P<block>\d+)" + _END,
        # T5: encoder and decoder are separate stacks.
        r"^(?P<stack>(?:encoder|decoder)\.block)\.(?P<block>\d+)" + _END,
        # transformers CLIP: text and vision towers are separate stacks.
        r"^(?P<stack>(?:text|vision)_model\.encoder\.layers)\.(?P<block>\d+)" + _END,
        # OpenAI CLIP / open_clip: text ``transformer`` and vision ``visual.transformer``.
        r"^(?P<stack>(?:visual\.)?transformer\.resblocks)\.(?P<block>\d+)" + _END,
        # timm ViT.
        r"^(?P<stack>blocks)\.(?P<block>\d+)" + _END,
        # Anything else: the outermost ``<container>.N`` component.
        r"^(?P<stack>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<block>\d+)" + _END,
    )
)


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a user ``--layer-pattern`` and check it has a ``block`` group."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid layer pattern {pattern!r}: {err}") from None
    _check_pattern(compiled)
    return compiled


def _check_pattern(pattern: re.Pattern[str]) -> None:
    if "block" not in pattern.groupindex:
        raise ValueError(
            f"layer pattern {pattern.pattern!r} has no named group 'block'; "
            r"write it like 'layers\.(?P<block>\d+)\.' (optionally with a (?P<stack>...) group)"
        )


def block_of(name: str, pattern: re.Pattern[str] | None = None) -> tuple[str, int] | None:
    """Return ``(stack, 0-based block index)`` of a parameter name, or ``None`` outside blocks.

    The stack is the name prefix up to and including the block container, e.g.
    ``"encoder.block.3.layer.1.DenseReluDense.wi.weight"`` -> ``("encoder.block", 3)`` and
    ``"model.layers.7.mlp.down_proj.weight"`` -> ``("model.layers", 7)``.

    Known layouts: ``model.layers.N`` (Llama, Mistral, Qwen; also under ``base_model.model.``
    and ``model.language_model.``), ``transformer.h.N`` / ``h.N`` (GPT-2),
    ``[bert.|roberta.]encoder.layer.N``, ``encoder.block.N`` / ``decoder.block.N`` (T5),
    ``text_model.encoder.layers.N`` / ``vision_model.encoder.layers.N`` (transformers CLIP),
    ``transformer.resblocks.N`` / ``visual.transformer.resblocks.N`` (OpenAI CLIP, open_clip)
    and ``blocks.N`` (timm ViT). Any other name falls back to its outermost component
    ``layers.N``, ``layer.N``, ``h.N``, ``blocks.N`` or ``block.N``.

    Args:
        name: parameter name as in a state dict.
        pattern: a user regex that replaces the known layouts. It must have a named group
            ``block`` matching digits and may have a group ``stack``; without ``stack`` the
            stack is the name prefix before the block number. It is applied with ``search``.

    Raises:
        ValueError: ``pattern`` has no ``block`` group, or its ``block`` group matched
            something other than digits.
    """
    if pattern is not None:
        _check_pattern(pattern)
        match = pattern.search(name)
        if match is None:
            return None
        block = match.group("block")
        if block is None or not block.isdecimal():
            raise ValueError(
                f"layer pattern {pattern.pattern!r} matched block {block!r} in {name!r}; "
                "the 'block' group must match digits"
            )
        if "stack" in pattern.groupindex and match.group("stack") is not None:
            stack = match.group("stack")
        else:
            stack = name[: match.start("block")].rstrip(".")
        return stack, int(block)
    if _DIGIT.search(name) is None:
        return None
    for layout in _LAYOUTS:
        match = layout.match(name)
        if match is not None:
            return match.group("stack"), int(match.group("block"))
    return None


@dataclass(frozen=True)
class LayerSchedule:
    """Per-parameter LiNeS scale ``lambda(l) = alpha + beta * (l - 1) / (L - 1)``.

    ``l`` is the 1-based block index and ``L`` the depth of the parameter's stack; parameters
    outside any block get ``alpha``. A stack with a single block (``L == 1``) gets
    ``alpha + beta``: LiNeS anchors the last block at ``alpha + beta`` (with ``alpha = c``,
    ``beta = 1 - c`` the last block is kept unchanged), and a lone block is the last one.

    Build it with :meth:`from_names` from every parameter name of the model.

    Attributes:
        alpha: scale of non-block parameters and of the first block of every stack.
        beta: extra scale reached by the last block of every stack.
        depths: block count ``L`` per stack id.
        pattern: the user layer regex, or ``None`` for the known layouts.
    """

    alpha: float
    beta: float
    depths: Mapping[str, int] = field(hash=False)
    pattern: re.Pattern[str] | None = None

    @classmethod
    def from_names(
        cls, names: Iterable[str], alpha: float, beta: float, pattern: str | None = None
    ) -> LayerSchedule:
        """Count the blocks of each stack (max index + 1) over ``names``.

        Raises:
            ValueError: ``pattern`` is not a valid regex or has no ``block`` group.
        """
        compiled = None if pattern is None else _compile_pattern(pattern)
        depths: dict[str, int] = {}
        for name in names:
            found = block_of(name, compiled)
            if found is not None:
                stack, index = found
                depths[stack] = max(depths.get(stack, 0), index + 1)
        return cls(float(alpha), float(beta), MappingProxyType(depths), compiled)

    def scale(self, name: str) -> float:
        """LiNeS scale of the update of parameter ``name``.

        Raises:
            ValueError: ``name`` lies in a block this schedule was not built with.
        """
        return self.describe(name)[2]

    def describe(self, name: str) -> tuple[str | None, int | None, float]:
        """Return ``(stack, 1-based block l, scale)``; ``(None, None, alpha)`` outside blocks.

        Raises:
            ValueError: ``name`` lies in a block this schedule was not built with.
        """
        found = block_of(name, self.pattern)
        if found is None:
            return None, None, self.alpha
        stack, index = found
        depth = self.depths.get(stack, 0)
        if index >= depth:
            raise ValueError(
                f"{name!r} is in block {index} of stack {stack!r}, but the schedule was built "
                f"with {depth} blocks there; build it from all parameter names of the model"
            )
        fraction = index / (depth - 1) if depth > 1 else 1.0
        return stack, index + 1, self.alpha + self.beta * fraction


def lines_alpha(sum_l1: float, merged_l1: float, num_tasks: int) -> float:
    """Multi-task LiNeS alpha ``(||sum_t tau_t||_1 / ||tau_merged||_1) / T``.

    Wang et al. 2025 (arXiv:2410.17146) use it when merging ``T`` task vectors so the merged
    update has the L1 mass of plain task arithmetic with weight ``1/T``; it equals ``1/T``
    when ``tau_merged`` is the sum itself. Both norms are over the whole model.

    Args:
        sum_l1: ``||sum_t tau_t||_1``.
        merged_l1: ``||tau_merged||_1`` of the merge being scaled.
        num_tasks: ``T``, the number of task vectors merged.

    Raises:
        ValueError: ``merged_l1`` is not positive, ``sum_l1`` is negative or ``num_tasks < 1``.
    """
    if not merged_l1 > 0:
        raise ValueError(
            f"cannot derive the LiNeS alpha: the merged task vector has L1 norm {merged_l1} "
            "(it must be positive); pass alpha explicitly"
        )
    if not sum_l1 >= 0:
        raise ValueError(f"the L1 norm of the summed task vectors must be >= 0, got {sum_l1}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    return sum_l1 / merged_l1 / num_tasks
