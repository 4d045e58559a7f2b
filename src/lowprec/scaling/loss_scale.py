"""Loss scaling (Micikevicius et al. 2018, §3.2) as a small state machine the training step drives.

Per step: ``scaler.scale_loss(loss).backward()`` -> ``found_inf, bad = scaler.unscale_(model.named_parameters())``
-> (clip, then step unless found_inf) -> ``result = scaler.update(found_inf)``.

Numerics. ``scale_loss`` returns ``loss.float() * S`` (fp32, so an fp16 loss cannot overflow in the product).
``unscale_`` divides every gradient in place by S in fp32 arithmetic (S rounded to fp32 once) and writes the
result back in the gradient's own dtype, so fp16/bf16 gradients are allowed (torch's GradScaler refuses fp16).
Dividing by a power of two is exact unless the result is subnormal in the grad's dtype. The inf/NaN test runs on
the values written back, on whatever device the grads live, with one host sync per ``unscale_`` call.

The loss counts too: ``scale_loss`` records whether the loss is finite (no sync), and ``unscale_`` checks it in
the same sync. A NaN loss whose gradients are finite (the mean over an empty batch: NaN loss, zero gradients)
is therefore skipped like an overflow, not applied; it is reported under the name ``"loss"`` when no
parameter's gradient is non-finite.

Across processes: ``agree`` (None by default) is applied to the vector of non-finite flags right before the
host sync; under torch.distributed ``lowprec.Trainer`` sets it to an element-wise MAX over all ranks
(``lowprec.train.distributed.all_max``), so one rank's overflow skips the step on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["LossScaleCollapse", "LossScaler", "StepResult"]

_KINDS = ("none", "static", "dynamic")
_MIN_SCALE = 2.0**-126  # smallest normal fp32: the lower clamp when floor=None
_MAX_SCALE = 2.0**127  # largest power of two in fp32: the upper clamp when cap=None


class LossScaleCollapse(RuntimeError):
    """The dynamic loss scale was about to fall below its floor."""


@dataclass(frozen=True)
class StepResult:
    skipped: bool  # the optimizer step must not be (or was not) applied
    scale: float  # the scale this step's loss was multiplied by
    next_scale: float  # the scale for the next step
    overflow_modules: tuple[str, ...]  # parameter names whose grads were inf/NaN (from unscale_); ("loss",)
    # when only the loss itself was non-finite
    growth_tracker: int  # consecutive clean steps counted towards the next growth


def _positive(name: str, value: Any, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number {accepted}, got {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class LossScaler:
    """Loss scale S and the rule that moves it. Build with ``none()``, ``static(S)`` or ``dynamic(...)``.

    * ``none``: S = 1. ``static``: S constant. Neither ever changes S; a step whose unscaled grads hold inf/NaN
      is still reported as ``skipped=True`` (apply no update with non-finite grads).
    * ``dynamic`` (NVIDIA's rule; with hysteresis=1 identical to torch.amp.GradScaler):
      - overflow (any grad inf/NaN): skip the step; clean counter <- 0; hysteresis counter -= 1 and when it
        reaches 0: S <- S * backoff_factor and the hysteresis counter <- ``hysteresis``.
      - clean step: clean counter += 1; when it reaches ``growth_interval``: S <- min(S * growth_factor, cap),
        clean counter <- 0, hysteresis counter <- ``hysteresis``. So S doubles after exactly ``growth_interval``
        consecutive clean steps (the growth applies from the next step on).
      - floor: a backoff that would give S < ``floor`` raises ``LossScaleCollapse`` instead (torch silently
        reaches S = 0.0 after ~200 NaN steps and then trains on zero gradients). With init 2**k, floor 1,
        hysteresis 1, the (k+1)-th consecutive overflow raises. ``floor=None`` disables the error; S then keeps
        backing off but is clamped at 2**-126 (smallest normal fp32), never 0. ``cap=None`` clamps at 2**127.
    S is kept as a Python float; with factors 2 and 0.5 it stays an exact power of two.
    """

    def __init__(
        self,
        kind: str = "dynamic",
        init: float = 2.0**16,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        floor: float | None = 1.0,
        cap: float | None = 2.0**24,
        hysteresis: int = 1,
    ):
        if kind not in _KINDS:
            raise ValueError(f"unknown loss scaler kind {kind!r}; use one of {_KINDS}")
        init = _positive("init" if kind == "dynamic" else "scale", init, "> 0")
        self.kind = kind
        self.config: dict[str, Any] = {"scale": init} if kind == "static" else {}
        if kind == "none" and init != 1.0:
            raise ValueError(f"a 'none' loss scaler has scale 1, got {init!r}")
        if kind == "dynamic":
            g = _positive("growth_factor", growth_factor, "> 1")
            if g <= 1:
                raise ValueError(f"growth_factor must be a finite number > 1, got {growth_factor!r}")
            b = _positive("backoff_factor", backoff_factor, "in (0, 1)")
            if b >= 1:
                raise ValueError(f"backoff_factor must be a finite number in (0, 1), got {backoff_factor!r}")
            lo = None if floor is None else _positive("floor", floor, "> 0 (or None)")
            hi = None if cap is None else _positive("cap", cap, "> 0 (or None)")
            if (lo is not None and init < lo) or (hi is not None and init > hi):
                raise ValueError(f"need floor <= init <= cap, got floor={floor!r}, init={init!r}, cap={cap!r}")
            self.config = {
                "init": init,
                "growth_factor": g,
                "backoff_factor": b,
                "growth_interval": _count("growth_interval", growth_interval),
                "floor": lo,
                "cap": hi,
                "hysteresis": _count("hysteresis", hysteresis),
            }
        self._scale = init
        self.growth_tracker = 0  # consecutive clean steps (dynamic only)
        self.hysteresis_left = self.config.get("hysteresis", 1)
        self.overflow_streak = 0  # consecutive overflowing steps, for the collapse message
        self.agree: Callable[[Tensor], Tensor] | None = None  # cross-process MAX of the flags (module docstring)
        self._clear_pending()

    @classmethod
    def none(cls) -> LossScaler:
        return cls("none", 1.0)

    @classmethod
    def static(cls, scale: float) -> LossScaler:
        return cls("static", scale)

    @classmethod
    def dynamic(
        cls,
        init: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        floor: float | None = 1.0,
        cap: float | None = 2.0**24,
        hysteresis: int = 1,
    ) -> LossScaler:
        return cls(
            "dynamic",
            init,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            floor=floor,
            cap=cap,
            hysteresis=hysteresis,
        )

    @property
    def scale(self) -> float:
        """The current loss scale S."""
        return self._scale

    def _clear_pending(self) -> None:
        self._found_inf, self._bad_names, self._unscaled = False, [], set()
        self._loss_finite: list[Tensor] = []  # one flag per scale_loss call since the last unscale_

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss.float() * S`` (fp32 result whatever the loss dtype); records whether the loss is finite."""
        self._loss_finite.append(torch.isfinite(loss.detach()).all())
        return loss.float() * self._scale

    def unscale_(
        self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | torch.nn.Module, *, divide: bool = True
    ) -> tuple[bool, list[str]]:
        """Divide every ``.grad`` in place by S; return (any grad non-finite, names of those params).

        Accepts ``model.parameters()`` (names are then ``"params[i]"``), ``model.named_parameters()`` or a module.
        May be called for several disjoint parameter sets between two ``update()`` calls (results accumulate);
        unscaling the same parameter twice raises RuntimeError. Dense grads only; params without grad are skipped.
        A non-finite loss since the last ``unscale_`` counts as found; it is named ``"loss"`` when no gradient is.
        With ``agree`` set, every process must unscale the same parameters (it reduces one flag per name).
        ``divide=False`` only checks: the caller divides by S inside its own update (lowprec's fused optimizer step).
        """
        if isinstance(params, torch.nn.Module):
            params = params.named_parameters()
        named = [(p[0], p[1]) if isinstance(p, tuple) else (f"params[{i}]", p) for i, p in enumerate(params)]
        names, groups = [], {}
        for name, p in named:
            if p.grad is None:
                continue
            if id(p) in self._unscaled:
                raise RuntimeError(f"unscale_() already unscaled {name} since the last update()")
            self._unscaled.add(id(p))
            names.append(name)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        flags = []
        for (device, dtype), grads in groups.items():
            if self._scale == 1.0 or not divide:
                pass  # x / 1 == x
            elif dtype == torch.float32:
                torch._foreach_div_(grads, self._scale)
            else:
                tmp = [g.float() for g in grads]
                torch._foreach_div_(tmp, self._scale)
                torch._foreach_copy_(grads, tmp)
            # one finite flag per tensor from its min and max (NaN and +-inf show there): one vectorised read
            # of each gradient (isfinite(g).all() and an inf-norm are ten times slower on CPUs)
            flags.append(torch.stack([torch.stack(torch.aminmax(g)) if g.numel() else g.new_zeros(2)
                                      for g in grads]).isfinite().all(dim=1))
        loss_checked = bool(self._loss_finite)
        if loss_checked:
            names.append("loss")
            flags.append(torch.stack([f.to(self._loss_finite[0].device) for f in self._loss_finite]).all()[None])
            self._loss_finite = []
        if not names:
            return False, []
        dev = flags[0].device
        nonfinite = ~torch.cat([f.to(dev, non_blocking=True) for f in flags])
        if self.agree is not None:
            nonfinite = self.agree(nonfinite)
        bad = [n for n, flag in zip(names, nonfinite.tolist()) if flag]  # the one host sync
        if loss_checked and len(bad) > 1 and bad[-1] == "loss":
            bad.pop()  # the gradients already name the overflow
        self._found_inf = self._found_inf or bool(bad)
        self._bad_names += bad
        return bool(bad), bad

    def update(self, found_inf: bool | Tensor | None = None) -> StepResult:
        """Advance the rule by one step. ``found_inf=None`` uses what ``unscale_`` found since the last update."""
        inf = self._found_inf if found_inf is None else bool(found_inf)
        bad, used = tuple(self._bad_names), self._scale
        self._clear_pending()
        if self.kind == "dynamic":
            c = self.config
            if inf:
                left = self.hysteresis_left - 1
                if left <= 0:
                    new = self._scale * c["backoff_factor"]
                    if c["floor"] is not None and new < c["floor"]:  # raise with the state left as it was
                        raise LossScaleCollapse(self._collapse_message(new, bad))
                    self._scale, left = max(new, _MIN_SCALE), c["hysteresis"]
                self.growth_tracker, self.hysteresis_left = 0, left
            else:
                self.growth_tracker += 1
                if self.growth_tracker >= c["growth_interval"]:
                    self._scale = min(self._scale * c["growth_factor"], c["cap"] or _MAX_SCALE)
                    self.growth_tracker, self.hysteresis_left = 0, c["hysteresis"]
        self.overflow_streak = self.overflow_streak + 1 if inf else 0
        return StepResult(inf, used, self._scale, bad, self.growth_tracker)

    def _collapse_message(self, new: float, bad: tuple[str, ...]) -> str:
        where = f" Non-finite this step: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}." if bad else ""
        return (
            f"loss scale collapsed below the floor {self.config['floor']:g} after {self.overflow_streak + 1} "
            f"consecutive overflowing steps (scale {self._scale:g} * backoff {self.config['backoff_factor']:g} = "
            f"{new:g}). The loss or the gradients are probably inf/NaN at every step; this is not an fp16 range "
            "problem (a range problem is fixed by a few backoffs). Check the learning rate (divergence), the data "
            "for NaN/inf inputs or labels, and whether the loss is finite at step 0 before any update."
            f"{where} Pass floor=None to keep backing off instead of raising."
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything for a bit-exact resume (taken between steps: pending unscale_ results are not saved)."""
        return {
            "kind": self.kind,
            "config": dict(self.config),
            "scale": self._scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_left": self.hysteresis_left,
            "overflow_streak": self.overflow_streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint holds a {state['kind']!r} loss scaler, this one is {self.kind!r}")
        keys = sorted(set(state["config"]) | set(self.config))
        diff = [
            f"{k}: checkpoint {state['config'].get(k)!r} vs {self.config.get(k)!r}"
            for k in keys
            if state["config"].get(k) != self.config.get(k)
        ]
        if diff:
            raise ValueError(f"checkpoint loss scaler config differs: {'; '.join(diff)}")
        self._scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.overflow_streak = int(state["overflow_streak"])
        self._clear_pending()

    def __repr__(self) -> str:
        if self.kind == "none":
            return "LossScaler.none()"
        if self.kind == "static":
            return f"LossScaler.static({self._scale!r})"
        c = self.config
        return (
            f"LossScaler.dynamic(scale={self._scale!r}, clean_steps={self.growth_tracker}/{c['growth_interval']}, "
            f"hysteresis_left={self.hysteresis_left}/{c['hysteresis']}, growth_factor={c['growth_factor']}, "
            f"backoff_factor={c['backoff_factor']}, floor={c['floor']}, cap={c['cap']})"
        )
