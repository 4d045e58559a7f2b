"""The command line under a fuzzer: option values, recipe strings and TOML recipes drawn by hypothesis.

Every run ends with exit 0 and its result on disk, or exit 2 and exactly one ``lowprec: error:`` line; never a
traceback, never exit 1 (the status of an unforeseen exception, a bug). ``main()`` runs in-process on a few
examples of the MNIST subset shipped with lowprec, one epoch at most, without torch.compile.
"""

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowprec.cli import main

PRESETS = ["fp32", "mixed-fp16", "mixed-bf16", "native-bf16", "int8", "int8-lazy", "fixed-20", "dfx-10-12",
           "wrpn-4-4", "wrpn-2-2", "fp8-hybrid"]
KEYS = ["width", "lr", "epochs", "batch_size", "loss_multiplier", "momentum", "weight_decay", "weight", "grads",
        "activations", "master", "loss_scale", "accumulator", "exponent_rule", "bogus", ""]
VALUES = ["2", "0.5", "0", "-1", "inf", "nan", "1e9", "1e-30", "fp16", "int8", "dfx<8>", "/stochastic",
          "fp16/stochastic", "static:8", "dynamic", "none", "", "abc", "1.5", "99999999999999999999", "fixed<4,2>",
          "uniform<4>", "maxabs"]

assignment = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(VALUES))
recipe = st.one_of(
    st.sampled_from(PRESETS),
    st.builds(lambda p, items: f"{p}+{','.join(items)}", st.sampled_from(PRESETS), st.lists(assignment, max_size=3)),
    st.lists(assignment, min_size=1, max_size=3).map(",".join),  # a policy string
    st.text(max_size=20),
)

OPTIONS = {  # option -> values tried (valid ones kept small so that a run takes a fraction of a second)
    "--epochs": ["1", "0", "-1", "x", "1.5"],
    "--batch-size": ["8", "1", "0", "x", "1e2"],
    "--lr": ["0.01", "inf", "nan", "-1", "0", "1e308", "1e-300", "fast"],
    "--schedule": ["constant", "inv", "linear", "cosine"],
    "--device": ["cpu", "bogus", "cuda:99", "meta", "", "cpu:0"],
    "--train-limit": ["16", "1", "0", "-3", "x"],
    "--test-limit": ["8", "1", "0", "x"],
    "--seed": ["0", "7", "-1", "99999999999999999999", "x"],
    "--checkpoint-every": ["1", "0", "x"],
    "--allreduce-format": ["grad", "fp16", "bogus", "dfx<8>"],
    "--task": ["mnist-lenet", "pimnist-maxout", "imagenet", ""],
    "--data-root": ["/nonexistent", "/dev/null"],
    "--nproc": ["1", "0", "-2", "x"],
}
FLAGS = [[], [], ["--resume"], ["--overwrite"], ["--resume", "--overwrite"]]
BASE = ["--epochs", "1", "--train-limit", "16", "--test-limit", "8", "--batch-size", "8"]


def options(names):
    return st.lists(st.sampled_from(names), unique=True, max_size=3).flatmap(
        lambda keys: st.tuples(*[st.sampled_from(OPTIONS[k]) for k in keys]).map(
            lambda values: [a for k, v in zip(keys, values) for a in (k, v)]))


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path / "no-data"))  # the shipped MNIST subset
    monkeypatch.setenv("LOWPREC_COMPILE", "0")
    monkeypatch.delenv("LOWPREC_TRACEBACK", raising=False)
    return tmp_path


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _check(argv: list[str], result: Path) -> None:
    """Exit 0 with ``result`` written, or exit 2 with one ``lowprec: error:`` line; never a traceback."""
    code, out, err = _run(argv)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    errors = [line for line in err.splitlines() if "lowprec: error:" in line]
    if code == 0:
        assert errors == [] and result.exists(), (argv, err)
    else:
        assert code == 2, (argv, err)  # 1 would be an unforeseen exception: a bug
        assert len(errors) == 1 and errors[0].startswith("lowprec: error: ") and err.rstrip().endswith(errors[0]), \
            (argv, err)
        assert len(errors[0]) <= 600, errors[0]


@settings(max_examples=25)
@given(command=st.sampled_from(["train", "compare"]), recipes=st.lists(recipe, min_size=1, max_size=2),
       opts=options(list(OPTIONS)), flags=st.sampled_from(FLAGS))
def test_fuzzed_training_command_lines_end_in_a_result_or_one_error_line(env, command, recipes, opts, flags):
    with tempfile.TemporaryDirectory(dir=env) as out:
        which = ["--recipe", recipes[0]] if command == "train" else ["--recipes", *recipes]
        _check([command, *BASE, *which, *opts, *flags, "--out", out], Path(out) / "results.csv")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)  # TOML has no surrogate-pair escapes
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


scalar = st.one_of(st.sampled_from(PRESETS + VALUES), st.integers(-5, 20), st.floats(allow_nan=True),
                   st.booleans(), st.text(max_size=8))
value = st.one_of(scalar, st.lists(scalar, max_size=2))
table = st.dictionaries(st.sampled_from(KEYS[:-1]), value, max_size=3)


@st.composite
def toml_documents(draw) -> str:
    """Mostly well-formed recipes (a preset or a policy, the three tables) holding values of any type."""
    top = draw(st.sampled_from([{"preset": draw(st.sampled_from(PRESETS))}] * 4 + [
        {"preset": draw(value)}, {"policy": draw(st.one_of(recipe, value))}, {}, {"preset": "int8", "policy": "x"}]))
    if draw(st.booleans()):
        top["label"] = draw(st.one_of(recipe, value))
    rarely = st.sampled_from([False] * 9 + [True])
    if draw(rarely):
        top["junk"] = draw(value)
    lines = [f"{key} = {_toml_value(v)}" for key, v in top.items()]
    tables = ["policy_roles", "model", "train"] + (["extra"] if draw(rarely) else [])
    for name in draw(st.lists(st.sampled_from(tables), unique=True, max_size=3)):
        lines += [f"[{name}]", *(f"{key} = {_toml_value(v)}" for key, v in draw(table).items())]
    return "\n".join(lines) + "\n"


@settings(max_examples=25)
@given(document=st.one_of(toml_documents(), st.text(max_size=40)))
def test_fuzzed_toml_recipes_end_in_a_result_or_one_error_line(env, document):
    with tempfile.TemporaryDirectory(dir=env) as out:
        path = Path(out) / "recipe.toml"
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
        _check(["train", *BASE, "--recipe", str(path), "--out", str(Path(out) / "runs")],
               Path(out) / "runs" / "results.csv")


@settings(max_examples=10)
@given(command=st.sampled_from(["memory", "inspect", "underflow"]), recipe=recipe,
       batch=st.sampled_from(["4", "1", "0", "-1", "x"]), fmt=st.sampled_from(["fp16", "bf16", "int8", "bogus", "e5m2"]),
       scale=st.sampled_from(["1", "8", "0", "-2", "inf", "3", "1e30"]))
def test_fuzzed_diagnostics_command_lines_end_in_a_result_or_one_error_line(env, command, recipe, batch, fmt, scale):
    with tempfile.TemporaryDirectory(dir=env) as out:
        if command == "memory":
            argv, result = ["memory", "lenet", "--no-measure", "--batch", batch, "--recipe", recipe, "--out", out], \
                Path(out) / "memory.png"
        elif command == "inspect":
            argv, result = ["inspect", "lenet", "--steps", "1", "--batch", batch, "--recipe", recipe,
                            "--format", fmt, "--out", out], Path(out) / "report.json"
        else:
            argv, result = ["underflow", "--batches", "1", "--batch-size", batch, "--train-limit", "16",
                            "--format", fmt, "--scales", scale], Path(out)  # prints a table only
        _check(argv, result)
