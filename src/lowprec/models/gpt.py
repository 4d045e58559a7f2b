"""A small GPT (decoder-only transformer) for character-level language modelling, nanoGPT-style.

Token embedding + learned position embedding -> ``n_layer`` pre-norm blocks -> final LayerNorm -> LM head
whose weight IS the token embedding's (weight tying: one parameter, registered first as ``wte.weight``).
Each block: ``x + attention(LayerNorm(x))`` then ``x + MLP(LayerNorm(x))``, the MLP being
Linear(n_embd, 4 n_embd) -> GELU -> Linear(4 n_embd, n_embd).

Attention is causal multi-head self-attention, written out by hand (``q @ k^T / sqrt(d)``, causal mask,
softmax, ``@ v``) or, with ``fused_attention=True``, one call of ``F.scaled_dot_product_attention(is_causal=
True)``. The hand-written softmax runs on the float32 value of the scores and its probabilities are rounded
to the dtype of ``v`` (as mixed precision trains: reductions in float32); in float32 both are no-ops, so an
all-float32 model computes exactly the textbook formula.

The model uses only standard torch layers (``nn.Embedding``, ``nn.Linear``, ``nn.LayerNorm``, ``nn.GELU``,
``nn.Dropout``) and functional matmul / softmax / SDPA: a plain torch model, nothing lowprec-specific.
Initialisation follows GPT-2: weights N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 n_layer)),
biases 0, LayerNorm (1, 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import scaled

__all__ = ["GPT", "CausalSelfAttention", "Block"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over (N, T, n_embd) inputs: one Linear for q, k, v, one output Linear."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.0,
                 fused: bool = False) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head, self.dropout, self.fused = n_head, dropout, fused
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)  # causal[i, j]: position i may attend to j

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (N, T, C) -> (N, heads, T, head_dim)
        q, k, v = (z.view(n, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
            probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
            y = self.attn_dropout(probs) @ v
        y = y.transpose(1, 2).contiguous().view(n, t, c)  # heads side by side again
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float = 0.0,
                 fused: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, dropout, fused)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """(N, T) token ids, T <= block_size -> (N, T, vocab_size) next-token logits.

    ``width`` (WRPN's widening factor) multiplies ``n_embd``; the result must stay a multiple of ``n_head``.
    ``fused_attention`` selects ``F.scaled_dot_product_attention`` instead of the hand-written attention
    (the same function up to rounding).
    """

    def __init__(self, vocab_size: int, block_size: int = 64, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                 dropout: float = 0.0, fused_attention: bool = False, width: float = 1.0) -> None:
        super().__init__()
        n_embd = scaled(n_embd, width)
        if min(vocab_size, block_size, n_layer, n_head) < 1:
            raise ValueError(f"vocab_size, block_size, n_layer and n_head must be >= 1, got {vocab_size}, "
                             f"{block_size}, {n_layer}, {n_head}")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, block_size, dropout, fused_attention)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one parameter
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.block_size}; cut it or build "
                             "the model with a larger block_size")
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
