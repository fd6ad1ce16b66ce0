"""ComPEFT (Yadav et al., arXiv:2311.13171): compress an update to signs and one scale.

tau_hat = alpha * sigma(tau) * sign(TopK_k(tau)): the top ``k = round(density * d)`` entries
of the update by magnitude keep their sign, every other entry becomes 0, and every kept entry
decodes to ``± alpha * sigma`` with sigma the standard deviation (ddof = 1) of the whole
unpruned update. Kept positions are Golomb coded, signs take one bit each, in a safetensors
container (docs/formats.md). Formula, parameters and choices: docs/methods.md.

Example:
    >>> from merge import compeft
    >>> compeft.compress("ft/", base="base/", out="ft.cpeft.safetensors")  # doctest: +SKIP
    >>> compeft.apply("ft.cpeft.safetensors", base="base/", out="ft-ternary/")  # doctest: +SKIP
    >>> expert = compeft.compress(task_vector, density=0.05)  # in memory  # doctest: +SKIP
    >>> expert.to_state_dict()["lm_head.weight"]  # doctest: +SKIP
"""

from .compress import CITATION, ComPEFT, compress
from .container import (
    FORMAT,
    VERSION,
    CompressedExpert,
    CompressedSource,
    Header,
    TensorCode,
    bound_bits,
)
from .use import apply, decompress, open_compressed

__all__ = [
    "CITATION",
    "FORMAT",
    "VERSION",
    "ComPEFT",
    "CompressedExpert",
    "CompressedSource",
    "Header",
    "TensorCode",
    "apply",
    "bound_bits",
    "compress",
    "decompress",
    "open_compressed",
]
