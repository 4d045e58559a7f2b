"""Advice read off an inspection's censuses: the loss scale, and dynamic fixed point starting exponents.

Loss scale (Micikevicius et al. §3.2; NVIDIA's guide: "shift ... to recover all but 0.1% of values lost to 0 ...
and still avoid overflow"): over every gradient tensor (output_grad, activation_grad, weight_grad, bias_grad)
whose format has a fixed range (floats, fixed point), the smallest S = 2**k such that at most ``max_lost`` of
the non-zero gradients round to zero and none overflows. The census counts are exact at every power of two,
so the advice holds exactly on the inspected tensors. Formats whose step follows the tensor (dynamic fixed
point, block floating point, the scaled formats: MX, NVFP4, scaled<...>) do not change under a loss scale and
are left out.

Dynamic fixed point starting exponents: per (module, role) group in a ``dfx`` format, the max-abs exponent of
everything the group saw, the smallest r with max|x| < 2**r: Courbariaux's groups start where their first
batches put them, without a warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from torch import nn

from ..formats import parse_format
from ..nn import quantizers
from ..policy import Role
from .census import SCALE_EXPONENTS, Census

__all__ = ["GRADIENT_ROLES", "LossScaleAdvice", "advise_loss_scale", "start_exponents", "set_start_exponents"]

#: The roles a loss scale multiplies.
GRADIENT_ROLES = Role.select(gradient=True)


@dataclass(frozen=True)
class LossScaleAdvice:
    """The advised loss scale and what it does to the inspected gradients.

    ``scale`` is None when no gradient role has a fixed-range format. ``satisfied`` is False when no scale
    keeps the loss under ``max_lost`` without overflow: ``scale`` is then the largest one that does not
    overflow (or 1 when even that overflows)."""

    scale: float | None
    max_lost: float  # the chosen largest share of non-zero gradients rounded to zero
    lost: float  # share of the non-zero gradients rounded to zero at ``scale``
    lost_unscaled: float  # the same at S = 1
    overflow: int  # gradients overflowing at ``scale``
    nonzero: int  # non-zero finite gradients counted
    satisfied: bool
    formats: tuple[str, ...]  # the gradient formats counted

    def summary(self) -> str:
        if self.scale is None:
            return "loss scale: no gradient role in a fixed-range format (nothing to advise)"
        k = round(math.log2(self.scale))
        verdict = "" if self.satisfied else f" (no scale loses at most {100 * self.max_lost:g} % without overflow)"
        return (f"loss scale S = 2^{k} = {self.scale:g}: {100 * self.lost:.3f} % of non-zero gradients lost in "
                f"{', '.join(self.formats)} (at S = 1: {100 * self.lost_unscaled:.3f} %), {self.overflow} "
                f"overflow{verdict}")


def _scalable(fmt: str | None) -> bool:
    return fmt is not None and not parse_format(fmt).scale_free


def advise_loss_scale(
    entries: Iterable[tuple[str, str, str | None, Census]], max_lost: float = 1e-3
) -> LossScaleAdvice:
    """The loss scale advice over ``(module, role, format, census)`` entries (module docstring); entries of
    other roles and of formats a loss scale does not move are ignored."""
    if not 0 <= max_lost < 1:
        raise ValueError(f"max_lost must lie in [0, 1), got {max_lost!r}")
    grads = [(fmt, c) for _, role, fmt, c in entries if role in GRADIENT_ROLES and _scalable(fmt)]
    formats = tuple(sorted({fmt for fmt, _ in grads}))
    if not grads:
        return LossScaleAdvice(None, max_lost, 0.0, 0.0, 0, 0, True, ())
    nonzero = sum(c.nonzero for _, c in grads)
    counts = [c.counts(fmt) for fmt, c in grads]
    lost = [sum(fc.lost[i] for fc in counts) for i in range(len(SCALE_EXPONENTS))]
    over = [sum(fc.overflow[i] for fc in counts) for i in range(len(SCALE_EXPONENTS))]
    share = [n / max(nonzero, 1) for n in lost]
    clean = [i for i in range(len(SCALE_EXPONENTS)) if over[i] == 0]
    good = [i for i in clean if share[i] <= max_lost]
    i = good[0] if good else (clean[-1] if clean else 0)
    return LossScaleAdvice(
        scale=2.0 ** SCALE_EXPONENTS[i], max_lost=max_lost, lost=share[i], lost_unscaled=share[0],
        overflow=over[i], nonzero=nonzero, satisfied=bool(good), formats=formats,
    )


def start_exponents(entries: Iterable[tuple[str, str, str | None, Census]]) -> dict[tuple[str, str], int]:
    """``{(module, role): r}``, the max-abs exponent of every group held in a dynamic fixed point format."""
    return {(module, role): c.int_bits for module, role, fmt, c in entries
            if fmt is not None and parse_format(fmt).outside_state == "exponent" and c.nonzero}


def set_start_exponents(model: nn.Module, exponents: Mapping[tuple[str, str], int]) -> int:
    """Start the moving exponents of a converted model's layers (policies with the "overflow" rule) at
    ``exponents`` (from :func:`start_exponents`); returns how many were set."""
    done = 0
    for name, role, q in quantizers(model):
        if q.exponent is not None and (name, role) in exponents:
            q.exponent.int_bits = exponents[name, role]
            done += 1
    return done
