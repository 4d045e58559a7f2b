"""The hostile input catalogue of docs/reliability.md: each input, and what lowprec does with it."""

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lowprec as lp
from lowprec.cli import main
from lowprec.experiments import TaskData, get_task, load_task_data, parse_recipe, run

NAN, INF = float("nan"), float("inf")
PARAMS = {"0.weight", "0.bias", "2.weight", "2.bias"}


def _setup(policy: str, scaler: lp.LossScaler | None = None):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Park's classifier-bits note for the 3-class head
        model = lp.convert(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), policy)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), policy, scaler=scaler)
    return model, trainer


def _loss(model, x, y=None):
    y = torch.arange(len(x)) % 3 if y is None else y
    return F.cross_entropy(model(x).float(), y)


def _snapshot(model, trainer):
    params = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    state = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
             for p, s in trainer.optimizer.state.items()}
    return params, state


def _assert_unchanged(before, after):
    for (a, b) in zip(before, after):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], dict):
                _assert_unchanged((a[k],), (b[k],))
            else:
                assert torch.equal(a[k], b[k]), k


# -- NaN / inf in the data ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, value, skipped", [
    ("fp32", NAN, True), ("fp32", INF, True), ("mixed-fp16", NAN, True), ("mixed-fp16", INF, True),
    ("int8", NAN, True), ("int8", INF, False), ("dfx-10-12", INF, False), ("wrpn-4-4", INF, True),
])
def test_nan_or_inf_in_a_batch(policy, value, skipped):
    """NaN always reaches the loss: the step is skipped, named and leaves weights and momentum as they were. An
    inf is skipped the same way, except where a fixed-point activation format saturates it (its overflow rule):
    that batch trains on the clipped value."""
    model, trainer = _setup(policy)
    x = torch.randn(4, 6)
    assert not trainer.step(_loss(model, x)).skipped
    before = _snapshot(model, trainer)
    scale = trainer.scaler.scale
    bad = x.clone()
    bad[1, 2] = value
    result = trainer.step(_loss(model, bad))
    assert result.skipped is skipped
    if skipped:
        assert set(result.overflow_modules) == PARAMS
        _assert_unchanged(before, _snapshot(model, trainer))
        assert trainer.scaler.scale == (scale / 2 if trainer.scaler.kind == "dynamic" else scale)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not trainer.step(_loss(model, x)).skipped  # the next clean batch trains


def test_a_run_refuses_data_holding_nan_or_inf():
    task = replace(get_task("mnist-lenet"), epochs=1, train_limit=64, test_limit=32)
    data = load_task_data(task)
    images = data.train_inputs[0].clone()
    images[17, 0, 3, 3] = NAN
    images[40, 0, 0, 0] = INF
    bad = TaskData((images,), data.train_labels, data.test_inputs, data.test_labels, data.source)
    with pytest.raises(ValueError, match=r"train inputs\[0\] hold 2 NaN/inf values \(first in example 17\)"):
        run(task, parse_recipe("fp32"), bad)


# -- a loss that is NaN from step 0; a collapsing scale --------------------------------------------------------------
def test_nan_loss_from_step_0_with_a_dynamic_scale_raises_loss_scale_collapse():
    model, trainer = _setup("mixed-fp16", scaler=lp.LossScaler.dynamic(init=2.0**4))
    before = _snapshot(model, trainer)
    x = torch.randn(4, 6)
    for step in range(4):  # 2**4 -> 2**0 = the floor: four skipped steps
        result = trainer.step(_loss(model, x) * NAN)
        assert result.skipped and result.scale == 2.0 ** (4 - step)
    with pytest.raises(lp.LossScaleCollapse, match=r"after 5 consecutive overflowing steps .* Non-finite this "
                                                   r"step: 0.weight, 0.bias, 2.weight, 2.bias"):
        trainer.step(_loss(model, x) * NAN)
    _assert_unchanged(before, _snapshot(model, trainer))


@pytest.mark.parametrize("scaler", [lp.LossScaler.none(), lp.LossScaler.static(128.0)])
def test_nan_loss_from_step_0_without_a_dynamic_scale_skips_every_step(scaler):
    model, trainer = _setup("fp32", scaler=scaler)
    before = _snapshot(model, trainer)
    for _ in range(5):
        result = trainer.step(_loss(model, torch.randn(4, 6)) * NAN)
        assert result.skipped and set(result.overflow_modules) == PARAMS
    assert trainer.scaler.overflow_streak == 5
    _assert_unchanged(before, _snapshot(model, trainer))


def test_cli_reports_a_collapsed_scale_as_an_error(monkeypatch, capsys):
    import sys

    cli = sys.modules["lowprec.cli.main"]

    def collapse(*args):
        raise lp.LossScaleCollapse("loss scale collapsed below the floor 1")

    monkeypatch.setattr(cli, "_compare", collapse)
    assert main(["train", "--epochs", "1"]) == 2
    assert "lowprec: error: loss scale collapsed below the floor 1" in capsys.readouterr().err


# -- empty batches ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e4m3", "e5m2", "fixed<16,8>", "dfx<8>", "int16", "uniform<4>",
                                 "uniform<2,unsigned>", "bfp<8,16>", "float<e=3,m=2>"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "toward_zero"])
def test_quantizing_an_empty_tensor_gives_an_empty_tensor(fmt, rounding):
    for shape in ((0,), (0, 5), (3, 0, 2)):
        y = lp.quantize(torch.empty(shape), fmt, rounding)
        assert y.shape == shape and y.dtype == torch.float32


@pytest.mark.parametrize("policy", ["int8", "dfx-10-12", "mixed-fp16", "fixed-20"])
def test_an_empty_batch_is_a_skipped_step(policy):
    """The mean loss over no examples is NaN with zero gradients: applying it would still move momentum and
    weight decay, so the step is skipped and reported under the name "loss"."""
    model, trainer = _setup(policy)
    trainer.step(_loss(model, torch.randn(4, 6)))
    before = _snapshot(model, trainer)
    empty = torch.empty(0, 6)
    assert model(empty).shape == (0, 3)
    result = trainer.step(_loss(model, empty, torch.empty(0, dtype=torch.long)))
    assert result.skipped and result.overflow_modules == ("loss",)
    _assert_unchanged(before, _snapshot(model, trainer))
    assert not trainer.step(_loss(model, torch.randn(4, 6))).skipped


def test_an_empty_tensor_counts_as_a_batch_without_overflow_for_dfx_exponents():
    g = lp.DynamicExponent("dfx<8>", int_bits=None, interval=2)
    g.quantize(torch.empty(0, 4))
    assert g.int_bits is None and g.batches == 1  # observed, but no exponent to start from
    g.quantize(torch.tensor([3.0]))  # starts r = 2; overflows at r - 1
    assert g.int_bits == 2 and g.counters().tolist() == [0.0, 1.0, 2.0]
    assert g.update() and g.int_bits == 2  # mean rate at r - 1 is 1/2 > max: r stays


@pytest.mark.parametrize("change, match", [
    (dict(train_limit=0), "the training split is empty"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(epochs=0), "epochs must be an integer >= 1, got 0"),
])
def test_a_run_refuses_settings_that_cannot_train(change, match):
    task = replace(get_task("mnist-lenet"), epochs=1, train_limit=32, test_limit=16)
    data = load_task_data(replace(task, **change))
    with pytest.raises(ValueError, match=match):
        run(replace(task, **change), parse_recipe("fp32"), data)


def test_checkpoint_every_must_be_a_positive_step_count(tmp_path):
    task = replace(get_task("mnist-lenet"), epochs=1, train_limit=32, test_limit=16)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        run(task, parse_recipe("fp32"), load_task_data(task), out_dir=tmp_path, checkpoint_every=0)


# -- a policy that gives a format to a role a module does not have ----------------------------------------------------
def _net():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10, bias=False))


@pytest.mark.parametrize("policy, match", [
    ("weight=int8; 1: weight=int8", r"'1: weight=dfx<8>'.*1 \(BatchNorm2d\) has roles activation, output, output_grad, "
                             r"activation_grad\. Remove weight"),
    ("weight=int8; 1: master=int16", r"'1: master=dfx<16>'.*1 \(BatchNorm2d\) has roles"),
    ("weight=int8; 2: activation=int8", r"2 \(ReLU\) is not a layer lowprec quantizes"),
    ("weight=fp16; 0: accumulation=fp16", r"'0: accumulation=fp16'.*0 \(Conv2d\) has roles weight, bias"),
])
def test_an_override_setting_a_role_its_modules_lack_is_a_value_error(policy, match):
    with pytest.raises(ValueError, match=match):
        lp.convert(_net(), policy)


def test_overrides_that_are_harmless_are_accepted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.convert(_net(), "weight=int16; 4: bias=int16, bias_grad=int16")  # no bias: nothing to round
        lp.convert(_net(), "weight=int16; 1: weight=none")  # taking a format away is always fine
        lp.convert(_net(), "weight=int16; 4: accumulation=fp16")  # the Linear has it
    with pytest.warns(UserWarning, match="override 'classifier' matches no module of this Sequential"):
        lp.convert(_net(), "weight=int16; classifier: weight=int16")


# -- an exponent group that only ever sees zeros or inf -------------------------------------------------------------
@pytest.mark.parametrize("value, bound", [(0.0, 7 - 100 + 1), (INF, 7 + 100)])
def test_a_dfx_exponent_rests_at_the_end_of_the_fixed_point_range(value, bound):
    g = lp.DynamicExponent("dfx<8>", int_bits=0, interval=1)
    for _ in range(250):
        g.quantize(torch.full((4,), value))
        g.update()
    assert g.int_bits == bound
    with pytest.raises(ValueError, match=r"int_bits for dfx<8> must lie in \[-92, 107\]"):
        lp.DynamicExponent("dfx<8>", int_bits=108)


# -- format and policy strings from a fuzzer ------------------------------------------------------------------------
_PIECES = ["fp16", "bf16", "fp32", "e4m3", "int8", "int16", "dfx", "fixed", "float", "uniform", "bfp", "<", ">", ",",
           "=", "e", "m", "0", "1", "-1", "+5", "8", "16", "999999", "9999999", "subnormals", "overflow", "finite",
           "saturate", "inf", "nan", "on", "off", "unsigned", "signed", " ", "/", "stochastic", "nearest",
           "toward_zero", "none", "weight", "grads", "params", "master", "accumulator", "optimizer_state",
           "loss_scale", "static:", "dynamic", "exponent_rule", "maxabs", "overflow", "exponent_interval",
           "init_int_bits", "auto", "max_overflow_rate", "accumulation_chunk", "classifier_rule", "1e999", "0.5",
           "-0", ";", ":", "@first", "@last", "fc*", "path", "native"]
grammar_like = st.lists(st.sampled_from(_PIECES), max_size=16).map("".join)


@given(st.one_of(grammar_like, st.text(max_size=40)))
def test_fuzzed_format_strings_parse_or_raise_value_error(text):
    try:
        fmt = lp.parse_format(text)
    except ValueError as err:
        assert str(err)
        return
    assert lp.parse_format(repr(fmt)) == fmt


@given(st.one_of(grammar_like, st.text(max_size=40)))
def test_fuzzed_policy_strings_parse_or_raise_value_error(text):
    try:
        policy = lp.Policy.parse(text)
    except ValueError as err:
        assert str(err)
        return
    assert lp.Policy.parse(policy.spec()) == policy
