"""The policy one converted module runs under: overrides, @first/@last, and Park's classifier rule."""

from __future__ import annotations

import warnings
from dataclasses import replace

from torch import nn

from ..formats import BlockFloat, DynamicFixedPoint, FixedPoint, Uniform
from ..policy import Policy, Quant, classifier_bits

__all__ = ["module_policy", "CLASSIFIER_ROLES"]

#: The classifier path of Park et al. eq. 5: the last layer's weights and the values and gradients between it
#: and the softmax.
CLASSIFIER_ROLES = ("weight", "output", "output_grad")

_GRID_FORMATS = (FixedPoint, DynamicFixedPoint, Uniform, BlockFloat)  # a fixed step: round-off eq. 4 applies


def _bits(quant: Quant | None) -> int | None:
    """The width of a fixed-step (integer-grid) format; None for floats and unquantized roles."""
    return quant.bits if quant is not None and isinstance(quant.format, _GRID_FORMATS) else None


def _num_classes(module: nn.Module) -> int | None:
    """The classes a last layer scores: a Linear's out_features or a (1x1) convolution's out_channels."""
    classes = getattr(module, "out_features", getattr(module, "out_channels", None))
    return classes if isinstance(classes, int) and classes >= 2 else None


def module_policy(policy: Policy, name: str, module: nn.Module, *, first: bool, last: bool) -> Policy:
    """``policy.for_module(name, first=, last=)``, then, for the last layer, Park's classifier rule.

    With ``classifier_rule`` on, every classifier-path role (weight, output, output_grad) held in a fixed or
    dynamic fixed point format narrower than ``classifier_bits(C)`` becomes ``dfx<classifier_bits(C)>`` (same
    rounding). With the rule off, a UserWarning names the roles with fewer bits than the rule asks for.
    """
    resolved = policy.for_module(name, first=first, last=last)
    classes = _num_classes(module) if last else None
    if classes is None:
        return resolved
    need = classifier_bits(classes)
    short = {r: q for r in CLASSIFIER_ROLES if (bits := _bits(q := resolved.get(r))) is not None and bits < need}
    if resolved.classifier_rule:
        widened = {
            r: Quant(DynamicFixedPoint(need), q.rounding)
            for r, q in short.items()
            if isinstance(q.format, (FixedPoint, DynamicFixedPoint))
        }
        short = {r: q for r, q in short.items() if r not in widened}
        resolved = replace(resolved.with_roles(**widened), name=resolved.name)
    if short:
        roles = ", ".join(f"{r}={q}" for r, q in short.items())
        advice = "" if resolved.classifier_rule else "; set classifier_rule=on to widen them"
        warnings.warn(
            f"lowprec.convert: the last layer {name or type(module).__name__!r} scores {classes} classes, for "
            f"which Park et al.'s rule (eq. 5) asks for {need} bits, but it gets {roles}{advice}",
            UserWarning,
            stacklevel=3,
        )
    return resolved
