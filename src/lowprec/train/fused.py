"""One pass over memory for the SGD step of a natively stored (fp16/bf16) model.

The unfused step of a native model (``update.py``) walks every parameter four times: the fp16/bf16 gradient is
copied into a float32 gradient of the master copy, divided by the loss scale, the optimizer updates the master,
and the master is rounded back into the parameter. ``FusedSGD`` does all of it in one compiled kernel per
parameter group, after the inf/NaN check (which reads only the fp16/bf16 gradients):

    d = g / S  (+ wd·w)                       # in float32: fp16 and bf16 gradients are float32 values
    b = d  at the first step, else  μ·b + (1 − dampening)·d
    d = b   (nesterov: d + μ·b)
    w = w − lr·d                              # the fp32 master (the optimizer's own tensor)
    θ = w rounded to θ's dtype (nearest, ties to even)

This is torch.optim.SGD's algorithm with its state (``momentum_buffer``) kept in the optimizer, so a checkpoint
reads the same whichever path wrote it. Every operation rounds once to float32; torch's eager kernels instead
fuse ``w + α·d`` into one multiply-add where α ≠ 1 (``alpha=-lr``, ``alpha=wd``, ``alpha=1-dampening``), so
against torch.optim.SGD a master may differ by one float32 ulp per step. Against lowprec.train.SGD (which also
rounds ``−lr·d`` before adding it) the results are bit-identical without weight decay and dampening.

Scalars (lr, μ, dampening, wd, S) enter the kernel as float32 tensors: changing them (an LR schedule, a new loss
scale) does not recompile. The path is taken only where it is exact to do so (``FusedSGD.build``): SGD is the
optimizer (torch's or lowprec's), every trainable parameter is either native or plain fp32 with no storage,
accumulator or optimizer-state format, there is no gradient clipping, and torch.compile works. Otherwise, and
after any compiler failure (one warning), the Trainer takes the unfused path.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from ..formats import compile_enabled
from .optim import SGD as LowprecSGD
from .update import ParamSlot

__all__ = ["FusedSGD"]

_SGD_TYPES = (torch.optim.SGD, LowprecSGD)


def _sgd_kernel(
    masters: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor] | None,
    params: list[Tensor | None],
    lr: Tensor,
    momentum: Tensor,
    dampening: Tensor | None,
    weight_decay: Tensor | None,
    scale: Tensor,
    first: bool,
    nesterov: bool,
) -> None:
    """The step written once (module docstring); ``None`` scalars are terms that are absent."""
    for i, (w, g) in enumerate(zip(masters, grads)):
        d = g.float() / scale
        if weight_decay is not None:
            d = d + weight_decay * w
        if buffers is not None:
            b = buffers[i]
            if first:
                new_b = d
            else:
                new_b = b * momentum + (d if dampening is None else (1 - dampening) * d)
            b.copy_(new_b)
            d = d + momentum * new_b if nesterov else new_b
        new_w = w - lr * d
        w.copy_(new_w)
        if params[i] is not None:
            params[i].copy_(new_w)


@functools.cache
def _compiled_kernel() -> Callable:
    return torch.compile(_sgd_kernel, dynamic=False, fullgraph=True)


class FusedSGD:
    """The fused master update of one Trainer (module docstring). Build it with :meth:`build`."""

    def __init__(self, optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot]):
        self.optimizer = optimizer
        self.native = {id(s.master_copy): s.param for s in slots if s.master_copy is not None}
        self.failed = False

    @classmethod
    def build(cls, optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot], clip: bool) -> FusedSGD | None:
        """A FusedSGD where the fused step gives the unfused step's numbers, else None (module docstring)."""
        if clip or type(optimizer) not in _SGD_TYPES or not compile_enabled():
            return None
        if not any(s.master_copy is not None for s in slots):
            return None
        if any(s.master is not None or s.accumulator is not None or s.state_quant is not None for s in slots):
            return None
        if any(g.get("maximize") or g.get("differentiable") for g in optimizer.param_groups):
            return None
        return cls(optimizer, slots)

    def ready(self, slots: Sequence[ParamSlot]) -> bool:
        """Whether this step can be fused: no gradient was already gathered into an fp32 master (gradient
        accumulation over several backward passes, an explicit ``unscale_``) and the compiler has not failed."""
        return not self.failed and all(s.master_copy is None or s.master_copy.grad is None for s in slots)

    @torch.no_grad()
    def step(self, scale: float) -> bool:
        """Update every parameter with a gradient (divided by ``scale``). Returns False, having changed nothing,
        when the compiler fails on the first group (it compiles there, at the first step), for the caller to
        take the unfused path."""
        for i, group in enumerate(self.optimizer.param_groups):
            created: list[Tensor] = []
            try:
                self._step_group(group, scale, created)
            except Exception as err:  # noqa: BLE001 - a compiler failure: fall back and say so, once
                for w in created:
                    del self.optimizer.state[w]["momentum_buffer"]
                if i:
                    raise
                self.failed = True
                warnings.warn(f"lowprec: the fused SGD step could not be compiled ({type(err).__name__}: {err}); "
                              "the unfused update is used from now on", RuntimeWarning, stacklevel=3)
                return False
        return True

    def _step_group(self, group: dict, scale: float, created: list[Tensor]) -> None:
        masters = [w for w in group["params"] if self._grad(w) is not None]
        if not masters:
            return
        f32 = functools.partial(torch.tensor, dtype=torch.float32, device=masters[0].device)
        mu, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
        scalars = dict(lr=f32(float(group["lr"])), momentum=f32(mu), dampening=f32(damp) if damp else None,
                       weight_decay=f32(wd) if wd else None, scale=f32(scale), nesterov=bool(group["nesterov"]))
        state = self.optimizer.state
        for w in masters:  # the first step's buffer is the step itself (torch.optim.SGD); the kernel fills it
            if mu != 0 and "momentum_buffer" not in state[w]:
                state[w]["momentum_buffer"] = torch.empty_like(w)
                created.append(w)
        fresh = {id(w) for w in created}
        for first in (True, False):
            ws = [w for w in masters if (id(w) in fresh) == first]
            if not ws:
                continue
            buffers = [state[w]["momentum_buffer"] for w in ws] if mu != 0 else None
            params = [self.native[id(w)].detach() if id(w) in self.native else None for w in ws]
            _compiled_kernel()([w.detach() for w in ws], [self._grad(w) for w in ws], buffers, params,
                               first=first, **scalars)

    def _grad(self, master: Tensor) -> Tensor | None:
        """The step's gradient of a holder: the native parameter's own fp16/bf16 gradient, or the fp32 one."""
        param = self.native.get(id(master))
        return master.grad if param is None else param.grad
