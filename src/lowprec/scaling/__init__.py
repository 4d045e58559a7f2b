"""Scale state: dynamic fixed point exponents (and, with the training layer, loss scaling)."""

from .dynamic_fixed import DynamicExponent
from .loss_scale import LossScaleCollapse, LossScaler, StepResult

__all__ = ["DynamicExponent", "LossScaleCollapse", "LossScaler", "StepResult"]
