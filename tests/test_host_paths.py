"""The few-op paths of formats/host.py give the kernels' bits on any float32 input, whatever its size."""

import importlib

import numpy as np
import pytest
import torch

import lowprec as lp
from lowprec.formats import host, kernels

quantize_module = importlib.import_module("lowprec.formats.quantize")


def _random_bits(n: int, seed: int) -> torch.Tensor:
    """Any float32 bit pattern: NaNs with payloads, infs, subnormals, -0, and every binade."""
    bits = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    x = torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.5, -2.5])
    return x


def _kernels(x, fmt, monkeypatch):
    monkeypatch.setattr(quantize_module, "FAST_PATHS", False)
    y = lp.quantize(x, fmt)
    monkeypatch.setattr(quantize_module, "FAST_PATHS", True)
    return y


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("name", ["fp16", "bf16", "e4m3", "e5m2"])
def test_cast_round_trip_equals_the_float_kernel(name, monkeypatch):
    x = _random_bits(200_000, 1)
    fmt = lp.parse_format(name)
    got = host.cast_round_trip(x, None, quantize_module._CASTS[fmt])
    assert _same(got, _kernels(x, fmt, monkeypatch))  # NaN payloads included


@pytest.mark.parametrize("name", ["fixed<16,8>", "fixed<8,0>", "fixed<24,30>", "uniform<4>", "uniform<3,unsigned>"])
def test_fixed_and_uniform_paths_equal_the_kernels(name, monkeypatch):
    x = _random_bits(200_000, 2)
    x[6:1000] = torch.linspace(-300, 300, 994)  # the in-range part of the grids, ties included
    fmt = lp.parse_format(name)
    assert _same(lp.quantize(x, fmt), _kernels(x, fmt, monkeypatch))


@pytest.mark.parametrize("scale", [2.0**-140, 2.0**-20, 1.0, 2.0**60])
def test_dfx_host_exponent_equals_the_kernel(scale, monkeypatch):
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3)) * scale
    fmt = lp.parse_format("dfx<8>")
    assert host.max_abs_exponent(x)[1] == x.abs().max().item()
    assert _same(lp.quantize(x, fmt), _kernels(x, fmt, monkeypatch))
    x[5] = float("nan")  # a NaN: the exponent must skip it, the general kernel does
    assert host.max_abs_exponent(x) is None
    assert _same(lp.quantize(x, fmt), _kernels(x, fmt, monkeypatch))


def test_only_nearest_and_float32_take_the_host_paths():
    x = torch.randn(10)
    assert quantize_module._fast(x, kernels.NEAREST)
    assert not quantize_module._fast(x, kernels.TOWARD_ZERO)
    assert not quantize_module._fast(x.double(), kernels.NEAREST)
    assert not quantize_module._fast(torch.randn(quantize_module.HOST_MAX_NUMEL), kernels.NEAREST)


@pytest.mark.parametrize("bits, int_bits", [(10, 3), (8, 0), (12, -20), (10, 40)])
@pytest.mark.parametrize("scale", [2.0**-30, 1.0, 2.0**35])
def test_quantize_counting_equals_quantize_and_count_above(bits, int_bits, scale, monkeypatch):
    """The shared pass gives the bits of the kernels and exactly count_above's counts, ties at the thresholds
    and at the edge of the word included."""
    fmt = lp.parse_format(f"dfx<{bits}>")
    g = lp.scaling.DynamicExponent(fmt, int_bits=int_bits)
    thresholds = g.thresholds()
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(bits)) * scale * 2.0**int_bits
    step = fmt.at(int_bits).step
    x[:8] = torch.tensor([thresholds[0], -thresholds[0], thresholds[1], -thresholds[1],
                          thresholds[1] + step / 4, fmt.at(int_bits).max_value + step, -0.0, step / 2])
    y, counts = lp.formats.quantize_counting(x, fmt, int_bits, thresholds)
    assert _same(y, _kernels(x, fmt.at(int_bits), monkeypatch))
    assert counts.tolist() == [float((x.abs() > t).sum()) for t in thresholds]


@pytest.mark.parametrize("special", [float("nan"), float("inf"), 3e38])
def test_quantize_counting_hands_nan_inf_and_overflowing_scale_to_the_general_paths(special, monkeypatch):
    fmt = lp.parse_format("dfx<8>")
    x = torch.randn(5000, generator=torch.Generator().manual_seed(5))
    x[17] = special
    assert host.fixed_counting(x, fmt.bits - 1 - 2, -128, 127, (1.0,)) is None  # 3e38 * 2**5 is inf
    y, counts = lp.formats.quantize_counting(x, fmt, 2, (1.0, 1.5))
    assert _same(y, _kernels(x, fmt.at(2), monkeypatch))
    assert counts.tolist() == [float((x.abs() > t).sum()) for t in (1.0, 1.5)]


@pytest.mark.parametrize("peak", [127.5 / 128, -127.5 / 128, 127.25 / 128, 126.5 / 128, -1.0, 0.5, 2.0**-130])
def test_dfx_maxabs_host_path_clamps_exactly_when_the_peak_rounds_past_the_word(peak, monkeypatch):
    """max|x| scaled to 127.5 rounds (ties to even) to 128 and must saturate at 127; below it no value can pass
    the word and the host path skips the clamp: both agree with the kernel bit for bit."""
    fmt = lp.parse_format("dfx<8>")
    x = torch.linspace(-0.7, 0.7, 1001) * abs(peak)
    x[17] = peak
    assert _same(lp.quantize(x, fmt), _kernels(x, fmt, monkeypatch))
    if abs(peak) == 127.5 / 128:
        assert lp.quantize(x, fmt)[17].item() == (127 / 128 if peak > 0 else -1.0)
