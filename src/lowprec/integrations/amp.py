"""A torch.amp-shaped entry point for a user's own loop: ``lowprec.autocast`` and ``lowprec.GradScaler``.

A torch.amp loop switches to any lowprec policy by changing its two precision lines::

    scaler = lp.GradScaler("int8-lazy", model, optimizer)   # was: scaler = torch.amp.GradScaler()
    for x, y in loader:
        optimizer.zero_grad()
        with lp.autocast(scaler):                          # was: with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)                         # optional, before clipping
        scaler.clip_grad_norm_(1.0)                        # clips what the optimizer updates
        scaler.step(optimizer)
        scaler.update()

``GradScaler`` is a thin shape around ``lowprec.Trainer``: the numbers are the Trainer's (loss scale S,
unscaling in fp32, inf/NaN check and skipped steps, fp32 master copies of fp16/bf16 parameters, storage in the
master format, Park's lazy update, optimizer-state formats, dynamic fixed point exponents), so a loop written
this way takes bit for bit the steps ``trainer.step(loss)`` takes (tests/test_integrations_amp.py).

Relation to ``lowprec.convert``. Under lowprec the precision is a property of the converted layers, not of a
block of code: ``GradScaler(policy, model, ...)`` converts ``model`` in place (its parameters stay the same
objects, so an optimizer built on them stays valid) unless it is already converted, and ``autocast`` only
checks that the model it runs is converted under the scaler's policy. ``autocast(policy, model)`` (no scaler:
evaluation, inference) converts ``model`` in place on first entry. Leaving the block undoes nothing: a forward
outside it computes under the policy too (unlike torch.autocast, which is a mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import conversion_policy, convert
from ..nn.convert import policy_label
from ..policy import Policy, as_policy
from ..scaling import LossScaler
from ..train import Trainer, TrainStepResult, distributed, scaler_for
from ..train.trainer import rng_state, set_rng_state
from ..train.params import parameter_slots

__all__ = ["GradScaler", "autocast", "convert_in_place"]

def convert_in_place(model: nn.Module, policy: Policy | str) -> nn.Module:
    """``lowprec.convert(model, policy, inplace=True)`` unless ``model`` is converted already: a model converted
    under the same policy is returned unchanged, one converted under another is refused (ValueError: convert a
    fresh copy of the float model instead)."""
    policy = as_policy(policy)
    done = conversion_policy(model)
    if done is None:
        convert(model, policy, inplace=True)
    elif done.spec() != policy.spec():
        raise ValueError(
            f"this model was converted under policy {policy_label(done)!r}, not {policy_label(policy)!r}: a model "
            "carries one policy; convert a fresh copy of the float model for another"
        )
    return model


class GradScaler:
    """torch.amp.GradScaler's shape over ``lowprec.Trainer`` (module docstring).

    ``GradScaler(policy, model, optimizer)``: converts ``model`` in place under ``policy`` (a Policy, preset
    name or policy string) unless already converted, then builds ``lowprec.Trainer(model, optimizer, policy,
    scaler=loss_scaler)`` (which rounds every parameter into its master format). ``optimizer`` may be left
    out: the Trainer is then built on the optimizer first given to ``unscale_``/``step`` (parameters are put in
    their master format now, as the Trainer's build would). ``GradScaler(trainer)`` wraps an existing Trainer.
    ``loss_scaler``: default from ``policy.loss_scale``. One optimizer per scaler.
    """

    def __init__(
        self,
        policy: Policy | str | Trainer,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        loss_scaler: LossScaler | None = None,
    ):
        self._trainer: Trainer | None = None
        self._pending_state: dict[str, Any] | None = None
        #: before the Trainer exists: each fp16/bf16 parameter's gradients of the step's earlier backward passes,
        #: summed in fp32 (``_hold_native_grads``), handed to its master copy when the Trainer is built
        self._held: dict[int, tuple[Tensor, Tensor]] = {}
        self._stepped = False
        self.last_result: TrainStepResult | None = None  #: what the last ``step`` did (skipped, scale, ...)
        if isinstance(policy, Trainer):
            if model is not None or optimizer is not None or loss_scaler is not None:
                raise TypeError("GradScaler(trainer) takes nothing else: the trainer has its model, optimizer "
                                "and loss scaler")
            self._trainer = policy
            self.policy, self.model, self.loss_scaler = policy.policy, policy.model, policy.scaler
            return
        if not isinstance(model, nn.Module):
            raise TypeError(
                "GradScaler(policy, model, optimizer) needs the model it trains (got "
                f"{type(model).__name__}): lowprec converts the model's layers, the precision is not a mode"
            )
        self.policy = as_policy(policy)
        self.model = convert_in_place(model, self.policy)
        self.loss_scaler = loss_scaler if loss_scaler is not None else scaler_for(self.policy)
        if optimizer is not None:
            self._bind(optimizer)
        else:
            parameter_slots(self.model, self.policy)  # the rounding into master formats the Trainer's build does
            if distributed.is_initialized():  # the forwards before the Trainer is built agree across ranks too
                distributed.agree_quantizers(self.model)

    # -- binding ----------------------------------------------------------------------------------------------
    @property
    def trainer(self) -> Trainer:
        """The ``lowprec.Trainer`` doing the work (RuntimeError before it has an optimizer)."""
        if self._trainer is None:
            raise RuntimeError("this GradScaler has no optimizer yet: pass it to GradScaler(...) or to "
                               "unscale_(optimizer) / step(optimizer) first")
        return self._trainer

    def _bind(self, optimizer: torch.optim.Optimizer) -> Trainer:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._trainer is None:
            if self._pending_state is not None:
                # a state loaded before binding restores the optimizer's too (on the master copies the Trainer
                # points it at): what a checkpoint loader put there already is dropped, not mis-keyed
                optimizer.state.clear()
            self._trainer = Trainer(self.model, optimizer, self.policy, scaler=self.loss_scaler)
            for slot in self._trainer.slots:  # the earlier backward passes' sums, as the Trainer would have formed
                held = self._held.pop(id(slot.param), None)
                if held is not None and slot.master_copy is not None:
                    slot.master_copy.grad = held[1]
            self._held = {}
            if self._pending_state is not None:
                drawn = rng_state()  # restored at load_state_dict, drawn from since: keep the stream as it is
                # the model's state was restored at load_state_dict; a forward since has recorded exponent
                # statistics and amaxes in its quantizers, which loading the checkpoint's model again would undo
                self._trainer.load_state_dict(dict(self._pending_state, model=self.model.state_dict()))
                set_rng_state(drawn)
                self._pending_state = None
        elif optimizer is not self._trainer.optimizer:
            raise ValueError("this GradScaler drives one optimizer (the one it was built or first stepped with); "
                             "use one GradScaler per model and optimizer")
        return self._trainer

    # -- torch.amp.GradScaler's methods -----------------------------------------------------------------------
    def scale(self, loss: Tensor) -> Tensor:
        """``S * loss`` in fp32, for the caller's ``.backward()`` (several per step accumulate: lowprec sums a
        native model's gradients in fp32, as ``Trainer.backward`` does)."""
        if not isinstance(loss, Tensor):
            raise TypeError(f"scale() takes the loss tensor, got {type(loss).__name__}")
        if self._trainer is None:
            self._hold_native_grads()
            return self.loss_scaler.scale_loss(loss)
        return self._trainer.scale_loss(loss)

    def _hold_native_grads(self) -> None:
        """Before the Trainer exists: move each fp16/bf16 parameter's gradient (an earlier backward of this step)
        into an fp32 sum, as ``Trainer.scale_loss`` moves it into the master copy, so that the backward passes of
        a step sum in fp32 from the first step on (summed in the parameter's dtype, a resumed run's first step
        differed from the uninterrupted run's)."""
        for p in self.model.parameters():
            if p.grad is not None and p.dtype in (torch.float16, torch.bfloat16):
                held = self._held.get(id(p))
                self._held[id(p)] = (p, p.grad.float() if held is None else held[1].add_(p.grad))
                p.grad = None

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the step's gradients by S in place (at most once per step; a second call does nothing) and
        check them for inf/NaN, before the caller clips or inspects them."""
        self._bind(optimizer).unscale_()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """``Trainer.clip_grad_norm_``: unscale (unless done), then clip the total norm of the gradients the
        optimizer will use (a native model's fp32 master copies, whose gradients ``model.parameters()`` no
        longer hold after unscaling). Returns the norm before clipping."""
        return self.trainer.clip_grad_norm_(max_norm, norm_type)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        """The whole update, ``Trainer.apply_update``: unscale (unless done), skip it on inf/NaN, else the
        optimizer step and each parameter's storage rule; gradients are zeroed, the loss scale and the dynamic
        fixed point exponents advance. ``last_result`` says what happened. Returns None (as torch does for a
        skipped step)."""
        if args or kwargs:
            raise TypeError("lowprec's GradScaler.step(optimizer) takes no closure or optimizer arguments: the "
                            "optimizer runs inside lowprec's update (call backward before step)")
        self.last_result = self._bind(optimizer).apply_update()
        self._stepped = True

    def update(self, new_scale: float | None = None) -> None:
        """Close the step. The scale already moved inside ``step`` (lowprec's rule, ``LossScaler.update``); this
        checks a step was taken, as torch does. ``new_scale`` is refused: set the scale through the policy's
        ``loss_scale`` or ``loss_scaler=LossScaler.static(S)``/``dynamic(init=S)``."""
        if new_scale is not None:
            raise ValueError("lowprec's loss scale follows its own rule; choose it with loss_scale=static:S or "
                             "loss_scaler=LossScaler.static(S) / LossScaler.dynamic(init=S)")
        if not self._stepped:
            raise RuntimeError("update() without a step(optimizer) since the last update()")
        self._stepped = False

    def get_scale(self) -> float:
        """The loss scale S the next ``scale(loss)`` multiplies by."""
        return float(self.loss_scaler.scale)

    def is_enabled(self) -> bool:
        """Whether losses are scaled (policy loss_scale other than none)."""
        return self.loss_scaler.kind != "none"

    def state_dict(self) -> dict[str, Any]:
        """``Trainer.state_dict()``: everything a bit-exact resume needs (model with its quantizer state,
        optimizer, loss scale, accumulators, master copies, exponents, RNG states, step counter). Loading it
        restores the model and optimizer too."""
        if self._trainer is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return self._trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``. Before the optimizer is known, the model, loss scale and RNG states are
        restored at once (a forward and backward may come first) and the rest when the Trainer is built."""
        if not state:
            return
        if self._trainer is None:
            self.model.load_state_dict(state["model"])
            self.loss_scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self._pending_state = state
        else:
            self._trainer.load_state_dict(state)
        self._stepped = False


@contextlib.contextmanager
def autocast(policy: Policy | str | GradScaler, model: nn.Module | None = None) -> Iterator[None]:
    """The block a forward runs in (module docstring). ``autocast(scaler)``: the scaler's model is already
    converted; ``autocast(policy, model)``: ``model`` is converted in place on first entry
    (``convert_in_place``: once; a model converted under another policy is an error)."""
    if isinstance(policy, GradScaler):
        if model is not None and model is not policy.model:
            raise ValueError("autocast(scaler, model): the model is not the one the scaler trains")
        yield
        return
    if not isinstance(model, nn.Module):
        raise TypeError("autocast(policy, model) needs the model to run under the policy (or pass a "
                        "lowprec.GradScaler, whose model is converted already)")
    convert_in_place(model, policy)
    yield
