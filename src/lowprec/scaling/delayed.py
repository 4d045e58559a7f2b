"""Delayed scaling: the scale of a per-tensor scaled float (``scaled<e4m3,delayed>``) from an amax history.

Transformer Engine's ``DelayedScaling`` recipe. Each tensor is quantized with the scale s computed at the previous
``update()``; its amax (over finite values; the MAX over all tensors this group rounds between two updates) is
recorded. ``update()`` (once per step) pushes that amax into a history of ``fmt.history`` entries (newest first,
zeros before the first step), combines it (``fmt.algo``: "max" of the whole history, or "most_recent"), and
sets, in float32,

    s = element max / amax / 2**margin     (``fmt.pow2``: rounded down to a power of two; clamped to
                                            [2**-149, FLT_MAX]: a large margin never makes it 0)

keeping the previous s when that amax is 0 or not finite. s starts at 1. A step that quantized nothing does not
move the history.

State (history, scale, pending amax) lives on the tensors' device: no host sync per step. ``state_dict`` /
``load_state_dict`` checkpoint it, and a resumed run continues bit for bit. Across processes, ``agree`` (a
cross-process MAX, as for the dfx start exponent) is applied to the pending amax in ``update()``, so every rank
pushes the same amax and holds the same scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..formats import ScaledFloat, parse_format, quantize
from ..formats.scaled_kernels import FLT_MAX
from ..formats.scaled_quantize import pow2_floor

__all__ = ["DelayedScale"]

#: The smallest positive float32 (a subnormal): the least scale a margin can push s down to.
FLT_TRUE_MIN = 2.0**-149


class DelayedScale:
    """The scale state of one delayed-scaling tensor group.

    >>> s = DelayedScale("scaled<e4m3,delayed,history=16>")
    >>> y = s.quantize(x)     # round with the current scale, record amax(x)
    >>> s.update()            # once per step: push the amax, recompute the scale
    """

    def __init__(self, fmt: ScaledFloat | str):
        fmt = parse_format(fmt)
        if fmt.outside_state != "amax_history":
            raise ValueError(f"DelayedScale needs a delayed-scaling format such as 'scaled<e4m3,delayed>', got {fmt!r}")
        self.fmt = fmt
        self.scale: Tensor = torch.ones((), dtype=torch.float32)
        self.history: Tensor = torch.zeros(fmt.history, dtype=torch.float32)
        self.pending: Tensor | None = None  # MAX of the amaxes seen since the last update
        self.agree: Callable[[Tensor], Tensor] | None = None  # cross-process MAX

    def observe(self, x: Tensor) -> None:
        """Record amax(x) over its finite values (an empty tensor records nothing)."""
        if x.numel() == 0:
            return
        x = x.detach()
        amax = torch.where(torch.isfinite(x), x.abs(), 0.0).amax().float()
        if self.scale.device != amax.device:
            self.scale, self.history = self.scale.to(amax.device), self.history.to(amax.device)
        self.pending = amax if self.pending is None else torch.maximum(self.pending, amax)

    def quantize(self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Tensor:
        """Round x with the current scale and record its amax."""
        self.observe(x)
        return self.round(x, rounding, generator)

    def round(self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Tensor:
        """Round x with the current scale, recording nothing."""
        return quantize(x, self.fmt, rounding, generator=generator, scale=self.scale.to(x.device))

    @torch.no_grad()
    def update(self) -> bool:
        """Push the pending amax into the history and recompute the scale; False (nothing changes) when no tensor
        was observed since the last update."""
        if self.pending is None:
            return False
        amax = self.pending if self.agree is None else self.agree(self.pending)
        self.history = torch.roll(self.history, 1)
        self.history[0] = amax
        combined = self.history.amax() if self.fmt.algo == "max" else self.history[0]
        s = torch.tensor(self.fmt.max_value, dtype=torch.float32, device=combined.device) / combined
        s = torch.clamp(s * 2.0 ** -self.fmt.margin, min=FLT_TRUE_MIN, max=FLT_MAX)
        if self.fmt.pow2:
            s = pow2_floor(s)
        self.scale = torch.where((combined > 0) & torch.isfinite(combined), s, self.scale)
        self.pending = None
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": repr(self.fmt),
            "scale": self.scale.cpu(),
            "history": self.history.cpu(),
            "pending": None if self.pending is None else self.pending.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["format"] != repr(self.fmt):
            raise ValueError(f"checkpoint holds a scale for {state['format']}, this group is {self.fmt!r}")
        device = self.scale.device
        self.scale = state["scale"].to(device=device, dtype=torch.float32).clone()
        self.history = state["history"].to(device=device, dtype=torch.float32).clone()
        self.pending = None if state["pending"] is None else state["pending"].to(device).clone()

    def __repr__(self) -> str:
        return f"DelayedScale({self.fmt!r}, scale={float(self.scale)})"
