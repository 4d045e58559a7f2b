"""examples/: each script runs (tiny sizes) and its loss falls."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("LOWPREC_COMPILE", "0")


def test_examples_are_short():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"amp_loop.py", "lightning_plugin.py", "hf_model.py",
                                                         "hf_trainer.py"}
    for path in EXAMPLES.glob("*.py"):
        assert len(path.read_text().splitlines()) < 60, path.name


@pytest.mark.parametrize("policy", ["int8-lazy", "native-bf16"])
def test_amp_loop(policy, capsys):
    losses = load("amp_loop").main(["--policy", policy, "--steps", "16"])
    assert sum(losses[-4:]) < sum(losses[:4])
    assert f"{policy}: loss" in capsys.readouterr().out


def test_lightning_plugin(capsys):
    pytest.importorskip("lightning")
    losses = load("lightning_plugin").main(["--policy", "int8-lazy", "--epochs", "2"])
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])
    assert "skipped steps 0" in capsys.readouterr().out


def test_hf_model(capsys):
    pytest.importorskip("transformers")
    losses = load("hf_model").main(["--policy", "mixed-bf16", "--steps", "6"])
    assert losses[-1] < losses[0]
    assert "reloaded and converted again: GPT2LMHeadModel" in capsys.readouterr().out


def test_hf_trainer(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    losses = load("hf_trainer").main(["--policy", "mixed-fp16", "--steps", "5"])
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert "mixed-fp16: loss" in capsys.readouterr().out
