"""Training helpers for LT-SFT (Ansell et al. 2022): the lottery-ticket mask of a full
fine-tune, and gradients restricted to a mask for the sparse re-training that follows.

LT-SFT fine-tunes fully, keeps the K entries that changed most (:func:`lottery_ticket_mask`),
resets the model to its original weights and trains again with every update outside the mask
zeroed (:func:`restrict_grads`). Zeroed gradients are not enough with decoupled weight decay
(AdamW shrinks every parameter whatever its gradient): given the optimizer,
:func:`restrict_grads` also restores the masked-out entries after each step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import MismatchError, ParameterError
from ..kernels.select import GlobalTopK, kept_mask
from .masks import Mask


def lottery_ticket_mask(
    model: Any, original_state: Mapping[str, Any], k: int, *, include: str | None = None
) -> Mask:
    """The ``k`` entries of largest ``|theta - theta0|`` over the model's float parameters.

    Exactly ``k`` entries over all the parameters together (named in ``original_state`` and,
    with ``include``, matching that regex by ``re.search``), ranked by the float32 magnitude
    of the float64 difference; ties keep the earlier parameter (by name), then the lower flat
    index, as :func:`merge.sparse.extract` does.

    Args:
        model: a ``torch.nn.Module`` after the full fine-tune.
        original_state: its parameters before fine-tuning (``{name: tensor}``).
        k: number of entries in the mask.

    Raises:
        ParameterError: ``k`` exceeds the entries, or no parameter is selected.
        MismatchError: a parameter's shape differs from ``original_state``'s.
    """
    import torch

    pattern = re.compile(include) if include is not None else None
    params = sorted(
        (n, p)
        for n, p in model.named_parameters()
        if n in original_state and p.is_floating_point() and (pattern is None or pattern.search(n))
    )
    if not params:
        raise ParameterError("no float parameter of the model is in original_state")

    def change(name: str, p: Any) -> np.ndarray:
        before = original_state[name]
        if tuple(before.shape) != tuple(p.shape):
            raise MismatchError(
                f"parameter {name!r}: shape {list(p.shape)} in the model but "
                f"{list(before.shape)} in original_state"
            )
        d = p.detach().to("cpu", torch.float64) - before.detach().to("cpu", torch.float64)
        return d.to(torch.float32).reshape(-1).numpy()

    g = GlobalTopK(int(k))
    for name, p in params:
        g.add_high(change(name, p))
    try:
        g.finish_high()
    except ValueError as e:
        raise ParameterError(f"k={k}: {e}") from None
    if g.needs_low_pass:
        for name, p in params:
            g.add_low(change(name, p))
    g.finish_low()
    positions = {}
    for name, p in params:
        x = change(name, p)
        positions[name] = np.flatnonzero(kept_mask(x, *g.selection(x)))
    g.finish_selection()
    return Mask(positions, {n: tuple(p.shape) for n, p in params})


def restrict_grads(model: Any, mask: Mask | Mapping[str, Any], optimizer: Any = None) -> list[Any]:
    """Zero the gradient of every entry outside ``mask`` (parameters the mask does not name are
    left alone: freeze them, or train them whole like task heads).

    Call it after resetting the model to its original weights. Given ``optimizer``, a step
    post-hook also puts the masked-out entries back to their values at this call after every
    step, so that decoupled weight decay (AdamW) and any other update that ignores gradients
    cannot move them.

    Args:
        model: a ``torch.nn.Module``.
        mask: a :class:`Mask` or ``{name: bool tensor}`` (True = trainable).
        optimizer: the ``torch.optim.Optimizer`` that steps the model.

    Returns:
        The hooks' handles; ``handle.remove()`` each to lift the restriction.

    Raises:
        MismatchError: the mask names a tensor that is not a parameter, or gives another shape.

    Example:
        >>> handles = restrict_grads(model, mask, optimizer)  # doctest: +SKIP
        >>> for h in handles: h.remove()  # doctest: +SKIP
    """
    import torch

    masks = mask.to_torch() if isinstance(mask, Mask) else mask
    params = dict(model.named_parameters())
    handles: list[Any] = []
    frozen = []
    for name, m in masks.items():
        p = params.get(name)
        if p is None:
            raise MismatchError(f"mask tensor {name!r} is not a parameter of the model")
        if tuple(m.shape) != tuple(p.shape):
            raise MismatchError(
                f"parameter {name!r}: shape {list(p.shape)} but {list(m.shape)} in the mask"
            )
        outside = ~m.to(device=p.device, dtype=torch.bool)
        if p.requires_grad:
            handles.append(p.register_hook(lambda grad, o=outside: grad.masked_fill(o, 0)))
        if optimizer is not None:
            frozen.append((p, outside, p.detach()[outside].clone()))
    if optimizer is not None:

        def restore(opt: Any, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                for p, outside, values in frozen:
                    p.masked_scatter_(outside, values)

        handles.append(optimizer.register_step_post_hook(restore))
    return handles
