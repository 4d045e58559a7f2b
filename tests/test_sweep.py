"""``lowprec sweep``: grid expansion from a template, the CSV and the figure, resume of finished cells."""

import csv
from dataclasses import replace

import pytest

from lowprec.cli.main import main
from lowprec.experiments import (CheckpointError, RunResult, expand_grid, get_task, load_task_data,
                                 parse_grid_values, sweep)
from lowprec.experiments.sweep import plot_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_grid_is_the_product_of_the_values_first_field_slowest():
    cells = expand_grid("dfx-{p}-{u}", {"u": [12, 14], "p": ["8", "10"]})
    assert [c.recipe for c in cells] == ["dfx-8-12", "dfx-8-14", "dfx-10-12", "dfx-10-14"]
    assert cells[1].values == (("p", "8"), ("u", "14"))
    # a field used twice takes one value; formats with their own commas and brackets pass through
    assert [c.recipe for c in expand_grid("weight=fixed<{w},{w}>", {"w": [8]})] == ["weight=fixed<8,8>"]
    assert [c.recipe for c in expand_grid("dfx-10-12+max_overflow_rate={r}", {"r": ["1e-4", "1e-2"]})] == [
        "dfx-10-12+max_overflow_rate=1e-4", "dfx-10-12+max_overflow_rate=1e-2"]


@pytest.mark.parametrize("template, grid, message", [
    ("dfx-10-12", {}, "has no {name} field"),
    ("dfx-{p}-{u}", {"p": [8]}, r"no values for \['u'\]"),
    ("dfx-{p}-12", {"p": [8], "u": [12]}, r"\['u'\] not in the template"),
    ("dfx-{}-12", {"p": [8]}, "must be a plain name"),
    ("dfx-{p:>3}-12", {"p": [8]}, "must be a plain name"),
    ("dfx-{p-12", {"p": [8]}, "write fields as"),
    ("dfx-{p}-12", {"p": []}, "has no values"),
    ("dfx-{p}-12", {"p": [8, "8"]}, "repeats a value"),
    ("dfx-{recipe}-12", {"recipe": [8]}, "may not be named"),
])
def test_a_bad_template_or_grid_is_refused_naming_the_problem(template, grid, message):
    with pytest.raises(ValueError, match=message):
        expand_grid(template, grid)


def test_grid_values_parse_from_the_command_line_form():
    assert parse_grid_values(["p=8,10, 12", "u=12"]) == {"p": ["8", "10", "12"], "u": ["12"]}
    for bad in (["p"], ["p="], ["=8"], ["p=8", "p=10"], ["1p=8"]):
        with pytest.raises(ValueError, match="sweep"):
            parse_grid_values(bad)


@pytest.fixture(scope="module")
def tiny():
    """mnist-lenet on 128 shipped images: two steps of 64 per cell, 50 test images."""
    task = replace(get_task("mnist-lenet"), epochs=1, train_limit=128, test_limit=50)
    return task, load_task_data(task)


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sweep_writes_a_row_per_cell_and_a_heatmap_and_resume_trains_only_new_cells(tiny, tmp_path):
    task, data = tiny
    calls = []

    def on_cell(index, count, recipe, finished):
        calls.append((index, count, recipe.label, finished))
        return lambda step, total, loss: calls.append((recipe.label, step))

    first = sweep(task, "dfx-{p}-{u}", {"p": [8], "u": [12]}, data, out_dir=tmp_path, on_cell=on_cell)
    assert calls == [(0, 1, "dfx-8-12", False), ("dfx-8-12", 1), ("dfx-8-12", 2)]
    calls.clear()
    done = sweep(task, "dfx-{p}-{u}", {"p": [8, 10], "u": [12]}, data, out_dir=tmp_path, resume=True,
                 on_cell=on_cell)
    # the finished cell is read back from its checkpoint without a step; the new one trains its two steps
    assert calls == [(0, 2, "dfx-8-12", True), (1, 2, "dfx-10-12", False), ("dfx-10-12", 1), ("dfx-10-12", 2)]
    assert done[0][1].losses == first[0][1].losses and done[0][1].history == first[0][1].history
    rows = _rows(tmp_path / "sweep.csv")
    assert [(r["p"], r["u"], r["recipe"]) for r in rows] == [("8", "12", "dfx-8-12"), ("10", "12", "dfx-10-12")]
    for row, (_, result) in zip(rows, done):
        assert float(row["test error %"]) == pytest.approx(100 - result.final_accuracy, abs=0.005)
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG)
    assert (tmp_path / "dfx-10-12" / "result.json").exists()


def test_resuming_a_cell_under_other_settings_is_refused(tiny, tmp_path):
    task, data = tiny
    sweep(task, "dfx-{p}-12", {"p": [8]}, data, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="settings.epochs"):
        sweep(replace(task, epochs=2), "dfx-{p}-12", {"p": [8]}, data, out_dir=tmp_path, resume=True)


def _result(recipe, accuracy):
    return RunResult("t", recipe, 0, history=[{"epoch": 1, "train_loss": 0.5, "test_accuracy": accuracy}])


@pytest.mark.parametrize("template, grid", [
    ("dfx-10-12+max_overflow_rate={r}", {"r": ["1e-5", "1e-4", "1e-2"]}),  # a line on a log axis
    ("weight={w}", {"w": ["fp16", "bf16"]}),  # categories
    ("dfx-{p}-{u}", {"p": [8, 10], "u": [12, 14]}),  # a heatmap, one cell not run yet
    ("dfx-{p}-{u}+exponent_interval={i}", {"p": [8, 10], "u": [12], "i": [10, 100]}),  # a line per (u, i)
])
def test_the_plot_is_written_for_one_two_and_more_fields(template, grid, tmp_path):
    cells = expand_grid(template, grid)
    done = [(c, _result(c.recipe, 90.0 + i)) for i, c in enumerate(cells[:-1])]
    plot_sweep(cells, done, tmp_path / "sweep.png", title=template)
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG)


def test_cli_sweep_runs_and_resumes(tiny, tmp_path, capsys):
    argv = ["sweep", "--task", "mnist-lenet", "--epochs", "1", "--train-limit", "128", "--test-limit", "50",
            "--template", "dfx-{p}-12", "--values", "p=8", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "cell 1/1: dfx-8-12\n" in out and "cell 1/1: dfx-8-12 (finished, read back)" in out
    assert [r["recipe"] for r in _rows(tmp_path / "sweep.csv")] == ["dfx-8-12"]
    assert main([*argv[:-4], "--values", "p", "--out", str(tmp_path)]) == 2
    assert "lowprec: error: sweep values 'p'" in capsys.readouterr().err
