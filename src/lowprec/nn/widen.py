"""``widen(model, beta)``: WRPN's wide reduced-precision networks (Mishra et al., spec W4).

"We maintain the depth parameter same as baseline network but widen the filter maps": every weight layer's
outputs (Linear out_features, Conv out_channels, LSTM/GRU/RNN hidden_size) are multiplied by beta, rounded to an
int, at least 1 (``round(width * beta)``, as lowprec.models' ``width`` does), except the last weight
layer's (the classes). Each layer's inputs follow the widths the layers before it now produce, so the first
layer's inputs (the data) stay as they are. Batch-norm ``num_features`` follow their input. Embeddings are not
widened (their width is the data's). The widened layers are built fresh (new random initial values: WRPN
trains from scratch); everything else in the model is kept.

How an input width follows: with the previous weight layer (in ``named_modules()`` order) turning width p into
p', an input of width w becomes ``(w // p) * p'`` when w is a multiple of p (a Linear after a Flatten of p
channels times H*W positions, a concatenation of equal branches), else ``round(w * p' / p)``.

WRPN's weight clip range, for converted models: ``fill_clip_range`` scales the weights to reach +-1 (what
``convert`` does under ``fill_clip_range=on``, the wrpn presets) and ``zero_weight_shares`` tells how many of
each layer's weights round to 0 (what ``convert`` warns about otherwise).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .emulate import emulation_of
from .layers import QuantizedModule
from .roles import clips_signed

__all__ = ["widen", "fill_clip_range", "zero_weight_shares"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RNNS = (nn.LSTM, nn.GRU, nn.RNN)
_CELLS = (nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_WEIGHT_LAYERS = (nn.Linear, *_CONVS, *_RNNS, *_CELLS)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Widths = tuple[int, int]  # (old, new) width of the activations the previous weight layer produces


def _scaled(width: int, beta: float) -> int:
    return max(1, round(width * beta))


def _follow(width: int, previous: Widths | None) -> int:
    if previous is None:
        return width
    old, new = previous
    return width // old * new if width % old == 0 else max(1, round(width * new / old))


def _factory(module: nn.Module) -> dict[str, Any]:
    """device and dtype of the module's floating-point tensors, for its rebuilt twin."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _widen_layer(m: nn.Module, previous: Widths | None, beta: float, last: bool) -> tuple[nn.Module, Widths]:
    """The rebuilt weight layer and the (old, new) width of what it produces."""
    fk = _factory(m)
    if isinstance(m, nn.Linear):
        old_in, old_out = m.in_features, m.out_features
    elif isinstance(m, _CONVS):
        old_in, old_out = m.in_channels, m.out_channels
    else:
        if getattr(m, "proj_size", 0):
            raise NotImplementedError("widen does not support an LSTM with proj_size > 0")
        old_in, old_out = m.input_size, m.hidden_size
    new_in = _follow(old_in, previous)
    new_out = old_out if last else _scaled(old_out, beta)
    if isinstance(m, nn.Linear):
        new = nn.Linear(new_in, new_out, bias=m.bias is not None, **fk)
    elif isinstance(m, _CONVS):
        groups = m.groups
        if groups > 1 and groups == old_in:  # depthwise: one group per input channel, channel multiplier kept
            groups = new_in
            new_out = old_out if last else old_out // m.groups * new_in
        if new_in % groups or new_out % groups:
            raise ValueError(
                f"widen: {type(m).__name__} with groups={m.groups} cannot take {new_in} -> {new_out} channels; "
                "pick a beta that keeps the channel counts divisible by the groups"
            )
        new = type(m)(new_in, new_out, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                      m.bias is not None, m.padding_mode, **fk)
    elif isinstance(m, _RNNS):
        new = type(m)(new_in, new_out, num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                      dropout=m.dropout, bidirectional=m.bidirectional, **_nonlinearity(m), **fk)
    else:
        new = type(m)(new_in, new_out, bias=m.bias, **_nonlinearity(m), **fk)
    directions = 2 if getattr(m, "bidirectional", False) else 1
    return new.train(m.training), (old_out * directions, new_out * directions)


def _nonlinearity(m: nn.Module) -> dict[str, str]:
    """An Elman RNN's (or cell's) ``nonlinearity`` as a keyword, for its rebuilt copy."""
    return {"nonlinearity": m.nonlinearity} if isinstance(m, (nn.RNN, nn.RNNCell)) else {}


def widen(model_or_factory: nn.Module | Callable[[], nn.Module], beta: float) -> nn.Module:
    """A widened copy of the model (or of ``model_or_factory()``): every weight layer's outputs times
    ``beta`` except the last's, inputs following (see the module docstring). Widen the plain model, then
    ``convert`` it. Modules with parameters that widen cannot resize (LayerNorm, custom ones) are kept and
    named in one UserWarning: the widened model may not run through them."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    model = copy.deepcopy(model_or_factory) if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"widen takes an nn.Module or a callable returning one, got {type(model).__name__}")
    if any(isinstance(m, QuantizedModule) for m in model.modules()):
        raise TypeError("widen the plain model, then convert it: this model already has quantized layers")
    names = [name for name, m in model.named_modules() if type(m) in _WEIGHT_LAYERS]
    last = names[-1] if names else None
    previous: Widths | None = None
    rebuilt: dict[str, nn.Module] = {}
    kept: list[str] = []
    for name, m in model.named_modules():
        if type(m) in _WEIGHT_LAYERS:
            rebuilt[name], previous = _widen_layer(m, previous, beta, name == last)
        elif type(m) in _NORMS:
            rebuilt[name] = type(m)(_follow(m.num_features, previous), m.eps, m.momentum, m.affine,
                                    m.track_running_stats, **_factory(m)).train(m.training)
        elif type(m) is nn.Embedding:
            previous = (m.embedding_dim, m.embedding_dim)
        elif next(m.parameters(recurse=False), None) is not None:
            kept.append(f"{name or '(root)'} ({type(m).__name__})")
    if kept:
        warnings.warn(f"lowprec.widen: these modules have parameters and were not resized: {', '.join(kept)}",
                      UserWarning, stacklevel=2)
    for name, new in rebuilt.items():
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def _clip_weights(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
    """(name, parameter, its rounding) for every weight rounded to WRPN's signed uniform<k>: a converted layer's
    (a Linear's or convolution's weight, each gate matrix of an LSTM/GRU: named by the layer), then each one a
    functional op rounds as its weight (GPT-2's Conv1D, MultiheadAttention's projections, ``x @ self.w``: named
    by the parameter; known once the converted model has run a forward, ``OpEmulation.clip_weights``)."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedModule):
            continue
        quantizer = module.quantizers["weight"]
        if clips_signed(quantizer):
            for pname, role in module.parameter_roles().items():
                if role == "weight":
                    yield name, getattr(module, pname), quantizer.round
    emulation = emulation_of(model)
    if emulation is not None:
        yield from emulation.clip_weights(model)


@torch.no_grad()
def fill_clip_range(model: nn.Module) -> list[str]:
    """Scale each weight a converted layer rounds to WRPN's signed ``uniform<k>`` so that its largest magnitude
    is 1, the edge of the clip range (each gate matrix of a recurrent layer on its own); returns the names of
    the layers scaled. ``convert`` does this itself under a policy with ``fill_clip_range=on`` (the wrpn
    presets).

    WRPN clips weights to [-1, 1] and rounds them to steps of 1/(2**(k-1)-1); with PyTorch's default
    initialisation (|w| < 1/sqrt(fan_in), below 0.07 for fan-in >= 200) every 4-bit weight rounds to 0, no
    signal flows and nothing trains. Scaling a layer's initial weights is a change of initialisation only
    (and no change at all to the function of a layer followed by batch-norm).
    """
    scaled = []
    for name, weight, _ in _clip_weights(model):
        peak = weight.abs().max()
        if peak > 0:
            weight.div_(peak)
            if name not in scaled:
                scaled.append(name)
    return scaled


@torch.no_grad()
def zero_weight_shares(model: nn.Module) -> dict[str, float]:
    """For each converted layer whose weights WRPN's signed ``uniform<k>`` rounds: the share of those weights
    that round to 0 (|w| below half a step, 1/(2**k - 2))."""
    zeros: dict[str, list[int]] = {}
    for name, weight, rounding in _clip_weights(model):
        counts = zeros.setdefault(name, [0, 0])
        counts[0] += int((rounding(weight) == 0).sum())
        counts[1] += weight.numel()
    return {name: z / n for name, (z, n) in zeros.items() if n}
