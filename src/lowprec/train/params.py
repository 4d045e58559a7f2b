"""Which policy each trainable parameter is updated under, and the checks that the setup makes sense.

The update roles (``master``, ``accumulator``, ``optimizer_state``) belong to the *weight layers*: the
modules ``lowprec.convert`` made into quantized Linear/Conv/LSTM/GRU/Embedding layers, and the ConvTranspose /
Conv3d layers its op-level emulation quantizes. The parameters of each
get the trainer's policy for that layer, ``policy.for_module(name, first=..., last=...)``, with ``@first`` and
``@last`` the first and last weight layer in module order, as ``convert`` resolves them. Every other
parameter keeps an fp32 master and fp32 optimizer state: batch-norm's scale and shift (Park et al. keep
batch-norm internals in full precision; lowprec.nn's batch-norm quantizes only its input and output) and
modules ``convert`` does not know. A model without any converted layer (a plain ``nn.Module``) is treated
as if every module owning parameters were a weight layer.

The trainer's policy decides the update roles; the layers' own policies (from ``convert``) decide what their
forward and backward round. Where the two disagree on an update role, a UserWarning names the layers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..nn import QuantizedModule, emulation_of
from ..nn.swapped import EMULATED_LAYERS
from ..policy import Policy
from .update import ParamSlot, check_update_roles

__all__ = ["parameter_slots", "check_optimizer_covers", "model_differences", "UPDATE_ROLES"]

UPDATE_ROLES = ("master", "accumulator", "optimizer_state")


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The weight layers of a converted model (the swapped ones and the ConvTranspose / Conv3d layers the
    op-level emulation quantizes, as ``convert`` counts them for @first/@last) or, for a plain model (or one
    that has none of those), every module owning parameters."""
    if emulation_of(model) is not None or any(isinstance(m, QuantizedModule) for m in model.modules()):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, EMULATED_LAYERS)
                  or (isinstance(m, QuantizedModule) and m.COUNTS_AS_LAYER)]
        if layers:
            return layers
    return [(n, m) for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


def parameter_slots(model: nn.Module, policy: Policy) -> list[ParamSlot]:
    """One ``ParamSlot`` per trainable parameter, in ``model.named_parameters()`` order.

    Raises ValueError when a layer's policy sets an accumulator without a master format."""
    check_update_roles(policy, "policy")  # the base roles, even where every layer overrides them
    layers = _weight_layers(model)
    policies: dict[str, Policy] = {}
    disagree = []
    for i, (name, module) in enumerate(layers):
        policies[name] = policy.for_module(name, first=i == 0, last=i == len(layers) - 1)
        if isinstance(module, QuantizedModule) and any(
            module.policy.get(r) != policies[name].get(r) for r in UPDATE_ROLES
        ):
            disagree.append(name)
    if disagree:
        warnings.warn(
            f"lowprec.Trainer: layers {', '.join(disagree)} were converted under a policy whose master / "
            "accumulator / optimizer_state roles differ from the trainer's; the trainer's policy decides how "
            "parameters are updated. Pass the same policy to convert() and Trainer() to silence this.",
            UserWarning,
            stacklevel=3,
        )
    slots = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = name.rpartition(".")[0]
            slots.append(ParamSlot(name, p, policies.get(owner, Policy())))
    return slots


def check_optimizer_covers(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless the optimizer's param groups hold exactly the model's trainable parameters."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for key, name in trainable.items() if key not in held]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(
            f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model: {shown}. Build it "
            "over the model after conversion, e.g. torch.optim.SGD(model.parameters(), ...), or freeze those "
            "parameters (requires_grad=False)."
        )
    foreign = len(held - set(trainable))
    if foreign:
        raise ValueError(
            f"the optimizer holds {foreign} parameter(s) that are not trainable parameters of the model (was it "
            "built over the model before lowprec.convert, or over another model?)"
        )


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def model_differences(saved: dict, live: dict) -> list[str]:
    """How a saved model state dict differs from a live one: missing and unexpected entries, tensor shapes and
    dtypes (empty when they match). Quantizer states are compared by the policy check, not here."""
    tensors = {k for k, v in live.items() if isinstance(v, torch.Tensor)}
    stored = {k for k, v in saved.items() if isinstance(v, torch.Tensor)}
    out = []
    if missing := sorted(tensors - stored):
        out.append(f"this model has {_listed(missing)}, the checkpoint does not")
    if unexpected := sorted(stored - tensors):
        out.append(f"the checkpoint has {_listed(unexpected)}, this model does not")
    for k in sorted(tensors & stored):
        a, b = saved[k], live[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{k}: checkpoint {tuple(a.shape)} {a.dtype}, this model {tuple(b.shape)} {b.dtype}")
    return out
