"""lowprec: train PyTorch models in reduced and mixed numeric precision, exactly as the papers describe.

>>> import lowprec as lp
>>> fmt = lp.parse_format("fp16")
>>> y = lp.quantize(x, fmt, rounding="nearest")
"""

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
from .policy import classifier_bits
from .scaling import DynamicExponent
from . import nn
from .nn import convert, widen
from .train import Trainer

__version__ = "0.1.0"

__all__ = [
    "parse_format", "quantize", "classifier_bits", "DynamicExponent",
    "Format", "FloatFormat", "FixedPoint", "DynamicFixedPoint", "Uniform", "BlockFloat",
]
__all__ += ["Trainer"]
__all__ += ["convert", "widen", "nn"]
