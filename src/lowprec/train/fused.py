"""One pass over memory for the optimizer step of a natively stored (fp16/bf16) model.

The unfused step of a native model (``update.py``) walks every parameter four times: the fp16/bf16 gradient is
copied into a float32 gradient of the master copy, divided by the loss scale, the optimizer updates the master,
and the master is rounded back into the parameter. ``FusedUpdate`` does all of it in one compiled kernel per
group of tensors, after the inf/NaN check (which reads only the fp16/bf16 gradients). With d = g / S in float32
(fp16 and bf16 gradients are float32 values), w the fp32 master and θ the parameter:

SGD (torch.optim.SGD, lowprec.train.SGD)::

    d = d + wd·w
    b = d  at the first step, else  μ·b + (1 − dampening)·d
    d = b   (nesterov: d + μ·b)
    w = w − lr·d

Adam, AdamW (torch.optim.Adam / AdamW, lowprec.train.AdamW), t the step count after this step::

    d = d + wd·w                    (Adam's L2 decay)     w = (1 − lr·wd)·w   (AdamW's decoupled decay)
    m = lerp(m, d, 1 − β1)          v = β2·v + (1 − β2)·d²
    w = w − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + ε)

and then θ = w rounded to θ's dtype (nearest, ties to even). These are torch's algorithms with their state
(``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``) kept in the optimizer, so a checkpoint reads the
same whichever path wrote it. Every operation rounds once to float32, its constants (1 − β1, lr / (1 − β1^t),
...) computed in float64 on the host as torch does; torch's eager kernels instead fuse some multiply-adds
(``add_(alpha=...)``, ``addcmul_``, ``addcdiv_``), so against torch a master may differ by an ulp or so per
step. Against lowprec.train.SGD (which also rounds ``−lr·d`` before adding it) the results are bit-identical
without weight decay and dampening.

Scalars enter the kernels as float32 tensors: changing them (an LR schedule, a new loss scale) does not
recompile. The path is taken only where it stands in exactly for the unfused one (``FusedUpdate.build``): the
optimizer is one of those above (no amsgrad, maximize, capturable or differentiable), every trainable
parameter is either native or plain fp32 with no storage, accumulator or optimizer-state format, there is no
gradient clipping, and torch.compile works. Otherwise, and after a compiler failure (one warning), the Trainer
takes the unfused path.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..formats import compile_enabled
from .optim import SGD as LowprecSGD
from .optim import AdamW as LowprecAdamW
from .update import ParamSlot

__all__ = ["FusedUpdate"]

_SGD = (torch.optim.SGD, LowprecSGD)
_ADAM = (torch.optim.Adam, torch.optim.AdamW, LowprecAdamW)


def _store(w: Tensor, new_w: Tensor, param: Tensor | None) -> None:
    w.copy_(new_w)
    if param is not None:
        param.copy_(new_w)


def _sgd_kernel(masters: list[Tensor], grads: list[Tensor], buffers: list[Tensor] | None,
                params: list[Tensor | None], *, lr: Tensor, momentum: Tensor, keep: Tensor | None,
                weight_decay: Tensor | None, scale: Tensor, first: bool, nesterov: bool) -> None:
    """SGD (module docstring); ``keep`` = 1 − dampening (None: no dampening), None scalars are absent terms."""
    for i, (w, g) in enumerate(zip(masters, grads)):
        d = g.float() / scale
        if weight_decay is not None:
            d = d + weight_decay * w
        if buffers is not None:
            b = d if first else buffers[i] * momentum + (d if keep is None else keep * d)
            buffers[i].copy_(b)
            d = d + momentum * b if nesterov else b
        _store(w, w - lr * d, params[i])


def _adam_kernel(masters: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 params: list[Tensor | None], *, lerp_weight: Tensor, beta2: Tensor, one_minus_beta2: Tensor,
                 eps: Tensor, step_size: Tensor, bias2_sqrt: Tensor, decay: Tensor | None,
                 weight_decay: Tensor | None, scale: Tensor) -> None:
    """Adam / AdamW (module docstring): ``decay`` = 1 − lr·wd (AdamW), ``weight_decay`` (Adam's L2)."""
    for i, (w, g) in enumerate(zip(masters, grads)):
        d = g.float() / scale
        if weight_decay is not None:
            d = d + weight_decay * w
        if decay is not None:
            w = w * decay
        m = torch.lerp(exp_avgs[i], d, lerp_weight)
        v = exp_avg_sqs[i] * beta2 + one_minus_beta2 * d * d
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        _store(masters[i], w - step_size * (m / (v.sqrt() / bias2_sqrt + eps)), params[i])


@functools.cache
def _compiled(kernel: Callable) -> Callable:
    # One graph per group's shapes, dtypes and static flags: a process that trains several models needs more
    # than torch's default of 8, past which it would run the kernel eagerly (correct, but many passes).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(kernel, dynamic=False, fullgraph=True)


class FusedUpdate:
    """The fused master update of one Trainer (module docstring). Build it with :meth:`build`."""

    def __init__(self, optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot]):
        self.optimizer = optimizer
        self.native = {id(s.master_copy): s.param for s in slots if s.master_copy is not None}
        self.adam = isinstance(optimizer, _ADAM)
        self.failed = False

    @classmethod
    def build(cls, optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot], clip: bool) -> FusedUpdate | None:
        """A FusedUpdate where the fused step stands in for the unfused one (module docstring), else None."""
        if clip or type(optimizer) not in _SGD + _ADAM or not compile_enabled():
            return None
        if not any(s.master_copy is not None for s in slots):
            return None
        if any(s.master is not None or s.accumulator is not None or s.state_quant is not None or s.courbariaux
               for s in slots):
            return None
        flags = ("amsgrad", "maximize", "capturable", "differentiable")
        if any(g.get(flag) for g in optimizer.param_groups for flag in flags):
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
            masters = [w for w in group["params"] if self._grad(w) is not None]
            fresh = [w for w in masters if not self.optimizer.state[w]]
            try:
                if masters:
                    (self._adam_group if self.adam else self._sgd_group)(group, masters, fresh, scale)
            except Exception as err:  # noqa: BLE001 - a compiler failure: fall back and say so, once
                for w in fresh:
                    self.optimizer.state.pop(w, None)
                if i:
                    raise
                self.failed = True
                warnings.warn(f"lowprec: the fused optimizer step could not be compiled ({type(err).__name__}: "
                              f"{err}); the unfused update is used from now on", RuntimeWarning, stacklevel=3)
                return False
        return True

    def _sgd_group(self, group: dict[str, Any], masters: list[Tensor], fresh: list[Tensor], scale: float) -> None:
        f32 = self._scalar(masters[0])
        mu, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
        scalars = dict(lr=f32(group["lr"]), momentum=f32(mu), keep=f32(1 - damp) if damp else None,
                       weight_decay=f32(wd) if wd else None, scale=f32(scale), nesterov=bool(group["nesterov"]))
        state = self.optimizer.state
        for w in fresh if mu != 0 else ():  # the first step's buffer is the step itself; the kernel fills it
            state[w]["momentum_buffer"] = torch.empty_like(w)
        is_fresh = {id(w) for w in fresh}
        for first in (True, False):
            ws = [w for w in masters if (id(w) in is_fresh) == first]
            if ws:
                buffers = [state[w]["momentum_buffer"] for w in ws] if mu != 0 else None
                _compiled(_sgd_kernel)(*self._tensors(ws), buffers, self._params(ws), first=first, **scalars)

    def _adam_group(self, group: dict[str, Any], masters: list[Tensor], fresh: list[Tensor], scale: float) -> None:
        f32 = self._scalar(masters[0])
        lr, (beta1, beta2), wd = float(group["lr"]), group["betas"], group["weight_decay"]
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(self.optimizer, LowprecAdamW)))
        state = self.optimizer.state
        for w in fresh:  # as torch initialises it (the count advances after the kernel)
            state[w].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
        common = dict(lerp_weight=f32(1 - beta1), beta2=f32(beta2), one_minus_beta2=f32(1 - beta2),
                      eps=f32(group["eps"]), scale=f32(scale), decay=f32(1 - lr * wd) if wd and decoupled else None,
                      weight_decay=f32(wd) if wd and not decoupled else None)
        by_count: dict[float, list[Tensor]] = {}
        for w in masters:
            by_count.setdefault(state[w]["step"].item() + 1, []).append(w)
        for t, ws in by_count.items():
            _compiled(_adam_kernel)(
                *self._tensors(ws), [state[w]["exp_avg"] for w in ws], [state[w]["exp_avg_sq"] for w in ws],
                self._params(ws), step_size=f32(lr / (1 - beta1**t)), bias2_sqrt=f32((1 - beta2**t) ** 0.5),
                **common)
        torch._foreach_add_([state[w]["step"] for w in masters], 1.0)

    def _tensors(self, masters: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [w.detach() for w in masters], [self._grad(w) for w in masters]

    def _params(self, masters: list[Tensor]) -> list[Tensor | None]:
        return [self.native[id(w)].detach() if id(w) in self.native else None for w in masters]

    @staticmethod
    def _scalar(like: Tensor) -> Callable[[float], Tensor]:
        return functools.partial(torch.tensor, dtype=torch.float32, device=like.device)

    def _grad(self, master: Tensor) -> Tensor | None:
        """The step's gradient of a holder: the native parameter's own fp16/bf16 gradient, or the fp32 one."""
        param = self.native.get(id(master))
        return master.grad if param is None else param.grad
