"""``quantize`` for the scaled formats: lays the tensor out as blocks along the format's axis and runs the kernels
of ``scaled_kernels.py`` (compiled where it pays, through the ``run`` that ``quantize`` passes in)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import scaled_kernels as sk
from .scaled import MXFormat, NVFP4, ScaledFloat, ScaledFormat

__all__ = ["quantize_scaled", "current_scale", "scaled_float_scale", "nvfp4_block_amax"]

Runner = Callable[..., Tensor]


def _axis(x: Tensor, axis: int) -> int:
    dims = max(x.dim(), 1)
    if not -dims <= axis < dims:
        raise ValueError(f"axis={axis} is out of range for a tensor of {x.dim()} dimensions ({tuple(x.shape)}); "
                         f"give the format an axis in [{-dims}, {dims - 1}], e.g. 'mxfp8_e4m3<axis=-1>'")
    return axis % dims


def _rows(x: Tensor, axis: int, block: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """x as rows of ``block`` elements along ``axis`` (each row along the axis zero-padded to a multiple of the
    block: zeros change no amax), and the function that puts rows of that layout back into x's shape."""
    x1 = x.reshape(1) if x.dim() == 0 else x
    last = _axis(x1, axis) == x1.dim() - 1
    moved = x1 if last else x1.movedim(axis, -1)
    length = moved.shape[-1]
    pad = (-length) % block
    flat = moved.reshape(-1, length)
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))

    def back(y: Tensor) -> Tensor:
        y = y.reshape(-1, length + pad)[:, :length].reshape(moved.shape)
        return (y if last else y.movedim(-1, axis)).reshape(x.shape)

    return flat.reshape(-1, block), back


def _direct(x: Tensor, out: Tensor | None, fmt: MXFormat | NVFP4, block: int) -> bool:
    """Whether x can be cut into blocks as it lies in memory: contiguous, blocks along the last dimension, rows a
    multiple of the block."""
    return (x.dim() > 0 and x.is_contiguous() and _axis(x, fmt.axis) == x.dim() - 1 and x.shape[-1] % block == 0
            and (out is None or out.is_contiguous()))


def _finish(y: Tensor, out: Tensor | None) -> Tensor:
    return y if out is None else out.copy_(y)


def _mx(x: Tensor, out: Tensor | None, fmt: MXFormat, rounding: int, key: Tensor | None, run: Runner) -> Tensor:
    el = fmt.elem
    kernel = sk.constant_block(sk.mx_fp32, fmt.block)
    args = (fmt.scale_rule, el.emax, el.man_bits, el.qmin, el.max_value, el.min_value, el.integer, rounding, key)
    if _direct(x, out, fmt, fmt.block):
        return run(kernel, x, out, *args)
    blocks, back = _rows(x, fmt.axis, fmt.block)
    return _finish(back(run(kernel, blocks, None, *args)), out)


def _nvfp4(x: Tensor, out: Tensor | None, fmt: NVFP4, rounding: int, key: Tensor | None, run: Runner) -> Tensor:
    if fmt.tile == "1x16" and _direct(x, out, fmt, 16):
        return run(sk.nvfp4_1x16_fp32, x, out, rounding, key)
    blocks, back = _rows(x, fmt.axis, 16)
    y = run(sk.nvfp4_fp32, blocks, None, nvfp4_block_amax(x, blocks, fmt), sk.nvfp4_encode_scale(x), rounding, key)
    return _finish(back(y), out)


def nvfp4_block_amax(x: Tensor, blocks: Tensor, fmt: NVFP4) -> Tensor:
    """The amax each of x's NVFP4 blocks (``blocks``: x as rows of 16 along ``fmt.axis``) takes its scale from,
    shaped (blocks, 1): the block's own (1x16) or its 16x16 tile's; NaN where it holds NaN or inf."""
    if fmt.tile == "1x16":
        amax = blocks.abs().amax(dim=-1, keepdim=True)
    else:  # 16x16 tiles: 16 consecutive rows of each column of blocks (rows padded to a multiple of 16)
        width = -(-(x.shape[_axis(x, fmt.axis)] if x.dim() else 1) // 16)  # blocks per row
        per_block = blocks.abs().amax(dim=-1).view(-1, width)
        rows_pad = (-per_block.shape[0]) % 16
        tiles = torch.nn.functional.pad(per_block, (0, 0, 0, rows_pad), value=0.0)
        tile_amax = tiles.view(-1, 16, width).amax(dim=1, keepdim=True).expand(-1, 16, width)
        amax = tile_amax.reshape(-1, width)[: per_block.shape[0]].reshape(-1, 1)
    return torch.where(torch.isfinite(amax), amax, float("nan"))


def current_scale(amax: Tensor, fmt: ScaledFloat) -> Tensor:
    """Current scaling: s = element max / amax in float32 (``pow2``: the largest power of two <= that), s = 1
    where amax is 0, capped at FLT_MAX (a tiny amax)."""
    s = torch.clamp(torch.as_tensor(fmt.max_value, dtype=torch.float32, device=amax.device) / amax, max=sk.FLT_MAX)
    s = torch.where(amax > 0, s, 1.0)
    return pow2_floor(s) if fmt.pow2 else s


def pow2_floor(s: Tensor) -> Tensor:
    """The largest power of two <= s (s positive, finite float32): s with its fraction bits cleared; a subnormal
    s (an element whose largest value is below 4 scaled for an amax near FLT_MAX) first times 2**64, the result
    times 2**-64 (both exact), since a subnormal's highest set bit lies in its fraction field."""
    normal = s >= 2.0**-126
    p = (torch.where(normal, s, s * 2.0**64).view(torch.int32) & -(1 << 23)).view(torch.float32)
    return torch.where(normal, p, p * 2.0**-64)


def scaled_float_scale(x: Tensor, fmt: ScaledFloat) -> Tensor:
    """The current-scaling scale of x: 0-d, or one per row along ``fmt.axis`` (``rowwise``; shaped to broadcast
    against x). amax over finite values: on a CPU first as max(-min x, max x) from one pass (``torch.aminmax``,
    exact), which a tensor without NaN or inf gives as it is (reading that back costs no device sync there)."""
    dims = {} if not fmt.rowwise or x.dim() == 0 else {"dim": _axis(x, fmt.axis), "keepdim": True}
    if x.device.type == "cpu" and x.numel():
        low, high = torch.aminmax(x, **dims)
        peak = torch.maximum(-low, high)
        if bool(torch.isfinite(peak).all()):
            return current_scale(peak, fmt)
    a = torch.where(torch.isfinite(x), x.abs(), 0.0)
    return current_scale(a.amax(**dims) if a.numel() else a.new_zeros(()), fmt)


def _scaled_float(x: Tensor, out: Tensor | None, fmt: ScaledFloat, rounding: int, key: Tensor | None,
                  scale: Tensor | float | None, round_float: Runner) -> Tensor:
    if scale is None:
        if fmt.scaling == "delayed":
            raise ValueError(f"{fmt!r} takes its scale from an amax history: use lowprec.scaling.DelayedScale "
                             "(what a policy's Quantizer holds), or pass scale= to quantize")
        scale = scaled_float_scale(x, fmt)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.device.type == "cpu" and not bool(torch.all(torch.isfinite(s) & (s > 0))):  # elsewhere: no device sync
        raise ValueError(f"a scale must be positive and finite, got {scale!r}")
    return round_float(x, s, out, fmt.element, rounding, key)


def quantize_scaled(x: Tensor, out: Tensor | None, fmt: ScaledFormat, rounding: int, key: Tensor | None,
                    scale: Tensor | float | None, run: Runner, round_float: Runner) -> Tensor:
    """Round float32 ``x`` onto a scaled format (``quantize`` has validated the call). ``run(kernel, x, out,
    *args)`` runs a kernel (compiled for large tensors); ``round_float(x, s, out, fmt, rounding, key)`` gives
    fl(q / s), q = fl(x * s) rounded onto the plain float format ``fmt`` (the per-tensor scaled floats' elements),
    x's NaNs kept."""
    if isinstance(fmt, MXFormat):
        return _mx(x, out, fmt, rounding, key, run)
    if isinstance(fmt, NVFP4):
        return _nvfp4(x, out, fmt, rounding, key, run)
    if isinstance(fmt, ScaledFloat):
        return _scaled_float(x, out, fmt, rounding, key, scale, round_float)
    raise TypeError(f"not a scaled format: {fmt!r}")
