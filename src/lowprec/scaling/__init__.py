"""Scale state: dynamic fixed point exponents, delayed scaling's amax history (and, with the training layer,
loss scaling)."""

from .delayed import DelayedScale
from .dynamic_fixed import DynamicExponent
from .loss_scale import LossScaleCollapse, LossScaler, StepResult

__all__ = ["DelayedScale", "DynamicExponent", "LossScaleCollapse", "LossScaler", "StepResult"]
