"""lowprec.models: every registered model's output shape, a backward with finite non-zero gradients for every
parameter, widths, parameter counts and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lowprec.models import DCGAN, MODELS, LeNet, SmallCNN, build_model, resnet20


@dataclass(frozen=True)
class Case:
    """How to build a model on a tiny batch and what its output looks like."""

    kwargs: dict = field(default_factory=dict)
    run: Callable[[nn.Module], torch.Tensor] = lambda m: m(torch.randn(3, 1, 28, 28))
    shape: tuple[int, ...] = (3, 10)


def _run_lstm(model: nn.Module) -> torch.Tensor:
    return model(torch.randn(3, 7, 13), torch.tensor([7, 3, 5]))


def _run_gan(model: nn.Module) -> torch.Tensor:
    return model.discriminator(model.generator(torch.randn(3, model.nz)))


CASES: dict[str, Case] = {
    "lenet": Case(),
    "maxout-mlp": Case(),
    "conv-maxout": Case(),
    "small-cnn": Case(),
    "resnet20": Case(run=lambda m: m(torch.randn(3, 3, 32, 32))),
    "lstm": Case(run=_run_lstm),
    "char-lstm": Case(kwargs={"vocab_size": 11}, run=lambda m: m(torch.randint(0, 11, (3, 6))), shape=(3, 6, 11)),
    "dcgan": Case(run=_run_gan, shape=(3,)),
    "gpt": Case(kwargs={"vocab_size": 11, "block_size": 8, "n_embd": 16, "n_head": 2},
                run=lambda m: m(torch.randint(0, 11, (3, 6))), shape=(3, 6, 11)),
}


def build_case(name: str) -> nn.Module:
    """The model, with a zero-initialised softmax layer (Courbariaux's maxout nets) given random weights:
    with W = 0 no gradient reaches the layers below it, and we want every parameter's gradient."""
    model = build_model(name, **CASES[name].kwargs)
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, 0.0, 0.1)
    return model


def backward(model: nn.Module, name: str) -> torch.Tensor:
    out = CASES[name].run(model)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out


def test_every_registered_model_has_a_case():
    assert set(CASES) == set(MODELS) == {
        "lenet", "maxout-mlp", "conv-maxout", "small-cnn", "resnet20", "lstm", "char-lstm", "dcgan", "gpt"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_finite_nonzero_grads(name):
    model = build_case(name).train()
    out = backward(model, name)
    assert out.shape == CASES[name].shape
    assert torch.isfinite(out).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_mode_forward(name):
    model = build_case(name).eval()
    with torch.no_grad():
        out = CASES[name].run(model)
    assert out.shape == CASES[name].shape and torch.isfinite(out).all()


def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    # Caffe LeNet: conv1 20*1*25+20 = 520, conv2 50*20*25+50 = 25,050, ip1 800*500+500 = 400,500,
    # ip2 500*10+10 = 5,010
    assert _nparams(LeNet()) == 431_080
    # ResNet-20, option A (no shortcut parameters), convs without bias:
    #   conv1 3*16*9 = 432, its BN 2*16 = 32
    #   stage 1: 6 convs 16*16*9 = 6*2,304 = 13,824, 6 BNs 6*32 = 192
    #   stage 2: 16*32*9 = 4,608 + 5 * 32*32*9 = 46,080 -> 50,688, 6 BNs 6*64 = 384
    #   stage 3: 32*64*9 = 18,432 + 5 * 64*64*9 = 184,320 -> 202,752, 6 BNs 6*128 = 768
    #   fc 64*10+10 = 650
    #   432+32 + 13,824+192 + 50,688+384 + 202,752+768 + 650 = 269,722 (He et al.: 0.27M)
    assert _nparams(resnet20()) == 269_722
    # Courbariaux PI-MNIST: 784*1200+1200 + 240*1200+1200 + 240*10+10
    assert _nparams(build_model("maxout-mlp")) == 942_000 + 289_200 + 2_410
    # Courbariaux MNIST conv: (96*1*64+96) + (96*48*64+96) + (96*48*25+96) + (216*10+10)
    assert _nparams(build_model("conv-maxout")) == 6_240 + 295_008 + 115_296 + 2_170


def test_resnet20_width_two_has_about_four_times_the_parameters():
    ratio = _nparams(resnet20(width=2)) / _nparams(resnet20())
    assert 3.5 <= ratio <= 4.1
    assert _nparams(resnet20(width=2)) == 1_073_962


def test_width_scales_hidden_layers_only():
    lenet = LeNet(num_classes=7, width=2)
    convs = [m for m in lenet.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in lenet.modules() if isinstance(m, nn.Linear)]
    assert [c.in_channels for c in convs] == [1, 40] and [c.out_channels for c in convs] == [40, 100]
    assert [(f.in_features, f.out_features) for f in fcs] == [(1600, 1000), (1000, 7)]

    cnn = SmallCNN(num_classes=5, in_channels=3, width=0.5)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64] and convs[0].in_channels == 3
    assert (cnn.fc.in_features, cnn.fc.out_features) == (64, 5)
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 5)

    net = resnet20(num_classes=100, width=1.5, in_channels=1)
    assert net.conv1.in_channels == 1 and net.fc.out_features == 100
    assert {m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)} == {24, 48, 96}
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 100)

    # rounding: int(round(c * width)), never below 1
    assert LeNet(width=0.01).features[0].out_channels == 1
    assert resnet20(width=1.3).layer3[0].conv1.out_channels == 83  # option A pads 42 -> 83 channels


@pytest.mark.parametrize("builder", [LeNet, SmallCNN, resnet20])
@pytest.mark.parametrize("width", [0, -1.0])
def test_nonpositive_width_is_an_error(builder, width):
    with pytest.raises(ValueError, match="width"):
        builder(width=width)


def test_layers_are_registered_in_data_flow_order():
    # policies name the first and last quantizable layer in module order (@first/@last): they must be the layer
    # that reads the input and the classifier
    inputs = {"lenet": 1, "small-cnn": 1, "resnet20": 3, "maxout-mlp": 784, "conv-maxout": 1, "lstm": 13}
    for name, size in inputs.items():
        layers = [m for m in build_model(name).modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LSTM))]
        first = layers[0]
        reads = {nn.Conv2d: "in_channels", nn.Linear: "in_features", nn.LSTM: "input_size"}[type(first)]
        assert getattr(first, reads) == size, name
        assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 10, name


def test_dcgan_sizes():
    for size in (28, 32):
        gan = DCGAN(nz=16, ngf=8, ndf=8, channels=3, image_size=size)
        images = gan(torch.randn(2, 16))
        assert images.shape == (2, 3, size, size) and images.abs().max() <= 1
        assert gan.discriminator(images).shape == (2,)
    with pytest.raises(ValueError, match="image_size"):
        DCGAN(image_size=30)


def test_dcgan_generator_is_fractionally_strided():
    """DCGAN's generator: a projection, then ConvTranspose2d(4, stride 2) layers doubling the side up to the
    image (7 -> 14 -> 28), the last one writing the channels, then tanh."""
    gan = DCGAN(nz=16, ngf=8, ndf=8)
    ups = [m for m in gan.generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in ups] == [
        (32, 16, (4, 4), (2, 2), (1, 1)), (16, 1, (4, 4), (2, 2), (1, 1))]
    assert not any(isinstance(m, (nn.Upsample, nn.Conv2d)) for m in gan.generator.modules())
    assert isinstance(list(gan.generator.modules())[-1], nn.Tanh)


@pytest.mark.parametrize("policy", ["int8+optimizer_state=int16", "mixed-fp16+loss_scale=none"])
def test_dcgan_every_gemm_and_conv_operand_is_quantized(policy):
    """lp.plan of one training step: every operand of every linear/conv/conv-transpose op of both networks,
    forward and backward, is in the policy's format (none left in fp32), the transposed convolutions included."""
    import lowprec as lp

    gan = DCGAN(nz=16, ngf=8, ndf=8)
    expected = "fp16" if "fp16" in policy else "dfx<8>"
    for net, x in ((gan.generator, torch.randn(4, 16)), (gan.discriminator, torch.randn(4, 1, 28, 28))):
        ops = [r for r in lp.plan(net, policy, x).ops if r.op in ("linear", "conv2d", "conv_transpose2d")]
        assert len(ops) == 3
        assert {r.op for r in ops} >= ({"conv_transpose2d"} if net is gan.generator else {"conv2d"})
        for r in ops:
            assert r.backward and r.operands, (r.module, r.op)
            assert all(o.quantized and o.format == expected for o in r.operands), (r.module, r.op, r.operands)


def test_build_model_unknown_name_lists_the_models():
    with pytest.raises(ValueError) as info:
        build_model("alexnet")
    message = str(info.value)
    assert "alexnet" in message
    for name in MODELS:
        assert name in message


def test_build_model_passes_kwargs():
    model = build_model("lenet", num_classes=3, width=0.5)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    with pytest.raises(TypeError):
        build_model("lenet", depth=3)


def test_resnet_releases_each_intermediate_once_the_next_layer_has_made_its_result():
    """Without a graph to keep them (no_grad here; under lowprec's packed storage the float32 activations are not
    what backward keeps), a block's conv2 input is gone while bn2 runs, the block's pre-shortcut sum's operand
    while relu2 runs, and the stem's output while layer2 runs: only a block's input lives on (its shortcut)."""
    import weakref

    model = resnet20().eval()
    made: dict[str, weakref.ref] = {}
    alive: dict[str, bool] = {}

    def keep(name: str):
        return lambda _m, _args, out: made.__setitem__(name, weakref.ref(out))

    def check(name: str, of: str):
        return lambda _m, _args: alive.__setitem__(name, made[of]() is not None)

    block = model.layer1[1]
    block.relu1.register_forward_hook(keep("relu1"))
    block.bn2.register_forward_hook(keep("bn2"))
    model.relu.register_forward_hook(keep("stem"))
    block.bn2.register_forward_pre_hook(check("conv2 input during bn2", "relu1"))
    block.relu2.register_forward_pre_hook(check("bn2 output during relu2", "bn2"))
    model.layer2.register_forward_pre_hook(check("stem output during layer2", "stem"))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert alive == {"conv2 input during bn2": False, "bn2 output during relu2": False,
                     "stem output during layer2": False}
