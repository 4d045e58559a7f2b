"""lowprec inspect and lowprec memory on the command line."""

import json
import sys

import pytest

from lowprec.cli import main


def test_inspect_command_writes_table_pictures_and_json(tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", "mnist-lenet", "--recipe", "mixed-fp16", "--batch", "8", "--steps", "1",
                 "--out", str(out), "--per-module"]) == 0
    text = capsys.readouterr().out
    assert "activation_grad" in text and "loss scale" in text
    assert (out / "activation_grad.png").stat().st_size > 10_000
    assert json.loads((out / "report.json").read_text())["policy"] == "mixed-fp16"


def test_memory_command_prints_estimates_and_writes_the_chart(tmp_path, capsys):
    out = tmp_path / "memory"
    assert main(["memory", "lenet", "--recipe", "fp32", "--recipe", "wrpn-4-4+width=2", "--batch", "4",
                 "--no-measure", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrpn-4-4+width=2" in text and "0.5x" in text  # WRPN's inner-layer weights at 2x, 4 bits
    assert (out / "memory.png").stat().st_size > 10_000


USER_MODEL = '''
import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self, width=1.0):
        super().__init__()
        h = round(8 * width)
        self.emb, self.rnn, self.head = nn.Embedding(13, 6), nn.GRU(6, h, batch_first=True), nn.Linear(h, 13)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def build(width=1.0):
    return Tagger(width)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's package lowprec_user_models/ in the current directory (sys.path and modules restored after)."""
    (tmp_path / "lowprec_user_models").mkdir()
    (tmp_path / "lowprec_user_models" / "__init__.py").write_text("")
    (tmp_path / "lowprec_user_models" / "nets.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("lowprec_user_models")]:
        del sys.modules[name]


def test_inspect_and_memory_accept_a_users_module_factory_model(user_package, capsys):
    out = user_package / "out"
    assert main(["inspect", "lowprec_user_models.nets:build", "--recipe", "int8-lazy+optimizer_state=none",
                 "--input-shape", "9", "--vocab", "13", "--batch", "4", "--steps", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "Tagger" and "random token ids < 13" in " ".join(capsys.readouterr().out.split())
    entries = {(e["module"], e["role"]): e for e in report["entries"]}
    assert {m for m, _ in entries} == {"emb", "rnn", "head"}
    # labels for every position: the head's output gradient has batch x time x vocab values per step
    assert entries["head", "output_grad"]["values"] == 4 * 9 * 13 and entries["rnn", "weight"]["format"] == "dfx<8>"
    assert main(["memory", "lowprec_user_models.nets:build", "--recipe", "fp32", "--recipe", "mixed-fp16+width=2",
                 "--input-shape", "9", "--vocab", "13", "--batch", "4", "--no-measure", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lowprec_user_models.nets:build, batch 4" in text and "mixed-fp" in text


@pytest.mark.parametrize("argv, message", [
    (["memory", "lowprec_user_models.nets:build"], "give --input-shape"),
    (["memory", "lowprec_user_models.nets:nope", "--input-shape", "9"], "has no callable 'nope'"),
    (["inspect", "no_such_package_x:build", "--input-shape", "9"], "cannot import 'no_such_package_x'"),
    (["memory", "lowprec_user_models.nets:build", "--input-shape", "9", "--no-measure"], "give --vocab N"),
])
def test_user_model_mistakes_are_one_line_errors_naming_the_fix(user_package, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowprec: error:") and message in err and "Traceback" not in err
