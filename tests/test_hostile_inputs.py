"""The hostile input catalogue of docs/reliability.md: each input, and what lowprec does with it."""

import re
import sys
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
    (dict(schedule="cosine"), "schedule must be one of constant, inv, linear, courbariaux, got 'cosine'"),
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


# -- the command line: one error line, never a traceback ----------------------------------------------------------
_TINY_RUN = ["--epochs", "1", "--train-limit", "32", "--test-limit", "16"]


def _toml(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _cli_error(argv, capsys) -> str:
    """Run the CLI; assert exit 2 and exactly one stderr line, a ``lowprec: error:`` one; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("lowprec: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, match", [
    (["train", "--device", "cuda:99"], r"device 'cuda:99': this machine .*(no cuda device|CUDA device)"),
    (["train", "--device", "bogus"], r"unknown device 'bogus': use cpu, cuda, cuda:N or mps"),
    (["underflow", "--device", "bogus"], r"unknown device 'bogus': use cpu, cuda, cuda:N or mps"),
    (["train", "--recipe", "wrpn-4-4+width=inf"], r"width must be a finite number in \(0, 16\], got 'inf'"),
    (["train", "--recipe", "wrpn-4-4+width=1e9"], r"width must be a finite number in \(0, 16\], got '1e9'"),
    (["train", "--recipe", "int8+lr=nan"], r"lr must be a finite number > 0, got 'nan'"),
    (["train", "--recipe", "weight=/stochastic"], r"'/stochastic' gives the rounding 'stochastic' but no format"),
    (["train", "--lr", "inf"], r"train: argument --lr: must be a finite number > 0, got 'inf'"),
    (["train", "--test-limit", "0"], r"argument --test-limit: must be an integer >= 1, got '0'"),
    (["memory", "lenet", "--batch", "0"], r"memory: argument --batch: must be an integer >= 1, got '0'"),
    (["memory", "lenet", "--batch", "-1"], r"memory: argument --batch: must be an integer >= 1, got '-1'"),
    (["inspect", "lenet", "--batch", "0"], r"inspect: argument --batch: must be an integer >= 1, got '0'"),
    (["underflow", "--batches", "0"], r"underflow: argument --batches: must be an integer >= 1, got '0'"),
    (["train", "--epochs", "two"], r"argument --epochs: must be an integer >= 1, got 'two'"),
    (["train", "--no-such-flag"], r"unrecognized arguments: --no-such-flag \(see lowprec --help\)"),
    ([], r"the following arguments are required: command"),
])
def test_hostile_command_lines_end_in_one_error_line(argv, match, capsys):
    assert re.search(match, _cli_error([*argv, *_TINY_RUN] if argv[:1] == ["train"] else argv, capsys))


@pytest.mark.parametrize("text, match", [
    ("preset = 5\n", r"preset must be a non-empty string, got 5"),
    ('preset = "int8"\nlabel = 5\n', r"label must be a non-empty string, got 5"),
    ('preset = "wrpn-4-4"\n[model]\nwidth = "abc"\n', r"width must be a finite number in \(0, 16\], got 'abc'"),
    ('preset = "int8"\n[train]\nlr = "fast"\n', r"lr must be a finite number > 0, got 'fast'"),
    ('preset = "int8"\n[train]\nepochs = 1.5\n', r"epochs must be an integer >= 1, got 1.5"),
    ('preset = "int9"\n', r"unknown preset 'int9'"),
    ('preset = "int8"\nmodel = 3\n', r"model must be a table \(\[model\]\), got 3"),
    ('preset = "int8"\n[policy_roles]\nweight = [1]\n', r"\[policy_roles\] weight must be a string or a number"),
    ("preset = \n", r"not valid TOML"),
])
def test_hostile_toml_recipes_end_in_one_error_line(tmp_path, text, match, capsys):
    path = _toml(tmp_path, "r.toml", text)
    assert re.search(f"{re.escape(path)}: .*{match}", _cli_error(["train", "--recipe", path, *_TINY_RUN], capsys))


def test_a_folder_named_like_a_toml_recipe_is_refused(tmp_path, capsys):
    (tmp_path / "x.toml").mkdir()
    assert "is not a file (a folder?)" in _cli_error(["train", "--recipe", str(tmp_path / "x.toml")], capsys)


def test_a_long_recipe_is_shortened_in_the_error(capsys):
    line = _cli_error(["train", "--recipe", "int8+" + "x" * 100_000, *_TINY_RUN], capsys)
    assert len(line) < 300 and "... (100,005 characters): expected key=value,... after '+'" in line
    with pytest.raises(ValueError) as err:  # the policy parser quotes the long format too: cut as well
        parse_recipe("weight=" + "x" * 100_000)
    assert len(str(err.value)) < 600 and "unknown number format 'xxx" in str(err.value)
    assert "(100,000 characters)" in str(err.value) and "(100,007 characters)" in str(err.value)


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    cli = sys.modules["lowprec.cli.main"]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_compare", interrupted)
    assert main(["train", *_TINY_RUN]) == 130
    assert capsys.readouterr().err == "lowprec: interrupted (a run continues from its last checkpoint with --resume)\n"


def test_an_unexpected_exception_is_one_line_naming_its_type(monkeypatch, capsys):
    cli = sys.modules["lowprec.cli.main"]

    def bug(*args):
        raise RuntimeError("something lowprec did not foresee\nsecond line")

    monkeypatch.setattr(cli, "_compare", bug)
    assert main(["train", *_TINY_RUN]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowprec: error: unexpected RuntimeError: something lowprec did "
                                                   "not foresee; second line (a bug in lowprec")
    monkeypatch.setenv("LOWPREC_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="did not foresee"):
        main(["train", *_TINY_RUN])


def test_a_recipe_label_too_long_for_a_file_name_runs_in_a_safe_unique_directory(tmp_path, monkeypatch, capsys):
    from lowprec.experiments.compare import MAX_DIR_NAME, run_dir_name
    from lowprec.policy.policy import ROLES

    recipe = ",".join(f"{role}=fp16/stochastic" for role in ROLES)
    assert len(recipe) > 255  # longer than a file name may be
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path / "none"))
    assert main(["train", "--recipe", recipe, *_TINY_RUN, "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert run_dir.name == run_dir_name(recipe) and len(run_dir.name) <= MAX_DIR_NAME
    assert (run_dir / "result.json").exists()
    # labels that differ only in characters a file name cannot hold get different directories; safe ones stay
    names = {run_dir_name(label) for label in ("a/b", "a:b", "a_b", "a b", "." * 3, "ä")}
    assert len(names) == 6 and run_dir_name("a_b") == "a_b" and run_dir_name("int8-lazy") == "int8-lazy"
    assert all(n and not n.startswith(".") and len(n) <= MAX_DIR_NAME and re.fullmatch(r"[\w.-]+", n, re.ASCII)
               for n in names)


def test_compare_refuses_two_recipes_with_one_label(tmp_path, capsys):
    line = _cli_error(["compare", "--recipes", "fp32", "int8", "fp32", *_TINY_RUN, "--out", str(tmp_path)], capsys)
    assert "recipes with the same label would share one run directory: fp32" in line
    assert not any(tmp_path.iterdir())


# -- data that does not fit the task ------------------------------------------------------------------------------
def _tiny():
    task = replace(get_task("mnist-lenet"), epochs=1, train_limit=64, test_limit=32)
    return task, load_task_data(task)


def _with(data: TaskData, **change) -> TaskData:
    return replace(data, **change)


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_outside_the_models_classes_are_refused_before_training(split):
    task, data = _tiny()
    labels = getattr(data, f"{split}_labels").clone()
    labels[5] = 255
    labels[9] = -1
    steps = []
    with pytest.raises(ValueError, match=rf"the {split} labels hold 2 values outside \[0, 9\] \(the model has 10 "
                                         r"outputs\), e\.g\. 255 at example 5: relabel"):
        run(task, parse_recipe("fp32"), _with(data, **{f"{split}_labels": labels}),
            after_step=lambda s, _: steps.append(s))
    assert steps == []


def test_inputs_of_the_wrong_shape_are_refused_before_training():
    task, data = _tiny()
    big = F.pad(data.train_inputs[0], (2, 2, 2, 2))  # 32x32 images for a 28x28 LeNet
    with pytest.raises(ValueError, match=r"task mnist-lenet: the model does not take these inputs \(one example has "
                                         r"shape \(1, 32, 32\)\)"):
        run(task, parse_recipe("fp32"), _with(data, train_inputs=(big,), test_inputs=(F.pad(data.test_inputs[0],
                                                                                            (2, 2, 2, 2)),)))
    with pytest.raises(ValueError, match=r"test examples have shape \(1, 32, 32\), training examples \(1, 28, 28\)"):
        run(task, parse_recipe("fp32"), _with(data, test_inputs=(F.pad(data.test_inputs[0], (2, 2, 2, 2)),)))


@pytest.mark.parametrize("change, match", [
    (lambda d: dict(test_labels=d.test_labels[:0], test_inputs=(d.test_inputs[0][:0],)), "the test split is empty"),
    (lambda d: dict(train_labels=d.train_labels[:10]), r"the train split has 64 inputs and 10 labels"),
    (lambda d: dict(train_labels=d.train_labels.float()), r"the train labels must be an integer tensor"),
    (lambda d: dict(train_labels=d.train_labels[:, None].repeat(1, 3)),
     r"the train labels have shape \(3,\) per example, but the model scores one label per example"),
])
def test_data_that_cannot_train_or_test_is_refused(change, match):
    task, data = _tiny()
    with pytest.raises(ValueError, match=match):
        run(task, parse_recipe("fp32"), _with(data, **change(data)))


@pytest.mark.parametrize("setting, value", [("lr", INF), ("lr", 0.0), ("lr", NAN), ("momentum", 1.5),
                                            ("loss_multiplier", INF), ("weight_decay", -1.0)])
def test_a_run_refuses_training_settings_that_give_a_meaningless_result(setting, value):
    """--lr inf used to skip every step and exit 0 with a number: such settings are refused up front."""
    task, data = _tiny()
    with pytest.raises(ValueError, match=rf"{setting} must be a finite number"):
        run(replace(task, **{setting: value}), parse_recipe("fp32"), data)


@pytest.mark.parametrize("text, match", [
    ("weight=/stochastic", r"'/stochastic' gives the rounding 'stochastic' but no format"),
    ("grads=none/toward_zero", r"'none/toward_zero' gives the rounding 'toward_zero' but no format"),
    ("weight=full/nearest", r"'full/nearest' gives the rounding 'nearest' but no format"),
    ("weight=fp16/", r"'fp16/': nothing after '/'"),
])
def test_a_rounding_without_a_format_is_refused(text, match):
    """It used to leave the role in full precision without a word."""
    with pytest.raises(ValueError, match=match):
        lp.Policy.parse(text)
    assert lp.Policy.parse("weight=fp16/stochastic").get("weight") == lp.Quant(lp.parse_format("fp16"), "stochastic")
    assert lp.Policy.parse("weight=none").get("weight") is None
