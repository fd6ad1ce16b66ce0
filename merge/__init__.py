"""adapt's engine: merge, compress and ship fine-tunes, streaming tensor by tensor.

Example:
    >>> import merge
    >>> merge.soup(["a.safetensors", "b.safetensors"], out="soup.safetensors")  # doctest: +SKIP
"""

from . import compeft
from .api import open, plan, run, soup
from .errors import (
    AdaptError,
    CorruptFileError,
    InputError,
    MismatchError,
    NonFiniteError,
    OutputError,
    ParameterError,
    SourceNotFoundError,
)
from .greedy import GreedySoupResult, greedy_soup
from .lora import LoraMergeResult, LoraSource, merge_to_lora, open_adapter
from .methods import DareLinear, DareTies, Lines, Method, Soup, TaskArithmetic, Ties
from .plan import Plan, PlannedTensor
from .provenance import version
from .safetensors_file import TensorInfo
from .sources import Source

__all__ = [
    "AdaptError",
    "CorruptFileError",
    "DareLinear",
    "DareTies",
    "GreedySoupResult",
    "InputError",
    "Lines",
    "LoraMergeResult",
    "LoraSource",
    "Method",
    "MismatchError",
    "NonFiniteError",
    "OutputError",
    "ParameterError",
    "Plan",
    "PlannedTensor",
    "Soup",
    "Source",
    "SourceNotFoundError",
    "TaskArithmetic",
    "TensorInfo",
    "Ties",
    "compeft",
    "greedy_soup",
    "merge_to_lora",
    "open",
    "open_adapter",
    "plan",
    "run",
    "soup",
    "version",
]
