"""The autograd Functions of the quantized layers: one per op, forward and backward written out.

Numerics of a weight layer (``QLinearFunction``, ``QConvFunction``), Courbariaux's D1 and MPT's T3::

    forward:   xq = Q_activation(x)   wq = Q_weight(W)   bq = Q_bias(b)
               z  = op(xq, wq, bq)           products of low-precision values, accumulated in float32
               zq = Q_output(z)              (or in an emulated narrow accumulator, see roles.Accumulator)
    backward:  gq = Q_output_grad(dE/dzq)
               dE/dx = Q_activation_grad(op_input_grad(gq, wq))     dE/dW = Q_weight_grad(op_weight_grad(gq, xq))
               dE/db = Q_bias_grad(sum of gq)

With a random Hadamard transform (``LinearOp.rht_seed``, the policy's ``wgrad_rht``: NVIDIA's NVFP4 recipe),
the weight gradient is computed from the unquantized operands instead: dE/dW = Q_weight_grad(
Q_output_grad((M g)^T) Q_activation((M x)^T)^T), g = dE/dzq after the output's STE, M the block-diagonal 16x16
random Hadamard matrix along the N rows (``lowprec.nn.hadamard``; the two roundings there use ``Quantizer.round``
and add nothing to a quantizer's statistics). The forward then also saves x.

xq and wq (the quantized values) are what backward uses, as in the papers. Every quantizer is crossed by a
straight-through estimator (roles.straight_through): the identity, or WRPN's clipped STE for Uniform formats,
applied before the gradient role rounds the result. A role the policy does not set is an identity quantizer
and costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..formats.packing import copy_mark
from ..policy import Quantizer
from .hadamard import rht_weight_grad
from .packed import recomputable
from .roles import Accumulator, quantize_roles, straight_through

__all__ = ["QLinearFunction", "QConvFunction", "QuantizeFunction", "LinearOp", "ConvOp", "quantize_boundary"]


@dataclass(frozen=True)
class LinearOp:
    """z = x W^T + b over the last dimension of x; an ``accumulator`` emulates a narrow accumulator in all
    three matmuls (forward, dE/dx, dE/dW); the bias is added and dE/db summed in float32. ``rht_seed`` (not
    None): dE/dW through the random Hadamard transform with that seed (see the module docstring)."""

    accumulator: Accumulator | None = None
    rht_seed: int | None = None

    @property
    def saves_input(self) -> bool:
        """Whether backward needs the unquantized input x (the transformed weight gradient)."""
        return self.rht_seed is not None

    def _matmul(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b if self.accumulator is None else self.accumulator.matmul(a, b)

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.accumulator is None:
            return F.linear(x, w, b)
        z = self.accumulator.matmul(x, w.t())
        return z if b is None else z + b

    def input_grad(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return self._matmul(g, w)

    def weight_grad(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return self._matmul(g.reshape(-1, g.shape[-1]).t(), x.reshape(-1, x.shape[-1]))

    def bias_grad(self, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1]).sum(0)

    def input_and_weight_grads(self, g: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool):
        return (self.input_grad(g, x, w) if need_x else None), (self.weight_grad(g, x, w) if need_w else None)

    def transformed_weight_grad(self, g: Tensor, x: Tensor, quantizers: Mapping[str, Quantizer]) -> Tensor:
        """dE/dW from the unquantized ``g`` and ``x`` through the random Hadamard transform (``rht_seed``)."""
        assert self.rht_seed is not None
        return rht_weight_grad(g, x, self.rht_seed, quantizers["output_grad"].round,
                               quantizers["activation"].round, self._matmul)


_CONV = {1: F.conv1d, 2: F.conv2d}


@dataclass(frozen=True)
class ConvOp:
    """A batched ``dim``-d convolution with explicit integer padding; accumulates in float32."""

    dim: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    #: Convolutions compute dE/dW from the quantized operands (no Hadamard transform).
    saves_input = False

    def _geometry(self) -> tuple[Any, ...]:
        return self.stride, self.padding, self.dilation, self.groups

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return _CONV[self.dim](x, w, b, *self._geometry())

    def bias_grad(self, g: Tensor) -> Tensor:
        return g.sum(dim=[0, *range(2, g.dim())])

    def input_and_weight_grads(self, g: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool):
        """Both gradients from one ``convolution_backward`` call (what autograd's own convolution does)."""
        dx, dw, _ = torch.ops.aten.convolution_backward(
            g, x, w, None, self.stride, self.padding, self.dilation, False, [0] * self.dim, self.groups,
            [need_x, need_w, False],
        )
        return dx, dw


def _own_output(y: Tensor, *inputs: Any) -> Tensor:
    """``y`` as a custom Function's output: autograd refuses an in-place op (``nn.ReLU(inplace=True)``) on an
    output that is a view (``F.linear`` of a 3-d input with a bias, before an output role that is not
    quantized) or an input returned as it is (a forward role that is not quantized, or only observed); those
    two are copied, every other result is returned as it is. Also the op-level emulation's (QOpFunction)."""
    return y.clone() if y._is_view() or any(y is x for x in inputs) else y


def _forward(ctx: Any, op: LinearOp | ConvOp, x: Tensor, weight: Tensor, bias: Tensor | None,
             quantizers: Mapping[str, Quantizer]) -> Tensor:
    (xq, mx), (wq, mw), (bq, mb) = quantize_roles(quantizers, activation=x, weight=weight, bias=bias)
    z = op.forward(xq, wq, bq)
    ((zq, mz),) = quantize_roles(quantizers, output=z)
    ctx.save_for_backward(xq, wq, mx, mw, mb, mz, x if op.saves_input else None)
    if zq is z:  # an unrounded output that a later op saves is computed again in backward (nn.packed)
        recomputable(z, op.forward, xq, wq, bq)
    ctx.op, ctx.quantizers = op, quantizers
    return _own_output(zq, x)


def _backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    xq, wq, mx, mw, mb, mz, x = ctx.saved_tensors
    op, quantizers = ctx.op, ctx.quantizers
    g = straight_through(grad_z, mz)
    ((gq, _),) = quantize_roles(quantizers, output_grad=g)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    transformed = need_w and x is not None
    dx, dw = op.input_and_weight_grads(gq, xq, wq, need_x, need_w and not transformed)
    if transformed:
        dw = op.transformed_weight_grad(g, x, quantizers)
    grads = quantize_roles(
        quantizers,
        activation_grad=straight_through(dx, mx) if need_x else None,
        weight_grad=straight_through(dw, mw) if need_w else None,
        bias_grad=straight_through(op.bias_grad(gq), mb) if need_b else None,
    )
    return tuple(g for g, _ in grads)  # type: ignore[return-value]


class QLinearFunction(Function):
    """``QLinearFunction.apply(x, weight, bias, quantizers, accumulator=None, rht_seed=None)``: a quantized
    ``F.linear``.

    ``quantizers`` maps the LAYER_ROLES to Quantizers; ``accumulator`` (a roles.Accumulator) emulates a
    low-precision accumulator, None accumulates in float32; ``rht_seed`` (an int): the weight gradient through
    the random Hadamard transform with that seed. See the module docstring for the numerics.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                quantizers: Mapping[str, Quantizer], accumulator: Accumulator | None = None,
                rht_seed: int | None = None) -> Tensor:
        return _forward(ctx, LinearOp(accumulator, rht_seed), x, weight, bias, quantizers)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor | None, ...]:
        return (*_backward(ctx, grad_z), None, None, None)


class QConvFunction(Function):
    """``QConvFunction.apply(x, weight, bias, quantizers, op)``: a quantized convolution (``op``: a ConvOp,
    batched input, explicit padding); backward through ``torch.nn.grad.conv{1,2}d_input/_weight``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                quantizers: Mapping[str, Quantizer], op: ConvOp) -> Tensor:
        return _forward(ctx, op, x, weight, bias, quantizers)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor | None, ...]:
        return (*_backward(ctx, grad_z), None, None)


class QuantizeFunction(Function):
    """``QuantizeFunction.apply(x, quantizers, forward_role, backward_role, share=False)``: a role boundary.

    Forward: ``quantizers[forward_role](x)``. Backward: the STE of that quantizer, then
    ``quantizers[backward_role]`` on the gradient. Used where the op in between is plain float32 autograd
    (batch-norm's normalisation, an embedding lookup, the recurrent weights shared by all time steps).

    Where the rounding leaves ``x`` as it is (a role that is not quantized, or ``x`` already on its grid:
    ``Quantizer.keeps``), the result is a copy of ``x`` with ``x``'s mark (``lowprec.formats.packing.mark``);
    with ``share=True`` it is ``x``'s own storage instead (``x.detach()``, marked the same, no copy), for a
    caller whose next op only reads the result (a batch-norm's input): an in-place change of either would be
    seen by both.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, quantizers: Mapping[str, Quantizer], forward_role: str,
                backward_role: str, share: bool = False) -> Tensor:
        ((y, mask),) = quantize_roles(quantizers, **{forward_role: x})
        ctx.save_for_backward(mask)
        ctx.quantizers, ctx.backward_role = quantizers, backward_role
        return _as_output(x, share) if y is x else _own_output(y, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        ((g, _),) = quantize_roles(ctx.quantizers, **{ctx.backward_role: straight_through(grad, mask)})
        return g, None, None, None, None


def _as_output(x: Tensor, share: bool) -> Tensor:
    """``x``'s values as a new tensor (autograd refuses an in-place op on a custom Function's input returned as
    it is): ``x``'s own storage (``share``) or a copy, with ``x``'s mark, so that what a later op saves of it is
    stored packed as ``x`` would be (from the packed form ``x``'s rounding made, if it made one: the same values,
    the same layout)."""
    return copy_mark(x, x.detach() if share else x.clone())


def quantize_boundary(x: Tensor, quantizers: Mapping[str, Quantizer], forward_role: str,
                      backward_role: str, share: bool = False) -> Tensor:
    """``x`` through a role boundary (QuantizeFunction, ``share`` as there); ``x`` itself when neither role is
    quantized."""
    if not (quantizers[forward_role].enabled or quantizers[backward_role].enabled):
        return x
    return QuantizeFunction.apply(x, quantizers, forward_role, backward_role, share)
