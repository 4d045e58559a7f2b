"""Full-precision range warm-up of dynamic fixed point exponents (Courbariaux et al., as in the authors' code).

Every exponent starts at ``init_int_bits`` (the authors: 5). Before low-precision training, they train ``range_init_epoch``
epochs at full precision while each group measures its overflow rate and moves its exponent, then reset the
parameters to their initial random values. Here: with ``lowprec.nn.calibrating(model)`` active (every layer
quantizer observes and returns its input unchanged) the model trains in fp32 for the given steps, the
exponents advance after every step by their rule, and afterwards the parameters and the optimizer state are
restored to what they were before. The exponents (and buffers such as batch-norm running statistics) keep
their warmed-up values; the RNG is not rewound.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import calibrating, update_exponents

__all__ = ["warmup_exponents"]


def warmup_exponents(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    steps: int | None = None,
    *,
    update: Callable[[], None] | None = None,
) -> int:
    """Warm the model's dynamic fixed point exponents up on ``steps`` batches of ``data`` (default: all of it).

    ``loss_fn(model, batch)`` returns the loss; each step is ``loss.backward()`` then ``update()`` (default:
    ``optimizer.step()``, zero the grads, ``lowprec.nn.update_exponents(model)``; the Trainer passes its own
    full-precision update). Returns the number of steps taken."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be a non-negative int or None, got {steps!r}")

    def plain_update() -> None:
        optimizer.step()
        model.zero_grad(set_to_none=True)
        update_exponents(model)

    params = [p for p in model.parameters()]
    saved_params = [p.detach().clone() for p in params]
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    taken = 0
    try:
        with calibrating(model):
            for batch in itertools.islice(data, steps):
                loss_fn(model, batch).backward()
                (update or plain_update)()
                taken += 1
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
        optimizer.load_state_dict(saved_optimizer)
        model.zero_grad(set_to_none=True)
    return taken
