"""What a scaled format does to each block of a tensor: its scale, the values its element rounding sees, the
result (for ``lowprec inspect``; docs/formats.md, "Scaled formats").

``scaled_blocks(x, fmt)`` lays ``x`` out as ``quantize`` does (rows of the block along ``fmt.axis``, each row
zero-padded to a multiple of the block) and returns, per block, the decode scale (the factor an element value
is multiplied by) and, per element, the value the element rounding sees (x times the block's encode scale,
before saturation, in the float32 operations of the format's kernel) and the quantized value
(``lowprec.quantize``, nearest). Blocks:

* MX: ``block`` elements; decode scale 2**e (``scaled_kernels.shared_exponent``), scaled value x * 2**-e.
* NVFP4: 16 elements (a 16x16 tile is 16 such blocks sharing one scale); decode scale d_b * s_dec, scaled
  value fl(x * enc_b), d_b, s_dec and enc_b as in ``scaled_kernels.nvfp4_fp32``.
* Per-tensor scaled floats: the whole tensor is one block (one row per ``rowwise`` row); decode scale 1/s,
  scaled value fl(x * s). Delayed scaling has no history here: it is read with the current scale of x itself
  (what a history of this tensor alone gives).

A block holding NaN or inf has a NaN scale (MX, NVFP4: the block becomes NaN). An element *clips* where
saturation, not rounding, decides its value: its scaled value lies more than half the top step beyond the
element's largest (or below its smallest) value, where rounding to nearest on the element's grid extended
upwards would leave the range (e4m3: beyond ±464, e2m1: beyond ±7; a value exactly half a step beyond is a
tie and counts as not clipped). Values between the largest value and that midpoint round to the largest
value either way: a block scale rounded down by a float32 or e4m3 rounding does not count as clipping. An
element *flushes* where it is finite and non-zero and quantizes to zero; it is *subnormal* where it quantizes
to a non-zero value whose scaled magnitude lies below the element's smallest normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import scaled_kernels as sk
from .quantize import quantize
from .scaled import MXFormat, NVFP4, ScaledFloat, ScaledFormat
from .scaled_quantize import _rows, nvfp4_block_amax, scaled_float_scale

__all__ = ["ScaledBlocks", "scaled_blocks"]


@dataclass(frozen=True)
class ScaledBlocks:
    """A tensor under a scaled format, block by block (module docstring); all tensors (blocks, size) but
    ``scale`` (blocks,)."""

    x: Tensor  # the float32 values (zero padding included)
    scaled: Tensor  # what the element rounding sees
    quantized: Tensor  # quantize(x, fmt), nearest
    scale: Tensor  # float64 decode scale per block; NaN for a NaN/inf block
    clip_low: float  # the element's smallest value minus half its top step
    clip_high: float  # the element's largest value plus half its top step
    element_min_normal: float  # 0 where the element has no subnormals (MXINT8)

    @property
    def clipped(self) -> Tensor:
        """Per element: saturation decides the value (the scaled value lies beyond clip_low or clip_high); never
        in a block with a NaN or zero scale."""
        beyond = (self.scaled > self.clip_high) | (self.scaled < self.clip_low)
        scaled_block = (torch.isfinite(self.scale) & (self.scale > 0))[:, None]  # a zero scale flushes the block
        return torch.isfinite(self.x) & scaled_block & beyond

    @property
    def flushed(self) -> Tensor:
        """Per element: finite, non-zero, quantized to zero."""
        return torch.isfinite(self.x) & (self.x != 0) & (self.quantized == 0)

    @property
    def subnormal(self) -> Tensor:
        """Per element: quantized to a non-zero value below the element's smallest normal (scaled)."""
        return (self.quantized != 0) & (self.scaled.abs() < self.element_min_normal) & torch.isfinite(self.x)


def scaled_blocks(x: Tensor, fmt: ScaledFormat) -> ScaledBlocks:
    """``x`` (float32) under ``fmt`` block by block: scales, scaled values, quantized values (module
    docstring)."""
    fmt.check_fits(x.dtype)
    if isinstance(fmt, ScaledFloat):
        current = replace(fmt, scaling="current")
        s = scaled_float_scale(x, current).expand_as(x)
        q = quantize(x, current)
        if fmt.rowwise and x.dim() > 0:
            blocks, qb, sb = (_rows(t, fmt.axis, x.shape[fmt.axis])[0] for t in (x, q, s))
        else:
            blocks, qb, sb = (t.reshape(1, -1) for t in (x, q, s))
        el = fmt.element
        scale = 1.0 / sb[:, 0].double() if sb.shape[1] else torch.ones(sb.shape[0], dtype=torch.float64)
        half = 2.0 ** (math.frexp(el.max_value)[1] - 2 - el.man_bits)  # half the step of the top binade
        return ScaledBlocks(blocks, blocks * sb, qb, scale, -el.max_value - half, el.max_value + half,
                            el.min_normal if el.subnormals else 0.0)
    if not isinstance(fmt, (MXFormat, NVFP4)):
        raise TypeError(f"not a scaled format: {fmt!r}")
    size = fmt.block if isinstance(fmt, MXFormat) else 16
    blocks, _ = _rows(x, fmt.axis, size)
    qb, _ = _rows(quantize(x, fmt), fmt.axis, size)
    el = fmt.elem
    if isinstance(fmt, MXFormat):
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        bad = ~torch.isfinite(amax)
        e = sk.shared_exponent(torch.where(bad, 0.0, amax), fmt.scale_rule, el.emax, el.man_bits, el.max_value)
        scaled = blocks * sk.pow2(-e)
        scale = torch.where(bad, float("nan"), sk.pow2(e).double())
    else:
        s_enc = sk.nvfp4_encode_scale(x)
        s_dec = 1.0 / s_enc
        d = sk.e4m3_scale(torch.clamp((nvfp4_block_amax(x, blocks, fmt) / 6.0) * s_enc, max=448.0))
        scaled = blocks * torch.clamp(1.0 / (d * s_dec), max=sk.FLT_MAX)
        scale = d.double() * s_dec.double()
    half = 2.0 ** (el.emax - el.man_bits - 1)
    return ScaledBlocks(blocks, scaled, qb, scale.reshape(-1), el.min_value - half, el.max_value + half,
                        0.0 if el.integer else 2.0**el.emin)
