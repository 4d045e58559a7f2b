"""``Quantizer``: one role's format, rounding and (for dynamic fixed point) exponent state."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..formats import DynamicFixedPoint, quantize
from ..formats.packing import mark
from ..scaling import DynamicExponent
from .policy import Policy, Quant

__all__ = ["Quantizer"]


class Quantizer:
    """Callable that rounds a tensor onto one role's format; the identity when the role is not quantized.

    Dynamic fixed point roles follow the policy's exponent rule: "overflow" carries a ``DynamicExponent``
    (Courbariaux's per-group scale: each call observes the tensor, ``update()`` moves the exponent at the end
    of each interval); "maxabs" takes the exponent from the tensor's own max|x| at every call (no state).
    Stochastic rounding draws from the device's default generator (seed with torch.manual_seed; checkpoint
    torch's RNG state for a bit-exact resume).
    """

    def __init__(self, quant: Quant | None, policy: Policy | None = None):
        self.quant = quant
        self.observe_only = False  # calibration: record exponent statistics, return x unchanged
        self.exponent: DynamicExponent | None = None
        p = policy or Policy()
        if quant is not None and isinstance(quant.format, DynamicFixedPoint) and p.exponent_rule == "overflow":
            # init_int_bits None: the exponent starts at the max-abs exponent of the first tensor it sees
            self.exponent = DynamicExponent(
                quant.format, p.init_int_bits, max_overflow_rate=p.max_overflow_rate, interval=p.exponent_interval
            )

    @property
    def enabled(self) -> bool:
        return self.quant is not None

    @torch.compiler.disable  # stateful (exponent statistics) and runs its own compiled kernels: opaque to a
    def __call__(self, x: Tensor) -> Tensor:  # user's torch.compile, which graph-breaks around it
        if self.quant is None:
            return x
        if self.observe_only:
            if self.exponent is not None:
                self.exponent.observe(x)
            return x
        if self.exponent is not None:
            return self._marked(x, self.exponent.quantize(x, self.quant.rounding))
        return self._marked(x, quantize(x, self.quant.format, self.quant.rounding))

    def _marked(self, x: Tensor, y: Tensor) -> Tensor:
        """``y``, marked as lying on the format's grid (lowprec.formats.packing.mark: what backward saves of it
        is stored packed); ``x`` itself (a rounding that changed nothing, a parameter) stays unmarked."""
        return y if y is x else mark(y, self.quant.format)  # type: ignore[union-attr]

    @torch.compiler.disable
    def round(self, x: Tensor) -> Tensor:
        """Round x like ``__call__`` but without adding it to the exponent statistics (identity when observing)."""
        if self.quant is None or self.observe_only:
            return x
        int_bits = None
        if self.exponent is not None:
            self.exponent.start(x)
            int_bits = self.exponent.int_bits
        return self._marked(x, quantize(x, self.quant.format, self.quant.rounding, int_bits=int_bits))

    @torch.no_grad()
    def update(self) -> None:
        """Advance the exponent rule (no-op for static formats)."""
        if self.exponent is not None:
            self.exponent.update()

    def state_dict(self) -> dict[str, Any]:
        return {"quant": str(self.quant), "exponent": self.exponent.state_dict() if self.exponent else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["quant"] != str(self.quant):
            raise ValueError(f"checkpoint quantizer is {state['quant']}, this one is {self.quant}")
        if self.exponent is not None:
            self.exponent.load_state_dict(state["exponent"])

    def __repr__(self) -> str:
        if self.exponent is not None:
            return f"Quantizer({self.quant}, int_bits={self.exponent.int_bits})"
        return f"Quantizer({self.quant})"
