"""The training step: loss scaling, master weights, the lazy update, optimizer-state formats.

>>> trainer = lowprec.Trainer(lowprec.convert(model, policy), torch.optim.SGD(...), policy)
>>> result = trainer.step(loss_fn(model(x), y))      # result.skipped, result.scale, result.overflow_modules
"""

from .allocator import retain_freed_memory
from .loss import cross_entropy
from .optim import SGD, AdamW, DeltaOptimizer
from .trainer import Trainer, TrainStepResult, scaler_for
from .update import ParamSlot, step_parameters
from .warmup import warmup_exponents

__all__ = [
    "Trainer", "TrainStepResult", "SGD", "AdamW", "DeltaOptimizer", "warmup_exponents",
    "ParamSlot", "step_parameters", "scaler_for", "retain_freed_memory", "cross_entropy",
]
