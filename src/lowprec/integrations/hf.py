"""Any lowprec policy under Hugging Face's ``transformers.Trainer``: ``LowprecTrainer``.

>>> trainer = LowprecTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, policy="int8-lazy")
>>> trainer.train()

Needs ``pip install lowprec[hf]`` (transformers and accelerate). ``policy``: a Policy, preset name, policy string
or recipe string without model or training settings, as ``lowprec.convert`` takes it. Hugging Face's own
precision switches (``fp16=True``, ``bf16=True``) are refused: the policy decides every format.

The numbers are ``lowprec.Trainer``'s, through ``lowprec.GradScaler`` (so a step is bit for bit a
``GradScaler`` loop's step over the same batches), plugged into the places transformers' loop gives a torch.amp
scaler (through accelerate):

* at construction the model is converted in place (``lowprec.convert(model, policy, inplace=True)``: an
  optimizer passed in ``optimizers=`` holds the same parameters);
* ``create_optimizer``: the ``GradScaler`` is built on the optimizer (rounding the parameters into their master
  formats) and becomes the accelerator's scaler: ``accelerator.backward`` multiplies the loss by the scale S;
* gradient clipping (``max_grad_norm``, 1.0 by default in transformers) and the logged ``grad_norm`` go through
  ``GradScaler.clip_grad_norm_``: unscaled first, over the gradients the optimizer updates (a native model's
  float32 master copies). accelerate's own ``clip_grad_norm_`` unscales only under its fp16 mode and would
  otherwise clip, and report, gradients S times too large;
* the optimizer step is ``GradScaler.step`` + ``update`` (``Trainer.apply_update``: skipped on inf/NaN gradients,
  master formats, lazy update, optimizer-state formats, loss scale and exponents advance). A skipped step is
  reported to transformers' loop as accelerate reports one (``accelerator.optimizer_step_was_skipped``), so the
  learning-rate schedule does not advance on it; ``lowprec_skipped_steps`` counts them and each log record
  gets ``lowprec/loss_scale`` and ``lowprec/skipped_steps``;
* checkpoints: the ``GradScaler``'s state (``Trainer.state_dict()``: loss scale, accumulators, master copies,
  exponents, RNG states, model and optimizer) and the skipped-step count are saved and loaded where transformers
  keeps a scaler's
  (``scaler.pt``, float tensors only: it loads with ``weights_only=True``), so ``train(resume_from_checkpoint=)``
  continues bit for bit.

One optimizer. Under DDP (accelerate on a process group: ``accelerate launch``, torchrun) the GradScaler is built
with the optimizer, after the group is up, so the ranks agree on skipped steps, the loss scale, exponents and amax
histories (``lowprec.train.distributed``); rank 0 writes ``scaler.pt`` and every rank resumes from it. The fused
native update of ``lowprec.Trainer`` is not used: gradients are unscaled before clipping, as under accelerate's own
fp16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    import transformers
except ImportError as err:  # pragma: no cover - exercised where transformers is absent
    raise ImportError("lowprec.integrations.hf needs transformers and accelerate: pip install 'lowprec[hf]'") from err

from ..policy import Policy, as_policy
from .amp import GradScaler, convert_in_place

__all__ = ["LowprecTrainer"]


class _AccelerateScaler:
    """A ``GradScaler`` in accelerate's scaler slot: torch.amp's methods, plus telling accelerate's optimizer
    wrapper whether the step ran. (The wrapper learns it from a patched ``optimizer.step``, which lowprec's own
    optimizers never call; the flag is set from the step's result instead.)"""

    def __init__(self, owner: LowprecTrainer, scaler: GradScaler):
        self.owner, self.scaler = owner, scaler

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, closure: Any = None) -> None:
        if closure is not None:
            raise TypeError("LowprecTrainer's optimizer step takes no closure")
        self.scaler.step(optimizer)
        skipped = self.scaler.last_result.skipped
        self.owner.lowprec_skipped_steps += int(skipped)
        wrapper = self.owner.optimizer  # accelerate's AcceleratedOptimizer around ``optimizer``
        if getattr(wrapper, "optimizer", None) is optimizer:
            wrapper._accelerate_step_called = not skipped

    def update(self) -> None:
        self.scaler.update()

    def get_scale(self) -> float:
        return self.scaler.get_scale()

    def is_enabled(self) -> bool:
        return self.scaler.is_enabled()

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state and the running count of skipped steps (as the Lightning plugin keeps it)."""
        return {"trainer": self.scaler.state_dict(), "skipped_steps": self.owner.lowprec_skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["trainer"])
        self.owner.lowprec_skipped_steps = int(state["skipped_steps"])


class LowprecTrainer(transformers.Trainer):
    """``transformers.Trainer`` training under a lowprec ``policy`` (keyword-only; module docstring)."""

    def __init__(self, *args: Any, policy: Policy | str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.fp16 or self.args.bf16:
            raise ValueError(
                "LowprecTrainer: TrainingArguments(fp16=True / bf16=True) is transformers' own mixed precision; "
                "under lowprec the policy sets every format (e.g. policy='mixed-fp16' or 'mixed-bf16+path="
                "native'): leave fp16 and bf16 False"
            )
        self.lowprec_policy = as_policy(policy)
        convert_in_place(self.model, self.lowprec_policy)
        self.lowprec_scaler: GradScaler | None = None
        self.lowprec_skipped_steps = 0

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """transformers' optimizer (or the one given in ``optimizers=``), with the GradScaler bound to it and put
        where accelerate looks for a scaler (before ``accelerator.prepare`` wraps the optimizer)."""
        optimizer = super().create_optimizer(model)
        if self.lowprec_scaler is None:
            self.lowprec_scaler = GradScaler(self.lowprec_policy, self.model, optimizer)
            self.accelerator.scaler = _AccelerateScaler(self, self.lowprec_scaler)
            self.accelerator.clip_grad_norm_ = self._clip_grad_norm_  # instance attribute: this trainer's only
            self.accelerator.unscale_gradients = self._unscale_gradients
        return optimizer

    def _clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """accelerate's ``clip_grad_norm_(model.parameters(), ...)`` as transformers calls it: the norm of the
        unscaled gradients the optimizer updates, clipped in place unless ``max_norm`` is inf."""
        return self.lowprec_scaler.clip_grad_norm_(max_norm, norm_type)

    def _unscale_gradients(self, optimizer: Any = None) -> None:
        self.lowprec_scaler.unscale_(self.lowprec_scaler.trainer.optimizer)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """transformers' log record, with the loss scale and the count of skipped steps."""
        if self.lowprec_scaler is not None:
            logs = {**logs, "lowprec/loss_scale": self.lowprec_scaler.get_scale(),
                    "lowprec/skipped_steps": self.lowprec_skipped_steps}
        super().log(logs, *args, **kwargs)
