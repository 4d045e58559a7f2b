"""The quantizers of a converted model: listing them, advancing their exponents, calibrating them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..policy import Quantizer
from .emulate import emulation_of
from .layers import QuantizedModule

__all__ = ["quantizers", "update_exponents", "calibrating"]


def quantizers(model: nn.Module) -> Iterator[tuple[str, str, Quantizer]]:
    """``(module name, role, quantizer)`` for every quantizer of every converted layer, in module order.

    Each layer lists all its ``quantizers`` entries (the eight LAYER_ROLES, and ``accumulation`` where it
    emulates one); roles the policy leaves in fp32 are identities (``quantizer.enabled`` is False). Each
    dynamic-fixed-point role with the "overflow" rule carries its own exponent (``quantizer.exponent``):
    Courbariaux's per-layer groups W, b, x, z, dE/dz, dE/dx, dE/dW, dE/db. Then the quantizers of the op-level
    emulation made so far (one set per op call site, named ``module:op[index]``, made at the first forward).
    """
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            for role, quantizer in module.quantizers.items():
                yield name, role, quantizer
    emulation = emulation_of(model)
    if emulation is not None:
        yield from emulation.all_quantizers()


def update_exponents(model: nn.Module) -> None:
    """Advance every dynamic-fixed-point exponent by its rule (call once per batch, after backward); each
    moves by at most one at the end of its ``exponent_interval``."""
    for _, _, quantizer in quantizers(model):
        quantizer.update()


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every quantizer only observes (exponent statistics) and returns its input unchanged:
    the model runs in full precision while its exponents warm up. Restores each quantizer's flag on exit."""
    saved = [(q, q.observe_only) for _, _, q in quantizers(model)]
    emulation = emulation_of(model)  # its op quantizers made inside the block observe too
    try:
        for q, _ in saved:
            q.observe_only = True
        if emulation is not None:
            emulation.observe_only = True
        yield model
    finally:
        for q, flag in saved:
            q.observe_only = flag
        if emulation is not None:
            emulation.observe_only = False
            for _, _, q in emulation.all_quantizers():
                if all(q is not s for s, _ in saved):
                    q.observe_only = False
