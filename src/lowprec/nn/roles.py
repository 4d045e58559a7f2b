"""Quantizing a layer's tensor roles, the straight-through estimator, and the emulated accumulator.

Every op in ``lowprec.nn`` rounds its tensors through one helper, :func:`quantize_roles`: each tensor goes
through its role's :class:`~lowprec.policy.Quantizer` (the identity, at no cost, for a role the policy leaves
in fp32) and comes back with its straight-through-estimator mask.

Straight-through estimator (spec P0.4): the backward pass treats every quantizer as the identity, except
WRPN's clip formats (:class:`~lowprec.formats.Uniform`), whose forward clips to [-1, 1] (signed) or [0, 1]
(unsigned) before rounding: the gradient is zero where the forward clipped and passed unchanged inside the
range (the "clipped STE", Mishra et al. / Distiller). Saturation of fixed-point formats is *not* masked: the
papers using them (Courbariaux, Park) pass gradients straight through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..policy import Quantizer

__all__ = ["IDENTITY", "Accumulator", "clip_mask", "clips_negatives", "clips_signed", "quantize_roles", "straight_through"]

#: A quantizer for a role that is not quantized.
IDENTITY = Quantizer(None)


def clip_mask(quantizer: Quantizer, x: Tensor) -> Tensor | None:
    """Where the clipped STE lets the gradient through (a bool tensor), or None where it passes everywhere."""
    quant = quantizer.quant
    if quant is None or quantizer.observe_only or quant.format.clip_range is None:
        return None
    low, high = quant.format.clip_range
    return (x >= low) & (x <= high)


def clips_negatives(quantizer: Quantizer) -> bool:
    """Whether the quantizer is WRPN's unsigned clip format (``uniform<k,unsigned>``): every negative value
    becomes 0."""
    quant = quantizer.quant
    return quant is not None and quant.format.clip_range is not None and not quant.format.signed


def clips_signed(quantizer: Quantizer) -> bool:
    """Whether the quantizer is WRPN's signed clip format (``uniform<k>``): the weights' clip to [-1, 1]."""
    quant = quantizer.quant
    return quant is not None and quant.format.clip_range is not None and quant.format.signed


def quantize_roles(
    quantizers: Mapping[str, Quantizer], **tensors: Tensor | None
) -> list[tuple[Tensor | None, Tensor | None]]:
    """Round each ``role=tensor`` with ``quantizers[role]``; returns (quantized, STE mask) per role, in order.

    A None tensor (an absent bias, a gradient nobody asked for) gives (None, None) and costs nothing.
    """
    out: list[tuple[Tensor | None, Tensor | None]] = []
    for role, x in tensors.items():
        if x is None:
            out.append((None, None))
        else:
            q = quantizers[role]
            out.append((q(x), clip_mask(q, x)))
    return out


def straight_through(grad: Tensor | None, mask: Tensor | None) -> Tensor | None:
    """The gradient through a quantizer: unchanged, or zero outside the clip range (``mask`` False)."""
    if grad is None or mask is None:
        return grad
    return grad.masked_fill(~mask, 0.0)


@dataclass(frozen=True, eq=False)
class Accumulator:
    """A low-precision accumulator (the policy's ``accumulation`` role, in chunks of ``accumulation_chunk``).

    ``matmul(a, b)`` computes ``a @ b`` as a hardware dot-product unit with a narrow accumulator would: the
    reduction dimension is cut into chunks of ``chunk`` products; each chunk's partial sum is computed in
    float32 and added to the running sum, which is rounded to the accumulator's format after every chunk:
    ``z = Q(z + a[..., k:k+chunk] @ b[k:k+chunk])``, starting from z = 0.
    """

    quantizer: Quantizer
    chunk: int

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        total = torch.zeros((*a.shape[:-1], b.shape[-1]), dtype=torch.result_type(a, b), device=a.device)
        for start in range(0, a.shape[-1], self.chunk):
            total = self.quantizer(total + a[..., start : start + self.chunk] @ b[start : start + self.chunk])
        return total
