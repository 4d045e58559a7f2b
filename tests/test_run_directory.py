"""A run's directory: claimed writable and locked before training, never overwritten by accident, write failures
named with the last checkpoint intact, stale temporaries removed, permissions from the umask, and checkpoints
that do not fit the run's schedule refused."""

import errno
import os
import stat
from dataclasses import replace

import pytest
import torch

from lowprec.cli import main
from lowprec.experiments import CheckpointError, get_task, load_checkpoint, load_task_data, parse_recipe, run
from lowprec.experiments import checkpoint as checkpoint_module
from lowprec.experiments.checkpoint import save_checkpoint
from lowprec.experiments.rundir import RunDirectoryError, claim

TINY = replace(get_task("mnist-lenet"), epochs=2, train_limit=64, test_limit=32, batch_size=32)  # 2 steps an epoch


@pytest.fixture(scope="module")
def tiny_data():
    return load_task_data(TINY)


def _fp32():
    return parse_recipe("fp32")


# -- a directory that cannot be written ------------------------------------------------------------------------------
def test_an_output_folder_that_is_a_file_is_refused_before_training(tmp_path, tiny_data):
    (tmp_path / "file").write_text("not a folder")
    steps = []
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(RunDirectoryError, match=rf"{tmp_path / 'file'} is a file; give --out a folder"):
            run(TINY, _fp32(), tiny_data, out_dir=out, after_step=lambda s, _: steps.append(s))
    assert steps == []


def test_an_unwritable_run_directory_is_refused_before_training(tmp_path, tiny_data, monkeypatch):
    """The probe write fails as in a read-only directory (simulated: the tests may run as root, whom no mode
    bit stops): the error names the directory and the fix, and not one step trains."""
    real = type(tmp_path).write_bytes

    def read_only(path, data):
        if path.name.startswith(".write-test"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(type(tmp_path), "write_bytes", read_only)
    steps = []
    with pytest.raises(RunDirectoryError, match=r"cannot write the test file .*\.write-test: Permission denied: make "
                                                r"it writable or choose another --out"):
        run(TINY, _fp32(), tiny_data, out_dir=tmp_path / "run", after_step=lambda s, _: steps.append(s))
    assert steps == []


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_last_checkpoint(tmp_path, tiny_data, monkeypatch):
    """The disk fills up during the second checkpoint: RunDirectoryError says which file, why and that the last
    checkpoint is intact; that checkpoint loads (next step 2) and no temporary file is left behind."""
    fsync, calls = os.fsync, []

    def full_on_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(checkpoint_module.os, "fsync", full_on_second)
    out = tmp_path / "run"
    with pytest.raises(RunDirectoryError, match=r"cannot write the checkpoint .*checkpoint\.pt: No space left on "
                                                r"device: free some space or choose another --out\. The last "
                                                r"checkpoint in .* is intact; --resume continues from it"):
        run(TINY, _fp32(), tiny_data, out_dir=out)
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == 2
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == []


def test_the_cli_reports_a_failed_write_in_one_line(tmp_path, monkeypatch, capsys):
    def read_only(fd):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoint_module.os, "fsync", read_only)
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path / "none"))
    code = main(["train", "--epochs", "1", "--train-limit", "32", "--test-limit", "16", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lowprec: error: cannot write the checkpoint ") and "Read-only file system" in err[0]


# -- a directory that holds a run, or is in use ----------------------------------------------------------------------
def test_a_directory_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, tiny_data):
    one = replace(TINY, epochs=1)
    first = run(one, _fp32(), tiny_data, out_dir=tmp_path, seed=1)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(checkpoint\.pt, metrics\.csv, result\.json\); "
                                                r"pass --resume to continue it, --overwrite to replace it"):
        run(one, _fp32(), tiny_data, out_dir=tmp_path, seed=2)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved  # the good checkpoint is untouched
    assert run(one, _fp32(), tiny_data, out_dir=tmp_path, seed=1, resume=True).losses == first.losses
    again = run(one, _fp32(), tiny_data, out_dir=tmp_path, seed=2, overwrite=True)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["identity"]["seed"] == 2
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2 and again.losses != first.losses
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        run(one, _fp32(), tiny_data, out_dir=tmp_path, resume=True, overwrite=True)


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path, tiny_data):
    lock = claim(tmp_path, resume=False, overwrite=False)  # as a run in another process holds it
    try:
        with pytest.raises(RunDirectoryError, match=rf"{tmp_path} is in use by another lowprec run"):
            run(TINY, _fp32(), tiny_data, out_dir=tmp_path)
        assert not (tmp_path / "metrics.csv").exists()
    finally:
        lock.release()
    run(replace(TINY, epochs=1), _fp32(), tiny_data, out_dir=tmp_path)  # released: the directory is free again


def test_the_cli_refuses_to_overwrite_a_run_and_names_both_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path / "none"))
    args = ["train", "--epochs", "1", "--train-limit", "32", "--test-limit", "16", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume", "--overwrite"]) == 2


# -- leftovers of a kill, permissions, forged checkpoints -------------------------------------------------------------
def test_temporary_files_of_a_killed_checkpoint_write_are_removed_by_the_next_run(tmp_path, tiny_data):
    tmp_path.joinpath("checkpoint.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")
    tmp_path.joinpath("checkpoint.pt.abc.tmp").write_bytes(b"")
    tmp_path.joinpath("other.tmp").write_bytes(b"not ours")
    run(replace(TINY, epochs=1), _fp32(), tiny_data, out_dir=tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == ["other.tmp"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "ck.pt", {"a": torch.zeros(2)})
        reference = tmp_path / "plain"
        reference.write_bytes(b"")  # any file the process creates
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "ck.pt").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(reference.stat().st_mode)


@pytest.mark.parametrize("forge", [
    {"next_step": 10**9}, {"next_step": -1}, {"next_step": 2.0}, {"next_step": 3},  # 3: history says 1 epoch
    {"losses": []},
])
def test_a_checkpoint_that_does_not_fit_the_schedule_is_refused(tmp_path, tiny_data, forge):
    """A checkpoint with a valid checksum whose position is beyond (or off) the run's schedule of 4 steps would
    "finish" without training: refused, with what it holds."""
    one = replace(TINY, epochs=2)

    def stop(step, _):
        if step == 2:  # the first step of epoch 2, after the checkpoint of epoch 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(one, _fp32(), tiny_data, out_dir=tmp_path, after_step=stop)  # checkpoint after epoch 1: next step 2
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["next_step"] == 2
    state.update({k: v for k, v in forge.items() if k == "next_step"})
    state["result"].update({k: v for k, v in forge.items() if k == "losses"})
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match=r"does not fit this run's schedule: next step .* of 4"):
        run(one, _fp32(), tiny_data, out_dir=tmp_path, resume=True)
