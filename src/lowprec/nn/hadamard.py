"""The random Hadamard transform (RHT) of the weight-gradient GEMM's operands (NVFP4 training recipe).

NVIDIA's NVFP4 recipe (Pretraining Large Language Models with NVFP4, 2025; Transformer Engine's NVFP4 recipe
with RHT) multiplies both operands of the weight-gradient GEMM ``dW = dY^T X`` along their shared reduction
dimension (the N = batch x sequence rows) by one orthogonal matrix before quantizing them, so that an outlier
spreads over 16 values instead of setting the scale of its whole 16-element block::

    M   = H16 . diag(s) / 4        H16: the 16x16 Sylvester Hadamard matrix (entries +-1), s: 16 random signs
    X'  = blockdiag(M, ..., M) X   (rows 16k .. 16k+15 of X form one block; N padded with zero rows to a
    dY' = blockdiag(M, ..., M) dY   multiple of 16, which adds nothing to the product)
    dW  = Q_output_grad(dY'^T) @ Q_activation(X'^T)^T

M is orthogonal (M^T M = I), so without quantization dY'^T X' = dY^T X up to float32 rounding; the operands are
quantized transposed, ``(in, N)`` and ``(out, N)``, so that block formats (NVFP4's 1x16, MX) form their blocks
along N, the GEMM's reduction dimension, as the hardware's wgrad GEMM reads them. The signs come from a CPU
``torch.Generator`` seeded with the policy's ``rht_seed``: one sign vector for every layer and step (the recipe
shares one vector too), the same on every machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["HADAMARD_SIZE", "hadamard_matrix", "random_hadamard", "rht_weight_grad"]

#: The block size of the transform (Transformer Engine's and the NVFP4 recipe's 16x16).
HADAMARD_SIZE = 16


@functools.lru_cache(maxsize=8)
def _matrix(seed: int) -> Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < HADAMARD_SIZE:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (HADAMARD_SIZE,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return h * signs.to(h.dtype) / HADAMARD_SIZE**0.5  # column j times s_j: H16 diag(s) / 4, exact in float32


def hadamard_matrix(seed: int, device: torch.device | str = "cpu") -> Tensor:
    """``M = H16 diag(s) / 4`` (float32, 16x16, entries +-1/4, orthogonal), ``s`` the 16 signs drawn by
    ``torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(seed)) * 2 - 1``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the Hadamard seed must be an integer >= 0, got {seed!r}")
    return _matrix(seed).to(device)


def random_hadamard(x: Tensor, seed: int) -> Tensor:
    """``blockdiag(M, ..., M) x`` for a 2-d ``x`` of shape (N, k): each group of 16 rows times M (float32 matmul);
    N is padded with zero rows to the next multiple of 16, so the result has ``ceil(N/16)*16`` rows."""
    if x.dim() != 2:
        raise ValueError(f"random_hadamard transforms a 2-d (rows, columns) tensor, got shape {tuple(x.shape)}")
    n, k = x.shape
    pad = -n % HADAMARD_SIZE
    if pad:
        x = torch.cat([x, x.new_zeros(pad, k)])
    blocks = x.reshape(-1, HADAMARD_SIZE, k)
    return (hadamard_matrix(seed, x.device).to(x.dtype) @ blocks).reshape(n + pad, k)


def rht_weight_grad(grad: Tensor, x: Tensor, seed: int, round_grad: Callable[[Tensor], Tensor],
                    round_input: Callable[[Tensor], Tensor],
                    matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> Tensor:
    """A linear layer's ``dE/dW`` (out, in) from its unquantized output gradient ``grad`` (..., out) and input
    ``x`` (..., in) through the random Hadamard transform: ``matmul(round_grad((M grad)^T), round_input((M x)^T)^T)``
    (see the module docstring); ``round_*`` round the transposed operands, whose last dimension is N."""
    g2 = random_hadamard(grad.reshape(-1, grad.shape[-1]), seed).t().contiguous()
    x2 = random_hadamard(x.reshape(-1, x.shape[-1]), seed).t().contiguous()
    return matmul(round_grad(g2), round_input(x2).t())
