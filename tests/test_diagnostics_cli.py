"""lowprec inspect and lowprec memory on the command line."""

import json

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
