"""Diagnostics: what the numbers of a model look like in each format before it trains, what a run costs in
memory, and what went wrong when a step overflowed."""

from .memory import PeakMemory, measure_peak_memory, profile_peak_memory

__all__ = ["PeakMemory", "measure_peak_memory", "profile_peak_memory"]
