"""The custom training loop and conversion: stock models train, and every misuse is caught, not absorbed.

In-place ops after converted layers (autograd Functions never return views), clipping after ``unscale_`` on
the native path, ``apply_update`` without ``trainer.backward``, the Trainer's policy against the model's,
optimizers built before ``convert``, converting twice.
"""

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.formats import compile_enabled

quantize_module = importlib.import_module("lowprec.formats.quantize")

# -- in-place ops after a converted layer ----------------------------------------------------------------------

INPLACE_POLICIES = ["mixed-fp16", "mixed-bf16", "fp8-e4m3", "fp8-e5m2", "int8", "weight=int8"]


def _bn_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(16 * 64, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))


def _linear_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(inplace=True), nn.Linear(2048, 2))


def _not_inplace(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return twin


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model(x).square().sum().backward()
    return [p.grad for p in model.parameters()]


@pytest.fixture(params=["compiled", "eager"])
def kernel_path(request, monkeypatch):
    """lowprec's compiled kernels (fast paths off, so every format reaches them at >= 65,536 elements) or eager."""
    if request.param == "compiled":
        if not compile_enabled():
            pytest.skip("torch.compile unavailable here")
        monkeypatch.setattr(quantize_module, "FAST_PATHS", False)
    else:
        monkeypatch.setenv("LOWPREC_COMPILE", "0")
    return request.param


@pytest.mark.parametrize("policy", INPLACE_POLICIES)
@pytest.mark.parametrize("build, small, large", [
    (_bn_relu, (1, 3, 8, 8), (64, 3, 8, 8)),  # batch-norm output 1,024 / 65,536 elements
    (_linear_relu, (2, 64), (32, 64)),  # Linear(64, 2048) output 4,096 / 65,536 elements
], ids=["batchnorm", "linear-64-2048"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_inplace_relu_after_converted_layer_trains_with_the_same_gradients(policy, build, small, large, size,
                                                                           kernel_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(build(), policy)
    twin = _not_inplace(model)
    x = torch.randn(small if size == "small" else large)
    for got, want in zip(_grads(model, x), _grads(twin, x), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("policy", ["mixed-fp16", "int8", "weight=int8"])
def test_inplace_relu_after_converted_3d_linear_and_boundaries(policy):
    """A 3-d input (F.linear's result is a view) and role boundaries that pass their input through."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq = lp.convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 2)), policy)
        bn = lp.convert(nn.Sequential(nn.BatchNorm1d(8), nn.ReLU(inplace=True)), "output_grad=int8")
    for model, x in ((seq, torch.randn(2, 3, 8)), (bn, torch.randn(4, 8))):
        for got, want in zip(_grads(model, x), _grads(_not_inplace(model), x), strict=True):
            assert torch.equal(got, want)


@pytest.mark.skipif(not compile_enabled(), reason="needs torch.compile")
def test_inplace_relu_after_converted_layer_trains_under_torch_compile():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(_linear_relu(), "mixed-fp16")
    twin = _not_inplace(model)
    x = torch.randn(32, 64)
    got = _grads(torch.compile(model), x)
    for g, w in zip(got, _grads(twin, x), strict=True):
        assert torch.allclose(g, w, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e4m3", "dfx<8>", "fixed<12,5>", "uniform<3>", "bfp<6,32>",
                                 "bfp<6,48>"])
@pytest.mark.parametrize("numel", [1000, 1 << 16, (1 << 16) + 7])
def test_quantize_never_returns_a_view(fmt, numel, both_paths):
    x = torch.randn(numel // 4 + 1, 4)[: numel // 4] if numel % 4 == 0 else torch.randn(numel)
    y = lp.quantize(x, fmt)
    assert not y._is_view() and y.shape == x.shape and y.data_ptr() != x.data_ptr()
