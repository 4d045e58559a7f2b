"""``quantize()``: round a tensor onto a number format.

Validation and dispatch only; the numerics are in ``kernels.py``. Large tensors run through kernels fused
by ``torch.compile`` (one pass over memory; on a CPU, MX and NVFP4 as two kernels: ``_run_split``); small ones,
and every tensor when no compiler is available or ``LOWPREC_COMPILE=0``, run the same kernels eagerly. Both
give the same bits. Called from code a user compiles, these functions are opaque (``torch.compiler.disable``):
the user's graph breaks around them and they run as here, since their own compiled kernels cannot nest inside
another graph.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import host, kernels
from .packing import Codes, codes_form, mark, rounding_packs
from .parse import parse_format
from .scaled import ScaledFloat, ScaledFormat
from .scaled_kernels import constant_block
from .scaled_quantize import quantize_scaled
from .types import (FRAC_RANGE, TORCH_DTYPES, BlockFloat, DynamicFixedPoint, FixedPoint, FloatFormat, Format, Uniform,
                    container_of)

__all__ = ["quantize", "quantize_codes", "quantize_counting", "count_above", "max_abs_int_bits", "compile_enabled"]

#: Tensors with at least this many elements use the compiled kernels.
COMPILE_MIN_NUMEL = 1 << 16

_compile_failed = False

#: Whether float32 tensors rounded to nearest take the few-op paths of ``host.py`` (the same bits; tests switch
#: them off to check the kernels themselves): fixed point, dfx and uniform below HOST_MAX_NUMEL elements, casts
#: below COMPILE_MIN_NUMEL. Above these sizes the compiled kernels' single pass over memory is faster (measured
#: on a 2-core CPU: fixed<16,8> 0.79 ms host vs 1.50 ms compiled at 4M elements, the reverse at 16M; the cast
#: round trip 0.19 ms vs 0.16 ms at 256k).
FAST_PATHS = True
HOST_MAX_NUMEL = 1 << 23

#: Formats whose nearest rounding is torch's own cast.
_CASTS = {fmt: dtype for fmt, dtype in TORCH_DTYPES.items() if dtype != torch.float32}


def compile_enabled() -> bool:
    """Whether large tensors go through torch.compile (off with LOWPREC_COMPILE=0 or after a failure)."""
    return not _compile_failed and os.environ.get("LOWPREC_COMPILE", "1") != "0"


def _apply(kernel: Callable, x: Tensor, out: Tensor | None, *args) -> Tensor:
    """Upcast half types, run ``kernel``, cast back, write ``out``: one fused pass when compiled.

    A half type's NaN does not survive the round trip through float32 (torch's casts canonicalise it, dropping
    sign and payload), so x's NaNs are put back bit for bit, selected on the 16-bit integer views."""
    if x.dtype in (torch.float32, torch.float64):
        y = kernel(x, *args)
    else:
        y = kernel(x.float(), *args).to(x.dtype)
        y = torch.where(torch.isnan(x), x.view(torch.int16), y.view(torch.int16)).view(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


@functools.cache
def _compiled_apply() -> Callable:
    # Each (kernel, static parameters) pair is one compiled graph of ``_apply``; allow enough of them. Set here,
    # at the first compilation, so that importing lowprec does not import torch's compiler (a second).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_apply, dynamic=True)


def _apply_static_ints(kernel: Callable, x: Tensor, out: Tensor | None, *args) -> Tensor:
    """``_apply`` as its own frame, compiled with automatic dynamic shapes (``_compiled_apply_static_ints``)."""
    return _apply(kernel, x, out, *args)


@functools.cache
def _compiled_apply_static_ints() -> Callable:
    # For kernels with a block size baked in (``scaled_kernels.constant_block``): under dynamic=True every int a
    # graph sees becomes symbolic, and a symbolic row length is not vectorised; automatic dynamic makes the tensor
    # length dynamic once it varies, and specialize_int/float keep every int and float argument (the format's
    # parameters, the rounding mode) a constant: without them automatic dynamic turned those that differed between
    # two formats symbolic too (measured: MX stochastic 10x slower after a few other formats had been compiled).
    _compiled_apply()
    compiled = torch.compile(_apply_static_ints, dynamic=None)

    def run(*args: object) -> Tensor:
        with torch._dynamo.config.patch(specialize_int=True, specialize_float=True):
            return compiled(*args)

    return run


def _run_split(split: tuple[Callable, Callable], xr: Tensor, outr: Tensor, args: tuple) -> bool:
    """A block kernel as its two CPU kernels (``kernel.cpu_split``: e.g. ``scaled_kernels.mx_scales`` and
    ``mx_elements``): per-row scales, then the elements from them (those marked ``reads_bits`` read x as float32
    and as int32 and write int32: a compiled CPU kernel bitcasts one element at a time, through memory). One
    fused kernel computing a reduction per row and the rounding of its elements ran 1.2-1.9x slower than the two
    (measured on a CPU: MX nearest, NVFP4). False, and nothing written,
    where the scales' kernel says its rows need the general kernel (``exact``: a scalar read on the CPU, free)."""
    scales, elements = split
    exact, *per_row = _compiled_apply_static_ints()(scales, xr, None, *args)
    if not bool(exact):
        return False
    if getattr(elements, "reads_bits", False):  # it takes x as float32 and as int32 and returns int32 bits
        xi, outr = xr.view(torch.int32), outr.view(torch.int32)
        torch._dynamo.mark_static(xi, 1)
        torch._dynamo.mark_static(outr, 1)
        per_row = [xi, *per_row]
    _compiled_apply_static_ints()(elements, xr, outr, *per_row, *args)
    return True


def _run(kernel: Callable, x: Tensor, out: Tensor | None, *args) -> Tensor:
    global _compile_failed
    if x.numel() >= COMPILE_MIN_NUMEL and compile_enabled():
        compiled = _compiled_apply_static_ints if getattr(kernel, "static_ints", False) else _compiled_apply
        # The kernels act per element (or per whole tensor): a flat view gives one compiled graph for all ranks.
        flat = x.is_contiguous() and (out is None or out.is_contiguous()) and all(
            not isinstance(a, Tensor) or a.dim() == 0 for a in args
        )
        try:
            if flat:  # written into a tensor of x's shape: the result is never a view of a temporary
                out = torch.empty_like(x) if out is None else out
                # A block kernel sees rows of its block: its result then has the layout of ``out``, which the
                # compiled graph writes directly (a flat ``out`` would be filled from a temporary, one more pass).
                rows = (-1, kernel.rows) if hasattr(kernel, "rows") else (-1,)
                xr, outr = x.view(rows), out.view(rows)
                if len(rows) == 2:  # the row length stays a constant (a symbolic one is not vectorised)
                    torch._dynamo.mark_static(xr, 1)
                    torch._dynamo.mark_static(outr, 1)
                split = getattr(kernel, "cpu_split", None)
                # the split kernels read and write float32 rows (a half container runs the one kernel)
                if split is None or x.device.type != "cpu" or x.dtype != torch.float32 or not _run_split(
                        split, xr, outr, args):
                    compiled()(kernel, xr, outr, *args)
                return out
            return compiled()(kernel, x, out, *args)
        except Exception as err:  # no C++ compiler, unsupported platform, ...: eager gives the same bits
            _compile_failed = True
            warnings.warn(
                f"lowprec: torch.compile failed ({type(err).__name__}: {err}); quantizing eagerly from now on.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _apply(kernel, x, out, *args)


@torch.compiler.disable
def count_above(x: Tensor, thresholds: Sequence[float]) -> Tensor:
    """How many elements of |x| exceed each threshold (float32 counts, exact below 2**24; NaN never counts).

    ``host.counts_above``: a 0/1 compare summed per threshold. On a CPU, where reading a scalar is free, the peak
    |x| is read first (a threshold it does not exceed counts 0 without a pass) and the counts come back as one
    tensor built from host numbers instead of a stack of device scalars."""
    a = x.detach().abs()
    a = a if a.dtype in (torch.float32, torch.float64) else a.float()  # thresholds exact, not rounded to half
    on_host = a.device.type == "cpu"
    peak = a.amax().item() if on_host and a.numel() else math.inf  # NaN: count everything (NaN never counts)
    counts = host.counts_above(a, list(thresholds), peak)
    if on_host:
        return torch.tensor([0.0 if c is None else c.item() for c in counts])
    return torch.stack([a.new_zeros(()) if c is None else c for c in counts]).float()


@torch.compiler.disable
def quantize_counting(
    x: Tensor,
    fmt: DynamicFixedPoint,
    int_bits: int,
    thresholds: Sequence[float],
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(quantize(x, fmt, rounding, generator=generator, int_bits=int_bits), count_above(x, thresholds))``:
    what the overflow-rate rule of dynamic fixed point does to every tensor it rounds. A float32 CPU tensor
    rounded to nearest shares one scaled copy between the two (``host.fixed_counting``); the results are those
    of the two calls."""
    fmt.check_fits(x.dtype)
    if (isinstance(fmt, DynamicFixedPoint) and isinstance(int_bits, int) and x.numel()
            and _fast(x, kernels.ROUNDINGS.get(rounding))):
        lo, hi = _frac_range(fmt.bits, x.dtype)
        kmax = 2 ** (fmt.bits - 1) - 1
        frac = min(max(fmt.bits - 1 - int_bits, lo), hi)
        grid = _grid(fmt.bits, frac)
        got = host.fixed_counting(x, frac, -kmax - 1, kmax, tuple(thresholds), _encoder(x, grid))
        if got is not None:
            y, counts, codes = got
            return (y if grid is None else mark(y, grid, codes)), torch.tensor(counts)
    return quantize(x, fmt, rounding, generator=generator, int_bits=int_bits), count_above(x, thresholds)


def _draw_key(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One int64 per call from ``generator`` (or the device's default generator)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but the tensor on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )
    return torch.randint(0, 2**62, (), generator=generator, device=device, dtype=torch.int64)


def max_abs_int_bits(x: Tensor, dim_block: int | None = None) -> Tensor:
    """The max-abs exponent rule: the smallest integer r with max|x| < 2**r (as an int32 tensor, no sync).

    With ``dim_block``, one r per row of ``x.reshape(-1, dim_block)``. All-zero (or empty) input gives 0
    (any r represents zeros exactly). NaN and inf are ignored.
    """
    a = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0)
    if dim_block:
        amax = a.reshape(-1, dim_block).amax(dim=1, keepdim=True)
    else:
        amax = a.amax() if a.numel() else a.new_zeros(())
    _, exponent = torch.frexp(amax)  # amax = f * 2**exponent, f in [0.5, 1): 2**(exponent-1) <= amax < 2**exponent
    return torch.where(amax > 0, exponent, 0).to(torch.int32)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The container the kernels compute in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _frac_range(word: int, dtype: torch.dtype) -> tuple[int, int]:
    """Fraction bits a ``word``-bit fixed point may have in ``dtype``: the step no finer than the dtype's smallest
    subnormal (2**-149 in float32, 2**-1074 in float64, 2**-133 in bfloat16, 2**-24 in float16); the range no
    wider than the dtype's. (The float32 kernels scale by 2**frac in two exact factors where 2**frac is not a
    normal float32: ``kernels.times_pow2``.)"""
    c = container_of(dtype)
    return word - 1 - c.emax, -c.smallest_exponent


def _fixed(
    x: Tensor, out: Tensor | None, word: int, frac: Tensor | int, rounding: int, key: Tensor | None,
    peak: float | None = None,
) -> Tensor:
    """Fixed-point rounding with a (possibly tensor-valued) number of fraction bits; ``peak``: max|x| when known
    (finite), for the host path."""
    wide = _wide(x.dtype)
    lo, hi = _frac_range(word, x.dtype)
    kmin, kmax = -(2 ** (word - 1)), 2 ** (word - 1) - 1
    if _fast(x, rounding) and (not isinstance(frac, Tensor) or frac.numel() == 1):
        frac = min(max(int(frac), lo), hi)
        grid = _grid(word, frac)
        y, codes = host.fixed_scaled_coded(x, out, frac, kmin, kmax, peak, _encoder(x, grid))
        return y if grid is None else mark(y, grid, codes)  # as _on_grid, with the codes the rounding made
    frac_t = torch.clamp(torch.as_tensor(frac, dtype=torch.int32, device=x.device), lo, hi)
    if wide == torch.float32:
        return _run(kernels.fixed_fast, x, out, frac_t, kmin, kmax, rounding, key)
    step = torch.ldexp(torch.ones_like(frac_t, dtype=wide), -frac_t)
    lo, hi = kmin * step, kmax * step
    return _run(kernels.fixed_grid, x, out, -frac_t.to(torch.int64), lo, hi, rounding, key)


def _encoder(x: Tensor, grid: FixedPoint | None) -> Callable[[Tensor], Codes | None] | None:
    """What a host-path rounding of ``x`` onto ``grid`` hands its integer codes to, to make the result's packed
    form as it rounds (``packing.codes_form``): only where a saved-tensor hook will take that form
    (``packing.rounding_packs``) and the grid is a ``fixed<...>`` one; None otherwise."""
    if grid is None or not rounding_packs(x):
        return None
    return lambda k: codes_form(k, grid, x.dtype)


def _grid(word: int, frac: int) -> FixedPoint | None:
    """The ``fixed<word, frac>`` grid a rounding used, or None for a step outside what ``fixed<...>`` allows
    (FRAC_RANGE: values below 2**-100)."""
    return FixedPoint(word, frac) if FRAC_RANGE[0] <= frac <= FRAC_RANGE[1] else None


def _on_grid(y: Tensor, word: int, frac: int) -> Tensor:
    """``y``, marked (``packing.mark``) with the fixed-point grid its rounding used (``_grid``): a ``dfx``
    tensor's packed codes then come from that exponent, with no second pass to find it. Outside FRAC_RANGE
    ``y`` is left unmarked: packing finds the exponent itself."""
    grid = _grid(word, frac)
    return y if grid is None else mark(y, grid)


def quantize_codes(x: Tensor, fmt: Format, rounding: str = "nearest") -> tuple[Tensor, int] | None:
    """``quantize(x, fmt, rounding)`` as (k, frac), its integer codes and fraction bits: the result is k * 2**-frac
    bit for bit (the ``fixed<bits, frac>`` grid ``quantize`` marks it with). k is a new float tensor of x's dtype
    and shape, the rounding's own scaled values before their scaling back, so codes cost no second pass.
    Served for dynamic fixed point with the max-abs exponent (``int_bits`` None) on the host path (a float32 CPU
    tensor rounded to nearest, no NaN or inf, a step inside ``FRAC_RANGE``); None otherwise, having done
    nothing: the caller rounds with ``quantize``."""
    if (not isinstance(fmt, DynamicFixedPoint) or kernels.ROUNDINGS.get(rounding) != kernels.NEAREST
            or x.numel() == 0 or not _fast(x, kernels.NEAREST)):
        return None
    fmt.check_fits(x.dtype)
    found = host.max_abs_exponent(x)
    if found is None:
        return None
    lo, hi = _frac_range(fmt.bits, x.dtype)
    frac = min(max(fmt.bits - 1 - found[0], lo), hi)  # as _fixed
    if _grid(fmt.bits, frac) is None:
        return None
    return host.fixed_codes(x, frac, -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1, found[1]), frac


def _fast(x: Tensor, rounding: int, limit: int = HOST_MAX_NUMEL) -> bool:
    """Whether ``host.py`` serves this call: a float32 CPU tensor (reading a scalar back is free there; a GPU runs
    the compiled kernels) rounded to nearest, below ``limit`` elements or with no compiler to fuse the kernels."""
    return (FAST_PATHS and x.dtype == torch.float32 and rounding == kernels.NEAREST and x.device.type == "cpu"
            and (x.numel() < limit or not compile_enabled()))


def _float_fp32_params(fmt: FloatFormat, rounding: int) -> tuple:
    """The static parameters of ``kernels.float_fast_fp32`` (after ``rounding`` and ``key``) for ``fmt``."""
    saturate = fmt.overflow == "saturate"
    max_bits, shift = kernels.f32_bits(fmt.max_value), 23 - fmt.man_bits
    big = max_bits if saturate else 0x7F800000
    overflow = max_bits if rounding == kernels.TOWARD_ZERO else big  # truncation never reaches inf
    # m = 0: the lowest kept significand bit is the implicit 1 of every normal (odd), so a normal tie
    # rounds up; float32 subnormals (no implicit 1) then take the subnormal branch even when emin = -126.
    round_add, odd_bit = ((1 << shift >> 1) - 1, 1) if 0 < shift < 23 else (1 << shift >> 1, 0)
    return (shift, 31 - shift, round_add, odd_bit, -(1 << shift), (1 << shift) - 1, (fmt.emin + 127) << 23, max_bits,
            overflow, big, 2.0 ** (fmt.man_bits - fmt.emin), fmt.emin > -126 or fmt.man_bits == 0, not fmt.subnormals)


def _round_scaled_float(x: Tensor, s: Tensor, out: Tensor | None, fmt: FloatFormat, rounding: int,
                        key: Tensor | None) -> Tensor:
    """fl(q / s) with q = ``fmt``'s rounding of fl(x * s), x's NaNs kept (float32 ``x``, positive finite scale
    ``s`` broadcasting against it): one fused pass (``kernels.scaled_float_fp32``), or, for small CPU tensors
    rounded to nearest onto a torch dtype, the cast's few ops."""
    if fmt in _CASTS and _fast(x, rounding, COMPILE_MIN_NUMEL):
        return torch.where(torch.isnan(x), x, kernels.descale(host.cast_round_trip(x * s, None, _CASTS[fmt]), s),
                           out=out)
    return _run(kernels.scaled_float_fp32, x, out, s, rounding, key, *_float_fp32_params(fmt, rounding))


def _dispatch(
    x: Tensor, out: Tensor | None, fmt: Format, rounding: int, key: Tensor | None, int_bits
) -> Tensor:
    if isinstance(fmt, FloatFormat):
        if fmt in _CASTS and _fast(x, rounding, COMPILE_MIN_NUMEL):
            return host.cast_round_trip(x, out, _CASTS[fmt])
        if _wide(x.dtype) == torch.float32:
            return _run(kernels.float_fast_fp32, x, out, rounding, key, *_float_fp32_params(fmt, rounding))
        saturate = fmt.overflow == "saturate"
        max_value = torch.tensor(fmt.max_value, dtype=_wide(x.dtype), device=x.device)
        return _run(
            kernels.float_grid, x, out, fmt.man_bits, fmt.emin - fmt.man_bits, fmt.min_normal,
            not fmt.subnormals, max_value, saturate, rounding, key,
        )
    if isinstance(fmt, FixedPoint):
        return _fixed(x, out, fmt.word, fmt.frac, rounding, key)
    if isinstance(fmt, DynamicFixedPoint):
        if int_bits is None and _fast(x, rounding):
            found = host.max_abs_exponent(x)  # None when x holds NaN/inf: the kernel's rule skips them
            if found is not None:
                return _fixed(x, out, fmt.bits, fmt.bits - 1 - found[0], rounding, key, peak=found[1])
        if int_bits is None and _wide(x.dtype) == torch.float32:  # max-abs rule fused with the rounding
            lo, hi = _frac_range(fmt.bits, x.dtype)
            kmin, kmax = -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
            return _run(kernels.dfx_maxabs_fp32, x, out, kmin, kmax, fmt.bits - 1, lo, hi, rounding, key)
        if isinstance(int_bits, int):
            return _fixed(x, out, fmt.bits, fmt.bits - 1 - int_bits, rounding, key)
        r = max_abs_int_bits(x) if int_bits is None else torch.as_tensor(int_bits, device=x.device)
        return _fixed(x, out, fmt.bits, fmt.bits - 1 - r, rounding, key)
    if isinstance(fmt, BlockFloat):
        kmin, kmax = -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
        pad = (-x.numel()) % fmt.block
        flat = torch.nn.functional.pad(x.reshape(-1), (0, pad)) if pad else x.reshape(-1)  # a copy only if ragged
        # the result is written into ``out`` (a new tensor of x's shape when None), never a view of the blocks
        out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
        if _wide(x.dtype) == torch.float32:
            lo, hi = _frac_range(fmt.bits, x.dtype)
            direct = not pad and out.is_contiguous()
            y = _run(constant_block(kernels.block_fp32, fmt.block), flat, out.view(-1) if direct else None, kmin,
                     kmax, fmt.bits - 1, lo, hi, rounding, key)
            return out if direct else out.copy_(y[: x.numel()].view(x.shape))
        blocks = flat.view(-1, fmt.block)
        r = max_abs_int_bits(blocks, fmt.block)
        y = _fixed(blocks, None, fmt.bits, fmt.bits - 1 - r, rounding, key).reshape(-1)[: x.numel()].view(x.shape)
        return out.copy_(y)
    if isinstance(fmt, Uniform):
        binary = fmt.signed and fmt.bits == 1
        if not binary and _fast(x, rounding):
            return host.uniform_scaled(x, out, fmt.levels, fmt.signed)
        return _run(kernels.uniform_grid, x, out, fmt.levels, fmt.signed, binary, rounding, key)
    raise TypeError(f"not a lowprec format: {fmt!r}")


def _identity_for(fmt: Format, dtype: torch.dtype) -> bool:
    """True when every value of ``dtype`` already lies in ``fmt`` with the same rules (nothing to do)."""
    if not isinstance(fmt, FloatFormat) or not fmt.subnormals or fmt.overflow != "inf" or fmt.finite:
        return False
    c = container_of(dtype)
    return fmt.man_bits >= c.man_bits and fmt.emin <= c.emin and fmt.emax >= c.emax


@torch.compiler.disable
def quantize(
    x: Tensor,
    fmt: Format | str,
    rounding: str = "nearest",
    *,
    generator: torch.Generator | None = None,
    int_bits: int | Tensor | None = None,
    out: Tensor | None = None,
    scale: Tensor | float | None = None,
) -> Tensor:
    """Round every element of ``x`` onto the number format ``fmt``; the result has x's dtype and shape.

    rounding:
      * ``"nearest"``: to the nearest value, ties to even (the IEEE default; torch's own casts).
      * ``"stochastic"``: up or down with probabilities proportional to the distance (unbiased). Random bits
        come from ``generator`` (or the device's default generator): the same state gives the same result.
      * ``"toward_zero"``: truncation; never rounds a finite value to inf.

    Overflow, NaN, inf, subnormals and the sign of zero follow the format (docs/formats.md): -0 stays -0,
    NaN stays the same NaN. ``int_bits`` sets the exponent of a ``dfx`` format (default: the max-abs rule
    on x). ``out`` receives the result in place (no allocation: the fastest way to quantize). When x's own
    dtype already holds exactly the format (fp32 on a float32 tensor), x itself is returned; otherwise the
    result is ``out`` or a new tensor, never a view (autograd lets in-place ops follow it). An empty tensor
    gives an empty tensor, in every format. ``scale`` sets the scale of a per-tensor scaled float
    (``scaled<...>``; default: current scaling from x's amax; delayed scaling needs it).

    Raises TypeError for a non-float tensor, ValueError for a format x's dtype cannot hold exactly, an
    unknown rounding, a generator on another device, or a mismatched ``out``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if isinstance(fmt, str):
        fmt = parse_format(fmt)
    elif not isinstance(fmt, Format):
        raise TypeError(f"fmt must be a lowprec format or a format string, got {type(fmt).__name__}")
    if rounding not in kernels.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {sorted(kernels.ROUNDINGS)}")
    container_of(x.dtype)
    fmt.check_fits(x.dtype)
    if int_bits is not None and not isinstance(fmt, DynamicFixedPoint):
        raise ValueError(f"int_bits only applies to dynamic fixed point (dfx<bits>), not {fmt!r}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(
            f"out must match x: got {tuple(out.shape)} {out.dtype} on {out.device}, "
            f"need {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if scale is not None and not isinstance(fmt, ScaledFloat):
        raise ValueError(f"scale= applies to per-tensor scaled floats (scaled<...>), not {fmt!r}")
    mode = kernels.ROUNDINGS[rounding]
    key = _draw_key(generator, x.device) if mode == kernels.STOCHASTIC else None
    if _identity_for(fmt, x.dtype) or x.numel() == 0:
        return x if out is None else out.copy_(x)
    if isinstance(fmt, ScaledFormat):
        return quantize_scaled(x, out, fmt, mode, key, scale, _run, _round_scaled_float)
    return _dispatch(x, out, fmt, mode, key, int_bits)
