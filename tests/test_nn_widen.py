"""lowprec.widen: WRPN's widening of every hidden layer by beta."""

import warnings

import pytest
import torch
from test_nn_models import lenet, mlp
from torch import nn

import lowprec as lp


def _shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_lenet_doubles_every_hidden_width_and_keeps_data_and_classes():
    wide = lp.widen(lenet(), 2)
    assert _shapes(wide) == {
        "0.weight": (12, 1, 5, 5), "0.bias": (12,),
        "3.weight": (32, 12, 5, 5), "3.bias": (32,),
        "7.weight": (64, 512), "7.bias": (64,),  # Flatten of 32 channels x 4 x 4
        "9.weight": (10, 64), "9.bias": (10,),
    }
    assert wide(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_from_a_factory_at_fractional_beta():
    wide = lp.widen(mlp, 1.5)
    assert [(m.in_features, m.out_features) for m in wide if isinstance(m, nn.Linear)] == [
        (784, 72), (72, 36), (36, 10)
    ]
    assert wide(torch.randn(3, 784)).shape == (3, 10)


def test_original_is_untouched_and_widened_layers_are_fresh():
    model = mlp()
    wide = lp.widen(model, 2)
    assert model[0].out_features == 48 and wide[0].out_features == 96
    assert wide[2] is not model[2] and type(wide[2]) is nn.Dropout


def test_batchnorm_follows_and_recurrent_hidden_sizes_scale():
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(8, 5))
    wide = lp.widen(convnet, 3)
    assert wide[1].num_features == 24 and wide[5].in_features == 24 and wide[5].out_features == 5
    assert wide(torch.randn(2, 3, 6, 6)).shape == (2, 5)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(30, 6)
            self.lstm = nn.LSTM(6, 10, num_layers=2, batch_first=True)
            self.head = nn.Linear(10, 4)

        def forward(self, tokens):
            return self.head(self.lstm(self.embedding(tokens))[0])

    tagger = lp.widen(Tagger(), 2)
    assert tagger.embedding.embedding_dim == 6
    assert (tagger.lstm.input_size, tagger.lstm.hidden_size, tagger.lstm.num_layers) == (6, 20, 2)
    assert tagger.lstm.batch_first and (tagger.head.in_features, tagger.head.out_features) == (20, 4)
    assert tagger(torch.randint(0, 30, (2, 5))).shape == (2, 5, 4)


def test_widened_model_converts_under_wrpn():
    q = lp.convert(lp.widen(lenet, 2), "wrpn-4-4")
    assert q(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert q[3].quantizing and not q[0].quantizing and not q[9].quantizing


def test_bad_arguments():
    for beta in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="beta"):
            lp.widen(mlp(), beta)
    with pytest.raises(TypeError, match="widen the plain model"):
        lp.widen(lp.convert(mlp(), "int8"), 2)
    with pytest.warns(UserWarning, match="1 \\(LayerNorm\\)"):
        lp.widen(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), 2)


def test_fill_clip_range_gives_wrpn_weights_nonzero_levels():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="2 100%"):
        model = lp.convert(nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(),
                                         nn.Linear(300, 10)), "wrpn-4-4+fill_clip_range=off")
    hidden = model[2]
    seen = lambda: lp.quantize(hidden.weight.detach(), "uniform<4>")  # noqa: E731
    assert torch.count_nonzero(seen()) == 0  # default init: |w| < 1/sqrt(300) < 1/14, all round to 0
    assert lp.nn.fill_clip_range(model) == ["2"]  # only the inner layer: @first/@last stay fp32
    assert hidden.weight.abs().max().item() == 1.0
    assert torch.count_nonzero(seen()) > 0.5 * hidden.weight.numel()


def _resnet_like():
    """The shapes that fail in a ResNet-18: 3x3 convolutions of 16 and 64 channels (fan-in 144 and 576)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         nn.Conv2d(16, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_wrpn_convert_warns_with_the_share_of_weights_that_round_to_zero_and_the_fix():
    model = _resnet_like()
    # independent count: uniform<4> rounds |w| < half a step (1/14) to 0
    shares = {name: (model[int(name)].weight.detach().abs() < 1 / 14).double().mean().item() for name in ("3", "6")}
    assert shares["6"] == 1.0 and 0.5 < shares["3"] < 1.0
    with pytest.warns(UserWarning) as caught:
        lp.convert(model, "wrpn-4-4+fill_clip_range=off")
    (message,) = [str(w.message) for w in caught if "round to 0" in str(w.message)]
    assert f"3 {100 * shares['3']:.0f}%, 6 100%" in message
    assert "lowprec.nn.fill_clip_range(model)" in message and "fill_clip_range=on" in message
    assert lp.nn.zero_weight_shares(lp.convert(model, "wrpn-4-4+fill_clip_range=off")) == pytest.approx(shares)


def test_wrpn_preset_fills_the_clip_range_at_convert_without_a_warning():
    model = _resnet_like()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = lp.convert(model, "wrpn-4-4")
    assert lp.Policy.preset("wrpn-4-4").fill_clip_range and not lp.Policy.preset("wrpn-32-4").fill_clip_range
    for name in ("3", "6"):  # inner layers: scaled to reach +-1, most weights on a non-zero level
        w = converted[int(name)].weight.detach()
        assert w.abs().max().item() == 1.0
        assert torch.equal(w, model[int(name)].weight.detach() / model[int(name)].weight.detach().abs().max())
    assert all(z < 0.5 for z in lp.nn.zero_weight_shares(converted).values())
    for first_or_last in (0, 11):  # fp32 layers are left as they were
        assert torch.equal(converted[first_or_last].weight, model[first_or_last].weight)


def test_wrpn_unsigned_activation_clip_on_a_signed_input_warns_once_naming_the_layer():
    torch.manual_seed(0)
    model = lp.convert(nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(),
                                     nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), "wrpn-4-4")
    x = torch.randn(32, 8)
    with pytest.warns(UserWarning) as caught:
        model(x)
    messages = [str(w.message) for w in caught if "negative" in str(w.message)]
    negative = (model[1](model[0](x)) < 0).float().mean().item()  # the LayerNorm output layer 2 receives
    assert len(messages) == 1 and "layer '2'" in messages[0] and f"{100 * negative:.1f}% of its input" in messages[0]
    assert "'2: activation=uniform<k>'" in messages[0]
    with warnings.catch_warnings():  # checked once: the next batches run without the check or a warning
        warnings.simplefilter("error")
        model(x)


def test_wrpn_activation_clip_on_a_recurrent_hidden_state_warns_at_convert():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rnn, self.out = nn.Linear(4, 8), nn.GRU(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.rnn(torch.relu(self.inp(x)))[0])

    with pytest.warns(UserWarning, match="hidden state h.*: rnn. Fix: .*'rnn: activation=uniform<k>'"):
        lp.convert(Tagger(), "wrpn-4-4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.convert(Tagger(), "wrpn-4-4; rnn: activation=uniform<4>")


class FunctionalWeightsNet(nn.Module):
    """Weights no layer swap covers: MultiheadAttention's in- and out-projection (F.linear on raw Parameters
    inside the attention) and ``h @ self.w``, between a first and a last Linear (WRPN keeps those fp32)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.attn = nn.Linear(8, 128), nn.MultiheadAttention(128, 4, batch_first=True)
        self.head = nn.Linear(128, 4)
        self.w = nn.Parameter(torch.randn(128, 128) / 40)  # |w| mostly below half a 4-bit step, 1/14

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.attn(h, h, h, need_weights=False)[0])
        return self.head(torch.relu(h @ self.w).mean(1))


FUNCTIONAL_WEIGHTS = ["attn.in_proj_weight", "attn.out_proj.weight", "w"]
X_SEQ = torch.rand(2, 5, 8, generator=torch.Generator().manual_seed(1))


def test_wrpn_preset_fills_the_weights_functional_ops_round_at_the_first_forward():
    """Before, fill_clip_range scaled only the swapped layers: MultiheadAttention's projections, a matmul's weight
    (and GPT-2's Conv1D) kept their initial values, 93-100% of which round to 0 in uniform<4>: no signal went
    through the attention, silently. The first forward now scales each to reach +-1 before rounding it."""
    plain = FunctionalWeightsNet()
    shares = {n: (plain.get_parameter(n).detach().abs() < 1 / 14).double().mean().item() for n in FUNCTIONAL_WEIGHTS}
    assert all(s > 0.5 for s in shares.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lp.convert(plain, "wrpn-4-4").eval()
        first = model(X_SEQ)
    assert not [w for w in caught if "round to 0" in str(w.message)]
    for name in FUNCTIONAL_WEIGHTS:
        assert model.get_parameter(name).abs().max().item() == 1.0, name
        assert lp.nn.zero_weight_shares(model)[name] < 0.5, name
    assert torch.equal(model(X_SEQ), first)  # the first forward already rounded the filled weights
    # a state dict loaded before the first forward holds weights that are not initial ones: kept as they are
    loaded = lp.convert(FunctionalWeightsNet(), "wrpn-4-4")
    loaded.load_state_dict(plain.state_dict())
    loaded(X_SEQ)
    assert all(torch.equal(loaded.get_parameter(n), plain.get_parameter(n)) for n in FUNCTIONAL_WEIGHTS)


def test_wrpn_without_fill_names_functional_weights_that_round_to_zero_at_the_first_forward():
    model = lp.convert(FunctionalWeightsNet(), "wrpn-4-4+fill_clip_range=off")
    with pytest.warns(UserWarning, match="functional ops") as caught:
        model(X_SEQ)
    (message,) = [str(w.message) for w in caught if "round to 0" in str(w.message)]
    assert all(name in message for name in FUNCTIONAL_WEIGHTS) and "fill_clip_range(model)" in message
    assert lp.nn.fill_clip_range(model) == FUNCTIONAL_WEIGHTS
    assert all(model.get_parameter(n).abs().max().item() == 1.0 for n in FUNCTIONAL_WEIGHTS)


class SignedInputsToFunctionalOps(nn.Module):
    """A LayerNorm's output (signed) into MultiheadAttention's in-projection and into ``h @ self.w``; the
    attention's P V (signed) into its out-projection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm = nn.Linear(8, 64), nn.LayerNorm(64)
        self.attn, self.head = nn.MultiheadAttention(64, 4, batch_first=True), nn.Linear(64, 4)
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.inp(x))
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.norm(h) @ self.w).mean(1))


def test_wrpn_unsigned_clip_on_a_signed_input_of_a_functional_op_warns_naming_the_call_site():
    """Before, only swapped layers checked their input's sign: the clip to [0, 1] zeroed half of a LayerNorm's
    output on its way into the attention's in-projection, without a word."""
    model = lp.convert(SignedInputsToFunctionalOps(), "wrpn-4-4")
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning) as caught:
        model(x)
    messages = [str(w.message) for w in caught if "negative" in str(w.message)]
    normed = model.norm(model.inp(x))
    share = (normed < 0).float().mean().item()
    assert any(m.startswith("lowprec: attn:linear[0] quantizes its input with uniform<4,unsigned>") and
               f"{100 * share:.1f}% of that input" in m and "'attn: activation=uniform<k>'" in m for m in messages)
    assert any(m.startswith("lowprec: (root):matmul[0]") for m in messages)
    assert any(m.startswith("lowprec: attn:linear[1]") for m in messages)  # the out-projection's: P V, signed
    assert len(messages) == 3
    with warnings.catch_warnings():  # the first forward checks; later ones neither check nor warn
        warnings.simplefilter("error")
        model(x)
