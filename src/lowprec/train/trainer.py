"""``Trainer``: everything a training step does after the forward pass, in the order the papers prescribe.

``trainer.step(loss)`` =

1. ``backward(loss)``: (S·loss).backward(), S the loss scale (fp32 product, ``LossScaler.scale_loss``).
2. ``unscale_()``: every gradient divided by S in place, before clipping and weight decay see it (MPT §3.2);
   the inf/NaN check of all gradients (one host sync) names the parameters that overflowed.
3. If any gradient is inf/NaN: the step is skipped (no optimizer step, no re-quantization), grads are zeroed;
   batch-norm running statistics its forward made inf/NaN are put back as the last step taken left them
   (``norm_statistics.py``).
4. Otherwise: clip the total gradient norm (``clip_grad_norm``), run the optimizer (its weight decay works on
   unscaled fp32 gradients), store each parameter per its update mode (``update.py``: fp32 master, storage
   in the master format, or Park's lazy update), round the optimizer state to ``optimizer_state``
   (``state.py``), zero the grads.
5. The loss scaler advances (``LossScaler.update``: backoff on overflow, growth after clean steps).
6. Dynamic fixed point exponents advance by their rule: the layers' (``lowprec.nn.update_exponents``) and the
   trainer's own master / accumulator / optimizer-state groups. They advance on skipped steps too: the
   batch was observed, and an overflow is exactly what the overflow-rate rule must see.

Under torch.distributed (a Trainer built after ``init_process_group``) the inf/NaN verdict, the exponent
counters, start exponents and delayed-scaling amaxes are agreed across ranks (``distributed.py``; functional
ops' quantizers made at the first forward included): every rank skips the same steps and holds the same loss
scale, exponents and amax histories. A Trainer built before a process group of several ranks came up refuses
to step (RuntimeError): it has no agreement set up.

Users with their own loop call the pieces, as with torch.amp: ``backward``, ``unscale_`` (then their own
clipping or gradient inspection of ``master_params()``, or ``clip_grad_norm_``), ``apply_update``. The step's
gradients must come from ``backward`` (under a loss scale, a ``loss.backward()`` by hand is refused) and a
step needs at least one gradient; a native parameter's own ``.grad`` raises on use after ``unscale_``.
``scale_loss(loss)`` is S·loss for the caller's own ``.backward()`` (a backward through it counts as the
Trainer's); ``lowprec.GradScaler`` (lowprec.integrations.amp) gives these pieces torch.amp.GradScaler's names.

A natively stored model (``lowprec.nn.native``) under SGD, Adam or AdamW takes steps 2-4 in one compiled pass
per parameter group (``fused.py``): the check reads the fp16/bf16 gradients, the kernel divides by S, updates
the fp32 master and the optimizer state and rounds the parameter. An explicit ``unscale_()``, a second
``backward`` before ``apply_update`` (gradient accumulation, summed in fp32) or clipping take the unfused path
for that step.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import emulation_of
from ..nn import quantizers as layer_quantizers
from ..nn import update_exponents as update_layer_exponents
from ..policy import Policy, Quantizer
from ..scaling import LossScaler, StepResult
from . import distributed
from .params import check_optimizer_covers, model_differences, parameter_policies, parameter_slots, trainer_policy
from .fused import FusedUpdate
from .lagging import LaggingExponents
from .norm_statistics import RunningStatistics
from .state import OptimizerStateFormats, bound_masters, install_state_hooks
from .update import ParamSlot, check_courbariaux_optimizer, courbariaux_step_, step_parameters, use_master_copies
from .warmup import warmup_exponents

__all__ = ["Trainer", "TrainStepResult", "scaler_for", "rng_state", "set_rng_state"]


@dataclasses.dataclass(frozen=True)
class TrainStepResult(StepResult):
    """The loss scaler's ``StepResult`` (skipped, scale, next_scale, overflow_modules: the names of the
    parameters whose gradients were inf/NaN, or ``("loss",)`` when only the loss was, growth_tracker) plus the
    step index and the gradient norm."""

    step: int  # 0-based index of this step (skipped steps count)
    grad_norm: Tensor | None  # total gradient norm before clipping (None unless clip_grad_norm is set)


def scaler_for(policy: Policy) -> LossScaler:
    """The loss scaler a policy's ``loss_scale`` setting names (dynamic: LossScaler.dynamic() defaults)."""
    if policy.loss_scale == "dynamic":
        return LossScaler.dynamic()
    if policy.loss_scale.startswith("static:"):
        return LossScaler.static(float(policy.loss_scale[len("static:"):]))
    return LossScaler.none()


def rng_state() -> dict[str, Any]:
    """torch's RNG states a checkpoint keeps: CPU, and CUDA when present (stochastic rounding and dropout draw
    from them)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore an ``rng_state()``."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _warn_narrow_adam_state(optimizer: torch.optim.Optimizer, slots) -> None:
    """Park et al.: Adam's second moment (beta2 = 0.999) needs 16 bits; in 8 it rounds to zero and the step
    m / (sqrt(v) + eps) explodes. Warn when a policy stores Adam's state in a fixed-point word under 16 bits, or
    in any fixed-point word with eps below 1e-4 (a second moment rounded to 0 makes a step of lr * m / eps)."""
    if not any("betas" in group for group in optimizer.param_groups):
        return
    fixed = {s.state_quant for s in slots if s.state_quant is not None and s.state_quant.bits is not None
             and s.state_quant.format.fixed_step}
    narrow = sorted(str(q) for q in fixed if q.bits < 16)
    small_eps = min((g.get("eps", 1.0) for g in optimizer.param_groups), default=1.0) < 1e-4
    if narrow or (fixed and small_eps):
        warnings.warn(
            f"optimizer_state={', '.join(narrow or sorted(str(q) for q in fixed))} with an Adam-type optimizer: "
            "its second moment needs at least 16 fixed-point bits (Park et al.: optimizer_state=int16) and an eps "
            "of about 1e-3, as their INT16 Adam used: a moment rounded to 0 makes a step of lr * m / eps",
            UserWarning, stacklevel=3,
        )


def _watch_accumulation(trainer: Trainer, slots: Iterable[ParamSlot]) -> None:
    """Note, per parameter of ``slots``, every gradient autograd accumulates outside ``trainer.backward`` (a hook
    after the accumulation; a weak reference, so the hooks keep no trainer alive)."""
    ref = weakref.ref(trainer)

    def note(name: str, _param: Tensor) -> None:
        owner = ref()
        if owner is not None and not owner._in_backward:
            owner._outside_backward.append(name)

    for slot in slots:
        slot.param.register_post_accumulate_grad_hook(functools.partial(note, slot.name))


def _refuse_masters_of_an_earlier_trainer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError when ``optimizer`` holds the float32 master copies another Trainer pointed it at (native
    fp16/bf16 parameters) instead of the model's parameters: that Trainer's master copies, which this one would
    neither know nor write back into the model."""
    masters, owned = bound_masters(optimizer), {id(p) for p in model.parameters()}
    if any(id(p) in masters and id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            "the optimizer holds the float32 master copies an earlier lowprec.Trainer pointed it at (this model's "
            "fp16/bf16 parameters are updated through them): a Trainer drives its optimizer for good. Keep that "
            "Trainer (or the GradScaler or plugin holding it), or build a new optimizer over model.parameters() "
            "and resume with trainer.load_state_dict(earlier_trainer.state_dict())"
        )


class Trainer:
    """The training step of one model under one policy (see the module docstring).

    ``model``: usually ``lowprec.convert(model, policy)``; a plain module works too. ``optimizer``: any
    ``torch.optim`` optimizer over the model's trainable parameters, frozen ones may be held too
    (``lowprec.train.SGD``/``AdamW`` avoid a parameter snapshot in the lazy update). ``policy``: a Policy,
    preset name or policy string; default (None) the policy ``convert`` gave the model (fp32 for a plain
    model). A policy whose layer roles differ from the model's conversion, or that quantizes layer roles of a
    model without converted layers, is refused (ValueError, ``params.trainer_policy``). ``scaler``: default
    from ``policy.loss_scale``. ``clip_grad_norm``: max total L2 norm of the unscaled gradients (may be
    changed between steps). Building the trainer rounds every parameter once to its master format.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        policy: Policy | str | None = None,
        *,
        scaler: LossScaler | None = None,
        clip_grad_norm: float | None = None,
    ):
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        self.model, self.optimizer = model, optimizer
        self.policy = trainer_policy(model, policy)
        self.scaler = scaler if scaler is not None else scaler_for(self.policy)
        self.clip_grad_norm = clip_grad_norm
        _refuse_masters_of_an_earlier_trainer(model, optimizer)
        check_optimizer_covers(model, optimizer)
        self.slots = parameter_slots(model, self.policy)
        emulation = emulation_of(model)  # its record of the weights functional ops use: after the first forward
        self._awaiting_forward = emulation is not None and emulation.layer_parameters is None
        use_master_copies(optimizer, self.slots)
        self.fused = FusedUpdate.build(optimizer, self.slots, clip=clip_grad_norm is not None)
        self.state_formats = OptimizerStateFormats(self.slots, optimizer)  # recorded on the optimizer
        install_state_hooks(optimizer)  # state kept packed between steps: state_dict(), step() see floats
        check_courbariaux_optimizer(optimizer, self.slots)
        _warn_narrow_adam_state(optimizer, self.slots)
        self.steps = 0
        self.lagging = LaggingExponents()
        self.norm_statistics = RunningStatistics(model)  # as the last step taken left them
        self._unscaled: tuple[bool, list[str]] | None = None
        self._in_backward = False
        self._outside_backward: list[str] = []  # parameters autograd gave a gradient outside self.backward
        _watch_accumulation(self, self.slots)
        self.distributed = distributed.is_initialized()
        if self.distributed:
            self.scaler.agree = distributed.all_max
            distributed.agree_quantizers(model)  # start exponents, amaxes: of layers and functional ops

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self, loss: Tensor) -> TrainStepResult:
        """backward + apply_update: everything after the forward pass. Returns what happened."""
        self.backward(loss)
        return self.apply_update()

    def backward(self, loss: Tensor) -> None:
        """(S·loss).backward(). May be called several times before ``apply_update`` (gradient accumulation)."""
        scaled = self.scale_loss(loss)
        try:
            scaled.backward()
        finally:
            self._in_backward = False
        if self.fused is None:
            self._gather_between_backwards()

    def scale_loss(self, loss: Tensor) -> Tensor:
        """S·loss (fp32) for the caller's own ``.backward()`` (``backward`` and torch.amp-style loops). Gradients
        an earlier backward of this step left on fp16/bf16 parameters move into their fp32 masters first, so
        several backward passes sum in fp32; ``unscale_``/``apply_update`` gather the last one. Under
        torch.distributed they stay on the parameters (``_gather_between_backwards``)."""
        if self._unscaled is not None:
            raise RuntimeError("backward() after unscale_(): call apply_update() first to finish that step")
        self._gather_between_backwards()
        scaled = self.scaler.scale_loss(loss)
        if scaled.requires_grad:  # the backward pass through it is this trainer's (not a loss.backward() by hand)
            scaled.register_hook(self._backward_started)
        return scaled

    def _backward_started(self, grad: Tensor) -> Tensor:
        """Hook on the scaled loss: its gradient is the first autograd computes, so the flag is set before any
        parameter's gradient accumulates, and cleared when that backward pass ends."""
        self._in_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
        return grad

    def _backward_ended(self) -> None:
        self._in_backward = False

    def _gather_grads(self) -> None:
        """Native fp16/bf16 parameters: move their gradients into the float32 master copies (update.py)."""
        for slot in self.slots:
            slot.gather_grad_()

    def _gather_between_backwards(self) -> None:
        """``_gather_grads`` between the backward passes of one step, in one process. Under torch.distributed the
        gradients of the passes accumulate on the fp16/bf16 parameters until ``unscale_``: DDP's ``no_sync()``
        (gradient accumulation in Lightning, accelerate, transformers) leaves the all-reduce to the last pass,
        which averages the ``.grad`` the parameters hold then; a gradient moved into a master copy before would
        miss it and stay each rank's own (the ranks' weights would drift apart)."""
        if not self.distributed:
            self._gather_grads()

    def _adopt_functional_weights(self) -> list[ParamSlot]:
        """Once the model's first forward has shown which parameters functional ops use as weights
        (``params.parameter_policies``), give each its layer's update roles: a new slot (rounded into its master
        format now, after the backward, before any optimizer step) where its policy changed. Returns the new
        slots."""
        if not self._awaiting_forward or emulation_of(self.model).layer_parameters is None:
            return []
        self._awaiting_forward = False
        policies = parameter_policies(self.model, self.policy, warn=False)
        new = [ParamSlot(s.name, s.param, policies[s.name]) for s in self.slots if s.policy != policies[s.name]]
        if new:
            made = {s.name: s for s in new}
            self.slots = [made.get(s.name, s) for s in self.slots]
            self.state_formats = OptimizerStateFormats(self.slots, self.optimizer)
            check_courbariaux_optimizer(self.optimizer, self.slots)
            _warn_narrow_adam_state(self.optimizer, self.slots)
        return new

    def _adopt_added_parameters(self) -> list[ParamSlot]:
        """Trainable parameters of the model added to the optimizer after this Trainer was built
        (``optimizer.add_param_group``, e.g. layers unfrozen mid-run): each gets its slot now, under its policy's
        update roles (rounded into its master format now, after the backward and before its first optimizer
        step, as a functional op's weight is; a native fp16/bf16 one gets its float32 master copy, which the
        optimizer then holds), so its gradient is unscaled, and its storage rule and optimizer-state format
        apply, as for every other parameter. Slots stay in ``model.named_parameters()`` order. Returns the new
        slots. ValueError for a parameter that is not one of the model's."""
        known = {id(s.holder) for s in self.slots} | {id(s.param) for s in self.slots}
        added = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in known and p.requires_grad]
        if not added:
            return []
        names = {id(p): n for n, p in self.model.named_parameters()}
        foreign = [p for p in added if id(p) not in names]
        if foreign:
            raise ValueError(f"the optimizer was given {len(foreign)} parameter(s) that are not the model's (an "
                             "add_param_group over another module?): lowprec.Trainer updates the model's parameters")
        policies = parameter_policies(self.model, self.policy, warn=False)
        new = [ParamSlot(names[id(p)], p, policies[names[id(p)]]) for p in added]
        use_master_copies(self.optimizer, new)
        order = {n: i for i, n in enumerate(names.values())}
        self.slots = sorted([*self.slots, *new], key=lambda s: order[s.name])
        self.state_formats.set_slots(self.slots)
        fused = FusedUpdate.build(self.optimizer, self.slots, clip=self.clip_grad_norm is not None)
        if fused is not None and self.fused is not None:
            fused.failed = self.fused.failed
        self.fused = fused
        check_courbariaux_optimizer(self.optimizer, self.slots)
        _warn_narrow_adam_state(self.optimizer, new)
        _watch_accumulation(self, new)
        return new

    def _adopt(self) -> list[ParamSlot]:
        """The slots this step adds: functional ops' weights (first forward), parameters added to the optimizer."""
        return [*self._adopt_functional_weights(), *self._adopt_added_parameters()]

    def unscale_(self) -> tuple[bool, list[str]]:
        """Divide the gradients by S in place (once per step); (any grad inf/NaN, names of those parameters)."""
        self._adopt()
        if self._unscaled is None:
            self._check_gradients("unscale_()")
            self._gather_grads()
            self._unscaled = self.scaler.unscale_((s.name, s.holder) for s in self.slots)
            for slot in self.slots:
                slot.refer_grad_to_master_()
        return self._unscaled

    def master_params(self) -> list[Tensor]:
        """The tensors the optimizer updates, one per trainable parameter: the parameter itself, or the float32
        master copy of an fp16/bf16 (native) one. After ``unscale_()`` their ``.grad`` are the step's real
        gradients (unscaled, float32 for native parameters): clip or inspect these, e.g.
        ``torch.nn.utils.clip_grad_norm_(trainer.master_params(), 1.0)``. A native parameter's own ``.grad``
        then raises on use: it no longer holds the gradient."""
        return [s.holder for s in self.slots]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Unscale (unless done), then clip the total ``norm_type`` norm of the step's gradients (those of
        ``master_params()``) to ``max_norm`` in place, as ``torch.nn.utils.clip_grad_norm_``; returns the norm
        before clipping (inf/NaN when a gradient overflowed: ``apply_update`` then skips the step)."""
        self.unscale_()
        return self._clip(max_norm, norm_type)

    def _clip(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        return torch.nn.utils.clip_grad_norm_([p for p in self.master_params() if p.grad is not None],
                                              max_norm, norm_type)

    def _check_gradients(self, caller: str) -> None:
        """RuntimeError, changing nothing, when a process group of several ranks came up after this Trainer was
        built (the ranks' agreement is set up at construction), when the step has no gradient at all (it would be
        reported as a normal step) or when, under a loss scale S != 1, a backward pass outside ``backward()`` (a
        ``loss.backward()`` by hand) gave gradients that are not multiplied by S: unscaling would make them S
        times too small."""
        if not self.distributed and distributed.world_size() > 1:
            raise RuntimeError(
                f"{caller}: this lowprec.Trainer was built before torch.distributed's process group was "
                f"initialised, so its {distributed.world_size()} processes would each decide alone on skipped "
                "steps, the loss scale, exponents and amax histories, and their weights would drift apart. Build "
                "the Trainer after init_process_group (as Lightning, accelerate and lowprec's runner do)."
            )
        if not any(s.param.grad is not None or s.holder.grad is not None for s in self.slots):
            raise RuntimeError(
                f"{caller}: no parameter has a gradient, so there is no step to take. Call trainer.backward(loss) "
                "first (or trainer.step(loss), which does both)."
            )
        if self._outside_backward and self.scaler.scale != 1.0:
            names = sorted(set(self._outside_backward))
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise RuntimeError(
                f"{caller}: the gradients of {shown} come from a backward pass outside trainer.backward(loss) (a "
                f"loss.backward() by hand?), so they are not multiplied by the loss scale {self.scaler.scale:g}; "
                f"unscaling them would update with gradients {self.scaler.scale:g} times too small. Use "
                "trainer.backward(loss) (or trainer.step(loss)); trainer.zero_grad() drops the gradients."
            )

    def apply_update(self) -> TrainStepResult:
        """Unscale (unless done), skip or clip + update + re-quantize, zero grads, advance scale and exponents.
        RuntimeError (nothing changed) without any gradient, or with gradients from a ``loss.backward()`` by hand
        under loss scaling (``_check_gradients``)."""
        self._adopt()
        if self._unscaled is None:
            self._check_gradients("apply_update()")
        if (self._unscaled is None and self.fused is not None and self.clip_grad_norm is None  # set after build
                and self.fused.ready(self.slots)):
            return self._fused_update()
        found_inf, _ = self.unscale_()
        grad_norm = None if found_inf else self._update_parameters()
        return self._finish_step(found_inf, grad_norm)

    def _fused_update(self) -> TrainStepResult:
        """Check the fp16/bf16 gradients as they are, then one fused optimizer pass (``fused.py``)."""
        found_inf, _ = self._unscaled = self.scaler.unscale_(((s.name, s.param) for s in self.slots), divide=False)
        scale = self.scaler.scale
        if not found_inf and not self.fused.step(scale):  # the compiler failed, nothing changed: unfused
            self._gather_grads()
            grads = [s.holder.grad for s in self.slots if s.holder.grad is not None]
            if scale != 1.0:
                torch._foreach_div_(grads, scale)
            self._update_parameters()
        return self._finish_step(found_inf, None)

    def _finish_step(self, found_inf: bool, grad_norm: Tensor | None) -> TrainStepResult:
        if not found_inf:
            # the fused step and lowprec's DeltaOptimizers update without optimizer.step(): tell an LR scheduler
            # that the optimizer stepped (the flag its wrapped step() sets), so that it does not warn of a
            # scheduler step before any optimizer step
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            self.norm_statistics.keep()
        else:
            self.norm_statistics.restore_nonfinite()
        self.zero_grad()
        result = self.scaler.update(found_inf)
        self.update_exponents()
        step, self.steps = self.steps, self.steps + 1
        return TrainStepResult(**{f.name: getattr(result, f.name) for f in dataclasses.fields(StepResult)},
                               step=step, grad_norm=grad_norm)

    def _update_parameters(self) -> Tensor | None:
        """Clip, optimizer step, storage rule, optimizer-state formats; the norm before clipping (if clipped)."""
        grad_norm = None
        if self.clip_grad_norm is not None:
            grad_norm = self._clip(self.clip_grad_norm)
        # right after each parameter's update (lowprec's optimizers, Courbariaux's rule): its state rounded, packed
        done: list[ParamSlot] = []

        def state_done(slot: ParamSlot) -> None:
            self.state_formats.apply_to_(self.optimizer, slot)
            done.append(slot)

        rule = [s for s in self.slots if s.courbariaux and s.holder.grad is not None]
        held = [s.holder.grad for s in rule]
        for s in rule:  # hidden from the optimizer's own step
            s.holder.grad = None
        try:
            step_parameters(self.optimizer, self.slots, state_done)
        finally:
            for s, grad in zip(rule, held):
                s.holder.grad = grad
        courbariaux_step_(self.optimizer, rule, self.state_formats.round_buffer, state_done)
        self.state_formats.apply_(self.optimizer, done)  # the rest: all of it after a torch optimizer's step()
        return grad_norm

    def requantize_(self) -> None:
        """Round every parameter back into its master format, e.g. after a constraint the caller applied to the
        weights (Courbariaux et al.: max-norm, then re-quantization to the update width)."""
        for slot in self.slots:
            slot.store_(observe=False)

    def update_exponents(self) -> None:
        """Advance every dynamic fixed point exponent one batch (layers' and the trainer's own groups); under
        torch.distributed the counters of the groups at the end of an interval are summed over the ranks first.
        Warns once if a group's interval ended with its tensors saturated (``lagging.py``)."""
        groups = [(n, r, q.exponent) for n, r, q in (*layer_quantizers(self.model), *self.quantizers())
                  if q.exponent is not None]
        if self.distributed:
            distributed.sum_exponent_counters(e for _, _, e in groups)
        due = [(f"{n}:{r}" if n else r, e) for n, r, e in groups if e.due]
        update_layer_exponents(self.model)
        for _, _, q in self.quantizers():
            q.update()
        self.lagging.check(due)

    def zero_grad(self) -> None:
        """Drop every gradient (set to None) and any pending unscale: abandons a step in progress."""
        self.model.zero_grad(set_to_none=True)
        for slot in self.slots:
            if slot.master_copy is not None:
                slot.master_copy.grad = None
        self._unscaled = None
        self._outside_backward = []

    # -- inspection -------------------------------------------------------------------------------------------
    def quantizers(self) -> Iterator[tuple[str, str, Quantizer]]:
        """(parameter name, role, Quantizer) for the trainer's master, accumulator and optimizer-state groups;
        optimizer-state names are ``"<param>:<buffer>"`` and appear after the first step."""
        for slot in self.slots:
            for role, q in slot.quantizers():
                yield slot.name, role, q
        for key, q in self.state_formats.items():
            yield key, "optimizer_state", q

    # -- range warm-up ----------------------------------------------------------------------------------------
    def warmup_exponents(
        self, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor], steps: int | None = None
    ) -> int:
        """Courbariaux's range initialisation: train in full precision on ``batches`` (``steps`` of them, default
        all) while every dynamic fixed point group observes its tensors and moves its exponent, then restore the
        initial parameters, accumulators and optimizer state. No loss scaling; the scaler is untouched.
        ``loss_fn(model, batch)`` returns the loss. Returns the number of steps taken."""
        accumulators = [(s, s.acc.clone()) for s in self.slots if s.lazy]
        adopted: list[ParamSlot] = []  # slots the warm-up's first forward showed (functional ops' weights)

        def update() -> None:
            new = self._adopt()
            if new:
                adopted.extend(new)
                self._set_observe_only(True)  # the new slots' quantizers observe too
            self._update_parameters()
            self.zero_grad()
            self.update_exponents()

        self._set_observe_only(True)
        try:
            return warmup_exponents(self.model, self.optimizer, batches, loss_fn, steps, update=update)
        finally:
            self._set_observe_only(False)
            for slot, saved in accumulators:
                slot.set_acc(saved)
            self.state_formats.repack_(self.optimizer)  # the state the warm-up restored, as float tensors
            for slot in adopted:  # they start as if built with the trainer: zero accumulator, stored in master
                if slot.lazy:
                    slot.set_acc(torch.zeros_like(slot.param))
                slot.store_(observe=False)

    def _set_observe_only(self, flag: bool) -> None:
        for slot in self.slots:
            for _, q in slot.quantizers():
                q.observe_only = flag
        self.state_formats.set_observe_only(flag)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs: model (its quantizer exponents included, through the model's own
        state_dict), optimizer, loss scaler, accumulators, the trainer's quantizer groups, the torch RNG states
        (CPU, and CUDA when present: stochastic rounding and dropout draw from them) and the step counter.
        As with torch's state_dicts, tensors are shared with the live objects: torch.save or deepcopy it. State
        kept packed between steps (accumulators, optimizer state with a format) appears as float tensors, the
        form checkpoints have always had."""
        return {
            "policy": self.policy.spec(),
            "steps": self.steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "accumulators": {s.name: s.acc for s in self.slots if s.lazy},  # float tensors (unpacked copies)
            "master_copies": {s.name: s.master_copy for s in self.slots if s.master_copy is not None},
            "quantizers": {
                "params": {f"{s.name}:{role}": q.state_dict() for s in self.slots for role, q in s.quantizers()},
                "optimizer_state": self.state_formats.state_dict(),
            },
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` into a trainer built the same way (same model, optimizer type, policy);
        ValueError naming what differs otherwise."""
        if state["policy"] != self.policy.spec():
            raise ValueError(
                f"checkpoint was trained under policy {state['policy']!r}, this trainer has {self.policy.spec()!r}"
            )
        differences = model_differences(state["model"], self.model.state_dict())
        if differences:
            raise ValueError(f"checkpoint holds another model: {'; '.join(differences)}")
        self.model.load_state_dict(state["model"])  # the functional ops' exponents too (lowprec.nn.emulate)
        self._adopt()  # and which parameters they use as weights; parameters added to the optimizer since
        if "ops" in state["quantizers"] and emulation_of(self.model) is not None:  # kept there before they were
            emulation_of(self.model).load_state_dict(state["quantizers"]["ops"])  # in the model's state_dict
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scaler.load_state_dict(state["scaler"])
        accumulators = {s.name: s for s in self.slots if s.lazy}
        if set(accumulators) != set(state["accumulators"]):
            raise ValueError("checkpoint accumulators do not match this trainer's lazy-update parameters")
        for name, slot in accumulators.items():
            slot.set_acc(state["accumulators"][name])
        masters = {s.name: s.master_copy for s in self.slots if s.master_copy is not None}
        if set(masters) != set(state.get("master_copies", {})):
            raise ValueError("checkpoint master copies do not match this trainer's fp16/bf16 (native) parameters")
        for name, master in masters.items():
            master.copy_(state["master_copies"][name])
        groups = state["quantizers"]["params"]
        for s in self.slots:
            for role, q in s.quantizers():
                q.load_state_dict(groups[f"{s.name}:{role}"])
        self.state_formats.load_state_dict(state["quantizers"]["optimizer_state"])  # the state: packed at its load
        set_rng_state(state["rng"])
        self.steps = state["steps"]
        self._unscaled = None
        self.norm_statistics.keep()
