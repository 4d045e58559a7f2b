"""Precision plugins that run any lowprec policy under Lightning (``lightning.pytorch``) and Fabric.

>>> trainer = L.Trainer(plugins=[LowprecPrecision("int8-lazy")], ...)        # lightning.pytorch
>>> fabric = L.Fabric(plugins=[LowprecFabricPrecision("mixed-fp16")], ...)   # Fabric

Needs ``pip install lowprec[lightning]``. ``policy``: a Policy, a preset name, a policy string or a recipe
string (``"mixed-bf16+path=native"``, ``"mixed-fp16+loss_scale=static:8"``; a recipe's model or training
settings such as ``width`` or ``lr`` are refused: under Lightning they are the module's and the optimizer's).

What each hook does (the numbers are ``lowprec.Trainer``'s, through ``lowprec.GradScaler``):

* ``convert_module``: ``lowprec.convert(module, policy, inplace=True)`` (the optimizers Lightning builds later,
  or Fabric's user built earlier, hold the same parameters).
* ``connect`` (Lightning) / the first ``optimizer_step`` or ``unscale_gradients`` (Fabric, which shows the
  plugin no optimizer before): the ``lowprec.Trainer`` is built on the one optimizer; it rounds the parameters
  into their master formats (Fabric: at ``convert_module``) and points the optimizer at fp32 master copies of
  native fp16/bf16 parameters.
* ``pre_backward`` / ``backward``: the loss times the scale S, in fp32.
* ``optimizer_step``: the closure (forward and backward), then ``unscale_`` before ``on_before_optimizer_step``
  and Lightning's gradient clipping (``clip_gradients`` clips the optimizer's parameters: the master copies),
  then ``Trainer.apply_update``: the step is skipped on inf/NaN gradients, the optimizer step and each
  parameter's storage rule (master format, lazy update) and the optimizer-state formats are applied, the loss
  scale and dynamic fixed point exponents advance. A skipped step is logged (``lowprec/skipped_steps``, a
  running count, in the progress bar and the logger, with ``lowprec/loss_scale``; Fabric: the plugin's
  ``skipped_steps`` and ``last_result``), and the parameters whose gradients overflowed are named in a log
  record of the ``lowprec.integrations.lightning`` logger.
* ``state_dict`` / ``load_state_dict``: ``Trainer.state_dict()`` (loss scale, accumulators, master copies,
  quantizer exponents, RNG states, step counter, model and optimizer), so a resume through Lightning's own
  checkpoints (``trainer.fit(..., ckpt_path=...)``) or ``fabric.save``/``fabric.load`` with the plugin in
  the state is bit-exact. Lightning restores a checkpoint's weights into the module *before* converting it:
  a converted model's state dict keeps its quantizer state in metadata, so it loads into the plain module
  (strict), and the plugin's own entry restores everything after conversion.

One optimizer per model. Under DDP the Trainer agrees on skipped steps and exponents across ranks
(``lowprec.train.distributed``). The fused native update of ``lowprec.Trainer`` is not used here: gradients are
always unscaled before Lightning's hooks see them (as under Lightning's own mixed precision).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from lightning.fabric.plugins.precision import Precision as _FabricBase
    from lightning.pytorch.plugins.precision import Precision as _PytorchBase
except ImportError as err:  # pragma: no cover - exercised where lightning is absent
    raise ImportError("lowprec.integrations.lightning needs Lightning: pip install 'lowprec[lightning]'") from err

from ..experiments.recipes import parse_recipe
from ..policy import Policy
from ..scaling import LossScaler
from ..train import TrainStepResult
from .amp import GradScaler, convert_in_place

__all__ = ["LowprecPrecision", "LowprecFabricPrecision", "resolve_policy"]

log = logging.getLogger(__name__)


def resolve_policy(policy: Policy | str) -> Policy:
    """A Policy, or the policy of a recipe string (a preset, ``PRESET+role=...``, a policy string, a TOML path);
    ValueError for a recipe that also sets model or training parameters."""
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a lowprec Policy or a recipe string, got {type(policy).__name__}")
    recipe = parse_recipe(policy)
    if recipe.model or recipe.train:
        raise ValueError(
            f"recipe {policy!r} sets {', '.join(sorted({**recipe.model, **recipe.train}))}: under Lightning those "
            "belong to the LightningModule and its optimizer; pass only the policy part"
        )
    return recipe.policy


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel wrappers."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


class _LowprecCore:
    """What both plugins share: the policy, the GradScaler, the skipped-step record, the state."""

    def _setup_core(self, policy: Policy | str, loss_scaler: LossScaler | None) -> None:
        self.policy = resolve_policy(policy)
        self._loss_scaler = loss_scaler
        self.scaler: GradScaler | None = None
        self.skipped_steps = 0
        self.last_result: TrainStepResult | None = None
        self._pending: dict[str, Any] | None = None

    def _new_scaler(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> GradScaler:
        scaler = GradScaler(self.policy, _unwrapped(model), optimizer, loss_scaler=self._loss_scaler)
        if self._pending is not None:
            scaler.load_state_dict(self._pending["trainer"])
            self._pending = None
        self.scaler = scaler
        return scaler

    def _require_scaler(self) -> GradScaler:
        if self.scaler is None:
            raise RuntimeError("the lowprec precision plugin has not converted a module yet (set up the model "
                               "through the Trainer or fabric.setup first)")
        return self.scaler

    def _step(self, optimizer: torch.optim.Optimizer) -> TrainStepResult:
        scaler = self._require_scaler()
        scaler.step(optimizer)
        scaler.update()
        result = self.last_result = scaler.last_result
        if result.skipped:
            self.skipped_steps += 1
            log.info("lowprec: step %d skipped (inf/NaN in %s); loss scale %g -> %g", result.step,
                     ", ".join(result.overflow_modules), result.scale, result.next_scale)
        return result

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return dict(self._pending) if self._pending else {}
        return {"trainer": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.skipped_steps = int(state_dict["skipped_steps"])
        if self.scaler is None:
            self._pending = state_dict
        else:
            self.scaler.load_state_dict(state_dict["trainer"])


class LowprecPrecision(_LowprecCore, _PytorchBase):
    """``lightning.pytorch`` precision plugin for a lowprec policy (module docstring).
    ``loss_scaler``: default from the policy's ``loss_scale``."""

    def __init__(self, policy: Policy | str, *, loss_scaler: LossScaler | None = None):
        self._setup_core(policy, loss_scaler)

    def convert_module(self, module: nn.Module) -> nn.Module:
        return convert_in_place(module, self.policy)

    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple:
        if len(optimizers) > 1:
            raise ValueError(f"LowprecPrecision drives one optimizer per model, got {len(optimizers)}")
        if optimizers:
            self._new_scaler(model, optimizers[0])
        return super().connect(model, optimizers, lr_schedulers)

    def pre_backward(self, tensor: Tensor, module: nn.Module) -> Tensor:
        return super().pre_backward(self._require_scaler().scale(tensor), module)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"LowprecPrecision.optimizer_step takes no optimizer arguments, got {sorted(kwargs)}")
        closure_result = closure()
        skip_backward = closure_result is None and model.automatic_optimization
        if not skip_backward:
            self._require_scaler().unscale_(optimizer)  # hooks and clipping see the true gradients
        self._after_closure(model, optimizer)
        if skip_backward:
            return closure_result
        result = self._step(optimizer)
        model.log("lowprec/skipped_steps", float(self.skipped_steps), prog_bar=True, on_step=True, on_epoch=False)
        model.log("lowprec/loss_scale", result.next_scale, on_step=True, on_epoch=False)
        return closure_result


class LowprecFabricPrecision(_LowprecCore, _FabricBase):
    """Fabric precision plugin for a lowprec policy (module docstring). For a resume, save and load the plugin
    with the model and optimizer: ``fabric.save(path, {"model": m, "optimizer": o, "lowprec": plugin})``."""

    def __init__(self, policy: Policy | str, *, loss_scaler: LossScaler | None = None):
        self._setup_core(policy, loss_scaler)

    def convert_module(self, module: nn.Module) -> nn.Module:
        self._new_scaler(module, None)  # converts in place and rounds parameters into their master formats
        return module

    def backward(self, tensor: Tensor, model: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        super().backward(self._require_scaler().scale(tensor), model, *args, **kwargs)

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"LowprecFabricPrecision.optimizer_step takes no optimizer arguments, got {sorted(kwargs)}")
        self._step(optimizer)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self._require_scaler().unscale_(optimizer)
