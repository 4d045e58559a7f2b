"""Outside checks of the scaled formats (MX, NVFP4, scaled<...>) on models lowprec never saw: what each GEMM
operand really holds, seen at the aten level by a dispatch mode independent of lowprec's own records."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowprec as lp
from lowprec.formats import MXFormat
from test_scaled_formats import bits

aten = torch.ops.aten


class GemmOperands(TorchDispatchMode):
    """Records the float32 operands of every aten GEMM run inside it: (op, operand index, tensor)."""

    GEMMS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
             aten.baddbmm.default: (1, 2), aten.convolution.default: (0, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for i in self.GEMMS.get(func, ()):
            self.seen.append((str(func), i, args[i].detach().clone()))
        return func(*args, **(kwargs or {}))


def forward_operands(model: nn.Module, *inputs: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
    with torch.no_grad(), GemmOperands() as mode:
        model(*inputs)
    return mode.seen


def along(x: torch.Tensor, axis: int) -> list[int]:
    return bits(lp.quantize(x.contiguous(), MXFormat("e2m1", axis=axis)))


def spread(*shape: int) -> torch.Tensor:
    """Values whose magnitude changes by 10^4 along dim -2 and by 10^2 along dim -1: a block along either
    dimension gets other scales than one along the other."""
    return (torch.randn(*shape) * torch.logspace(-2, 2, shape[-2])[:, None]
            * torch.logspace(-1, 1, shape[-1]))


class Products(nn.Module):
    """The products of hand-written attention and of a weight stored (in, out), as GPT-2's Conv1D stores it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(spread(64, 48))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(q @ k.transpose(-2, -1), -1)
        return (p @ v).sum() + (q[0] @ self.w).sum() + torch.addmm(self.w[0], q[0], self.w).sum()


def test_mx_blocks_of_a_products_second_operand_run_along_its_reduction_dimension():
    """x @ W reduces over W's dim -2 (rows of a weight stored (in, out), K^T's head dimension, V's sequence):
    an MX block must run along it, as the hardware GEMM reads it; blocks along dim -1 (the output columns)
    gave each product a scale per output column instead."""
    torch.manual_seed(0)
    q, k, v = spread(2, 16, 64), spread(2, 16, 64), spread(2, 16, 64)
    model = lp.convert(Products(), "mxfp4")
    seen = forward_operands(model, q, k, v)
    assert [(op, i) for op, i, _ in seen] == [("aten.bmm.default", 0), ("aten.bmm.default", 1)] * 2 + [
        ("aten.mm.default", 0), ("aten.mm.default", 1), ("aten.addmm.default", 1), ("aten.addmm.default", 2)]
    qk, kt, _, v_seen, x_mm, w_mm, x_add, w_add = (t for _, _, t in seen)
    assert bits(qk) == along(q, -1)
    assert bits(kt) == along(k.transpose(-2, -1), -2)  # K's head dimension
    assert bits(v_seen) == along(v, -2)  # V's sequence dimension, the reduction of P @ V
    assert bits(x_mm) == along(q[0], -1) and bits(x_add) == along(q[0], -1)
    assert bits(w_mm) == along(model.w.detach(), -2) and bits(w_add) == along(model.w.detach(), -2)


def test_mx_blocks_of_scaled_dot_product_attention_run_along_each_products_reduction():
    """F.scaled_dot_product_attention: S = Q K^T reduces over the head dimension (Q's and K's last), O = P V
    over the keys (V's dim -2)."""
    torch.manual_seed(0)
    q, k, v = spread(2, 16, 32), spread(2, 16, 32), spread(2, 16, 32)

    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    seen = forward_operands(lp.convert(Attention(), "mxfp4"), q, k, v)
    assert len(seen) == 4
    assert bits(seen[0][2]) == along(q, -1) and bits(seen[1][2]) == along(k.transpose(-2, -1), -2)
    assert bits(seen[3][2]) == along(v, -2)


def test_mx_blocks_of_an_einsum_run_along_its_contracted_index():
    torch.manual_seed(0)
    p, v = spread(2, 16, 16).softmax(-1), spread(2, 16, 32)

    class Mix(nn.Module):
        def forward(self, p, v):
            return torch.einsum("bqk,bkd->bqd", p, v)

    seen = forward_operands(lp.convert(Mix(), "mxfp4"), p, v)
    assert bits(seen[0][2].reshape(p.shape)) == along(p, -1)
    assert bits(seen[1][2].reshape(v.shape)) == along(v, -2)


def test_mx_blocks_of_a_functional_convolution_run_along_channels_as_a_converted_conv2d():
    """F.conv2d called in a forward is blocked along the channel dimension, as QConv2d (what convert makes of
    nn.Conv2d) blocks it, not along the image width."""
    torch.manual_seed(0)
    x, w = spread(2, 40, 6, 6), spread(8, 40, 3, 3)

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(w.clone())

        def forward(self, x):
            return F.conv2d(x, self.w)

    layer = nn.Conv2d(40, 8, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    functional = forward_operands(lp.convert(Functional(), "mxfp4"), x)
    swapped = forward_operands(lp.convert(layer, "mxfp4"), x)
    assert bits(functional[0][2]) == bits(swapped[0][2]) == along(x, 1)
    assert bits(functional[1][2]) == bits(swapped[1][2]) == along(w, 1)
