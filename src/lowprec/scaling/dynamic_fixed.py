"""Exponent state of one dynamic-fixed-point group (one tensor role of one layer).

The exponent r is the number of integer bits of a ``dfx<bits>`` word (range about +-2**r, step
2**(r - bits + 1)). Courbariaux et al. (2014), Algorithm 1 as coded by the authors, moves it by the measured
overflow rate: over an interval of ``interval`` observed batches, average the per-batch overflow rate at r
and at r - 1; then
    if rate(r) > max_rate:        r += 1
    elif rate(r - 1) > max_rate:  keep r
    else:                         r -= 1
and reset the counters. r stays within the exponents a fixed-point word can take (``FRAC_RANGE``): a group that
only ever sees zeros (a dead unit's gradient) rests at the lowest r, one that sees inf at the highest, instead of
failing after a hundred intervals.

The overflow rate of a batch is the fraction of its elements whose round-to-nearest
value reaches the largest positive code in magnitude (saturated values included), the authors'
``mean(|Q(x)| >= max)``.

The other rule, the max-abs exponent of the tensor itself at every quantization (Flexpoint / Das et al., the
choice Park et al. cite), needs no state: it is what ``quantize(x, "dfx<b>")`` does without ``int_bits``.

Rates are summed in float64: on the host for CPU tensors (reading a CPU scalar is free, and no small tensors
pile up between two updates), on the device for others (no host sync per batch); only ``update()`` at the end
of an interval reads them. A tensor rounded at the current exponent is observed in the same pass
(``formats.quantize_counting``). An empty tensor is an observed batch with no overflow (so that every process
counts the same batches) and does not start an exponent.

Across processes (torch.distributed data parallelism) each rank observes its own data. ``counters()`` /
``set_counters()`` expose the interval's sums so that ``lowprec.train.distributed.sum_exponent_counters``
can add them over all ranks before ``update()``: every rank then moves r by the pooled overflow rate and all
ranks hold the same exponent. ``agree`` (None by default; ``lowprec.Trainer`` sets it under torch.distributed)
is applied to the max-abs start exponent of ``int_bits=None``, so all ranks start at the largest one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..formats import (DynamicFixedPoint, FixedPoint, count_above, max_abs_int_bits, parse_format, quantize,
                       quantize_counting)
from ..formats.types import FRAC_RANGE

__all__ = ["DynamicExponent"]


@functools.lru_cache(maxsize=None)
def _thresholds(fmt: DynamicFixedPoint, int_bits: int) -> tuple[float, float]:
    return tuple(f.max_value - f.step / 2 for f in (fmt.at(int_bits), fmt.at(int_bits - 1)))


class DynamicExponent:
    """The moving exponent of one dynamic-fixed-point tensor group.

    >>> g = DynamicExponent("dfx<10>", int_bits=5, max_overflow_rate=1e-4, interval=100)
    >>> g = DynamicExponent("dfx<10>", int_bits=None)   # start at the max-abs exponent of the first batch
    >>> y = g.quantize(x)        # quantize at the current r and record x's overflow statistics
    >>> g.update()               # once per batch; r moves by at most one at the end of each interval
    """

    def __init__(
        self,
        fmt: DynamicFixedPoint | str,
        int_bits: int | None = 5,
        *,
        max_overflow_rate: float = 1e-4,
        interval: int = 100,
    ):
        fmt = parse_format(fmt)
        if fmt.outside_state != "exponent":
            raise ValueError(f"DynamicExponent needs a dynamic fixed point format (dfx<bits>), got {fmt!r}")
        if not 0.0 <= max_overflow_rate < 1.0:
            raise ValueError(f"max_overflow_rate must lie in [0, 1), got {max_overflow_rate}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int (batches), got {interval!r}")
        if int_bits is not None and (isinstance(int_bits, bool) or not isinstance(int_bits, int)):
            raise TypeError(f"int_bits must be an int or None (start from the first tensor seen), got {int_bits!r}")
        self.fmt = fmt
        self.max_overflow_rate, self.interval = max_overflow_rate, interval
        if int_bits is not None and self._bounded(int_bits) != int_bits:
            top = fmt.bits - 1
            raise ValueError(f"int_bits for {fmt!r} must lie in [{top - FRAC_RANGE[1] + 1}, {top - FRAC_RANGE[0]}] "
                             f"(fixed<{fmt.bits},frac> needs frac in {list(FRAC_RANGE)}), got {int_bits}")
        self.int_bits = int_bits
        self.agree: Callable[[Tensor], Tensor] | None = None  # cross-process MAX of the start exponent
        self.last_rate: float | None = None  # the averaged rate at r of the last completed interval
        self._reset()

    def _reset(self) -> None:
        self.batches = 0
        self._host_sum = [0.0, 0.0]  # [rate at r, rate at r-1] of the CPU batches, summed
        self._device_sum: Tensor | None = None  # the same for batches on another device (float64 tensor)

    @property
    def _rate_sum(self) -> Tensor | None:
        """[rate at r, rate at r - 1] summed over this interval's batches (float64; None before the first)."""
        if not self.batches:
            return None
        host = torch.tensor(self._host_sum, dtype=torch.float64)
        return host if self._device_sum is None else self._device_sum + host.to(self._device_sum.device)

    @property
    def format(self) -> FixedPoint:
        """The fixed-point format this group has now."""
        return self.fmt.at(self.int_bits)

    def start(self, x: Tensor) -> None:
        """``int_bits=None``: start at the max-abs exponent of the first non-empty tensor seen (one host sync,
        once; one MAX over the processes when ``agree`` is set)."""
        if self.int_bits is None and x.numel() > 0:
            r = max_abs_int_bits(x.detach())
            self.int_bits = self._bounded(int(r if self.agree is None else self.agree(r)))

    def thresholds(self) -> tuple[float, float]:
        """|x| above which a value counts as an overflow at r and at r - 1: max - step/2 of each format."""
        return _thresholds(self.fmt, self.int_bits)

    def overflow_rates(self, x: Tensor) -> Tensor:
        """[rate at r, rate at r - 1] for one batch: the fraction of |x| above each of ``thresholds()`` (a float
        tensor, no host sync on a GPU; zeros for an empty tensor)."""
        counts = self._counts(x)
        return torch.zeros(2, device=x.device) if counts is None else counts / float(x.numel())

    def observe(self, x: Tensor) -> None:
        """Record one batch's statistics for the next update."""
        self._record(self._counts(x), x.numel())

    def _counts(self, x: Tensor) -> Tensor | None:
        """How many elements of |x| exceed each of ``thresholds()`` (None for an empty tensor)."""
        self.start(x)
        return count_above(x, self.thresholds()) if x.numel() else None

    def _record(self, counts: Tensor | None, numel: int) -> None:
        """Add one batch's rates, counts / numel (an empty batch: none)."""
        if counts is None:
            pass
        elif counts.device.type == "cpu":
            self._host_sum = [a + c / numel for a, c in zip(self._host_sum, counts.tolist())]
        else:
            rates = counts.double() / numel
            self._device_sum = rates if self._device_sum is None else self._device_sum + rates
        self.batches += 1

    def _set_sum(self, sums: Tensor | None) -> None:
        self._host_sum, self._device_sum = [0.0, 0.0], None
        if sums is not None and sums.device.type == "cpu":
            self._host_sum = sums.double().tolist()
        elif sums is not None:
            self._device_sum = sums.double()

    def quantize(self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Tensor:
        """Observe ``x`` then quantize it at the current exponent (both from one pass where possible)."""
        self.start(x)
        if x.numel() == 0:
            self.observe(x)
            return quantize(x, self.fmt, rounding, int_bits=self.int_bits)
        y, counts = quantize_counting(x, self.fmt, self.int_bits, self.thresholds(), rounding, generator)
        self._record(counts, x.numel())
        return y

    def round(self, x: Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> Tensor:
        """Quantize ``x`` at the current exponent, recording nothing (``quantize``'s values, bit for bit). Before
        the exponent has started (``int_bits`` None) it is not started: ``x`` is rounded at its own max-abs
        exponent."""
        return quantize(x, self.fmt, rounding, generator=generator, int_bits=self.int_bits)

    def _bounded(self, r: int) -> int:
        """r clamped so that r and r - 1 (whose rate is measured too) are integer bits of fixed<bits, frac> with
        frac in FRAC_RANGE."""
        top = self.fmt.bits - 1
        return min(max(r, top - FRAC_RANGE[1] + 1), top - FRAC_RANGE[0])

    @property
    def due(self) -> bool:
        """Whether the next ``update()`` applies the rule (an interval of observations is complete)."""
        return self.batches >= self.interval

    def counters(self) -> Tensor:
        """This interval's sums as one float64 tensor: [rate at r, rate at r - 1, batches observed]."""
        sums = self._rate_sum if self.batches else torch.zeros(2, dtype=torch.float64)
        return torch.cat([sums, sums.new_tensor([float(self.batches)])])

    def set_counters(self, counters: Tensor) -> None:
        """Replace this interval's sums (e.g. by their totals over all processes); the inverse of ``counters``."""
        self._set_sum(counters[:2] if int(counters[2]) else None)
        self.batches = int(counters[2])

    def update(self) -> bool:
        """Apply the rule if an interval is complete; returns True if it ran (r may or may not move). The
        interval's averaged overflow rate at the old r is kept as ``last_rate`` (a diagnostic, not checkpointed):
        far above ``max_overflow_rate`` it says that the tensors outgrew r faster than one binade per interval."""
        if not self.due:
            return False
        rate_r, rate_below = (self._rate_sum / self.batches).tolist()
        self.last_rate = rate_r
        if rate_r > self.max_overflow_rate:
            self.int_bits = self._bounded(self.int_bits + 1)
        elif rate_below <= self.max_overflow_rate:
            self.int_bits = self._bounded(self.int_bits - 1)
        self._reset()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": repr(self.fmt),
            "int_bits": self.int_bits,
            "max_overflow_rate": self.max_overflow_rate,
            "interval": self.interval,
            "batches": self.batches,
            "rate_sum": None if self._rate_sum is None else self._rate_sum.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["format"] != repr(self.fmt):
            raise ValueError(f"checkpoint holds an exponent for {state['format']}, this group is {self.fmt!r}")
        self.int_bits = None if state["int_bits"] is None else int(state["int_bits"])
        self.max_overflow_rate, self.interval = state["max_overflow_rate"], state["interval"]
        self._set_sum(state["rate_sum"])
        self.batches = state["batches"]

    def __repr__(self) -> str:
        return (
            f"DynamicExponent({self.fmt!r}, int_bits={self.int_bits}, "
            f"max_overflow_rate={self.max_overflow_rate}, interval={self.interval})"
        )
