"""``Quantizer``: one role's format, rounding and (for dynamic fixed point) exponent state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..formats import Format, operand_format, quantize, quantize_codes
from ..formats.packing import FormDemand, FormsFor, mark, marked_format
from ..scaling import DelayedScale, DynamicExponent
from .policy import Policy, Quant

__all__ = ["Quantizer", "recomputing", "inferring", "forward_started", "forward_ended"]

#: One entry per converted model whose forward runs now (the innermost last): whether it is inference.
_FORWARDS: list[bool] = []


def recomputing() -> bool:
    """Whether autograd is running a backward pass now: a forward rounding made then is an activation
    checkpoint's recomputation of the forward (torch.utils.checkpoint runs it inside backward, reentrant or
    not), not a new batch."""
    return torch._C._current_graph_task_id() != -1


def forward_started(inference: bool) -> None:
    """A converted model's forward begins (``lowprec.nn``'s outermost module hook); ``inference``: the model is
    in eval mode and autograd is not recording (``torch.no_grad``, ``torch.inference_mode``)."""
    _FORWARDS.append(inference)


def forward_ended() -> None:
    """The forward ``forward_started`` began has ended (normally or by an exception)."""
    if _FORWARDS:
        _FORWARDS.pop()


def inferring() -> bool:
    """Whether the innermost converted model's forward running now is inference (``forward_started``)."""
    return bool(_FORWARDS) and _FORWARDS[-1]

#: The roundings that leave a value already on the grid as it is, and draw nothing.
_DETERMINISTIC = ("nearest", "toward_zero")


class Quantizer:
    """Callable that rounds a tensor onto one role's format; the identity when the role is not quantized.

    Dynamic fixed point roles follow the policy's exponent rule: "overflow" carries a ``DynamicExponent``
    (Courbariaux's per-group scale: each call observes the tensor, ``update()`` moves the exponent at the end
    of each interval); "maxabs" takes the exponent from the tensor's own max|x| at every call (no state).
    Delayed-scaling floats (``scaled<e4m3,delayed>``) carry a ``DelayedScale`` (``scale_state``): each call
    rounds with the current scale and records the tensor's amax, ``update()`` moves the scale.
    Stochastic rounding draws from the device's default generator (seed with torch.manual_seed; checkpoint
    torch's RNG state for a bit-exact resume).

    ``forward=True``: the role rounds forward tensors only (activation, weight, bias, output). Such a rounding
    rounds at the current exponent or scale and records nothing (no overflow statistics, no amax) where the
    tensor is not a new training batch's: made while autograd runs a backward pass, it is an activation
    checkpoint (``torch.utils.checkpoint``, reentrant or not) computing the forward again (the values of the
    first forward bit for bit; the statistics count each batch once, as without the checkpoint); made in an
    inference forward (``inferring``: the model in eval mode under ``torch.no_grad``), it is an evaluation, which
    must not move the training's exponents or scales. Calibration (``observe_only``) records in inference too.

    A tensor already on the role's grid is returned as it is, not copied (``keeps``): the output of a rounding
    onto the same format (a convolution's fp16 output reaching the fp16 input role of the batch-norm after it),
    which a second rounding would reproduce bit for bit.

    ``block_axis`` (set by a layer, e.g. 1 for a convolution's channels): the dimension the blocks or rows of a
    scaled format (MX, NVFP4, rowwise scaling) run along for tensors of 3 or more dimensions, in place of the
    format's own axis; lower-dimensional tensors (a bias) keep the format's axis. A call's ``axis`` (an op's
    choice for one operand, its reduction dimension: ``lowprec.nn.ops``) takes precedence over both, for any
    tensor that has that dimension.
    """

    def __init__(self, quant: Quant | None, policy: Policy | None = None, *, forward: bool = False):
        self.quant = quant
        self.forward = forward  # rounds forward tensors only: see the class docstring
        self.observe_only = False  # calibration: record exponent statistics, return x unchanged
        self.exponent: DynamicExponent | None = None
        self.scale_state: DelayedScale | None = None
        self.block_axis: int | None = None
        #: this role's roundings as one call site for the packed forms they make (formats.packing.FormDemand)
        self._forms = FormsFor(FormDemand())
        p = policy or Policy()
        if quant is not None and quant.format.outside_state == "amax_history":
            self.scale_state = DelayedScale(quant.format)
        if quant is not None and quant.format.outside_state == "exponent" and p.exponent_rule == "overflow":
            # init_int_bits None: the exponent starts at the max-abs exponent of the first tensor it sees
            self.exponent = DynamicExponent(
                quant.format, p.init_int_bits, max_overflow_rate=p.max_overflow_rate, interval=p.exponent_interval
            )

    def set_agree(self, agree: Callable[[Tensor], Tensor] | None) -> None:
        """Have this role's scale state agree across processes: ``agree`` (an element-wise MAX over the ranks,
        ``lowprec.train.distributed.all_max``; None: each process alone) takes a dynamic fixed point exponent's
        start exponent and a delayed scale's amax before they are used. A role without such state ignores it."""
        if self.exponent is not None:
            self.exponent.agree = agree
        if self.scale_state is not None:
            self.scale_state.agree = agree

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling: a quantizer pickled before it had a FormDemand gets a new one."""
        self.__dict__.update(state)
        self.__dict__.setdefault("_forms", FormsFor(FormDemand()))
        self.__dict__.setdefault("forward", False)

    @property
    def enabled(self) -> bool:
        return self.quant is not None

    # stateful (exponent statistics) and runs its own compiled kernels: opaque to a user's torch.compile, which
    # graph-breaks around it
    @torch.compiler.disable
    def __call__(self, x: Tensor, axis: int | None = None) -> Tensor:
        if self.quant is None:
            return x
        recomputed = self.forward and recomputing()
        if self.observe_only:
            if self.exponent is not None and not recomputed:
                self.exponent.observe(x)
            if self.scale_state is not None and not recomputed:
                self.scale_state.observe(x)
            return x
        records = not (recomputed or (self.forward and inferring()))
        if self.keeps(x):
            return x
        self._check_container(x)
        with self._forms:
            if self.exponent is not None:
                rounding = self.quant.rounding
                return self._marked(x, self.exponent.quantize(x, rounding) if records
                                    else self.exponent.round(x, rounding))
            if self.scale_state is not None:
                return (self.scale_state.quantize if records else self.scale_state.round)(x, self.quant.rounding)
            return self._marked(x, quantize(x, self._format_for(x, axis), self.quant.rounding))

    @torch.compiler.disable
    def codes(self, x: Tensor) -> tuple[Tensor, int] | None:
        """``self(x)`` as (k, frac), its integer codes (a float tensor) and fraction bits: ``self(x)`` is
        k * 2**-frac bit for bit. Given where the rounding produces them itself (``formats.quantize_codes``:
        dynamic fixed point with the max-abs exponent rule, no exponent statistics, on the host path); None
        otherwise, having done nothing (call the quantizer)."""
        if self.quant is None or self.observe_only or self.exponent is not None or self.scale_state is not None:
            return None
        if self.keeps(x):
            return None
        return quantize_codes(x, self._format_for(x), self.quant.rounding)

    def keeps(self, x: Tensor) -> bool:
        """Whether rounding ``x`` gives ``x`` bit for bit and records nothing, so that ``__call__`` returns ``x``
        itself: ``x`` was marked by a rounding onto this role's format (``lowprec.formats.packing.mark``,
        unchanged in place since), the format's grid is fixed (a float, fixed-point or uniform format: not one
        whose exponent or scale follows the data), and the rounding is deterministic (nearest or toward zero
        leave every value of the grid, -0, inf and NaN as they are; stochastic rounding would draw random bits)
        with no state (no dynamic exponent or delayed scale, not observing)."""
        quant = self.quant
        return (quant is not None and not self.observe_only and quant.rounding in _DETERMINISTIC
                and self.exponent is None and self.scale_state is None and not quant.format.scale_free
                and marked_format(x) == quant.format)

    def _marked(self, x: Tensor, y: Tensor) -> Tensor:
        """``y``, marked as lying on the format's grid (lowprec.formats.packing.mark: what backward saves of it
        is stored packed); ``x`` itself (a rounding that changed nothing, a parameter) stays unmarked."""
        return y if y is x else mark(y, self.quant.format)  # type: ignore[union-attr]

    def _check_container(self, x: Tensor) -> None:
        """ValueError, saying what to change in the model, where the role's format cannot round a tensor of
        x's dtype without rounding twice (a scaled format on anything but float32, ``bf16`` on float16): a
        converted model run under torch.autocast, or made half precision with ``model.half()`` /
        ``model.to(torch.bfloat16)``."""
        fmt = self.quant.format  # type: ignore[union-attr]
        if not fmt.fits_in(x.dtype):
            why = ("its scales span 2**-127..2**127: it rounds float32 only" if fmt.scaled
                   else "not all its values are representable there: it would round twice")
            raise ValueError(
                f"a {x.dtype} tensor reached a role this policy rounds onto {fmt!r}, which cannot "
                f"round {x.dtype} tensors ({why}). Keep the converted "
                "model float32 (model.float(), float32 inputs) and run it outside torch.autocast: the policy sets "
                "each role's precision (lowprec.autocast / lowprec.GradScaler are the torch.amp-shaped entry points)"
            )

    def _format_for(self, x: Tensor, axis: int | None = None) -> Format:
        """The format with the call's ``axis``, else the layer's ``block_axis``, where it applies (see the class
        docstring)."""
        return operand_format(self.quant.format, x, axis, self.block_axis)  # type: ignore[union-attr]

    @torch.compiler.disable
    def round(self, x: Tensor, axis: int | None = None) -> Tensor:
        """Round x like ``__call__`` (``axis`` as there) but without adding it to the exponent statistics (identity
        when observing)."""
        if self.quant is None or self.observe_only:
            return x
        self._check_container(x)
        int_bits = None
        if self.exponent is not None:
            self.exponent.start(x)
            int_bits = self.exponent.int_bits
        if self.scale_state is not None:
            return self.scale_state.round(x, self.quant.rounding)
        with self._forms:
            return self._marked(x, quantize(x, self._format_for(x, axis), self.quant.rounding, int_bits=int_bits))

    @torch.no_grad()
    def update(self) -> None:
        """Advance the exponent rule or the delayed scale (no-op for static formats)."""
        if self.exponent is not None:
            self.exponent.update()
        if self.scale_state is not None:
            self.scale_state.update()

    def state_dict(self) -> dict[str, Any]:
        state = {"quant": str(self.quant), "exponent": self.exponent.state_dict() if self.exponent else None}
        if self.scale_state is not None:
            state["scale"] = self.scale_state.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["quant"] != str(self.quant):
            raise ValueError(f"checkpoint quantizer is {state['quant']}, this one is {self.quant}")
        if self.exponent is not None:
            self.exponent.load_state_dict(state["exponent"])
        if self.scale_state is not None:
            self.scale_state.load_state_dict(state["scale"])

    def __repr__(self) -> str:
        if self.exponent is not None:
            return f"Quantizer({self.quant}, int_bits={self.exponent.int_bits})"
        if self.scale_state is not None:
            return f"Quantizer({self.quant}, scale={float(self.scale_state.scale)})"
        return f"Quantizer({self.quant})"
