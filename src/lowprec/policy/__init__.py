"""Policies: which format each tensor role gets, per-module overrides, presets, the classifier rule."""

from .classifier import classifier_bits
from .policy import LAYER_ROLES, ROLES, Policy, Quant, as_policy
from .quantizer import Quantizer
from .roles import Role

__all__ = ["classifier_bits", "Policy", "Quant", "as_policy", "Quantizer", "ROLES", "LAYER_ROLES", "Role"]
