"""Optimizer-state formats: the policy's ``optimizer_state`` role applied to any torch optimizer's buffers.

After every optimizer step, each floating-point tensor in ``optimizer.state[p]`` (``momentum_buffer``,
``exp_avg``, ``exp_avg_sq``, ...; never the ``step`` counters) of a parameter whose policy sets
``optimizer_state=F`` is rounded in place to F with the role's rounding. The optimizer computed the new state
in fp32 from the previous (already rounded) state, so each buffer is rounded once per step, as Courbariaux's
``v <- Q(M·v − LR·dE/dW)`` and Park's INT8/INT16 momentum. Each (parameter, buffer) pair has its own
``Quantizer`` (its own dynamic fixed point exponent: Courbariaux's v_W and v_b groups; Adam's two moments have
very different ranges). Buffers are visited in parameter order, then buffer name order, so stochastic
rounding draws from the RNG in a fixed order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..policy import Quantizer
from .update import ParamSlot, assign_

__all__ = ["OptimizerStateFormats"]


class OptimizerStateFormats:
    """Rounds optimizer buffers to each parameter's ``optimizer_state`` format (module docstring)."""

    def __init__(self, slots: Sequence[ParamSlot]):
        self._slots = [s for s in slots if s.state_quant is not None]
        self._quantizers: dict[str, Quantizer] = {}  # "<param name>:<buffer name>"
        self._observe_only = False

    def _quantizer(self, slot: ParamSlot, buffer: str) -> Quantizer:
        key = f"{slot.name}:{buffer}"
        if key not in self._quantizers:
            q = Quantizer(slot.state_quant, slot.policy)
            q.observe_only = self._observe_only
            self._quantizers[key] = q
        return self._quantizers[key]

    @torch.no_grad()
    def apply_(self, optimizer: torch.optim.Optimizer) -> None:
        """Round every buffer of the slots under the optimizer's own update rule (Courbariaux's update rounds its
        velocity itself, through ``round_buffer``)."""
        for slot in self._slots:
            if slot.courbariaux:
                continue
            state = optimizer.state.get(slot.param, {})
            for buffer in sorted(state):
                value = state[buffer]
                if buffer != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    assign_(value, self._quantizer(slot, buffer)(value))

    def round_buffer(self, slot: ParamSlot, value: Tensor, buffer: str = "momentum_buffer") -> Tensor:
        """``value`` rounded to the slot's optimizer_state format by that buffer's quantizer (as is without one)."""
        return self._quantizer(slot, buffer)(value) if slot.state_quant is not None else value

    def items(self) -> Iterator[tuple[str, Quantizer]]:
        """("<param name>:<buffer name>", quantizer) for every buffer seen so far."""
        return iter(self._quantizers.items())

    def set_observe_only(self, flag: bool) -> None:
        self._observe_only = flag
        for q in self._quantizers.values():
            q.observe_only = flag

    def state_dict(self) -> dict[str, Any]:
        return {key: q.state_dict() for key, q in self._quantizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        slots = {s.name: s for s in self._slots}
        self._quantizers.clear()
        for key, qstate in state.items():
            name, _, buffer = key.rpartition(":")
            if name not in slots:
                raise ValueError(f"checkpoint has an optimizer-state format for {key}, but {name} has none here")
            self._quantizer(slots[name], buffer).load_state_dict(qstate)
