"""Policy: parsing, presets, overrides, printing, the per-role Quantizer."""

import pytest
import torch

import lowprec as lp
from lowprec.policy import LAYER_ROLES, ROLES, Policy, Quant, Quantizer
from lowprec.policy.presets import PRESETS

ALL_PRESETS = list(PRESETS) + ["wrpn-4-4", "wrpn-2-4", "wrpn-32-2", "wrpn-1-32"]


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_presets_round_trip_through_their_spec(name):
    policy = Policy.preset(name)
    assert Policy.parse(policy.spec()) == policy
    assert policy.name == name and name in policy.table()


def test_fp32_preset_quantizes_nothing():
    p = Policy.preset("fp32")
    assert not p.quantizes_anything and all(p.get(r) is None for r in ROLES)


def test_mixed_precision_presets():
    p = Policy.preset("mixed-fp16")
    assert all(str(p.get(r)) == "fp16" for r in LAYER_ROLES)
    assert p.get("master") is None and p.get("optimizer_state") is None and p.loss_scale == "dynamic"
    assert Policy.preset("mixed-bf16").loss_scale == "none"


def test_park_presets():
    plain, lazy = Policy.preset("int8"), Policy.preset("int8-lazy")
    assert str(plain.get("weight")) == "dfx<8>" and str(plain.get("master")) == "dfx<8>"
    assert plain.get("accumulator") is None and str(lazy.get("accumulator")) == "dfx<16>"
    assert plain.classifier_rule and plain.exponent_rule == "maxabs"


def test_courbariaux_presets():
    p = Policy.preset("dfx-10-12")
    assert str(p.get("weight_grad")) == "dfx<10>" and str(p.get("master")) == "dfx<12>"
    assert (p.exponent_rule, p.max_overflow_rate, p.exponent_interval) == ("overflow", 1e-4, 10)
    assert p.init_int_bits is None  # each group starts at the max-abs exponent of its first tensor
    assert str(Policy.preset("fixed-20").get("activation")) == "fixed<20,14>"


def test_dfx_presets_exist_for_any_propagation_and_update_widths():
    p = Policy.preset("dfx-8-14")
    assert (p.name, str(p.get("activation")), str(p.get("weight_grad"))) == ("dfx-8-14", "dfx<8>", "dfx<8>")
    assert (str(p.get("master")), str(p.get("optimizer_state"))) == ("dfx<14>", "dfx<8>")
    assert p.spec() == Policy.preset("dfx-10-12").spec().replace("dfx<10>", "dfx<8>").replace("dfx<12>", "dfx<14>")
    for bad in ("dfx-1-12", "dfx-10-33"):
        with pytest.raises(ValueError, match="must be 2..32"):
            Policy.preset(bad)


def test_wrpn_presets_keep_first_and_last_full_precision():
    p = Policy.preset("wrpn-2-4")
    inner = p.for_module("features.3")
    assert str(inner.get("weight")) == "uniform<2>" and str(inner.get("activation")) == "uniform<4,unsigned>"
    assert inner.get("weight_grad") is None and inner.get("master") is None
    for edge in (p.for_module("conv1", first=True), p.for_module("fc", last=True)):
        assert edge.get("weight") is None and edge.get("activation") is None
    assert Policy.preset("wrpn-32-4").for_module("x").get("weight") is None
    with pytest.raises(ValueError, match="1..16 or 32"):
        Policy.preset("wrpn-0-4")


def test_design_spelling_grad_sets_every_gradient_role():
    p = Policy.parse("weight=int8,grad=int16")
    assert {str(p.get(r)) for r in ("output_grad", "activation_grad", "weight_grad", "bias_grad")} == {"dfx<16>"}


def test_parse_shorthands_rounding_and_settings():
    p = Policy.parse("params=fp16/stochastic, grads=e5m2, activations=bf16, master=fp32, loss_scale=1024")
    assert p.get("weight") == Quant(lp.parse_format("fp16"), "stochastic") == p.get("bias")
    assert {str(p.get(r)) for r in ("output_grad", "activation_grad", "weight_grad", "bias_grad")} == {"e5m2"}
    assert str(p.get("activation")) == str(p.get("output")) == "bf16"
    assert p.loss_scale == "static:1024"
    assert str(p.get("master")) == "fp32"


def test_overrides_by_pattern_in_order():
    p = Policy.parse("weight=int8; fc*: weight=int16; fc3: weight=none")
    assert str(p.for_module("conv1").get("weight")) == "dfx<8>"
    assert str(p.for_module("fc1").get("weight")) == "dfx<16>"
    assert p.for_module("fc3").get("weight") is None
    q = Policy.of(weight="int8").override("@last", weight="int16")
    assert str(q.for_module("head", last=True).get("weight")) == "dfx<16>"
    assert str(q.for_module("head").get("weight")) == "dfx<8>"


def test_policies_are_immutable_values():
    p = Policy.preset("int8")
    q = p.with_roles(accumulator="int16")
    assert p.get("accumulator") is None and str(q.get("accumulator")) == "dfx<16>"
    assert q == Policy.preset("int8-lazy").with_roles()  # equal by content, the name aside
    with pytest.raises(AttributeError):
        p.loss_scale = "dynamic"


@pytest.mark.parametrize(
    "text, match",
    [
        ("wieght=int8", "unknown role 'wieght'"),
        ("weight", "expected role=format"),
        ("weight=int9", "unknown number format"),
        ("weight=fp16/sideways", "unknown rounding"),
        ("loss_scale=always", "loss_scale"),
        ("loss_scale=-2", "positive"),
        ("exponent_rule=guess", "exponent_rule"),
        ("max_overflow_rate=2", "max_overflow_rate"),
        ("classifier_rule=maybe", "on or off"),
    ],
)
def test_bad_policy_strings(text, match):
    with pytest.raises(ValueError, match=match):
        Policy.parse(text)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="mixed-fp16"):
        Policy.preset("mixed-fp12")


def test_quantizer_identity_static_and_dynamic():
    x = torch.randn(100) * 10
    assert Quantizer(None)(x) is x
    assert torch.equal(Quantizer(Quant.parse("fp16"))(x), x.half().float())
    policy = Policy.preset("dfx-10-12").with_roles(init_int_bits=3, exponent_interval=2)
    q = Quantizer(Quant.parse("dfx<10>"), policy)
    assert q.exponent.int_bits == 3
    assert torch.equal(q(x), lp.quantize(x, "fixed<10,6>"))
    assert torch.equal(q.round(x), lp.quantize(x, "fixed<10,6>")) and q.exponent.batches == 1  # not observed
    q.update()
    q(x)
    q.update()
    assert q.exponent.int_bits == 4  # |x| up to ~30 overflows 3 integer bits: one step up per interval
    auto = Quantizer(Quant.parse("dfx<10>"), policy.with_roles(init_int_bits="auto"))
    auto(torch.tensor([0.3, -5.0]))
    assert auto.exponent.int_bits == 3  # max-abs exponent of the first tensor: 5 < 2**3
    maxabs = Quantizer(Quant.parse("dfx<8>"), Policy.preset("int8"))
    assert maxabs.exponent is None and torch.equal(maxabs(x), lp.quantize(x, "dfx<8>"))


def test_quantizer_observe_only_and_state():
    policy = Policy.preset("dfx-10-12").with_roles(init_int_bits=0)
    q = Quantizer(Quant.parse("dfx<10>"), policy)
    x = torch.randn(50) * 100
    q.observe_only = True
    assert q(x) is x and q.exponent.batches == 1
    fresh = Quantizer(Quant.parse("dfx<10>"), policy)
    fresh.load_state_dict(q.state_dict())
    assert fresh.exponent.batches == 1
    with pytest.raises(ValueError, match="dfx<12>"):
        Quantizer(Quant.parse("dfx<12>"), policy).load_state_dict(q.state_dict())


def test_policy_table_is_readable():
    text = str(Policy.preset("int8-lazy"))
    assert "accumulator      dfx<16>" in text and "classifier rule" in text and "rule=maxabs" in text
    assert "interval" not in text  # the overflow rule's settings do not apply to max-abs exponents
    assert "interval=10 batches" in str(Policy.preset("dfx-10-12"))


def test_preset_plus_recipe_strings_are_one_grammar_for_parse_as_policy_convert_and_trainer():
    """The CLI's PRESET+key=value form means the same policy wherever a policy string is accepted."""
    from lowprec.experiments import parse_recipe
    from lowprec.policy import as_policy

    text = "int8-lazy+optimizer_state=none,loss_scale=8; fc: weight=int16"
    expected = (Policy.preset("int8-lazy").with_roles(optimizer_state="none", loss_scale="8")
                .override("fc", weight="int16"))
    assert Policy.parse(text) == as_policy(text) == expected
    assert Policy.parse(text).name == text and expected.get("optimizer_state") is None
    assert parse_recipe(text.replace("; fc: weight=int16", "") + ",lr=0.5").policy == Policy.preset(
        "int8-lazy").with_roles(optimizer_state="none", loss_scale="8")
    # brackets keep their commas: WRPN's unsigned activation format survives the '+' split
    wide = "wrpn-4-4+activation=uniform<8,unsigned>"
    assert str(Policy.parse(wide).get("activation")) == "uniform<8,unsigned>"
    assert parse_recipe(wide + ",width=2").policy == Policy.parse(wide)
    assert Policy.parse("int8") == Policy.preset("int8")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    converted = lp.convert(model, "int8-lazy+optimizer_state=none")
    assert converted[0].policy.get("optimizer_state") is None and str(converted[0].policy.get("weight")) == "dfx<8>"
    trainer = lp.Trainer(converted, torch.optim.SGD(converted.parameters(), lr=0.1), "int8-lazy+optimizer_state=none")
    assert trainer.policy == Policy.preset("int8-lazy").with_roles(optimizer_state="none")


@pytest.mark.parametrize("text, match", [
    ("int8-lazy+", "after '\\+'"),
    ("int8-lazy+width=2", "width= or lr= are read by the lowprec command line only"),
    ("mixed-fp16+wieght=fp16", "unknown role 'wieght'"),
])
def test_bad_preset_plus_strings_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        lp.convert(torch.nn.Linear(2, 2), text)
