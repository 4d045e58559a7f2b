"""Multi-tensor SGD and AdamW that compute each step's update Δ before applying it.

``step()`` is ``θ <- θ + Δ`` (one fp32 rounding per element), with Δ from ``compute_deltas()``. The Trainer's
lazy update (Park et al.) needs Δ itself: with these optimizers it takes one parameter at a time
(``parameter_delta``: its Δ, then its storage rule and its optimizer-state rounding, so that one parameter's
float state and Δ exist at a time) and never has to snapshot, step and restore the parameters as it must for an
arbitrary ``torch.optim`` optimizer.

Numerics, in the parameters' dtype (fp32 for lowprec's emulated formats), with torch._foreach_* ops:

* SGD (torch.optim.SGD semantics, including the first-step momentum buffer = g):
  ``d = g + wd·θ``; ``b = μ·b + (1 - dampening)·d`` (b = d at the first step); ``d = b`` (or ``d + μ·b``
  with nesterov); ``Δ = fl(-lr·d)``.
* AdamW (torch.optim.AdamW semantics, decoupled weight decay, no amsgrad):
  ``m = lerp(m, g, 1 - β1)``; ``v = β2·v + (1 - β2)·g²``; ``t += 1``;
  ``Δ = -lr·wd·θ - (lr / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)``.

torch applies its update with fused forms (``θ.add_(d, alpha=-lr)``, ``θ.mul_(1 - lr·wd)`` then ``addcdiv_``);
here Δ is rounded once before it is added, so results agree with torch to within a few fp32 ulps of θ per
step, not bit for bit. The state (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``) has torch's
names, so the Trainer's optimizer-state formats and checkpoints treat both alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["DeltaOptimizer", "SGD", "AdamW"]


class DeltaOptimizer(Optimizer):
    """An optimizer whose update can be computed without being applied (see the module docstring)."""

    def _group_deltas(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Advance the state of ``params`` and return their updates Δ (new tensors)."""
        raise NotImplementedError

    @torch.no_grad()
    def parameter_delta(self, group: dict[str, Any], param: Tensor) -> Tensor:
        """The update Δ of one parameter of ``group`` (it has a gradient); its state advances one step. Per
        element the same arithmetic as ``compute_deltas`` (the multi-tensor ops on a one-tensor list)."""
        if param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return self._group_deltas(group, [param], [param.grad])[0]

    @torch.no_grad()
    def compute_deltas(self) -> tuple[list[Tensor], list[Tensor]]:
        """(parameters, their updates Δ) for every parameter with a gradient; the state advances one step,
        the parameters are left as they are."""
        params: list[Tensor] = []
        deltas: list[Tensor] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                if any(p.grad.is_sparse for p in ps):
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params += ps
                deltas += self._group_deltas(group, ps, [p.grad for p in ps])
        return params, deltas

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """θ <- θ + Δ for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, deltas = self.compute_deltas()
        if params:
            torch._foreach_add_(params, deltas)
        return loss


def _check(name: str, value: float, lo: float = 0.0, hi: float | None = None) -> None:
    if not value >= lo or (hi is not None and not value < hi):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


class SGD(DeltaOptimizer):
    """Stochastic gradient descent with momentum and (coupled, L2) weight decay, like torch.optim.SGD."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        _check("lr", lr)
        _check("momentum", momentum)
        _check("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)

    def _group_deltas(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        lr, mu, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
        d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else list(grads)
        if mu != 0:
            bufs, old_bufs, old_d = [], [], []
            for p, g in zip(params, d):
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g.detach().clone()
                else:
                    old_bufs.append(buf)
                    old_d.append(g)
                bufs.append(buf)
            if old_bufs:
                torch._foreach_mul_(old_bufs, mu)
                torch._foreach_add_(old_bufs, old_d, alpha=1 - group["dampening"])
            d = torch._foreach_add(d, bufs, alpha=mu) if group["nesterov"] else bufs
        return torch._foreach_mul(d, -lr)


class AdamW(DeltaOptimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), like torch.optim.AdamW (no amsgrad)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        _check("lr", lr)
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("eps", eps)
        _check("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _group_deltas(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_add_(steps, 1.0)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [s.item() for s in steps]  # CPU scalars, as torch keeps them: no device sync
        step_sizes = [-lr / (1 - beta1**t) for t in counts]
        bias2_sqrt = [(1 - beta2**t) ** 0.5 for t in counts]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        deltas = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(deltas, step_sizes)
        if wd != 0:
            torch._foreach_add_(deltas, params, alpha=-lr * wd)
        return deltas
