"""Converted models: layers whose forward and backward quantize each tensor role per a policy.

>>> import lowprec as lp
>>> model = lp.convert(model, "int8")               # or a Policy, or "weight=int8,activations=int8,..."
>>> for name, role, q in lp.nn.quantizers(model): ...
>>> lp.nn.update_exponents(model)                   # once per batch: dynamic fixed point exponents
>>> with lp.nn.calibrating(model): ...              # full-precision run that only measures exponents
>>> wide = lp.widen(model_factory, 2)               # WRPN: every hidden layer twice as wide
>>> plain = lp.unconvert(model)                     # the plain torch model with the weights as rounded

Layout: roles.py (the per-role quantize helper, STE, accumulator), functions.py (one autograd Function per
op), layers.py and recurrent.py (the modules), resolve.py (a module's policy, the classifier rule),
convert.py, unconvert.py (the export back to plain torch layers), packed.py (saved tensors stored packed
during a converted model's forward), state.py (quantizers, exponents, calibration), widen.py (WRPN's widening
and clip-range checks). Op-level emulation (every functional GEMM, norm and attention, whatever module runs
it): ops.py (the intercepted functions and their operand roles), opfunction.py (one autograd Function for every
op), attention.py, emulate.py (the interception), swapped.py (what the swapped layers cover), records.py and
plan.py (``lp.plan``). nn/ depends on policy/, scaling/ and formats/ only.
"""

from .convert import CONVERSIONS, conversion_policy, convert
from .emulate import OpEmulation, emulation_of
from .plan import Plan, plan
from .functions import QConvFunction, QLinearFunction, QuantizeFunction
from .layers import QBatchNorm1d, QBatchNorm2d, QConv1d, QConv2d, QEmbedding, QLinear, QuantizedModule
from .packed import PackedSavedTensors
from .recurrent import QGRU, QLSTM, QRNN, QGRUCell, QLSTMCell, QRNNCell
from .state import calibrating, quantizers, update_exponents
from .unconvert import unconvert
from .widen import fill_clip_range, widen, zero_weight_shares

__all__ = [
    "convert", "conversion_policy", "unconvert", "widen", "fill_clip_range", "zero_weight_shares", "quantizers",
    "update_exponents", "calibrating", "CONVERSIONS",
    "QuantizedModule", "QLinear", "QConv1d", "QConv2d", "QLSTM", "QGRU", "QRNN", "QLSTMCell", "QGRUCell", "QRNNCell",
    "QBatchNorm1d", "QBatchNorm2d", "QEmbedding",
    "QLinearFunction", "QConvFunction", "QuantizeFunction", "PackedSavedTensors",
    "plan", "Plan", "OpEmulation", "emulation_of",
]
