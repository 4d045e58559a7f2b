"""Which modules and roles produced the inf/NaN when a training step is skipped.

Two levels, neither costing anything on a clean step:

* ``attribute_overflow(names)``: the trainer already knows, from its one inf/NaN check after unscaling, the
  parameters whose gradients are not finite (``TrainStepResult.overflow_modules``); this maps each to its
  module and role (``weight_grad`` or ``bias_grad``). Pure bookkeeping, done only for skipped steps.
* ``explain_overflow(model, batch, loss_fn, scale)``: an opt-in post-mortem. It re-runs the batch, at the loss
  scale that overflowed, on a copy of the converted model (the model, its statistics and its exponents stay as
  they are) whose quantizers check what they return, and lists every (module, role) whose rounded tensor holds
  inf or NaN, in the order autograd produced them; ``origin`` marks those whose input was still finite: the
  place the overflow happened (an fp16 ``output_grad`` past 65504), as opposed to where it only travelled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..nn import QuantizedModule
from ..policy import Quantizer

__all__ = ["OverflowSource", "attribute_overflow", "describe_skipped_step", "explain_overflow"]

@dataclass(frozen=True)
class OverflowSource:
    """One module and role where a non-finite value appeared; ``parameter`` for parameter gradients."""

    module: str
    role: str
    parameter: str | None = None
    origin: bool = True  # its input was finite: the overflow happened here

    def __str__(self) -> str:
        return f"{self.module or '(root)'}.{self.role}" + ("" if self.origin else " (propagated)")


def attribute_overflow(parameter_names: Iterable[str]) -> tuple[OverflowSource, ...]:
    """(module, role) of each parameter whose gradient was inf/NaN: ``bias...`` parameters give
    ``bias_grad``, all others (weights, recurrent weights, batch-norm scales) ``weight_grad``. The name
    ``"loss"`` (the trainer's report of a non-finite loss with finite gradients) gives the role ``loss``."""
    sources = []
    for name in parameter_names:
        if name == "loss":
            sources.append(OverflowSource("", "loss"))
            continue
        module, _, leaf = name.rpartition(".")
        sources.append(OverflowSource(module, "bias_grad" if leaf.startswith("bias") else "weight_grad", name))
    return tuple(sources)


def describe_skipped_step(step: int, result: Any) -> str:
    """One line for a skipped step: the loss scale's move and the modules and roles that overflowed."""
    sources = attribute_overflow(result.overflow_modules)
    where = ", ".join("the loss" if s.role == "loss" else str(s) for s in sources) or "an unnamed tensor"
    return (f"step {step} skipped (loss scale {result.scale:g} -> {result.next_scale:g}): inf/NaN in {where}; "
            "lowprec.diagnostics.explain_overflow(model, batch, loss_fn, scale) names the first layer and role")


class _Checking(Quantizer):
    """A layer's quantizer, unchanged in what it returns, that reports a non-finite result."""

    def __init__(self, inner: Quantizer, report: Callable[[bool], None]):
        self.__dict__.update(inner.__dict__)
        self._inner, self._report = inner, report

    @property
    def enabled(self) -> bool:
        return self._inner.enabled

    def __call__(self, x: Tensor, axis: int | None = None) -> Tensor:
        y = self._inner(x, axis)
        if not bool(torch.isfinite(y).all()):
            self._report(bool(torch.isfinite(x).all()))
        return y


def explain_overflow(
    model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor], scale: float = 1.0
) -> tuple[OverflowSource, ...]:
    """Re-run ``loss_fn(model, batch) * scale`` forward and backward on a copy of ``model`` (a converted model)
    and return every (module, role) whose rounded tensor was not finite, in the order they were produced,
    then the parameters whose gradient was not finite (module docstring). Empty when nothing overflows."""
    work = copy.deepcopy(model)
    found: list[OverflowSource] = []
    for name, module in work.named_modules():
        if isinstance(module, QuantizedModule):
            for role, q in list(module.quantizers.items()):
                module.quantizers[role] = _Checking(
                    q, lambda finite_in, name=name, role=role: found.append(OverflowSource(name, role, None, finite_in))
                )
            if module.accumulator is not None:
                module.accumulator = type(module.accumulator)(module.quantizers["accumulation"], module.accumulator.chunk)
    (loss_fn(work, batch).float() * scale).backward()
    seen = {(s.module, s.role) for s in found}
    bad = [n for n, p in work.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    found += [s for s in attribute_overflow(bad) if (s.module, s.role) not in seen]
    return tuple(dict.fromkeys(found))
