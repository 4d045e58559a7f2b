"""A converted model's state dict in the plain model (strict), and lp.unconvert: the plain model it exports."""

import io
import pickle

import pytest
import torch
from test_nn_models import lenet
from torch import nn

import lowprec as lp
from lowprec.formats import DynamicFixedPoint
from lowprec.nn import CONVERSIONS, QuantizedModule
from lowprec.policy import ROLES, Policy

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))


def _trained(policy, steps=3):
    """A converted LeNet after a few SGD steps (exponents moved, weights off their initial values)."""
    torch.manual_seed(0)
    model = lp.convert(lenet(), policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
        lp.nn.update_exponents(model)
    return model


def _exponents(model):
    return {(n, r): q.exponent.int_bits for n, r, q in lp.nn.quantizers(model) if q.exponent is not None}


@pytest.mark.parametrize("policy", ["dfx-10-12+exponent_interval=1", "int8", "mixed-fp16", "wrpn-4-4"])
def test_converted_state_dict_loads_into_the_plain_model_with_strict_true(policy):
    model = _trained(policy)
    state = model.state_dict()
    plain = lenet()
    plain.load_state_dict(state)  # strict: no _extra_state keys
    assert list(state) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    # the quantizer state still travels with the state dict, through torch.save (also weights_only loading)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = lp.convert(lenet(), policy)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert _exponents(fresh) == _exponents(model)
    assert torch.equal(fresh(X), model(X))


def test_dfx_exponents_survive_the_state_dict_and_differ_from_fresh_ones():
    model = _trained("dfx-10-12+exponent_interval=1", steps=4)
    fresh = lp.convert(lenet(), "dfx-10-12+exponent_interval=1")
    assert _exponents(fresh) != _exponents(model)
    fresh.load_state_dict(model.state_dict())
    assert _exponents(fresh) == _exponents(model) and _exponents(model)


def _weights_only(policy):
    """The policy with every role but weight and bias in float32 (its overrides kept)."""
    return Policy.preset(policy).with_roles(**{r: "none" for r in ROLES if r not in ("weight", "bias")})


def _bn_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 26 * 26, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("policy", ["int8", "mixed-fp16", "wrpn-4-4", "fp8-hybrid"])
def test_unconvert_gives_the_plain_model_whose_outputs_equal_the_converted_weights_in_fp32(policy):
    original = _bn_model().eval()
    converted = lp.convert(original, policy)
    plain = lp.unconvert(converted)
    assert all(type(m) not in CONVERSIONS.values() and not isinstance(m, QuantizedModule) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    assert all(not hasattr(m, "quantizers") for m in plain.modules())
    # bit for bit the converted model with only its weight and bias roles, everything else in float32
    reference = lp.convert(original, _weights_only(policy))
    assert torch.equal(plain(X), reference(X))
    # each weight is the independent rounding of the stored one in the format its layer's policy gives it
    for name, module in converted.named_modules():
        if isinstance(module, QuantizedModule):
            for pname, role in module.parameter_roles().items():
                quant = module.policy.get(role)
                want = getattr(module, pname).detach()
                if quant is not None:
                    want = lp.quantize(want, quant.format, quant.rounding)
                assert torch.equal(getattr(plain.get_submodule(name), pname), want), (name, pname)
    # it is an ordinary torch model: a fresh one loads its state dict strictly and computes the same
    fresh = _bn_model().eval()
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh(X), plain(X))
    # and the converted model itself was left as it was (a copy)
    assert isinstance(converted[0], lp.nn.QConv2d)
    # the export is no longer a converted model: it converts again (convert refuses a converted one)
    assert lp.nn.conversion_policy(plain) is None
    assert isinstance(lp.convert(plain, policy)[0], lp.nn.QConv2d)


def test_unconvert_rounds_dfx_weights_with_each_layers_current_exponent():
    model = _trained("dfx-10-12+exponent_interval=1", steps=4)
    plain = lp.unconvert(model)
    for name in ("0", "3", "7", "9"):
        q = model.get_submodule(name).quantizers["weight"]
        assert isinstance(q.quant.format, DynamicFixedPoint) and q.exponent.int_bits is not None
        want = lp.quantize(model.get_submodule(name).weight.detach(), q.quant.format, int_bits=q.exponent.int_bits)
        assert torch.equal(plain.get_submodule(name).weight, want)


def test_unconvert_of_a_recurrent_model_rounds_every_gate_matrix():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, num_layers=2)
    converted = lp.convert(lstm, "int8")
    plain = lp.unconvert(converted)
    assert type(plain) is nn.LSTM
    for pname, p in plain.named_parameters():
        fmt = converted.policy.get("weight" if pname.startswith("weight") else "bias").format
        assert torch.equal(p, lp.quantize(getattr(lstm, pname).detach(), fmt)), pname
    x = torch.randn(6, 3, 5)
    reference = lp.convert(lstm, _weights_only("int8"))
    # torch's fused LSTM kernel against lowprec's step-by-step recurrence: equal to float32 rounding
    torch.testing.assert_close(plain(x)[0], reference(x)[0], rtol=1e-5, atol=1e-6)


def test_unconvert_of_a_native_model_gives_float32_layers_holding_the_bf16_weights():
    original = _bn_model().eval()
    plain = lp.unconvert(lp.convert(original, "native-bf16"))
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    rounded = _bn_model().eval()  # the original with the weights of every non-norm layer cast to bf16 by torch
    with torch.no_grad():
        for m in rounded.modules():
            if not isinstance(m, nn.modules.batchnorm._NormBase):
                for p in m.parameters(recurse=False):
                    p.copy_(p.bfloat16().float())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), rounded.state_dict().values()))
    assert torch.equal(plain(X), rounded(X))
    pickle.dumps(plain)  # an ordinary model again: whole-model torch.save works


class FunctionalWeights(nn.Module):
    """Parameters only the op-level emulation rounds: LayerNorm's affine pair, MultiheadAttention's packed
    in-projection (one F.linear, self-attention) and out-projection, cross-attention's chunks of it (views),
    a Conv1D-style ``addmm`` with raw Parameters, a scale multiplied elementwise and a positional table added;
    and a swapped Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(16), nn.MultiheadAttention(16, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=True)
        self.w, self.b = nn.Parameter(torch.randn(16, 16) / 4), nn.Parameter(torch.randn(16))
        self.scale, self.pos = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(5, 16))
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():  # off every grid (LayerNorm starts at exact 1 and 0)
                p.add_(torch.randn_like(p) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.pos)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.cross(h, x, x, need_weights=False)[0]
        h = torch.addmm(self.b, h.reshape(-1, 16), self.w).view_as(h) * self.scale
        return self.head(h.mean(1))


#: The mxfp4 preset's weight and bias roles alone (its op overrides also round norms' activations): blocks of 32
#: along each weight's reduction dimension, a views' own blocks (cross-attention's chunks of the in-projection)
MXFP4_WEIGHTS = "weight=mxfp4,bias=bf16; op:norm: weight=bf16,bias=bf16; op:elementwise: weight=bf16,bias=bf16"


@pytest.mark.parametrize("policy", ["mixed-fp16", "int8", "fp8-hybrid", MXFP4_WEIGHTS])
def test_unconvert_rounds_the_parameters_functional_ops_round(policy):
    """Before, only swapped layers' weights were rounded in the export: LayerNorm, MultiheadAttention,
    a Conv1D's addmm and elementwise parameters kept their stored values, and the exported model computed
    something else than the converted one (any transformer, a Hugging Face GPT-2's save_pretrained)."""
    torch.manual_seed(0)
    original = FunctionalWeights().eval()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    converted = lp.convert(original, policy)
    converted(x)  # the first forward shows which parameters the functional ops round, and how
    plain = lp.unconvert(converted)
    reference = lp.convert(original, policy if policy == MXFP4_WEIGHTS else _weights_only(policy))
    assert torch.equal(plain(x), reference(x))
    rounded = lambda name: lp.quantize(original.get_parameter(name).detach(), "e4m3")  # noqa: E731
    if policy == "fp8-hybrid":  # one format, elementwise: each parameter is its own e4m3 rounding
        for name, p in plain.named_parameters():
            assert torch.equal(p, rounded(name)), name
        assert not torch.equal(rounded("attn.in_proj_weight"), original.attn.in_proj_weight)


def test_unconvert_before_any_forward_of_functional_weights_is_refused():
    """Which parameters functional ops round is known from a forward: without one, an error names the fix."""
    converted = lp.convert(FunctionalWeights(), "mixed-fp16")
    with pytest.raises(RuntimeError, match="run one forward"):
        lp.unconvert(converted)
    assert isinstance(lp.unconvert(lp.convert(nn.Sequential(nn.Linear(4, 4)), "mixed-fp16"))[0], nn.Linear)
