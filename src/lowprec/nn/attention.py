"""Scaled-dot-product attention written out as two quantized products around a float32 softmax.

``emulated_attention(q, k, v, ..., product=...)`` computes what ``F.scaled_dot_product_attention`` computes,
with the same arguments and semantics (``attn_mask`` boolean or additive, ``is_causal`` top-left aligned,
``dropout_p``, ``scale`` default 1/sqrt(E), ``enable_gqa``), as::

    S = product("scores", Q, K^T) * scale      (+ mask)       Q, K: activation role; S: output role
    P = softmax(S) in float32                  then dropout    (torch's safe softmax: a fully masked row is 0)
    O = product("out", P, V)                                   P (in V's dtype), V: activation role; O: output

``product`` runs each matmul through the op-level quantizers (``QOpFunction``), so in backward dO and dS
arrive through the output_grad role and dP, dV, dQ, dK leave through activation_grad. No fused attention
kernel runs. The scale multiplies the float32 product (torch's math kernel scales Q and K by sqrt(scale)
instead: the two agree bit for bit when sqrt(scale) is a power of two, e.g. head dimension 16 or 64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["emulated_attention"]

Product = Callable[[str, Tensor, Tensor], Tensor]


def emulated_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                       dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                       enable_gqa: bool = False, *, product: Product) -> Tensor:
    """``F.scaled_dot_product_attention`` as two ``product(name, a, b)`` matmuls, see the module docstring."""
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give either attn_mask or is_causal=True, not both")
    length, source = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scores = product("scores", query, key.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.ops.aten._safe_softmax(scores.float(), -1)
    if dropout_p > 0.0:
        probs = torch.dropout(probs, dropout_p, True)
    return product("out", probs.to(value.dtype), value)
