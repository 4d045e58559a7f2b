"""``Policy``: which number format (and rounding) each tensor role of a model gets.

A policy is a small immutable value, written and read as prose::

    Policy.parse("weight=int8, activation=int8, grads=int16, master=int8, accumulator=int16")
    Policy.parse("weight=fp16, activation=fp16, grads=fp16, loss_scale=dynamic")
    Policy.preset("wrpn-4-4")          # WRPN 4-bit weights and activations, first/last layer fp32

Roles (per quantized layer unless noted):

=================  ==========================================================================================
weight             the weight as the layer's forward and backward see it (the "propagation" copy)
bias               the bias as the layer sees it
activation         the layer's input x
output             the layer's output z = x W + b (pre-activation)
output_grad        dE/dz arriving from above (Courbariaux's dE/dz, Park's classifier error y - t)
activation_grad    dE/dx sent below
weight_grad        dE/dW
bias_grad          dE/db
master             the stored parameters, after each update (None: float32, MPT's master copy;
                   a format: parameters live in it, Courbariaux's "update" width, Park's INT8)
optimizer_state    every optimizer buffer (momentum, Adam moments)
accumulator        Park's lazy-update accumulator (None: no lazy update)
accumulation       partial sums inside matmuls/convolutions (None: float32, MPT; a format: emulate a
                   low-precision accumulator in chunks of ``accumulation_chunk``)
=================  ==========================================================================================

A role given no format (``none``) is left in float32. ``grads`` (or ``grad``) sets the four gradient roles,
``activations`` sets activation and output, ``params`` sets weight and bias.

``path=native`` (fp16/bf16 policies only) runs the model in the format's torch dtype instead of emulating it in
float32 containers: real memory and speed gains, see ``lowprec.nn.native``.

``packed=off`` keeps what a step saves for backward in float32 containers (default on: stored packed in each
format's width, ``lowprec.nn.packed``). ``recompute=off`` (packed only) keeps a quantized layer's unrounded output
that a later op saves (the float32 input of the batch-norm after a WRPN convolution) as it is, instead of
computing it again in backward from the layer's packed operands (default on: the least memory, for one more
forward op per such layer in backward; off: faster, that output stored in float32).

``wgrad_rht=on`` (NVIDIA's NVFP4 recipe) computes each linear layer's weight gradient from its operands times a
16x16 random Hadamard transform along the batch rows (``lowprec.nn.hadamard``), in the layers whose activation
or output_grad role has a scaled format (NVFP4, MX, scaled<...>); ``rht_seed`` (default 0) seeds its signs.

``update_rule`` says how an SGD step uses a rounded momentum: ``optimizer`` (the default) lets the optimizer update
from its own state as torch does and rounds the state to ``optimizer_state`` afterwards; ``courbariaux`` (the
fixed-20 and dfx-10-12 presets) is Courbariaux et al.'s update, v <- Q(M·v − LR·g), W <- Q(W + v): the ROUNDED
velocity moves the weight (``lowprec.train.update``).

Per-module overrides: ``"...; fc3: weight=int16"`` or ``policy.override("fc3", weight="int16")``. Patterns are
shell-style (``fnmatch``) against the module's qualified name; ``@first`` and ``@last`` name the first and last
quantized layer in the model's module order (WRPN keeps them full precision; Park's classifier is ``@last``).
Later overrides win.

Per-op overrides: a pattern ``op:<selector>`` selects ops instead of modules, by op name or kind
(``lowprec.policy.ops``): ``"mixed-bf16 roles...; op:attention: activations=none,grads=none"`` keeps every
attention in fp32, ``"...; op:norm: params=bf16"`` sets the norms' affine parameters. Module and op overrides
apply in the order written: a later one wins where both match.

``PRESET+assignments`` (the command line's recipe form, e.g. ``"int8-lazy+optimizer_state=none"`` or
``"wrpn-4-4+activation=uniform<8,unsigned>; fc3: weight=none"``; only overrides: ``"wrpn-4-4; fc3: weight=none"``)
is the preset's policy with the assignments, settings and overrides after it applied on top, as
``Policy.with_roles`` / ``Policy.override`` would. ``Policy.parse``, ``as_policy`` and so everything that takes
a policy string (``lowprec.convert``, the Trainer, ``lowprec.inspect``, the CLI's recipes) read this one grammar.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..formats import Format, parse_format
from ..formats.kernels import ROUNDINGS
from ..formats.parse import split_top
from .ops import OP_PREFIX, check_op_selector, op_matches
from .roles import ALIASES, LAYER_ROLES, ROLES

__all__ = ["Quant", "Policy", "as_policy", "split_top", "ROLES", "LAYER_ROLES"]

SETTINGS = ("loss_scale", "exponent_rule", "max_overflow_rate", "exponent_interval", "init_int_bits",
            "accumulation_chunk", "classifier_rule", "path", "fill_clip_range", "update_rule", "packed",
            "recompute", "wgrad_rht", "rht_seed")
PATHS = ("emulated", "native")
UPDATE_RULES = ("optimizer", "courbariaux")


@dataclass(frozen=True)
class Quant:
    """A format and a rounding mode for one role. Written ``fp16`` or ``fp16/stochastic``."""

    format: Format
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if not isinstance(self.format, Format):
            object.__setattr__(self, "format", parse_format(self.format))
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; use one of {sorted(ROUNDINGS)}")

    @classmethod
    def parse(cls, text: str | Quant | Format | None) -> Quant | None:
        """``"int8"``, ``"fp16/stochastic"``, ``"none"`` (-> None), a Format, or a Quant."""
        if text is None or isinstance(text, Quant):
            return text
        if isinstance(text, Format):
            return cls(text)
        spec, slash, rounding = str(text).strip().partition("/")
        if slash and not rounding.strip():
            raise ValueError(f"{str(text).strip()!r}: nothing after '/'; give a rounding ({', '.join(sorted(ROUNDINGS))}) "
                             "or drop the '/'")
        if spec.strip().lower() in ("none", "", "full"):
            if slash:  # a rounding of nothing would leave the role in full precision without a word
                raise ValueError(f"{str(text).strip()!r} gives the rounding {rounding.strip()!r} but no format; "
                                 f"write FORMAT/{rounding.strip()} (e.g. fp16/{rounding.strip()}), or none for "
                                 "full precision")
            return None
        return cls(parse_format(spec), rounding.strip() or "nearest")

    @property
    def bits(self) -> int | None:
        """Width of the format in bits, where it has one (dfx, fixed, uniform, bfp, float)."""
        return self.format.bits

    def __str__(self) -> str:
        return repr(self.format) + ("" if self.rounding == "nearest" else f"/{self.rounding}")


def _expand(assignments: Mapping[str, Any]) -> dict[str, Quant | None]:
    roles: dict[str, Quant | None] = {}
    for key, value in assignments.items():
        names = ALIASES.get(key, (key,))
        for name in names:
            if name not in ROLES:
                raise ValueError(
                    f"unknown role {key!r}; roles: {', '.join(ROLES)}; shorthands: {', '.join(ALIASES)}"
                )
            roles[str(name)] = Quant.parse(value)
    return roles


@dataclass(frozen=True)
class Policy:
    """Formats per role, per-module overrides and the scale settings of one training recipe."""

    roles: tuple[tuple[str, Quant | None], ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Quant | None], ...]], ...] = ()
    loss_scale: str = "none"  # "none" | "dynamic" | "static:<S>"
    exponent_rule: str = "overflow"  # dfx exponents: "overflow" (Courbariaux) | "maxabs"
    max_overflow_rate: float = 1e-4
    exponent_interval: int = 100
    init_int_bits: int | None = 5  # None ("auto"): each group starts at its first tensor's max-abs exponent
    accumulation_chunk: int = 32
    classifier_rule: bool = False  # give @last at least classifier_bits(C) bits (Park eq. 5)
    path: str = "emulated"  # "emulated": fp32 containers rounded per role | "native": real fp16/bf16 tensors
    fill_clip_range: bool = False  # convert scales WRPN's uniform<k> weights to reach +-1 (lowprec.nn.fill_clip_range)
    update_rule: str = "optimizer"  # "optimizer": torch's update, state rounded after | "courbariaux": v <- Q(Mv - LR g)
    packed: bool = True  # what a step saves for backward is stored packed in its format (lowprec.nn.packed)
    recompute: bool = True  # packed: an unrounded layer output a later op saves is computed again in backward
    wgrad_rht: bool = False  # random Hadamard transform of the wgrad GEMM's operands (NVFP4 recipe, nn.hadamard)
    rht_seed: int = 0  # the seed of its 16 random signs
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        got = dict(self.roles)
        object.__setattr__(self, "roles", tuple((r, got.get(r)) for r in ROLES))
        if not re.fullmatch(r"none|dynamic|static:[0-9.eE+\-]+", self.loss_scale):
            raise ValueError(f"loss_scale must be 'none', 'dynamic' or 'static:<S>', got {self.loss_scale!r}")
        if self.loss_scale.startswith("static:") and not float(self.loss_scale[7:]) > 0:
            raise ValueError(f"a static loss scale must be positive, got {self.loss_scale!r}")
        if self.exponent_rule not in ("overflow", "maxabs"):
            raise ValueError(f"exponent_rule must be 'overflow' or 'maxabs', got {self.exponent_rule!r}")
        if not 0 <= self.max_overflow_rate < 1:
            raise ValueError(f"max_overflow_rate must lie in [0, 1), got {self.max_overflow_rate}")
        if self.path not in PATHS:
            raise ValueError(f"path must be 'emulated' or 'native', got {self.path!r}")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be 'optimizer' or 'courbariaux', got {self.update_rule!r}")
        if self.exponent_interval < 1 or self.accumulation_chunk < 1:
            raise ValueError("exponent_interval and accumulation_chunk must be >= 1")
        if isinstance(self.rht_seed, bool) or not isinstance(self.rht_seed, int) or self.rht_seed < 0:
            raise ValueError(f"rht_seed must be an integer >= 0, got {self.rht_seed!r}")

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def of(cls, **assignments: Any) -> Policy:
        """``Policy.of(weight="int8", grads="int16", loss_scale="dynamic")``."""
        settings = _settings(assignments)
        return cls(tuple(_expand(assignments).items()), **settings)

    @classmethod
    def parse(cls, text: str) -> Policy:
        """Parse ``"role=format[/rounding],...; pattern: role=format,..."``, a preset name, or
        ``"PRESET+role=format,...; pattern: ..."`` or ``"PRESET; pattern: ..."`` (the preset with these changes;
        see the module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"Policy.parse takes a string, got {type(text).__name__}")
        from .presets import is_preset, preset

        stripped = text.strip()
        head, plus, tail = stripped.partition(";")[0].partition("+")
        if not is_preset(head.strip()):
            return _parse_onto(cls(), stripped, text)
        if plus and "=" not in tail:
            raise ValueError(f"policy {text!r}: expected role=format,... after '+' (e.g. 'int8-lazy+master=int16')")
        base, rest = preset(head.strip()), stripped[len(head) + len(plus):]
        if not rest.strip():
            return base
        try:
            policy = _parse_onto(base, rest, text)
        except ValueError as err:
            raise ValueError(
                f"{err} (in {text!r}: after '+' come policy roles and settings; a recipe's model and training "
                "settings such as width= or lr= are read by the lowprec command line only: in Python, build the "
                "model (lowprec.widen) and the optimizer with them)"
            ) from None
        return replace(policy, name=stripped)

    @classmethod
    def preset(cls, name: str) -> Policy:
        """A named recipe: fp32, mixed-fp16, mixed-bf16, int8, int8-lazy, int16, wrpn-<w>-<a>, fixed-20,
        dfx-10-12 (any dfx-<p>-<u>), fp8-e4m3, fp8-e5m2, fp8-hybrid, and the scaled formats' fp8-current,
        fp8-delayed, mxfp8, mxfp6, mxfp4, nvfp4."""
        from .presets import preset

        return preset(name)

    def with_roles(self, **assignments: Any) -> Policy:
        """A copy with some roles (or settings) changed."""
        settings = _settings(assignments)
        roles = dict(self.roles)
        roles.update(_expand(assignments))
        return replace(self, roles=tuple(roles.items()), name=None, **settings)

    def override(self, pattern: str, **assignments: Any) -> Policy:
        """A copy where modules matching ``pattern`` (fnmatch, or @first/@last) get these roles."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("an override needs a non-empty module-name pattern")
        if pattern.startswith(OP_PREFIX):
            check_op_selector(pattern[len(OP_PREFIX):])
        entry = (pattern, tuple(_expand(assignments).items()))
        return replace(self, overrides=self.overrides + (entry,), name=None)

    # -- queries --------------------------------------------------------------------------------------------
    def get(self, role: str) -> Quant | None:
        if role not in ROLES:
            raise KeyError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        return dict(self.roles)[role]

    def for_module(self, name: str, *, first: bool = False, last: bool = False, op: str | None = None) -> Policy:
        """The policy of one module (of one op it runs, when ``op`` names it): the base roles with every
        matching module override, and every ``op:`` override selecting ``op``, applied in order."""
        roles = dict(self.roles)
        for pattern, assigned in self.overrides:
            hit = (pattern == "@first" and first) or (pattern == "@last" and last) or (
                op_matches(pattern[len(OP_PREFIX):], op) if pattern.startswith(OP_PREFIX) else
                not pattern.startswith("@") and fnmatch.fnmatchcase(name, pattern)
            )
            if hit:
                roles.update(assigned)
        return replace(self, roles=tuple(roles.items()), overrides=())

    @property
    def quantizes_anything(self) -> bool:
        return any(q is not None for _, q in self.roles) or any(
            q is not None for _, a in self.overrides for _, q in a
        )

    @property
    def uses_dynamic_fixed_point(self) -> bool:
        quants = [q for _, q in self.roles] + [q for _, a in self.overrides for _, q in a]
        return any(q is not None and q.format.outside_state == "exponent" for q in quants)

    # -- printing ------------------------------------------------------------------------------------------
    def spec(self) -> str:
        """The policy as a string that ``Policy.parse`` reads back to an equal policy."""
        base = [f"{r}={q}" for r, q in self.roles if q is not None]
        defaults = Policy()
        base += [f"{k}={'auto' if getattr(self, k) is None else getattr(self, k)}"
                 for k in SETTINGS if getattr(self, k) != getattr(defaults, k)]
        parts = [",".join(base)] if base else []
        for pattern, assigned in self.overrides:
            parts.append(f"{pattern}: " + ",".join(f"{r}={q if q else 'none'}" for r, q in assigned))
        return "; ".join(parts)

    def table(self) -> str:
        """A readable table: one line per role, then overrides and settings."""
        title = f"Policy {self.name}" if self.name else "Policy"
        lines = [title, "-" * len(title)]
        lines += [f"  {r:<16} {q if q else 'fp32 (not quantized)'}" for r, q in self.roles]
        for pattern, assigned in self.overrides:
            lines.append(f"  override {pattern}: " + ", ".join(f"{r}={q if q else 'fp32'}" for r, q in assigned))
        lines.append(f"  loss scale       {self.loss_scale}")
        if self.path == "native":
            lines.append("  path             native (tensors stored in the format's torch dtype, fp32 master weights)")
        if self.uses_dynamic_fixed_point and self.exponent_rule == "maxabs":
            lines.append("  dfx exponents    rule=maxabs (each tensor's own max|x|, at every use)")
        elif self.uses_dynamic_fixed_point:
            lines.append(
                f"  dfx exponents    rule=overflow, max overflow rate={self.max_overflow_rate}, "
                f"interval={self.exponent_interval} batches, "
                f"start r={'max-abs of the first batch' if self.init_int_bits is None else self.init_int_bits}"
            )
        if self.classifier_rule:
            lines.append("  classifier rule  @last gets >= classifier_bits(C) bits (Park eq. 5)")
        if self.fill_clip_range:
            lines.append("  fill clip range  convert scales uniform<k> weights to reach +-1 (WRPN from scratch)")
        if self.update_rule == "courbariaux":
            lines.append("  update rule      courbariaux: v <- Q(M v - LR g), W <- Q(W + v) (SGD)")
        if not self.packed:
            lines.append("  packed           off (saved tensors kept in float32 containers)")
        elif not self.recompute:
            lines.append("  recompute        off (unrounded layer outputs a later op saves kept in float32)")
        if self.wgrad_rht:
            lines.append(f"  wgrad RHT        on, seed {self.rht_seed} (16x16 random Hadamard transform of the weight-"
                         "gradient GEMM's operands in linear layers with scaled-format operands)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _parse_onto(policy: Policy, text: str, whole: str) -> Policy:
    """``policy`` with the roles, settings and overrides of the policy string ``text`` applied (``whole``: the
    string the user wrote, for messages)."""
    for segment in split_top(text, ";"):
        pattern = None
        head, colon, rest = segment.partition(":")
        if colon and head.strip() == OP_PREFIX[:-1]:  # "op:<selector>: roles" (else a module named op)
            selector, second, after = rest.partition(":")
            if second and "=" not in selector:
                head, rest = OP_PREFIX + selector.strip(), after
        if colon and "=" not in head and "<" not in head:
            pattern, segment = head.strip(), rest
        assignments: dict[str, Any] = {}
        for item in split_top(segment, ","):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"expected role=format, got {item!r} in {whole!r}")
            assignments[key.strip()] = value.strip()
        if pattern is None:
            settings = _settings(assignments)
            roles = dict(policy.roles)
            roles.update(_expand(assignments))
            policy = replace(policy, roles=tuple(roles.items()), **settings)
        else:
            policy = policy.override(pattern, **assignments)
    return policy


def _settings(assignments: dict[str, Any]) -> dict[str, Any]:
    """Pop the settings (not roles) out of ``assignments``; string values are parsed as in policy strings."""
    return {k: _setting(k, assignments.pop(k)) for k in list(assignments) if k in SETTINGS}


def _setting(key: str, value: Any) -> Any:
    """A setting's value from a policy string (or a Python value: a number as loss_scale means static)."""
    if key == "loss_scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"static:{value}"
    if not isinstance(value, str):
        return value
    if key in ("max_overflow_rate",):
        return float(value)
    if key == "init_int_bits" and value.lower() in ("auto", "none"):
        return None
    if key in ("exponent_interval", "init_int_bits", "accumulation_chunk", "rht_seed"):
        return int(value)
    if key in ("classifier_rule", "fill_clip_range", "packed", "recompute", "wgrad_rht"):
        if value.lower() not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
            raise ValueError(f"{key} must be on or off, got {value!r}")
        return value.lower() in ("on", "true", "yes", "1")
    if key == "loss_scale" and re.fullmatch(r"[0-9.eE+\-]+", value):
        return f"static:{value}"
    return value


def as_policy(policy: Policy | str) -> Policy:
    """A Policy, a preset name (``Policy.preset``) or a policy string (``Policy.parse``, which also reads
    ``PRESET+role=format,...``).

    A string is a preset name unless it assigns or changes something (contains ``=`` or ``+``) or is empty
    (no quantization)."""
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a Policy, a preset name or a policy string, got {type(policy).__name__}")
    text = policy.strip()
    return Policy.parse(text) if "=" in text or "+" in text or not text else Policy.preset(text)
