"""Recipes, checkpoints, runs with resume, and the command line."""

from dataclasses import replace

import pytest
import torch

import lowprec as lp
from lowprec.cli import main
from lowprec.experiments import (
    CheckpointError,
    get_task,
    load_checkpoint,
    load_task_data,
    parse_recipe,
    run,
    save_checkpoint,
)

TINY = replace(get_task("mnist-lenet"), epochs=2, train_limit=192, test_limit=100)


@pytest.fixture(scope="module")
def tiny_data():
    return load_task_data(TINY)


def test_recipe_forms(tmp_path):
    assert parse_recipe("int8-lazy").policy == lp.Policy.preset("int8-lazy")
    r = parse_recipe("mixed-fp16+loss_scale=8,lr=0.1")
    assert r.policy.loss_scale == "static:8" and r.train == {"lr": 0.1}
    r = parse_recipe("wrpn-4-4+width=2")
    assert r.model == {"width": 2.0} and r.policy.get("weight") == lp.Quant.parse("uniform<4>")
    r = parse_recipe("weight=fp16,grads=e5m2")
    assert r.policy.get("weight_grad") == lp.Quant.parse("e5m2")
    toml = tmp_path / "r.toml"
    toml.write_text('label = "mine"\npreset = "int8"\n[policy_roles]\naccumulator = "int16"\nloss_scale = 8\n'
                    '[model]\nwidth = 2\n')
    r = parse_recipe(str(toml))
    assert r.label == "mine" and r.policy.get("accumulator") == lp.Quant.parse("int16") and r.model == {"width": 2}
    assert r.policy.loss_scale == "static:8"
    for bad, match in [("int9", "unknown recipe"), ("int8+width", "key=value"), (str(tmp_path / "no.toml"), "not found")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            parse_recipe(bad)
    toml.write_text('preset = "int8"\npolicy = "weight=fp16"\n')
    with pytest.raises(ValueError, match="exactly one"):
        parse_recipe(str(toml))


def test_checkpoint_is_atomic_and_verified(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"a": torch.arange(5)})
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(raw.replace(b"LOWPREC-CKPT\n1 ", b"LOWPREC-CKPT\n9 ", 1))
    with pytest.raises(CheckpointError, match="version 9"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(CheckpointError, match="not a lowprec checkpoint"):
        load_checkpoint(path)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("recipe", ["int8-lazy", "mixed-fp16"])
def test_resume_after_interruption_is_bit_exact(tmp_path, tiny_data, recipe):
    r = parse_recipe(recipe)
    full = run(TINY, r, tiny_data, seed=3, out_dir=tmp_path / "full")

    def stop(step, _):
        if step == 4:  # mid-way through the second epoch (3 steps per epoch)
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(TINY, r, tiny_data, seed=3, out_dir=tmp_path / "cut", after_step=stop)
    resumed = run(TINY, r, tiny_data, seed=3, out_dir=tmp_path / "cut", resume=True)
    assert resumed.losses == full.losses
    assert [h["test_accuracy"] for h in resumed.history] == [h["test_accuracy"] for h in full.history]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["trainer"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["trainer"]
    model_a, model_b = a["model"], b["model"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a if isinstance(model_a[k], torch.Tensor))


def test_resume_refuses_another_runs_checkpoint(tmp_path, tiny_data):
    run(replace(TINY, epochs=1), parse_recipe("int8"), tiny_data, out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="recipe"):
        run(replace(TINY, epochs=1), parse_recipe("int8-lazy"), tiny_data, out_dir=tmp_path, resume=True)


def test_compare_command_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--epochs", "1", "--train-limit", "128", "--test-limit", "64", "--recipes", "fp32",
                 "int8-lazy", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "int8-lazy" in printed and "test acc" in printed
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("recipe,") and len(rows) == 3
    png = out / "convergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (out / "int8-lazy" / "metrics.csv").exists()
    assert any((out / "int8-lazy" / "tensorboard").iterdir())


def test_cli_reports_bad_input(capsys):
    assert main(["compare", "--task", "imagenet"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["train", "--recipe", "int9", "--epochs", "1"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


def test_data_command_lists_datasets(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path))
    assert main(["data", "list"]) == 0
    text = capsys.readouterr().out
    assert "mnist" in text and "cifar10" in text


def test_gradient_census_matches_a_direct_count():
    from lowprec.experiments import gradient_census

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    mult = 2.0**-14
    census = gradient_census(model, [((x,), y)], "fp16", scales=[1.0, 1024.0], loss_multiplier=mult)
    # direct: dE/dz of both layers by autograd on the same batch
    z1 = model[0](x)
    z1.retain_grad()
    z2 = model[2](model[1](z1))
    z2.retain_grad()
    (torch.nn.functional.cross_entropy(z2, y) * mult).backward()
    grads = torch.cat([z1.grad.reshape(-1), z2.grad.reshape(-1)])
    assert census.total == grads.numel() == 64 * 35
    assert census.zero_fp32 == int((grads == 0).sum())
    for s in (1.0, 1024.0):
        want = int(((grads != 0) & ((grads * s).half() == 0)).sum())
        assert census.lost[s] == want
    assert census.lost[1.0] > census.lost[1024.0]  # scaling recovers gradients
