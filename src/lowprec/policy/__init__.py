"""Policies: which format each tensor role gets. (The classifier rule lives here.)"""

from .classifier import classifier_bits

__all__ = ["classifier_bits"]
