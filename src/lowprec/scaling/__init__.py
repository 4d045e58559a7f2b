"""Scale state: dynamic fixed point exponents (and, with the training layer, loss scaling)."""

from .dynamic_fixed import DynamicExponent

__all__ = ["DynamicExponent"]
