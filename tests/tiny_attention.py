"""``TinyAttention``: the smallest model with both swapped layers (Linear) and op-level ops (layer_norm and an
attention's products), for tests of what a converted model's two paths do together."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyAttention(nn.Module):
    """Linear embedding of 8 features to ``width``, LayerNorm, a qkv Linear, attention over the sequence (written
    out as softmax(q kᵀ / 4) v, or ``F.scaled_dot_product_attention`` with ``fused``), mean over it, a 4-class
    Linear head."""

    def __init__(self, width: int, fused: bool = False) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(8, width), nn.LayerNorm(width)
        self.qkv, self.head = nn.Linear(width, 3 * width), nn.Linear(width, 4)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(self.embed(x))).chunk(3, dim=-1)
        if self.fused:
            return self.head(F.scaled_dot_product_attention(q, k, v).mean(1))
        return self.head((torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v).mean(1))
