"""Diagnostics: what the numbers of a model look like in each format before it trains, what a run costs in
memory, and what went wrong when a step overflowed (see docs/diagnostics.md).

>>> report = lowprec.inspect(model, (x, y), "mixed-fp16")     # census of every role, loss-scale advice
>>> print(report.table()); report.plot("runs/inspect"); report.to_json("runs/inspect/report.json")
"""

from .advice import GRADIENT_ROLES, LossScaleAdvice, advise_loss_scale, set_start_exponents, start_exponents
from .census import Census, FormatCounts, census
from .inspection import Entry, InspectReport, inspect
from .overflow import OverflowSource, attribute_overflow, describe_skipped_step, explain_overflow
from .footprint import COMPONENTS, MemoryEstimate, estimate_memory, measure_step_memory, wrpn_footprint
from .memory import PeakMemory, measure_peak_memory, profile_peak_memory

__all__ = [
    "Census", "FormatCounts", "census",
    "Entry", "InspectReport", "inspect",
    "GRADIENT_ROLES", "LossScaleAdvice", "advise_loss_scale", "start_exponents", "set_start_exponents",
    "PeakMemory", "measure_peak_memory", "profile_peak_memory",
    "OverflowSource", "attribute_overflow", "describe_skipped_step", "explain_overflow",
    "COMPONENTS", "MemoryEstimate", "estimate_memory", "measure_step_memory", "wrpn_footprint",
]
