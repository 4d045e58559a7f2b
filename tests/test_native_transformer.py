"""The native bf16 path on transformer pieces: nn.TransformerEncoderLayer (MultiheadAttention, LayerNorm),
SDPA and hand-written attention, GroupNorm with ConvTranspose; norms with float32 statistics; pickling."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp
from lowprec.models import GPT
from lowprec.nn.native import compute_dtype

pytestmark = [pytest.mark.skipif(compute_dtype(torch.bfloat16, "cpu") != torch.bfloat16,
                                 reason="this CPU has no native bf16 matmul"),
              pytest.mark.usefixtures("eager_update")]
HALF_SPACING = 2.0**-8  # bf16 rounds to nearest with 8 significant bits: |rounded - x| <= 2^-8 |x|


def _native(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model the native path covers converts without a warning
        return lp.convert(model, "native-bf16")


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                         nn.Flatten(), nn.Linear(5 * 32, 3))


@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_layer_runs_in_bf16_with_float32_norms(train):
    plain = _encoder().train(train)
    model = _native(plain).train(train)
    layer = model[0]
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".norm" in name else torch.bfloat16), name
    seen = {}
    for name in ("self_attn", "norm1", "linear1"):
        getattr(layer, name).register_forward_hook(
            lambda m, a, out, name=name: seen.update({name: (out[0] if isinstance(out, tuple) else out).dtype}))
    x = torch.randn(4, 5, 32)
    with torch.set_grad_enabled(train):  # eval without grad: torch's fused encoder fast path
        out = model(x)
        expected = plain(x)
    assert out.dtype == torch.float32
    if train:
        assert seen == dict.fromkeys(("self_attn", "norm1", "linear1"), torch.bfloat16)  # attention in bf16
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)  # the same function, in bf16
    if train:
        out.square().sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("norm", [nn.LayerNorm(24), nn.GroupNorm(4, 24)], ids=["layer", "group"])
def test_norms_keep_float32_statistics_and_round_once(norm):
    """A native norm on bf16 input: float32 parameters, mean and variance in float32 and the output rounded to
    bf16 once, so it is the float32 norm of the same bf16 values within half a bf16 spacing (+ fp32 noise). A norm
    whose statistics were bf16 misses that on inputs with a large common offset."""
    torch.manual_seed(2)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    model = _native(nn.Sequential(nn.Linear(24, 24), copy.deepcopy(norm)))
    assert model[1].weight.dtype == torch.float32
    x = (torch.randn(64, 24) * 4 + 300).bfloat16()
    got = model[1](x)
    expected = norm(x.float())
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).abs() <= expected.abs() * HALF_SPACING + 1e-5).all()
    all_bf16 = copy.deepcopy(norm).bfloat16()(x).float()
    assert not ((all_bf16 - expected).abs() <= expected.abs() * HALF_SPACING + 1e-5).all()


def test_conv_transpose_group_norm_generator_trains_natively():
    torch.manual_seed(1)
    gen = nn.Sequential(nn.ConvTranspose2d(8, 16, 4, 2, 1), nn.GroupNorm(4, 16), nn.ReLU(),
                        nn.Conv2d(16, 1, 3, padding=1))
    model = _native(gen)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "native-bf16")
    z, target = torch.randn(8, 8, 4, 4), torch.rand(8, 1, 8, 8)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(z), target)
        trainer.step(loss)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("fused", [False, True], ids=["hand-written", "sdpa"])
def test_gpt_attention_runs_on_bf16_operands_with_a_float32_softmax(fused):
    torch.manual_seed(0)
    plain = GPT(17, block_size=12, n_layer=1, n_embd=32, n_head=4, fused_attention=fused)
    model = _native(plain)
    operands = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "scaled_dot_product_attention"):
                operands.append(tuple(a.dtype for a in args[:3]))
            if func is F.softmax:
                operands.append(("softmax", args[0].dtype))
            return func(*args, **(kwargs or {}))

    x = torch.randint(0, 17, (3, 12))
    with Watch():
        out = model(x)
    if fused:
        assert operands == [(torch.bfloat16,) * 3]
    else:
        assert operands == [(torch.bfloat16,) * 2, ("softmax", torch.float32), (torch.bfloat16,) * 2]
    torch.testing.assert_close(out, plain(x), rtol=0.05, atol=0.05)


def test_whole_native_model_pickles_with_float32_modules():
    torch.manual_seed(0)
    model = _native(nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Softmax(dim=-1)))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m).__name__ for m in loaded] == ["NativeLinear", "LayerNorm", "NativeSoftmax"]
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), model(x)) and loaded(x).dtype == torch.float32
