"""The GAN experiment (lowprec.experiments.gan, ``lowprec gan``): the Fréchet distance against references written
here, the class scores, divergence recorded rather than raised, bit-exact resume, and the command's outputs."""

from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest
import torch

from lowprec.cli import main
from lowprec.experiments import CheckpointError, load_checkpoint, parse_recipe
from lowprec.experiments.gan import GanSettings, build_scorer, load_gan_data, train_gan
from lowprec.experiments.gan_scores import class_scores, frechet_distance

TINY = GanSettings(epochs=2, batch_size=16, nz=8, ngf=4, ndf=4, samples=16, grid=2, classifier_epochs=1)


@pytest.fixture(scope="module")
def tiny():
    data = load_gan_data(None, 32)
    return data, build_scorer(data, TINY, 0, None)


def _moments(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = torch.randn(300, 6) @ torch.randn(6, 6)
    assert abs(frechet_distance(a, a)) < 1e-9


def test_frechet_distance_of_1d_gaussians_matches_the_closed_form():
    """d = 1: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2), with the sample moments computed here in plain Python."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, 1, generator=gen) * 2 + 1, torch.randn(70, 1, generator=gen) * 0.5 - 3
    (m1, s1), (m2, s2) = _moments(a[:, 0].double().tolist()), _moments(b[:, 0].double().tolist())
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * math.sqrt(s1 * s2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_with_diagonal_covariances_adds_up_per_dimension():
    """The four corners (+-1, +-1) have a diagonal sample covariance (4/3 I): scaled by (sx, sy) and shifted,
    the distance is the sum of the 1-d closed forms over the two dimensions."""
    corners = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    a = corners * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    b = corners * torch.tensor([1.0, 3.0]) + torch.tensor([0.0, 2.0])
    var = 4 / 3
    expected = sum((ma - mb) ** 2 + var * (sa**2 + sb**2 - 2 * sa * sb)
                   for ma, mb, sa, sb in ((1, 0, 2, 1), (-1, 2, 0.5, 3)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_is_rotation_invariant_and_refuses_bad_input():
    a, b = torch.randn(200, 4), torch.randn(150, 4) @ torch.randn(4, 4) + 1
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    assert frechet_distance(a.double() @ q, b.double() @ q) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a, torch.full_like(b, math.nan))
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(a[:1], b)


def test_class_scores_of_confident_balanced_and_collapsed_predictions():
    balanced = class_scores(torch.eye(10).repeat(3, 1) * 100)
    assert balanced.confidence == pytest.approx(1.0)
    assert balanced.class_entropy == pytest.approx(math.log(10))
    assert balanced.inception_score == pytest.approx(10.0)
    collapsed = class_scores(torch.eye(10)[[4] * 30] * 100)  # every image the same digit: no coverage
    assert collapsed.class_entropy == pytest.approx(0.0, abs=1e-12)
    assert collapsed.inception_score == pytest.approx(1.0)
    uniform = class_scores(torch.zeros(5, 10))
    assert uniform.confidence == pytest.approx(0.1) and uniform.inception_score == pytest.approx(1.0)


def test_a_nan_loss_is_recorded_as_divergence_with_its_epoch(tiny):
    data, scorer = tiny
    broken = replace(data, train=torch.cat([data.train[:16], torch.full_like(data.train[16:], math.nan)]))
    result, _ = train_gan(parse_recipe("fp32"), broken, scorer, TINY)
    assert result.diverged_epoch == 1 and len(result.history) == 1
    assert math.isnan(result.losses_d[-1]) and all(map(math.isfinite, result.losses_d[:-1]))  # stopped at once
    assert len(result.losses_d) <= 2


def test_resume_after_an_interrupted_epoch_gives_the_same_weights(tiny, tmp_path):
    data, scorer = tiny
    recipe = parse_recipe("int8-lazy+optimizer_state=int16")
    whole, _ = train_gan(recipe, data, scorer, TINY, out_dir=tmp_path / "whole")

    def interrupt(step: int) -> None:
        if step == 2:  # the first step of epoch 2: its checkpoint is epoch 1's
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_gan(recipe, data, scorer, TINY, out_dir=tmp_path / "cut", after_step=interrupt)
    assert len(load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["result"]["history"]) == 1
    resumed, _ = train_gan(recipe, data, scorer, TINY, out_dir=tmp_path / "cut", resume=True)
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("whole", "cut"))
    for net in ("g", "d"):
        for key, value in a[net]["model"].items():
            assert torch.equal(value, b[net]["model"][key]), (net, key)
    assert resumed.losses_d == whole.losses_d and resumed.losses_g == whole.losses_g
    assert [h["fid"] for h in resumed.history] == [h["fid"] for h in whole.history]
    # a 1-epoch run resumed with --epochs 2 is the 2-epoch run; resuming with fewer epochs than done is refused
    train_gan(recipe, data, scorer, replace(TINY, epochs=1), out_dir=tmp_path / "short")
    longer, _ = train_gan(recipe, data, scorer, TINY, out_dir=tmp_path / "short", resume=True)
    assert longer.losses_d == whole.losses_d and longer.history[-1]["fid"] == whole.history[-1]["fid"]
    with pytest.raises(CheckpointError, match="holds 2 epochs, more than the 1"):
        train_gan(recipe, data, scorer, replace(TINY, epochs=1), out_dir=tmp_path / "short", resume=True)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny ``lowprec gan`` run of two recipes: (its command line, its output folder, its exit status)."""
    out = tmp_path_factory.mktemp("cli") / "gan"
    argv = ["gan", "--epochs", "1", "--train-limit", "32", "--batch-size", "16", "--samples", "16", "--out", str(out),
            "--recipes", "fp32", "int8+optimizer_state=int16"]
    return argv, out, main(argv)


def _rows(out):
    with (out / "scores.csv").open() as f:
        return list(csv.DictReader(f))


def test_cli_gan_writes_grids_scores_and_table(cli_run):
    _, out, status = cli_run
    assert status == 0
    rows = _rows(out)
    assert [r["recipe"] for r in rows] == ["fp32", "int8+optimizer_state=int16", "real training images"]
    assert all(math.isfinite(float(r["fid"])) and r["diverged"] in ("no", "-") for r in rows)
    assert "| fp32 | 1 |" in (out / "scores.md").read_text()
    import matplotlib.pyplot as plt

    grid = plt.imread(out / "fp32" / "samples.png")
    assert grid.shape[:2] == ((8 * 30 + 2) * 3,) * 2  # 8x8 images of 28 px, 2 px apart, 3 screen px each
    for name in ("samples.png", "losses.png", "classifier.pt"):
        assert (out / name).stat().st_size > 0


def test_cli_gan_refuses_a_finished_run_and_reads_it_back_on_resume(cli_run, capsys):
    argv, out, _ = cli_run
    rows = _rows(out)
    capsys.readouterr()
    assert main(argv) == 2  # the runs are there: refused without --resume/--overwrite
    assert capsys.readouterr().err.startswith("lowprec: error:")
    assert main([*argv, "--resume"]) == 0  # finished: read back, the same table
    assert _rows(out) == rows


def test_cli_gan_refuses_bad_options_in_one_line(tmp_path, capsys):
    for extra in (["--resume", "--overwrite"], ["--recipes", "int8+width=2"], ["--epochs", "0"]):
        assert main(["gan", "--out", str(tmp_path / "x"), "--train-limit", "8", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lowprec: error:") and err.count("\n") == 1, err
