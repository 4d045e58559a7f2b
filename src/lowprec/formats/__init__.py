"""Number formats and ``quantize()``: the foundation every other layer builds on."""

from .packing import Packed, Storage, pack, pack_bool
from .parse import FORMS, parse_format
from .scaled import (ELEMENTS, NVFP4, SCALE_RULES, MXFormat, ScaledFloat, ScaledFormat, operand_format,
                     with_block_axis, with_operand_axis)
from .quantize import compile_enabled, count_above, max_abs_int_bits, quantize, quantize_codes, quantize_counting
from .types import (
    BF16,
    E4M3,
    E5M2,
    FP16,
    FP32,
    TORCH_DTYPES,
    BlockFloat,
    DynamicFixedPoint,
    FixedPoint,
    FloatFormat,
    Format,
    Uniform,
)

__all__ = [
    "FORMS", "parse_format", "quantize", "quantize_codes", "quantize_counting", "count_above", "max_abs_int_bits",
    "compile_enabled",
    "Format", "FloatFormat", "FixedPoint", "DynamicFixedPoint", "Uniform", "BlockFloat",
    "FP32", "BF16", "FP16", "E4M3", "E5M2", "TORCH_DTYPES", "pack", "pack_bool", "Packed", "Storage",
    "MXFormat", "NVFP4", "ScaledFloat", "ScaledFormat", "ELEMENTS", "SCALE_RULES", "with_block_axis",
    "with_operand_axis", "operand_format",
]
