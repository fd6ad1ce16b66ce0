"""Composable sparse fine-tunes (Ansell et al., ACL 2022, arXiv:2110.07560).

A sparse fine-tune (SFT) ``phi`` holds the entries of ``theta - theta0`` at a few positions;
fine-tunes compose by addition, ``theta = theta0 + phi_lang + phi_task``, and ``revert``
subtracts. This package extracts them (LT-SFT's top-K rule), stores them (positions coded with
the ComPEFT position code, values contiguous; docs/formats.md), composes them exactly, does
mask algebra, reads composable-sft and SpIEL files, and helps train LT-SFT in torch.
Workflow and guarantees: docs/sparse.md.

Example:
    >>> from merge import sparse
    >>> sparse.extract("ft/", base="base/", density=0.05, out="t.sft.safetensors")  # doctest: +SKIP
    >>> sparse.apply("base/", ["l.sft.safetensors", "t.sft.safetensors"], "out/")  # doctest: +SKIP
    >>> sparse.mask_of("l.sft.safetensors") & sparse.mask_of("t.sft.safetensors")  # doctest: +SKIP
"""

from .compose import apply, revert
from .container import FORMAT, VERSION, Entry, Header, SparseFineTune, SparseSource
from .extract import CITATION, extract
from .interop import convert, open_sparse
from .masks import Mask, compeft_mask, difference, intersection, mask_of, restrict, union
from .stats import stats
from .training import lottery_ticket_mask, restrict_grads

__all__ = [
    "CITATION",
    "FORMAT",
    "VERSION",
    "Entry",
    "Header",
    "Mask",
    "SparseFineTune",
    "SparseSource",
    "apply",
    "compeft_mask",
    "convert",
    "difference",
    "extract",
    "intersection",
    "lottery_ticket_mask",
    "mask_of",
    "open_sparse",
    "restrict",
    "restrict_grads",
    "revert",
    "stats",
    "union",
]
