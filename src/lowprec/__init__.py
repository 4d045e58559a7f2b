"""lowprec: train PyTorch models in reduced and mixed numeric precision, exactly as the papers describe.

>>> import lowprec as lp
>>> y = lp.quantize(x, "fp16")                           # exact, ties to even
>>> model = lp.convert(model, lp.Policy.preset("int8-lazy"))
>>> trainer = lp.Trainer(model, optimizer, "int8-lazy")
>>> result = trainer.step(loss)                          # result.skipped, result.scale, result.overflow_modules
>>> plain = lp.unconvert(model)                          # plain torch layers, weights as the layers round them
>>> scaler = lp.GradScaler("int8-lazy", model, optimizer)  # a torch.amp-shaped loop: lp.autocast(scaler)
>>> report = lp.inspect(model, (x, y), "mixed-fp16")     # histograms, underflow/overflow, loss-scale advice
>>> print(lp.plan(model, "fp8-hybrid", (x,)))             # every op one step runs: roles, formats, fp32 parts
"""

from . import nn
from .formats import (
    BlockFloat,
    DynamicFixedPoint,
    FixedPoint,
    FloatFormat,
    Format,
    Uniform,
    parse_format,
    quantize,
)
from .diagnostics import inspect
from .nn import convert, plan, unconvert, widen
from .policy import Policy, Quant, Quantizer, classifier_bits
from .scaling import DynamicExponent, LossScaleCollapse, LossScaler, StepResult
from .train import Trainer
from .integrations import GradScaler, autocast

__version__ = "0.1.0"

__all__ = [
    "parse_format", "quantize", "Format", "FloatFormat", "FixedPoint", "DynamicFixedPoint", "Uniform", "BlockFloat",
    "Policy", "Quant", "Quantizer", "classifier_bits",
    "DynamicExponent", "LossScaler", "LossScaleCollapse", "StepResult",
    "convert", "unconvert", "widen", "nn", "Trainer", "inspect", "plan", "autocast", "GradScaler",
]
