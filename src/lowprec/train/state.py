"""Optimizer-state formats: the policy's ``optimizer_state`` role applied to any torch optimizer's buffers.

After every optimizer step, each floating-point tensor in ``optimizer.state[p]`` (``momentum_buffer``,
``exp_avg``, ``exp_avg_sq``, ...; never the ``step`` counters, nor a 0-dim scalar of a parameter with dimensions:
NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``, coefficients kept exact) of a parameter whose policy sets
``optimizer_state=F`` is rounded in place to F with the role's rounding. The optimizer computed the new state
in fp32 from the previous (already rounded) state, so each buffer is rounded once per step, as Courbariaux's
``v <- Q(M·v − LR·dE/dW)`` and Park's INT8/INT16 momentum. Each (parameter, buffer) pair has its own
``Quantizer`` (its own dynamic fixed point exponent: Courbariaux's v_W and v_b groups; Adam's two moments have
very different ranges). Buffers are visited in parameter order, then buffer name order (under lowprec's own
optimizers each parameter's buffers right after its master rounding, under torch's after all of them), so
stochastic rounding draws from the RNG in a fixed order.

Between steps each rounded buffer is kept packed in its format (``stored.py``: int8/int16 codes with the
exponent, fp16/fp8 casts), unless packing is off (policy ``packed=off`` or ``LOWPREC_PACKED=0``). lowprec's own
optimizers (``lowprec.train.SGD``/``AdamW``) and Courbariaux's rule are driven one parameter at a time
(``update.step_parameters``): that parameter's state is unpacked, read and written in float, then rounded and
packed again (``apply_to_``) before the next parameter's, so one parameter's float state exists at a time.
torch's optimizers update all parameters of a group with multi-tensor ops that read ``optimizer.state`` as float
tensors inside ``step()``: a pre-hook of ``optimizer.step()`` unpacks all of it (``unpack_state_``) and the
Trainer packs it when it rounds it after the step (``apply_``), so their float32 state exists during the update
only, not during forward and backward. A buffer not read in a step (its parameter had no gradient) is
not rounded again, packed or not, and every other buffer is rounded once a step. ``optimizer.state_dict()`` gives
float tensors (a state-dict hook unpacks them), so checkpoints keep their form and any ``load_state_dict``
accepts them; the loaded state is packed again at every ``optimizer.load_state_dict`` (a post-hook: the
Trainer's own ``load_state_dict``, Lightning's, a loop's). That hook reads the formats from the optimizer itself
(``bind``: which tensors it holds take which ``optimizer_state`` format, set by the Trainer that drives it), not
from the Trainer, so it packs as long as the optimizer lives, also after that Trainer is gone (built inside a
function that returned only the model and optimizer). Code that reads
``optimizer.state`` directly between steps sees ``lowprec.formats.packing.Packed`` values (``.unpack()``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..formats import Format
from ..formats.packing import Packed
from ..policy import Policy, Quantizer
from . import stored
from .update import ParamSlot, assign_, unpack_state_of_

__all__ = ["OptimizerStateFormats", "install_state_hooks", "unpack_state_", "bound_masters"]

#: The optimizer attribute recording what the Trainer driving it made of it: one ``_Bound`` per parameter slot.
_BOUND = "_lowprec_bound"


@dataclass(frozen=True)
class _Bound:
    """One parameter slot as its optimizer records it: the tensor the optimizer holds for it (the parameter, or
    its float32 master copy), the parameter, and its ``optimizer_state`` format (None: none) and policy."""

    holder: Tensor
    param: Tensor
    state_format: Format | None
    policy: Policy

    @classmethod
    def of(cls, slot: ParamSlot) -> _Bound:
        return cls(slot.holder, slot.param, None if slot.state_quant is None else slot.state_quant.format,
                   slot.policy)


def _is_buffer(name: str, value: Any, param: Tensor) -> bool:
    """A floating-point state tensor of ``param`` with values per element (momentum, moments, Rprop's step
    sizes), packed or not: not a ``step`` counter, and not a 0-dim scalar of a parameter with dimensions (the
    optimizer's own bookkeeping: NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``, which enter every element's
    update as exact coefficients; rounding them to an int8/int16 grid would move every step)."""
    if name == "step" or not (isinstance(value, Packed) or isinstance(value, Tensor) and value.is_floating_point()):
        return False
    return len(value.shape) > 0 or param.dim() == 0


def _unpacked_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` post-hook: every packed buffer as a float tensor (new per-parameter dicts
    where one was packed; the optimizer's own state is not changed)."""
    state_dict["state"] = {
        k: {b: stored.load(v) for b, v in s.items()} if any(isinstance(v, Packed) for v in s.values()) else s
        for k, s in state_dict["state"].items()
    }
    return state_dict


def unpack_state_(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Every packed buffer in ``optimizer.state`` as a float tensor again: ``optimizer.step()``'s pre-hook (torch's
    optimizers read float state; also a direct call, e.g. ``warmup_exponents`` without a Trainer)."""
    unpack_state_of_(optimizer, list(optimizer.state))


def _repack(optimizer: torch.optim.Optimizer, bound: Sequence[_Bound]) -> None:
    """Pack the float buffers of the ``bound`` slots that have a state format: each in its optimizer_state format
    where all its values lie on the grid (``stored.repack``)."""
    for b in bound:
        if b.state_format is None:
            continue
        state = optimizer.state.get(b.holder, {})
        on = stored.packing_on(b.policy)
        for buffer, value in state.items():
            if _is_buffer(buffer, value, b.holder) and not isinstance(value, Packed):
                state[buffer] = stored.repack(value, b.state_format, on)


def _repack_loaded(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.load_state_dict`` post-hook: the loaded state (float tensors) packed in the formats the
    optimizer records (``OptimizerStateFormats.bind``), whether or not the Trainer that set them is still alive."""
    _repack(optimizer, optimizer.__dict__.get(_BOUND, ()))


def bound_masters(optimizer: torch.optim.Optimizer) -> set[int]:
    """``id``s of the float32 master copies a Trainer pointed ``optimizer`` at (native fp16/bf16 parameters)."""
    return {id(b.holder) for b in optimizer.__dict__.get(_BOUND, ()) if b.holder is not b.param}


def install_state_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.state_dict()`` give float tensors for buffers kept packed, ``optimizer.step()`` unpack
    them first and ``optimizer.load_state_dict`` pack the loaded state (hooks on the optimizer, installed once)."""
    if _unpacked_state_dict not in getattr(optimizer, "_optimizer_state_dict_post_hooks", {}).values():
        optimizer.register_state_dict_post_hook(_unpacked_state_dict)
    if unpack_state_ not in getattr(optimizer, "_optimizer_step_pre_hooks", {}).values():
        optimizer.register_step_pre_hook(unpack_state_)
    if _repack_loaded not in getattr(optimizer, "_optimizer_load_state_dict_post_hooks", {}).values():
        optimizer.register_load_state_dict_post_hook(_repack_loaded)


class OptimizerStateFormats:
    """Rounds optimizer buffers to each parameter's ``optimizer_state`` format (module docstring)."""

    def __init__(self, slots: Sequence[ParamSlot], optimizer: torch.optim.Optimizer | None = None):
        self._optimizer = optimizer
        self._slots: list[ParamSlot] = []
        self.set_slots(slots)
        self._quantizers: dict[str, Quantizer] = {}  # "<param name>:<buffer name>"
        self._observe_only = False

    def set_slots(self, slots: Sequence[ParamSlot]) -> None:
        """The slots whose buffers are rounded, in this order (parameters added to the optimizer after the
        Trainer was built join them; the quantizers of the others are kept). With an ``optimizer``, it records
        them (``bind``)."""
        self._slots = [s for s in slots if s.state_quant is not None]
        if self._optimizer is not None:
            self.bind(self._optimizer, slots)

    @staticmethod
    def bind(optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot]) -> None:
        """Record on ``optimizer`` what each slot's parameter is to it (the tensor it holds, the state format, the
        policy): its load hook packs loaded state from this record, and a later Trainer over the same optimizer
        finds the master copies an earlier one pointed it at. The last Trainer bound is the one recorded."""
        setattr(optimizer, _BOUND, tuple(_Bound.of(s) for s in slots))

    def _quantizer(self, slot: ParamSlot, buffer: str) -> Quantizer:
        key = f"{slot.name}:{buffer}"
        if key not in self._quantizers:
            q = Quantizer(slot.state_quant, slot.policy)
            q.observe_only = self._observe_only
            self._quantizers[key] = q
        return self._quantizers[key]

    @torch.no_grad()
    def apply_(self, optimizer: torch.optim.Optimizer, done: Collection[ParamSlot] = ()) -> None:
        """Round every buffer of the slots under the optimizer's own update rule (Courbariaux's update rounds its
        velocity itself, through ``round_buffer``) and keep it packed (module docstring). ``done``: slots whose
        state ``apply_to_`` handled this step already (right after their update), skipped: a buffer is rounded
        once per step whether it is kept packed or in a float32 container (a second rounding would draw again
        under stochastic rounding and be observed twice by a moving exponent)."""
        skip = {id(s) for s in done}
        for slot in self._slots:
            if id(slot) not in skip:
                self.apply_to_(optimizer, slot)

    @torch.no_grad()
    def apply_to_(self, optimizer: torch.optim.Optimizer, slot: ParamSlot) -> None:
        """``apply_`` for one parameter (right after its update: one parameter's float state at a time); a
        buffer already packed (not read this step) is left as it is. A parameter without a gradient was not
        stepped: its buffers are not rounded again (no stochastic draw, no observation by a moving exponent),
        packed or not, and a buffer ``optimizer.step()``'s pre-hook unpacked is packed back as it was
        (``stored.repack``), so packed and float32 containers round the same buffers."""
        if slot.state_quant is None:
            return
        state = optimizer.state.get(slot.holder, {})
        on = stored.packing_on(slot.policy)
        stepped = slot.holder.grad is not None
        for buffer in sorted(state):
            value = state[buffer]
            if not _is_buffer(buffer, value, slot.holder) or isinstance(value, Packed):
                continue
            if stepped:
                self._round_buffer_(slot, state, buffer, on)
            else:
                state[buffer] = stored.repack(value, slot.state_quant.format, on)

    def _round_buffer_(self, slot: ParamSlot, state: dict[str, Any], buffer: str, on: bool) -> None:
        """``state[buffer]`` rounded (unless Courbariaux's update rounded it) and kept packed (``on``), or rounded
        in place. Packed, the codes come from the rounding where it gives them (``stored.store_rounded``), else
        are formed in the rounded tensor's memory: either way at most two float tensors of one buffer (its
        unrounded value and the rounding's result) are alive at a time, beside the integer codes."""
        value = state[buffer]
        if on and not slot.courbariaux:  # rounded and packed, the codes from the rounding where it gives them
            state[buffer] = stored.store_rounded(self._quantizer(slot, buffer), value, on)
            return
        rounded = value if slot.courbariaux else self._quantizer(slot, buffer)(value)
        if not on:
            assign_(value, rounded)  # float32 containers, in place
            return
        del value
        state[buffer] = rounded  # the unrounded buffer is released before its codes are formed
        state[buffer] = stored.store(rounded, on)

    @torch.no_grad()
    def repack_(self, optimizer: torch.optim.Optimizer) -> None:
        """Pack the float buffers of the slots (state just loaded from a checkpoint): each in its
        optimizer_state format where all its values lie on the grid (``stored.repack``)."""
        _repack(optimizer, [_Bound.of(s) for s in self._slots])

    def nbytes(self, optimizer: torch.optim.Optimizer) -> int:
        """Bytes the slots' buffers hold now (packed, or float tensors)."""
        return sum(stored.nbytes(v) for s in self._slots for b, v in optimizer.state.get(s.holder, {}).items()
                   if _is_buffer(b, v, s.holder))

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
