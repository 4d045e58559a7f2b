"""The policy one converted module runs under: overrides, @first/@last, and Park's classifier rule, resolved once.

A :class:`Resolution` is the precision plan of one model under one policy: its weight layers (in module order;
``@first``/``@last`` are the first and last of them) and, for any module path and op, the policy resolved there
(:meth:`Resolution.module_policy`: the base roles, module and ``op:`` overrides in the order written,
``@first``/``@last``, then Park's classifier rule on the last layer), including the update roles (master,
optimizer_state, accumulator) of each weight layer's parameters (:meth:`Resolution.update_policies`).
``convert`` makes it in one walk over the model and records it on the model it returns; the swapped layers, the
op-level emulation, the Trainer (``train.params``) and ``lowprec.inspect`` all read that one plan.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from ..policy import LAYER_ROLES, Policy, Quant, Role, classifier_bits
from ..policy.ops import OP_PREFIX
from .swapped import EMULATED_LAYERS, layer_op

__all__ = ["module_policy", "check_override_roles", "CLASSIFIER_ROLES", "Resolution", "is_weight_layer",
           "record_resolution", "recorded_resolution"]

_RESOLUTION_ATTR = "_lowprec_resolution"  # where convert records the plan on the model it returns

#: The roles the trainer applies to the parameters of weight layers (the other parameters stay fp32).
_UPDATE_ROLES = Role.select(update=True)

#: The classifier path of Park et al. eq. 5: the last layer's weights and the values and gradients between it
#: and the softmax.
CLASSIFIER_ROLES = Role.select(classifier=True)

def _bits(quant: Quant | None) -> int | None:
    """The width of a fixed-step (integer-grid) format; None for floats and unquantized roles."""
    return quant.bits if quant is not None and quant.format.fixed_step else None


def _widened(quant: Quant, bits: int) -> Quant:
    """The same kind of format at ``bits`` bits (fixed point becomes dynamic fixed point, as the rule does)."""
    return replace(quant, format=quant.format.widened(bits))


def _num_classes(module: nn.Module) -> int | None:
    """The classes a last layer scores: a Linear's out_features or a (1x1) convolution's out_channels."""
    classes = getattr(module, "out_features", getattr(module, "out_channels", None))
    return classes if isinstance(classes, int) and classes >= 2 else None


def _narrower(resolved: Policy, roles: Sequence[str], need: int) -> dict[str, Quant]:
    """The roles among ``roles`` held in a fixed-step format narrower than ``need`` bits."""
    return {r: q for r in roles if (bits := _bits(q := resolved.get(r))) is not None and bits < need}


def module_policy(policy: Policy, name: str, module: nn.Module, *, first: bool, last: bool,
                  op: str | None = None, warn: bool = True) -> Policy:
    """``policy.for_module(name, first=, last=, op=)``, then, for the last layer, Park's classifier rule.

    ``op``: the op (``lowprec.policy.ops.OP_KINDS``) the policy is for, so that ``op:`` overrides apply; the
    swapped layers and the op-level emulation both resolve their formats here.

    With ``classifier_rule`` on, every classifier-path role (weight, output, output_grad) held in a fixed or
    dynamic fixed point format narrower than ``classifier_bits(C)`` becomes ``dfx<classifier_bits(C)>`` (same
    rounding), and so do the layer's update roles (master, optimizer_state, accumulator) narrower than that:
    the stored weight lies on its master's grid, so a weight role wider than the master would widen nothing.
    With ``warn``, a UserWarning names the classifier-path roles left with fewer bits than the rule asks for
    (the rule off, or a format it cannot widen: WRPN's uniform, block floating point) and the fix:
    classifier_rule=on or an ``@last`` override. Float formats are exempt: their step scales with the value, so
    the 1/C components survive. ``convert`` and the Trainer both resolve a layer's policy here, so they agree.
    """
    resolved = policy.for_module(name, first=first, last=last, op=op)
    classes = _num_classes(module) if last else None
    if classes is None:
        return resolved
    need = classifier_bits(classes)
    short = _narrower(resolved, CLASSIFIER_ROLES, need)
    if resolved.classifier_rule:
        widened = {
            r: replace(q, format=q.format.widened(need))
            for r, q in _narrower(resolved, CLASSIFIER_ROLES + _UPDATE_ROLES, need).items()
            if q.format.fixed_point
        }
        short = {r: q for r, q in short.items() if r not in widened}
        resolved = replace(resolved.with_roles(**widened), name=resolved.name)
    if short and warn:
        roles = ", ".join(f"{r}={q}" for r, q in short.items())
        override = "@last: " + ",".join(f"{r}={_widened(q, need)}" for r, q in short.items())
        fix = f"an override {override!r}"
        if not resolved.classifier_rule and any(q.format.fixed_point for q in short.values()):
            fix = f"classifier_rule=on, or {fix}"
        warnings.warn(
            f"lowprec.convert: the last layer {name or type(module).__name__!r} scores {classes} classes, for "
            f"which Park et al.'s rule (eq. 5) asks for {need} bits, but it gets {roles}; fix: {fix}",
            UserWarning,
            stacklevel=3,
        )
    return resolved


def is_weight_layer(module: nn.Module, quantized: type | None) -> bool:
    """Whether a module counts for @first/@last and takes the update roles: a layer swapped for a quantized
    class (``quantized``, before or after the swap) that counts as a layer (not batch-norm), or one of the
    weight layers the op-level emulation quantizes (``swapped.EMULATED_LAYERS``: ConvTranspose, Conv3d)."""
    return quantized.COUNTS_AS_LAYER if quantized is not None else isinstance(module, EMULATED_LAYERS)


@dataclass(frozen=True)
class Resolution:
    """The precision plan of one model under ``policy`` (module docstring). ``layers``: the qualified names of
    its weight layers in module order; ``ops``: the op each runs (``swapped.layer_op``; empty: none known)."""

    policy: Policy
    layers: tuple[str, ...] = ()
    ops: tuple[str | None, ...] = ()

    @classmethod
    def of_layers(cls, policy: Policy, layers: Sequence[tuple[str, nn.Module, type | None]]) -> Resolution:
        """The plan of the weight layers ``(name, module, quantized class or None)``, in module order."""
        return cls(policy, tuple(n for n, _, _ in layers), tuple(layer_op(m, q) for _, m, q in layers))

    @property
    def first(self) -> str | None:
        """The module ``@first`` stands for (None: the model has no weight layer)."""
        return self.layers[0] if self.layers else None

    @property
    def last(self) -> str | None:
        """The module ``@last`` stands for, which Park's classifier rule applies to."""
        return self.layers[-1] if self.layers else None

    def module_policy(self, name: str, module: nn.Module, *, op: str | None = None, warn: bool = True) -> Policy:
        """The policy module ``name`` (and op ``op`` it runs) resolves to: :func:`module_policy` with @first/@last
        from this plan."""
        return module_policy(self.policy, name, module, first=name == self.first, last=name == self.last, op=op,
                             warn=warn)

    def update_policies(self, model: nn.Module) -> dict[str, Policy]:
        """Each weight layer's resolved policy (with the ``op:`` overrides of the op it runs, as ``convert``
        resolves the layer), whose update roles its parameters are stored and stepped in; the parameters of every
        other module keep fp32 masters and optimizer state."""
        modules = dict(model.named_modules())
        ops = self.ops or (None,) * len(self.layers)
        return {name: self.module_policy(name, modules[name], op=op, warn=False) for name, op in zip(self.layers, ops)}


def record_resolution(model: nn.Module, resolution: Resolution | None) -> None:
    """Record (None: forget) the plan ``convert`` made for ``model``."""
    if resolution is None:
        model.__dict__.pop(_RESOLUTION_ATTR, None)
    else:
        model.__dict__[_RESOLUTION_ATTR] = resolution


def recorded_resolution(model: nn.Module) -> Resolution | None:
    """The plan ``convert`` recorded on ``model`` (the module it returned), or None."""
    return model.__dict__.get(_RESOLUTION_ATTR)


def may_run_ops(module: nn.Module) -> bool:
    """Whether a module lowprec does not swap may run ops the op-level emulation quantizes: every module
    except torch's own leaf modules without parameters (ReLU, Dropout, Flatten...)."""
    if next(module.parameters(recurse=False), None) is not None or next(module.children(), None) is not None:
        return True
    return not type(module).__module__.startswith("torch.nn.")


def _roles_of(cls: type) -> tuple[str, ...]:
    """The roles a quantized layer class has: its op's, accumulation where it emulates one, the update roles for
    weight layers."""
    return (cls.OP_ROLES + (("accumulation",) if cls.ACCUMULATES else ())
            + (_UPDATE_ROLES if cls.COUNTS_AS_LAYER else ()))


def check_override_roles(policy: Policy, model: nn.Module, plan: Sequence[tuple[str, nn.Module, type]],
                         first: str | None, last: str | None) -> None:
    """Every per-module override must reach a module that has the roles it sets.

    ``plan``: (name, module, quantized class) of the modules ``convert`` converts; ``first``/``last``: the names
    @first/@last stand for. ValueError when an override gives a format to a role that none of the modules it
    matches has (``bn1: weight=int8`` on a batch-norm, ``relu: activation=int8`` on a module lowprec does not
    convert, ``conv1: accumulation=fp16`` on a convolution); setting a role to none is always allowed. An
    override whose pattern matches no module of this model at all only warns: a policy may serve several models.
    """
    converted = {name: cls for name, _, cls in plan}
    modules = dict(model.named_modules())
    for pattern, assigned in policy.overrides:
        if pattern.startswith(OP_PREFIX):
            continue  # selects ops, wherever they run; the selector was checked when the policy was made
        if pattern.startswith("@"):
            hits = [n for n in ((first,) if pattern == "@first" else (last,) if pattern == "@last" else ()) if n]
        else:
            hits = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            warnings.warn(f"policy override {pattern!r} matches no module of this {type(model).__name__}",
                          UserWarning, stacklevel=3)
            continue
        for role, quant in assigned:
            if quant is None or any(n in converted and role in _roles_of(converted[n]) for n in hits):
                continue
            if role in LAYER_ROLES and any(n not in converted and may_run_ops(modules[n]) for n in hits):
                continue  # the op-level emulation applies it to the ops this module runs
            found = "; ".join(
                f"{n} ({type(modules[n]).__name__}) has roles {', '.join(_roles_of(converted[n]))}" if n in converted
                else f"{n} ({type(modules[n]).__name__}) is not a layer lowprec quantizes"
                for n in hits[:4]
            )
            raise ValueError(
                f"policy override '{pattern}: {role}={quant}' gives {role} a format, but no module it matches has "
                f"that role: {found}. Remove {role} from the override, or point the pattern at a layer that has it"
            )
