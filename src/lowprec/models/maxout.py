"""Courbariaux, Bengio & David 2014 (arXiv 1412.7024): the maxout networks of their Table "test error rates".

Reproduced from the authors' code (``MatthieuCourbariaux/deep-learning-multipliers``: ``model.py``,
``layer.py``), spec sections 4(a)-4(c):

* :class:`MaxoutMLP`, PI-MNIST: 784 -> maxout(240 x 5) -> maxout(240 x 5) -> softmax 10, 1,233,610 parameters.
* :class:`ConvMaxoutMNIST`, MNIST: three conv maxout layers -> softmax on 24*3*3, 418,714 parameters.

A maxout layer is written as a plain ``nn.Linear``/``nn.Conv2d`` with ``units * pieces`` outputs followed by
the parameter-free :class:`Maxout`, so ``lowprec.convert`` can swap the parameterised layers by type.
Output ``u * pieces + p`` is piece ``p`` of unit ``u``, the layout of the authors' ``reshape(N, units, pieces)``.

Dropout is the authors' kind (:class:`MaskDropout`): during training the input of a layer is multiplied by a
Bernoulli(keep) mask with *no* rescaling; at evaluation it is multiplied by a fixed ``scale``: 1.0 after the
network input (keep 0.8: the code's ``scale_input = 1.``, spec 5.12) and 0.5 for the hidden layers (keep 0.5).

Deviations from the authors' code:

* At evaluation the code multiplies both W and b by ``scale``; here the layer *input* is scaled, i.e. W only
  (the usual weight-scaling rule). Identical while the biases are zero.
* Max over pieces uses ``torch.max``, whose gradient goes to one maximal piece; Theano's ``T.max`` gives the
  full gradient to every tied piece. Only exact ties differ (which quantized activations can produce).
* The conv network applies maxout before max-pooling and adds the bias before pooling (the code pools, adds the
  bias, then takes the maxout). Max-pool and the max over pieces commute and a per-channel bias commutes with
  both, so the function is the same.
* The max-norm of conv layers is taken per output filter, as pylearn2's ``max_kernel_norm`` (Goodfellow et al.
  2013, whose networks these are); the code's ``sum(W**2, axis=0)`` on a (filters, in, kh, kw) tensor gives one
  norm per (in, kh, kw) position across filters, which we take for a slip carried over from the dense layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["MAX_COL_NORM", "ConvMaxoutMNIST", "MaskDropout", "Maxout", "MaxoutMLP", "apply_max_norm"]

MAX_COL_NORM = 1.9365
"""Courbariaux's (and Goodfellow et al.'s) bound on the norm of each unit's incoming weights."""


class Maxout(nn.Module):
    """Max over groups of ``pieces`` consecutive channels (dim 1): (N, U*pieces, ...) -> (N, U, ...)."""

    def __init__(self, pieces: int) -> None:
        super().__init__()
        if pieces < 1:
            raise ValueError(f"pieces must be >= 1, got {pieces}")
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, self.pieces)).max(dim=2).values

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}"


class MaskDropout(nn.Module):
    """Courbariaux's dropout: training multiplies by a Bernoulli(``keep``) mask (no 1/keep rescaling),
    evaluation multiplies by ``scale``."""

    def __init__(self, keep: float, scale: float) -> None:
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"keep probability must be in (0, 1], got {keep}")
        self.keep = keep
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x * torch.bernoulli(torch.full_like(x, self.keep)) if self.keep < 1 else x
        return x * self.scale if self.scale != 1 else x

    def extra_repr(self) -> str:
        return f"keep={self.keep}, scale={self.scale}"


def _maxout_init(layer: nn.Linear | nn.Conv2d, fan_in: int, fan_out: float) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


class MaxoutMLP(nn.Module):
    """PI-MNIST maxout MLP (Courbariaux Table, column PI-MNIST; ``PI_MNIST_model`` in their code).

    ``in -> [drop(input_keep)] Linear(units*pieces) -> Maxout -> [drop(hidden_keep)] Linear(units*pieces)
    -> Maxout -> [drop(hidden_keep)] Linear(num_classes)``; the softmax belongs to the loss (cross-entropy on
    the returned logits). Maxout weights ~ U(+-sqrt(6 / (fan_in + units*pieces))), biases 0; the softmax layer's
    weight and bias are 0 (so at initialisation no gradient reaches the maxout layers: the first step only
    trains the softmax bias and weight). Call :func:`apply_max_norm` after every optimizer step.
    ``input_scale``/``hidden_scale`` are the evaluation-time dropout scales of the code (1.0 and 0.5).
    """

    def __init__(
        self,
        in_features: int = 784,
        units: int = 240,
        pieces: int = 5,
        num_classes: int = 10,
        input_keep: float = 0.8,
        hidden_keep: float = 0.5,
        input_scale: float = 1.0,
        hidden_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            MaskDropout(input_keep, input_scale),
            nn.Linear(in_features, units * pieces),
            Maxout(pieces),
            MaskDropout(hidden_keep, hidden_scale),
            nn.Linear(units, units * pieces),
            Maxout(pieces),
            MaskDropout(hidden_keep, hidden_scale),
            nn.Linear(units, num_classes),
        )
        for maxout_layer in (self.net[2], self.net[5]):
            _maxout_init(maxout_layer, maxout_layer.in_features, units * pieces)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_features) or (N, 1, 28, 28) -> (N, num_classes) logits."""
        return self.net(x)


class ConvMaxoutMNIST(nn.Module):
    """MNIST conv maxout network (Courbariaux Table, column MNIST; ``MNIST_model`` in their code).

    ====  =====================================================  ===========  ======  ========
    drop  conv (kernel, padding)                                  pieces       pool    output
    ====  =====================================================  ===========  ======  ========
    0.8   48 filters 8x8, pad 0                                   2            4 / 2   48x10x10
    0.5   48 filters 8x8, pad 3                                   2            4 / 2   48x4x4
    0.5   24 filters 5x5, pad 3                                   4            2 / 2   24x3x3
    0.5   softmax on 24*3*3 = 216 inputs, W = b = 0
    ====  =====================================================  ===========  ======  ========

    The code pools with cuda-convnet's ``MaxPool``, whose output size is ``ceil((n - k) / s) + 1``;
    ``nn.MaxPool2d(..., ceil_mode=True)`` computes the same, so every shape of the code is reproduced exactly on
    1x28x28 inputs without changing any padding. Conv weights ~ U(+-sqrt(6 / (fan_in + fan_out))) with
    ``fan_in = in * kh * kw`` and ``fan_out = filters * kh * kw / pool_area`` as in the code; biases 0.
    Max-norm 0.9 on the first layer and 1.9365 elsewhere (``max_norm_overrides``, read by
    :func:`apply_max_norm`).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.max_norm_overrides: dict[str, float] = {"features.1": 0.9}
        # (in, filters, kernel, padding, pieces, pool, keep, eval scale) per layer, from the code's MNIST_model
        config = [
            (1, 48, 8, 0, 2, 4, 0.8, 1.0),
            (48, 48, 8, 3, 2, 4, 0.5, 0.5),
            (48, 24, 5, 3, 4, 2, 0.5, 0.5),
        ]
        layers: list[nn.Module] = []
        for c_in, filters, kernel, pad, pieces, pool, keep, scale in config:
            conv = nn.Conv2d(c_in, filters * pieces, kernel, padding=pad)
            _maxout_init(conv, c_in * kernel * kernel, filters * kernel * kernel / (pool * pool))
            layers += [MaskDropout(keep, scale), conv, Maxout(pieces), nn.MaxPool2d(pool, 2, ceil_mode=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), MaskDropout(0.5, 0.5), nn.Linear(24 * 3 * 3, num_classes))
        nn.init.zeros_(self.classifier[-1].weight)
        nn.init.zeros_(self.classifier[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) -> (N, num_classes) logits."""
        return self.classifier(self.features(x))


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float = MAX_COL_NORM) -> None:
    """Courbariaux's / pylearn2's ``max_col_norm``: rescale every unit's incoming weight vector whose L2 norm
    exceeds the bound down to the bound; vectors within it are left exactly as they are.

    pylearn2 and Theano store a dense weight as W of shape (in, out) and bound the norm of each *column*, i.e.
    of the incoming weights of one output unit (one maxout piece). torch stores (out, in), so that is each
    *row* of ``weight``; for a conv weight (out, in, kh, kw) it is each output filter. Every module with a
    ``weight`` parameter of two or more dimensions is constrained (so converted layers are too), except
    embeddings; biases are not. The bound is ``max_norm`` unless ``model.max_norm_overrides`` maps the module's
    qualified name to its own (``ConvMaxoutMNIST``: 0.9 for the first conv). Call after each optimizer step.
    """
    overrides: Mapping[str, float] = getattr(model, "max_norm_overrides", {})
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2 or isinstance(module, nn.Embedding):
            continue
        bound = overrides.get(name, max_norm)
        norms = weight.detach().flatten(1).norm(dim=1)
        factor = (bound / norms).clamp(max=1.0)  # 1.0 (exactly unchanged) within the bound and for zero rows
        weight.mul_(factor.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
