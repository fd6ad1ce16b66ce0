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
    HubError,
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
    "HubError",
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
    "hub",
    "merge_to_lora",
    "open",
    "open_adapter",
    "plan",
    "run",
    "soup",
    "version",
]


def __getattr__(name: str) -> object:
    """``merge.hub`` is imported on first use: huggingface_hub is slow to import."""
    if name == "hub":
        import importlib

        return importlib.import_module(".hub", __name__)
    raise AttributeError(f"module 'merge' has no attribute {name!r}")
