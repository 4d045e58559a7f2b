"""A warning when dynamic fixed point exponents fall behind their tensors.

Courbariaux's overflow-rate rule moves an exponent by at most one binade per ``exponent_interval`` batches. A
tensor that grows faster (a freshly initialised network's layer outputs grow about two binades in their first
~30 batches) saturates: its values clip at the largest code, the straight-through gradient keeps pushing them,
and training can diverge without a NaN anywhere. ``LaggingExponents`` looks at each group whose interval has
just ended and warns, once, when more than ``SATURATED`` of its values overflowed on average over that interval
(the rule's own limit is ``max_overflow_rate``, 1e-4 in the presets; healthy training stays below a few
percent even in a 10-element bias group).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..scaling import DynamicExponent

__all__ = ["LaggingExponents", "SATURATED"]

SATURATED = 0.25  # a quarter of a group's values clipped, averaged over a whole interval


class LaggingExponents:
    """Warns (once per instance) about dynamic fixed point groups whose last interval saturated. Collect the
    groups that are ``due`` before their exponents advance, then ``check`` them.

    >>> watch = LaggingExponents()
    >>> due = [(name, e) for name, e in groups if e.due]
    >>> for _, e in due: e.update()
    >>> watch.check(due)
    """

    def __init__(self) -> None:
        self.warned = False

    def check(self, updated: Sequence[tuple[str, DynamicExponent]]) -> list[tuple[str, float]]:
        """The (name, rate) of every just-updated group whose averaged overflow rate exceeded ``SATURATED``,
        worst first; a UserWarning naming them and the fix the first time there are any."""
        lagging = sorted(((name, e.last_rate) for name, e in updated
                          if e.last_rate is not None and e.last_rate > SATURATED), key=lambda t: -t[1])
        if lagging and not self.warned:
            self.warned = True
            intervals = sorted({e.interval for _, e in updated})
            warnings.warn(_message(lagging, intervals), UserWarning, stacklevel=3)
        return lagging


def _message(lagging: Sequence[tuple[str, float]], intervals: Sequence[int]) -> str:
    shown = ", ".join(f"{name} {100 * rate:.1f} %" for name, rate in lagging[:4])
    more = f" and {len(lagging) - 4} more" if len(lagging) > 4 else ""
    return (f"dynamic fixed point exponents fall behind their tensors: over the last interval these groups "
            f"saturated (share of values clipped at the largest code): {shown}{more}. An exponent rises at most "
            f"one binade per exponent_interval={'/'.join(map(str, intervals))} batches; the clipped values distort "
            f"training. Use a shorter exponent_interval (down to 1), a smaller learning rate, or warm the "
            f"exponents up first (Trainer.warmup_exponents).")
