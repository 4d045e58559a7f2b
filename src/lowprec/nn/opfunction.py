"""``QOpFunction``: any torch op with its operands, result and gradients rounded per role.

The op-level emulation (``lowprec.nn.emulate``) runs every GEMM-like op and norm through this one autograd
Function. Numerics, for an op ``z = op(t1, ..., tn)`` whose operand ``ti`` has forward role ``ri``::

    forward:   tiq = Q_ri(ti)                 (activation, weight or bias; operands with no role pass as they are)
               z   = op(t1q, ..., tnq)        torch's own kernel, in the operands' (float32) precision
               zq  = Q_output(z)
    backward:  gq  = Q_output_grad(dE/dzq)
               dE/dti = Q_{ri}_grad(d op / d ti at (t1q, ..., tnq), applied to gq)

``activation -> activation_grad``, ``weight -> weight_grad``, ``bias -> bias_grad``. The backward products are
torch's own backward of ``op`` evaluated on the quantized operands and the quantized output gradient (the same
rule as QLinearFunction, written once for every op), so every GEMM of the backward pass (dE/dx = gq W,
dE/dW = gq^T x, a convolution's ``convolution_backward``) multiplies values that lie on their roles' grids.
Every quantizer is crossed by the straight-through estimator of ``roles.straight_through``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..policy import Quantizer, Role
from .roles import quantize_roles, straight_through

__all__ = ["OpCall", "QOpFunction", "GRAD_ROLE", "run_op"]

#: The gradient role of each forward operand role.
GRAD_ROLE = {r: Role(r).grad for r in Role.select(layer=True, gradient=False) if r != Role.OUTPUT}


@functools.cache
def _used_roles(roles: tuple[str | None, ...]) -> tuple[str, ...]:
    """The roles an op with these operand roles has: theirs, their gradients', the output's and its gradient's."""
    named = {r for r in roles if r is not None}
    return tuple(named | {GRAD_ROLE[r] for r in named} | {Role.OUTPUT.value, Role.OUTPUT_GRAD.value})


@dataclass(frozen=True, eq=False)
class OpCall:
    """One op to run quantized: ``fn(*tensors)`` computes it; ``roles[i]`` is the forward role of operand i
    (None: passed unquantized, e.g. indices or running statistics); ``quantizers`` maps every LAYER_ROLE to a
    Quantizer; ``on_backward`` (optional) is called when the op's backward runs (the plan records it)."""

    fn: Callable[..., Tensor]
    roles: tuple[str | None, ...]
    quantizers: Mapping[str, Quantizer]
    on_backward: Callable[[], None] | None = None

    @property
    def quantizes(self) -> bool:
        """Whether any role this call has (its operands', the output's and their gradients') is quantized."""
        return any(self.quantizers[r].enabled for r in _used_roles(self.roles))


def _quantize(quantizers: Mapping[str, Quantizer], role: str | None, x: Any) -> tuple[Any, Tensor | None]:
    if role is None or not isinstance(x, Tensor):
        return x, None
    ((q, mask),) = quantize_roles(quantizers, **{role: x})
    return q, mask


class QOpFunction(Function):
    """``QOpFunction.apply(call, *tensors)``: ``call.fn`` on quantized operands, see the module docstring."""

    @staticmethod
    def forward(ctx: Any, call: OpCall, *tensors: Any) -> Tensor:
        leaves, masks = [], []
        for i, (role, t) in enumerate(zip(call.roles, tensors)):
            q, mask = _quantize(call.quantizers, role, t)
            needs_grad = ctx.needs_input_grad[1 + i] and isinstance(q, Tensor)
            leaves.append(q.detach().requires_grad_() if needs_grad else q)
            masks.append(mask)
        with torch.enable_grad():
            z = call.fn(*leaves)
        zq, mask_z = _quantize(call.quantizers, "output", z.detach())
        if any(isinstance(leaf, Tensor) and leaf.requires_grad for leaf in leaves):
            ctx.graph = (z, leaves)  # backward differentiates torch's own op at the quantized operands
        ctx.call, ctx.masks, ctx.mask_z = call, masks, mask_z
        return zq

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        call: OpCall = ctx.call
        z, leaves = ctx.graph
        del ctx.graph
        if call.on_backward is not None:
            call.on_backward()
        gq, _ = _quantize(call.quantizers, "output_grad", straight_through(grad, ctx.mask_z))
        wanted = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad]
        with torch.enable_grad():
            grads = torch.autograd.grad(z, [leaves[i] for i in wanted], gq, allow_unused=True)
        out: list[Tensor | None] = [None] * len(leaves)
        for i, g in zip(wanted, grads):
            role = call.roles[i]
            g = straight_through(g, ctx.masks[i])
            out[i] = g if role is None else _quantize(call.quantizers, GRAD_ROLE[role], g)[0]
        return (None, *out)


def run_op(call: OpCall, *tensors: Any) -> Tensor:
    """``call.fn(*tensors)`` through QOpFunction, or directly (bit for bit torch's op) when no role of the
    call is quantized."""
    if not call.quantizes:
        return call.fn(*tensors)
    return QOpFunction.apply(call, *tensors)
