"""Which policy each trainable parameter is updated under, and the checks that the setup makes sense.

The update roles (``master``, ``accumulator``, ``optimizer_state``) belong to the *weight layers*: the
modules ``lowprec.convert`` made into quantized Linear/Conv/LSTM/GRU/Embedding layers, and the ConvTranspose /
Conv3d layers its op-level emulation quantizes; and to every parameter functional ops use as a weight layer's
weight or bias (MultiheadAttention's ``in_proj_weight``, a user's ``nn.Parameter`` passed to ``F.linear`` or
multiplied by ``@``: ``OpEmulation.layer_parameters``), under its module's policy. Which parameters those are
is known once a forward has run: a Trainer built before the model's first forward resolves them at its first
update (``Trainer.unscale_`` / ``apply_update``), rounding them into their master format then, before the
optimizer steps; a checkpoint of the converted model carries the list. The parameters of each
get the trainer's policy for that layer, ``policy.for_module(name, first=..., last=..., op=...)``, with ``@first`` and
``@last`` the first and last weight layer in module order, and Park's classifier rule on the last one (which
widens its master, accumulator and optimizer-state formats with its weight): the plan ``convert`` made and
recorded on the model (``lowprec.nn.resolve.Resolution``), read with the trainer's policy. Every other
parameter keeps an fp32 master and fp32 optimizer state: batch-norm's scale and shift (Park et al. keep
batch-norm internals in full precision; lowprec.nn's batch-norm quantizes only its input and output) and
modules ``convert`` does not know. A model without any converted layer (a plain ``nn.Module``) is treated
as if every module owning parameters were a weight layer.

The trainer's policy decides the update roles; the layers' own policies (from ``convert``) decide what their
forward and backward round. Where the two disagree on an update role, a UserWarning names the layers.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from ..nn import QuantizedModule, conversion_policy, emulation_of
from ..nn.convert import policy_label
from ..nn.native import is_native_layer
from ..nn.originals import REPLACED_HINT, is_replaced
from ..nn.resolve import Resolution, is_weight_layer, recorded_resolution
from ..policy import Policy, Role, as_policy
from .update import ParamSlot, check_update_roles

__all__ = ["parameter_slots", "parameter_policies", "check_optimizer_covers", "model_differences", "trainer_policy",
           "UPDATE_ROLES"]

UPDATE_ROLES = Role.select(update=True)


def _resolution(model: nn.Module, policy: Policy) -> Resolution:
    """The plan the trainer reads, under its own ``policy``: the one ``convert`` recorded on ``model``; for a model
    it did not convert as a whole (a plain model, one wrapping converted parts, one built from quantized layers),
    its weight layers as ``convert`` counts them (``nn.resolve.is_weight_layer``), or, where it has none of
    those, every module owning parameters."""
    recorded = recorded_resolution(model)
    if recorded is not None:
        return replace(recorded, policy=policy)
    if emulation_of(model) is not None or any(isinstance(m, QuantizedModule) for m in model.modules()):
        quantized = ((n, m, type(m) if isinstance(m, QuantizedModule) else None) for n, m in model.named_modules())
        layers = [(n, m, q) for n, m, q in quantized if is_weight_layer(m, q)]
        if layers:
            return Resolution.of_layers(policy, layers)
    return Resolution(policy, tuple(n for n, m in model.named_modules()
                                    if next(m.parameters(recurse=False), None) is not None))


def parameter_policies(model: nn.Module, policy: Policy, *, warn: bool = True) -> dict[str, Policy]:
    """The policy each trainable parameter is updated under (module docstring), by qualified name; ``warn``: the
    UserWarning for converted layers whose update roles differ from the trainer's."""
    resolution = _resolution(model, policy)
    policies = resolution.update_policies(model)
    modules = dict(model.named_modules())
    disagree = [name for name, p in policies.items() if isinstance(modules[name], QuantizedModule)
                and any(modules[name].policy.get(r) != p.get(r) for r in UPDATE_ROLES)]
    if disagree and warn:
        warnings.warn(
            f"lowprec.Trainer: layers {', '.join(disagree)} were converted under a policy whose master / "
            "accumulator / optimizer_state roles differ from the trainer's; the trainer's policy decides how "
            "parameters are updated. Pass the same policy to convert() and Trainer() to silence this.",
            UserWarning,
            stacklevel=3,
        )
    emulation = emulation_of(model)
    functional = set(emulation.layer_parameters or ()) if emulation is not None else set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = name.rpartition(".")[0]
            if owner not in policies and name in functional:  # a weight only functional ops use
                out[name] = resolution.module_policy(owner, modules[owner], warn=False)
            else:
                out[name] = policies.get(owner, Policy())
    return out


def parameter_slots(model: nn.Module, policy: Policy) -> list[ParamSlot]:
    """One ``ParamSlot`` per trainable parameter, in ``model.named_parameters()`` order.

    Raises ValueError when a layer's policy sets an accumulator without a master format."""
    check_update_roles(policy, "policy")  # the base roles, even where every layer overrides them
    params = dict(model.named_parameters())
    return [ParamSlot(name, params[name], p) for name, p in parameter_policies(model, policy).items()]


def _layer_part(policy: Policy) -> Policy:
    """What the converted layers use of a policy: the trainer's own settings (update roles, loss scale, update
    rule) dropped."""
    def keep(roles):
        return tuple((r, q) for r, q in roles if r not in UPDATE_ROLES)

    overrides = tuple((pattern, keep(assigned)) for pattern, assigned in policy.overrides if keep(assigned))
    return replace(policy, roles=keep(policy.roles), overrides=overrides, loss_scale="none", update_rule="optimizer")


def trainer_policy(model: nn.Module, policy: Policy | str | None) -> Policy:
    """The policy a Trainer of ``model`` runs under: ``policy``, or (None) the one ``convert`` gave the model
    (fp32 for a model it never converted).

    ValueError when ``policy`` differs from the model's conversion in what the layers use (a layer role, its
    rounding, exponent settings, overrides, the path): the layers would round under one policy and the trainer
    scale and store under another. Differences in the trainer's own settings are allowed: the loss scale, the
    update rule, and the update roles (master, accumulator, optimizer_state; a UserWarning from ``parameter_slots``). ValueError
    too for a policy that quantizes layer roles on a model without converted layers (only ``convert`` applies
    them: the trainer alone would round nothing but the stored weights). A model whose parts were converted
    under different policies needs ``policy`` (it then decides the update roles and loss scale alone)."""
    try:
        converted = conversion_policy(model)
    except ValueError:  # parts converted under different policies: only an explicit policy can serve them all
        if policy is None:
            raise
        return as_policy(policy)
    if converted is None and any(isinstance(m, QuantizedModule) or is_native_layer(m) for m in model.modules()):
        if policy is None:
            raise ValueError("the model's quantized (or fp16/bf16 native) layers were not made by lowprec.convert, "
                             "so their policy is unknown: pass the policy to lowprec.Trainer")
        return as_policy(policy)
    if policy is None:
        return converted if converted is not None else Policy()
    policy = as_policy(policy)
    if converted is not None and _layer_part(policy) != _layer_part(converted):
        was, given = policy_label(converted), policy_label(policy)
        if was == given:  # the same preset name, changed settings: show what differs
            was, given = converted.spec(), policy.spec()
        raise ValueError(
            f"lowprec.Trainer: the model was converted under {was!r} and the trainer was "
            f"given {given!r}: its layers would round under one and the trainer scale the loss "
            "and store the weights under the other. Leave the policy out (the trainer takes the model's) or pass "
            "the same one; a different loss scale goes in scaler=."
        )
    layer_roles = sorted({r for r, q in _layer_part(policy).roles if q is not None}
                         | {r for _, a in _layer_part(policy).overrides for r, q in a if q is not None})
    if converted is None and layer_roles:
        raise ValueError(
            f"lowprec.Trainer: policy {policy_label(policy)!r} quantizes {', '.join(layer_roles)}, which only the "
            "layers of a converted model apply, and this model has none: convert it first "
            "(model = lowprec.convert(model, policy)), or give the trainer only update roles "
            "(master, accumulator, optimizer_state) and a loss scale."
        )
    return policy


def check_optimizer_covers(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless the optimizer's param groups hold every trainable parameter of the model and only
    parameters of the model; the error says so when they are the parameters of the model before ``convert``
    copied it. Frozen parameters of the model (``requires_grad=False``) may be held too, as torch allows: they
    get no gradient, and their update roles when they are unfrozen (``Trainer._adopt_added_parameters``)."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    owned = {id(p) for p in model.parameters()}
    foreign = [p for p in held if id(p) not in owned]
    if any(is_replaced(p) for p in foreign):
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameter(s) of the model as it was before lowprec.convert, not "
            f"the converted model's: it would update nothing; {REPLACED_HINT}"
        )
    held_ids = {id(p) for p in held}
    missing = [name for key, name in trainable.items() if key not in held_ids]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(
            f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model: {shown}. Build it "
            "over the model after conversion, e.g. torch.optim.SGD(model.parameters(), ...), or freeze those "
            "parameters (requires_grad=False)."
        )
    if foreign:
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not parameters of the model (was it built "
            "over another model?)"
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
