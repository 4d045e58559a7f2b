"""The tensor roles a policy gives formats to: one declared set, with what each role is.

``Role`` is a ``str`` enum: ``Role.WEIGHT == "weight"``, it hashes, prints and formats as ``"weight"``, and
``Role(name)`` gives the attributes of a role name. Every subset of the roles lowprec needs (the gradients, the
update roles, the classifier path, ...) is a query on the attributes below (``Role.select(gradient=True)``),
never a hand-written list; queries return the plain names, so role names in policy strings, dict keys, state dicts
and messages are the plain strings they always were.

===============  ========  ======  =====  =========  ==========  ====  ===============  ===========
role             gradient  update  layer  parameter  classifier  bias  grad             shorthand
===============  ========  ======  =====  =========  ==========  ====  ===============  ===========
weight                             yes    yes        yes               weight_grad      params
bias                               yes    yes                    yes   bias_grad        params
activation                         yes                                 activation_grad  activations
output                             yes               yes               output_grad      activations
output_grad      yes               yes               yes                                grads
activation_grad  yes               yes                                                  grads
weight_grad      yes               yes    yes                                           grads
bias_grad        yes               yes    yes                    yes                    grads
master                     yes            yes
optimizer_state            yes            yes
accumulator                yes            yes
accumulation
===============  ========  ======  =====  =========  ==========  ====  ===============  ===========

* gradient: a backward tensor (loss scaling scales it; ``grads`` sets these four).
* update: a role of the optimizer step (the Trainer applies it to the parameters of weight layers), not of the
  layer's forward and backward.
* layer: rounded by a layer's (or an op's) forward or backward: the roles a quantized layer holds quantizers for.
* parameter: the tensor is a parameter, its gradient or its stored copy/state (rounded once per forward or step,
  not per product).
* classifier: the path between the last layer and the softmax that Park et al.'s classifier rule (eq. 5) widens.
* bias: exists only where the layer has a bias.
* grad: the gradient role of a forward operand role.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Role", "ROLES", "LAYER_ROLES", "ALIASES"]


class Role(str, Enum):
    """One tensor role (see the module docstring for the attributes)."""

    WEIGHT = "weight"
    BIAS = "bias"
    ACTIVATION = "activation"
    OUTPUT = "output"
    OUTPUT_GRAD = "output_grad"
    ACTIVATION_GRAD = "activation_grad"
    WEIGHT_GRAD = "weight_grad"
    BIAS_GRAD = "bias_grad"
    MASTER = "master"
    OPTIMIZER_STATE = "optimizer_state"
    ACCUMULATOR = "accumulator"
    ACCUMULATION = "accumulation"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def gradient(self) -> bool:
        return self.value.endswith("_grad")

    @property
    def update(self) -> bool:
        return self in _UPDATE

    @property
    def layer(self) -> bool:
        return not self.update and self is not Role.ACCUMULATION

    @property
    def parameter(self) -> bool:
        return self.update or self in (Role.WEIGHT, Role.BIAS, Role.WEIGHT_GRAD, Role.BIAS_GRAD)

    @property
    def classifier(self) -> bool:
        return self in (Role.WEIGHT, Role.OUTPUT, Role.OUTPUT_GRAD)

    @property
    def bias(self) -> bool:
        return self in (Role.BIAS, Role.BIAS_GRAD)

    @property
    def grad(self) -> str | None:
        """The gradient role of a forward operand role (``activation`` -> ``activation_grad``); None otherwise."""
        return _GRAD.get(self)

    @classmethod
    def select(cls, **attributes: bool) -> tuple[str, ...]:
        """The names of the roles, in declaration order, whose attributes have the given values:
        ``Role.select(gradient=True)``, ``Role.select(layer=True, parameter=True)``.

        Plain strings, as policies, dict keys and state dicts hold them (a state dict must load with
        ``torch.load(weights_only=True)``, which refuses any class but the builtins)."""
        for name in attributes:
            if not isinstance(getattr(cls, name, None), property):
                raise AttributeError(f"Role has no attribute {name!r}")
        return tuple(r.value for r in cls if all(getattr(r, k) == v for k, v in attributes.items()))


_UPDATE = frozenset({Role.MASTER, Role.OPTIMIZER_STATE, Role.ACCUMULATOR})
_GRAD = {r: r.value + "_grad" for r in (Role.WEIGHT, Role.BIAS, Role.ACTIVATION, Role.OUTPUT)}

#: Every role's name, in table order.
ROLES: tuple[str, ...] = Role.select()
#: The roles a quantized layer (or op) rounds in its forward and backward.
LAYER_ROLES: tuple[str, ...] = Role.select(layer=True)
#: The shorthands of policy strings, each setting several roles.
ALIASES: dict[str, tuple[str, ...]] = {
    "grads": Role.select(gradient=True),
    "grad": Role.select(gradient=True),
    "activations": Role.select(layer=True, gradient=False, parameter=False),
    "params": Role.select(layer=True, gradient=False, parameter=True),
}
