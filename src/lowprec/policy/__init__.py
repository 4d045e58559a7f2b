"""Policies: which format each tensor role gets, per-module overrides, presets, the classifier rule."""

from .classifier import classifier_bits
from .policy import LAYER_ROLES, ROLES, Policy, Quant
from .quantizer import Quantizer

__all__ = ["classifier_bits", "Policy", "Quant", "Quantizer", "ROLES", "LAYER_ROLES"]
