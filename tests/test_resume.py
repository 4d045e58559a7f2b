"""Checkpoints: resume mid-epoch after an interruption or a SIGKILL, bit-exactly; refuse another run's checkpoint."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from lowprec.experiments import CheckpointError, get_task, load_checkpoint, load_task_data, parse_recipe, run
from lowprec.experiments.checkpoint import save_checkpoint

TINY = replace(get_task("mnist-lenet"), epochs=2, train_limit=192, test_limit=100)  # 3 steps per epoch


@pytest.fixture(scope="module")
def tiny_data():
    return load_task_data(TINY)


class _Interrupt(Exception):
    pass


def _stop_at(step_to_stop: int):
    def stop(step, _):
        if step == step_to_stop:
            raise _Interrupt

    return stop


def _model_tensors(path):
    model = load_checkpoint(path)["trainer"]["model"]
    return {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("recipe", ["dfx-10-12", "mixed-fp16"])
@pytest.mark.parametrize("stop", [1, 2, 4])
def test_resume_mid_epoch_is_bit_exact(tmp_path, tiny_data, recipe, stop):
    """Checkpoints every 2 steps (after steps 2 and 4: mid-epoch); interrupted after step index ``stop``, the
    run resumes from the last one and ends with the uninterrupted run's weights, losses and scale state."""
    r = parse_recipe(recipe)
    full = run(TINY, r, tiny_data, seed=5, out_dir=tmp_path / "full", checkpoint_every=2)
    with pytest.raises(_Interrupt):
        run(TINY, r, tiny_data, seed=5, out_dir=tmp_path / "cut", checkpoint_every=2, after_step=_stop_at(stop))
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert saved["next_step"] == {1: 2, 2: 2, 4: 4}[stop] and saved["next_step"] % 3 != 0  # mid-epoch
    resumed = run(TINY, r, tiny_data, seed=5, out_dir=tmp_path / "cut", checkpoint_every=2, resume=True)
    assert resumed.losses == full.losses
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    _assert_same_weights(_model_tensors(tmp_path / "full" / "checkpoint.pt"),
                         _model_tensors(tmp_path / "cut" / "checkpoint.pt"))
    a, b = (load_checkpoint(p / "checkpoint.pt")["trainer"] for p in (tmp_path / "full", tmp_path / "cut"))
    assert a["scaler"] == b["scaler"] and a["quantizers"].keys() == b["quantizers"].keys()
    assert (tmp_path / "cut" / "metrics.csv").read_text().count("\n") == 1 + TINY.epochs  # no duplicated rows


def _lowprec(*args):
    return [sys.executable, "-m", "lowprec", "train", "--task", "mnist-lenet", "--recipe", "int8-lazy",
            "--epochs", "2", "--train-limit", "1024", "--test-limit", "100", "--batch-size", "32",
            "--checkpoint-every", "3", *args]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_reaches_the_same_weights(tmp_path):
    """A real ``lowprec train`` process is killed with SIGKILL as soon as its first mid-epoch checkpoint is on
    disk (at whatever point of a step or of a checkpoint write it is then); ``--resume`` finishes the run with
    exactly the weights of an uninterrupted run."""
    env = {**os.environ, "LOWPREC_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1", "CI": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = subprocess.run(_lowprec("--out", str(full)), env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    proc = subprocess.Popen(_lowprec("--out", str(cut)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = cut / "int8-lazy" / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    steps_per_epoch = 1024 // 32
    next_step = load_checkpoint(ckpt)["next_step"]
    assert 0 < next_step < 2 * steps_per_epoch and next_step % steps_per_epoch != 0  # killed mid-epoch
    assert not (cut / "int8-lazy" / "result.json").exists()

    done = subprocess.run(_lowprec("--out", str(cut), "--resume"), env=env, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    _assert_same_weights(_model_tensors(full / "int8-lazy" / "checkpoint.pt"),
                         _model_tensors(cut / "int8-lazy" / "checkpoint.pt"))
    assert (full / "int8-lazy" / "metrics.csv").read_text().count("\n") == 3
    assert (cut / "int8-lazy" / "metrics.csv").read_text().count("\n") == 3


def test_refuses_another_runs_checkpoint_naming_the_difference(tmp_path, tiny_data):
    one = replace(TINY, epochs=1)
    run(one, parse_recipe("int8"), tiny_data, out_dir=tmp_path, seed=1)
    cases = [
        (dict(recipe=parse_recipe("int8-lazy")), r"recipe: checkpoint 'int8', this run 'int8-lazy'"),
        (dict(recipe=parse_recipe("int8+lr=0.5")), r"settings.lr: checkpoint 0.01, this run 0.5"),
        (dict(seed=2), "seed: checkpoint 1, this run 2"),
        (dict(task=replace(one, name="other-task")), "task: checkpoint 'mnist-lenet', this run 'other-task'"),
    ]
    for change, message in cases:
        args = {"task": one, "recipe": parse_recipe("int8"), "seed": 1, **change}
        with pytest.raises(CheckpointError, match=message):
            run(args.pop("task"), args.pop("recipe"), tiny_data, out_dir=tmp_path, resume=True, **args)


def test_refuses_a_checkpoint_that_is_not_a_run_checkpoint(tmp_path, tiny_data):
    save_checkpoint(tmp_path / "checkpoint.pt", {"weights": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"not a run checkpoint .*\(no identity, next_step"):
        run(TINY, parse_recipe("fp32"), tiny_data, out_dir=tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"LOWPREC-CKPT\n1 00 5\nabcde")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        run(TINY, parse_recipe("fp32"), tiny_data, out_dir=tmp_path, resume=True)


def test_trainer_refuses_another_models_state():
    import lowprec as lp

    def trainer(width: int, policy: str = "int8") -> lp.Trainer:
        model = lp.convert(torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(),
                                               torch.nn.Linear(width, 2)), policy)
        return lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy)

    state = trainer(8).state_dict()
    with pytest.raises(ValueError, match=r"0.weight: checkpoint \(8, 4\) torch.float32, this model \(6, 4\)"):
        trainer(6).load_state_dict(state)
    with pytest.raises(ValueError, match="trained under policy"):
        trainer(8, "int8-lazy").load_state_dict(state)
    other = lp.Trainer(m := torch.nn.Sequential(torch.nn.Linear(4, 8)), torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="the checkpoint has 2.bias, 2.weight, this model does not"):
        other.load_state_dict({**state, "policy": other.policy.spec()})
