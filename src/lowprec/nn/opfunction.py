"""``QOpFunction``: any torch op with its operands, result and gradients rounded per role.

The op-level emulation (``lowprec.nn.emulate``) runs every GEMM-like op and norm through this one autograd
Function. Numerics, for an op ``z = op(t1, ..., tn)`` whose operand ``ti`` has forward role ``ri``::

    forward:   tiq = Q_ri(ti)                 (activation, weight or bias; operands with no role pass as they are;
                                               block formats along the operand's reduction dimension, ``axes``,
                                               and each gradient as its tensor; the result: ``result_axis``)
               z   = op(t1q, ..., tnq)        torch's own kernel, in the operands' (float32) precision
               zq  = Q_output(z)
    backward:  gq  = Q_output_grad(dE/dzq)
               dE/dti = Q_{ri}_grad(d op / d ti at (t1q, ..., tnq), applied to gq)

``activation -> activation_grad``, ``weight -> weight_grad``, ``bias -> bias_grad``. The backward products are
torch's own backward of ``op`` evaluated on the quantized operands and the quantized output gradient (the same
rule as QLinearFunction, written once for every op), so every GEMM of the backward pass (dE/dx = gq W,
dE/dW = gq^T x, a convolution's ``convolution_backward``) multiplies values that lie on their roles' grids.
Every quantizer is crossed by the straight-through estimator of ``roles.straight_through``.

What forward keeps for backward depends on whether saved-tensor hooks take what autograd saves
(``lowprec.nn.packed.saving_through_hooks``: the packing's, ``lowprec.nn.packed``, or an activation
checkpoint's, in its forward and its recomputation alike). Without hooks, forward keeps torch's graph of ``op``
(the float32 operands ``tiq`` and the unrounded ``z``) and backward differentiates it (then frees it, unless
backward runs with ``retain_graph=True``: a second backward uses it again). Under hooks, forward keeps only the
rounded operands ``tiq`` and the straight-through masks, through ``ctx.save_for_backward`` (so the packing stores
them in their formats' width, a mask one bit a value, and a checkpoint recomputes them), and frees ``z``;
backward runs ``op`` once more on the unpacked operands (bit for bit the same values) and differentiates that:
the same gradients, bit for bit where the op is deterministic, for one more forward ``op`` per call. A graph
kept under a non-reentrant checkpoint's hooks would be differentiated by a backward of its own (a new graph
task), for which torch recomputes the whole checkpointed block again: once per op. An op that changes state as
it runs (``OpCall.recompute`` False: batch_norm's running statistics in training) always keeps its graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..policy import Quantizer, Role
from .functions import _own_output
from .packed import saving_through_hooks
from .roles import clip_mask, straight_through

__all__ = ["OpCall", "QOpFunction", "GRAD_ROLE", "run_op", "observing_recomputed"]

#: What ``observing_recomputed`` listeners are told: (the operands saved to run the op again, its result).
RecomputeListener = Callable[[tuple[Any, ...], Tensor], None]
_LISTENERS: list[RecomputeListener] = []


@contextmanager
def observing_recomputed(listener: RecomputeListener) -> Iterator[None]:
    """Inside the block, ``listener(operands, result)`` is called by every QOpFunction forward that saves its
    rounded operands to run the op again in backward, right after it saved them (a memory estimate counts what
    that backward allocates)."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)

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
    recompute: bool = True  # whether fn may run again in backward (False: it changes state, see the docstring)
    axes: tuple[int | None, ...] = ()  # per operand: its reduction dimension, where its blocks run (ops.Invocation)
    result_axis: int | None = None  # the same for the result and its gradient

    @property
    def quantizes(self) -> bool:
        """Whether any role this call has (its operands', the output's and their gradients') is quantized."""
        return any(self.quantizers[r].enabled for r in _used_roles(self.roles))


def _quantize(quantizers: Mapping[str, Quantizer], role: str | None, x: Any,
              axis: int | None = None) -> tuple[Any, Tensor | None]:
    """x rounded by its role's quantizer (blocks along ``axis`` where given), with its straight-through mask."""
    if role is None or not isinstance(x, Tensor):
        return x, None
    quantizer = quantizers[role]
    return quantizer(x, axis), clip_mask(quantizer, x)


class QOpFunction(Function):
    """``QOpFunction.apply(call, *tensors)``: ``call.fn`` on quantized operands, see the module docstring."""

    @staticmethod
    def forward(ctx: Any, call: OpCall, *tensors: Any) -> Tensor:
        axes = call.axes or (None,) * len(tensors)
        operands, masks = zip(*(_quantize(call.quantizers, role, t, axis)
                                for role, t, axis in zip(call.roles, tensors, axes)))
        wanted = [i for i, q in enumerate(operands) if ctx.needs_input_grad[1 + i] and isinstance(q, Tensor)]
        if call.recompute and saving_through_hooks():
            with torch.autograd.graph.saved_tensors_hooks(_drop, _dropped):  # the graph is not kept
                z = _differentiable(call, operands, wanted)[0].detach()
            ctx.graph = None
        else:
            z, leaves = _differentiable(call, operands, wanted)
            ctx.graph = (z, leaves) if wanted else None
        zq, mask_z = _quantize(call.quantizers, "output", z.detach(), call.result_axis)
        ctx.call, ctx.wanted = call, wanted
        _save(ctx, (*operands, *masks, mask_z) if ctx.graph is None else (*masks, mask_z))
        if ctx.graph is None:
            for listener in _LISTENERS:
                listener(operands, zq)
        return _own_output(zq, *tensors)  # a view (F.linear of a 3-d input, no output role) is copied

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        call: OpCall = ctx.call
        saved, n = _saved(ctx), len(call.roles)
        if ctx.graph is None:  # packed: run the op again on the unpacked rounded operands
            z, leaves = _differentiable(call, saved[:n], ctx.wanted)
            saved = saved[n:]
        else:  # freed after use, unless backward keeps the graph (retain_graph=True: it may run again)
            z, leaves = ctx.graph
            retain = torch._C._autograd._get_current_graph_task_keep_graph()
            if not retain:
                ctx.graph = None
        masks, mask_z = saved[:n], saved[n]
        if call.on_backward is not None:
            call.on_backward()
        gq, _ = _quantize(call.quantizers, "output_grad", straight_through(grad, mask_z), call.result_axis)
        with torch.enable_grad():
            grads = torch.autograd.grad(z, [leaves[i] for i in ctx.wanted], gq, allow_unused=True,
                                        retain_graph=ctx.graph is not None)
        out: list[Tensor | None] = [None] * n
        axes = call.axes or (None,) * n
        for i, g in zip(ctx.wanted, grads):
            role = call.roles[i]
            g = straight_through(g, masks[i])
            out[i] = g if role is None else _quantize(call.quantizers, GRAD_ROLE[role], g, axes[i])[0]
        return (None, *out)


def _differentiable(call: OpCall, operands: Sequence[Any], wanted: list[int]) -> tuple[Tensor, list[Any]]:
    """``call.fn`` on ``operands``, differentiable with respect to the ``wanted`` ones (fresh leaves, returned
    with the others): the same kernels in forward and when backward runs it again, so the same bits."""
    leaves = [q.detach().requires_grad_() if i in wanted else q for i, q in enumerate(operands)]
    with torch.enable_grad():
        return call.fn(*leaves), leaves


def _drop(_t: Tensor) -> None:
    return None


def _dropped(_packed: None) -> Tensor:
    raise RuntimeError("QOpFunction: a graph built to compute a result only was differentiated")


def _save(ctx: Any, values: tuple[Any, ...]) -> None:
    """Save ``values`` (tensors, None or other operands) through ``ctx.save_for_backward``, so that the
    saved-tensor hooks see the tensors; anything else is kept as it is."""
    ctx.tensor_slots = [isinstance(v, Tensor) for v in values]
    ctx.others = [None if t else v for t, v in zip(ctx.tensor_slots, values)]
    ctx.save_for_backward(*(v for v in values if isinstance(v, Tensor)))


def _saved(ctx: Any) -> list[Any]:
    """The values ``_save`` saved, in order (tensors unpacked)."""
    tensors = iter(ctx.saved_tensors)
    return [next(tensors) if t else v for t, v in zip(ctx.tensor_slots, ctx.others)]


def run_op(call: OpCall, *tensors: Any) -> Tensor:
    """``call.fn(*tensors)`` through QOpFunction, or directly (bit for bit torch's op) when no role of the
    call is quantized."""
    if not call.quantizes:
        return call.fn(*tensors)
    return QOpFunction.apply(call, *tensors)
