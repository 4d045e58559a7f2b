"""The GAN experiment of Micikevicius et al. (DCGAN trains in fp16 without loss scaling) and Park et al. (an
INT8 GAN fails without the lazy update and matches fp32 with it): a small DCGAN on MNIST under several recipes.

``gan_experiment`` trains, for each recipe, the DCGAN generator G and discriminator D (``lowprec.models.DCGAN``,
28x28) converted under the recipe's policy, one ``lowprec.Trainer`` per network, with Adam at Park's GAN
settings for every recipe (lr 1e-4, betas (0.5, 0.9), eps 1e-3: ``GanSettings``). One step:

1. D: ``BCE(D(x), 1) + BCE(D(G(z).detach()), 0)`` on a batch of real images x in [-1, 1] and noise z ~ N(0, I);
   ``trainer_d.step``.
2. G (D's parameters frozen): the non-saturating ``BCE(D(G(z)), 1)`` on the same fakes; ``trainer_g.step``.

Each network's loss scale is its policy's (``mixed-fp16+loss_scale=none``: none, as MPT trained DCGAN). A step
whose D or G loss is NaN or inf marks the recipe diverged at that epoch and ends its training; its scores are
still computed (a NaN image makes them NaN). After every epoch the generator (eval mode, fixed noise) is scored
with a classifier trained here (``gan_scores``: FID-like Fréchet distance of LeNet features of ``samples``
generated vs as many real test images, confidence, class entropy, Inception-score formula), and everything a
bit-exact resume needs is checkpointed (both trainers with the RNG states, the history, the divergence).

Output folder: ``classifier.pt`` (the scoring LeNet, a cache reused when its seed, data, epochs and batch size
match), ``scores.csv`` and ``scores.md`` (one row per recipe and one for real training images), ``samples.png`` (the
recipes' 8x8 grids side by side), ``losses.png`` (D and G loss per step, score per epoch), and per recipe
(``<run_dir_name(label)>/``) ``checkpoint.pt``, ``metrics.csv``, ``samples.png`` and ``result.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits

from ..data.mnist import MNIST_MEAN, MNIST_STD
from ..models import DCGAN, LeNet
from ..nn import convert
from ..train import Trainer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compare import run_dir_name
from .gan_scores import accuracy, class_scores, features_and_logits, frechet_distance, train_classifier
from .recipes import Recipe
from .rundir import claim, writing
from .validate import check_device

__all__ = ["GanSettings", "GanData", "GanResult", "GanScorer", "DEFAULT_GAN_RECIPES", "load_gan_data",
           "train_gan", "gan_experiment", "build_scorer"]

#: MPT's DCGAN (fp16 storage, no loss scaling) and Park's GAN recipe (INT8 weights, activations and gradients,
#: Adam state in INT16) without and with the lazy update.
DEFAULT_GAN_RECIPES = ["fp32", "mixed-fp16+loss_scale=none", "int8+optimizer_state=int16",
                       "int8-lazy+optimizer_state=int16"]
#: Seed offsets of the fixed noise of the sample grids and of the scored samples (independent of training).
_GRID_SEED, _SCORE_SEED = 7_919, 104_729


@dataclass(frozen=True)
class GanSettings:
    """The schedule and sizes of a GAN run. ``lr``, ``betas``, ``eps``: Adam for G and D (Park et al.'s GAN
    settings); ``nz``, ``ngf``, ``ndf``: DCGAN's noise size and widths; ``samples``: images scored per recipe
    (and real test images they are compared with); ``grid``: the sample grid's side; ``classifier_epochs``:
    the scoring LeNet's training."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-3
    nz: int = 64
    ngf: int = 32
    ndf: int = 32
    samples: int = 2000
    grid: int = 8
    classifier_epochs: int = 2

    def check(self) -> None:
        """ValueError naming a setting that cannot work."""
        for name in ("epochs", "batch_size", "nz", "ngf", "ndf", "samples", "grid", "classifier_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GAN setting {name} must be an integer >= 1, got {value!r}")
        if self.samples < 2:
            raise ValueError(f"GAN setting samples must be at least 2 (a covariance), got {self.samples}")
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"GAN settings lr and eps must be finite numbers > 0, got {self.lr!r} and {self.eps!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"GAN setting betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass(frozen=True)
class GanData:
    """MNIST for the GAN: training images in [-1, 1] (the generator's tanh range) and, normalised with MNIST's
    mean/std as the classifier takes them, the same training images with labels and the test images."""

    train: Tensor
    train_normalised: Tensor
    train_labels: Tensor
    test_normalised: Tensor
    test_labels: Tensor
    source: str


def to_classifier_input(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> MNIST-normalised, as the classifier was trained."""
    return ((images + 1) / 2 - MNIST_MEAN) / MNIST_STD


def load_gan_data(data_root: str | Path | None, train_limit: int | None) -> GanData:
    """MNIST's first ``train_limit`` training images (all by default) and its test images, from ``data_root``
    as ``lowprec compare`` finds them (default $LOWPREC_DATA, then the shipped subset)."""
    from .tasks import get_task, load_task_data

    task = replace(get_task("mnist-lenet"), train_limit=train_limit, test_limit=None)
    data = load_task_data(task, data_root)
    x = data.train_inputs[0]
    return GanData(((x * MNIST_STD + MNIST_MEAN) * 2 - 1).clamp(-1, 1), x, data.train_labels, data.test_inputs[0],
                   data.test_labels, data.source)


@dataclass
class GanScorer:
    """The scoring classifier and the real test images' features (see ``gan_scores``)."""

    classifier: LeNet
    real_features: Tensor
    accuracy: float

    def score(self, images: Tensor) -> dict[str, float]:
        """fid, confidence, class_entropy, inception_score of generated ``images`` in [-1, 1]; all NaN when
        the images hold NaN or inf."""
        if not torch.isfinite(images).all():
            return dict.fromkeys(("fid", "confidence", "class_entropy", "inception_score"), math.nan)
        feats, logits = features_and_logits(self.classifier, to_classifier_input(images.float().cpu()))
        return {"fid": frechet_distance(feats, self.real_features), **asdict(class_scores(logits))}


def build_scorer(data: GanData, settings: GanSettings, seed: int, cache: Path | None) -> GanScorer:
    """The scorer: an fp32 LeNet trained on ``data``'s training images (``train_classifier``), read from
    ``cache`` when it holds one trained from the same seed, images, epochs and batch size (else trained and
    written there).
    ValueError when the test split has fewer images than ``settings.samples``."""
    if len(data.test_labels) < settings.samples:
        raise ValueError(f"samples={settings.samples} exceeds the {len(data.test_labels)} test images the generated "
                         "images are compared with; use fewer samples")
    identity = {"seed": seed, "train_images": len(data.train_labels), "epochs": settings.classifier_epochs,
                "batch_size": settings.batch_size, "first_label_sum": int(data.train_labels[:1000].sum())}
    classifier = LeNet()
    cached = None
    if cache is not None and cache.exists():
        try:
            cached = load_checkpoint(cache)
        except CheckpointError:
            cached = None  # a cache: a damaged one is retrained and replaced
    if cached is not None and cached.get("identity") == identity:
        classifier.load_state_dict(cached["model"])
        classifier.eval()
    else:
        classifier = train_classifier(data.train_normalised, data.train_labels, seed=seed,
                                      epochs=settings.classifier_epochs, batch_size=settings.batch_size)
        if cache is not None:
            with writing("classifier", cache):
                save_checkpoint(cache, {"identity": identity, "model": classifier.state_dict()})
    real, _ = features_and_logits(classifier, data.test_normalised[: settings.samples])
    return GanScorer(classifier, real, accuracy(classifier, data.test_normalised, data.test_labels))


@dataclass
class GanResult:
    """One recipe's GAN run: per-epoch history (epoch, loss_d, loss_g, fid, confidence, class_entropy,
    inception_score, skipped_d, skipped_g, seconds), every step's D and G losses, the epoch (1-based) whose
    step first had a non-finite loss (None: no divergence), skipped steps (inf/NaN gradients) per network."""

    recipe: str
    seed: int
    history: list[dict[str, float]] = field(default_factory=list)
    losses_d: list[float] = field(default_factory=list)
    losses_g: list[float] = field(default_factory=list)
    diverged_epoch: int | None = None
    skipped_d: int = 0
    skipped_g: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def _settings_for(recipe: Recipe, settings: GanSettings) -> GanSettings:
    """``settings`` with the recipe's ``lr``, ``epochs`` and ``batch_size``; ValueError for recipe settings a GAN
    run has no use for (width, momentum, ...)."""
    unused = sorted(set(recipe.model) | (set(recipe.train) - {"lr", "epochs", "batch_size"}))
    if unused:
        raise ValueError(f"recipe {recipe.label!r}: {', '.join(unused)} has no meaning for the GAN run (Adam at "
                         "fixed betas/eps, DCGAN at fixed widths); it takes lr, epochs and batch_size")
    return replace(settings, **recipe.train)


def _build(recipe: Recipe, settings: GanSettings, seed: int, device: torch.device):
    torch.manual_seed(seed)
    gan = DCGAN(nz=settings.nz, ngf=settings.ngf, ndf=settings.ndf, channels=1, image_size=28)
    trainers = []
    for net in (gan.generator, gan.discriminator):
        model = convert(net, recipe.policy).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps)
        trainers.append(Trainer(model, optimizer, recipe.policy))
    return trainers


def _noise(count: int, nz: int, seed: int, device: torch.device) -> Tensor:
    return torch.randn(count, nz, generator=torch.Generator().manual_seed(seed)).to(device)


def generate(generator: nn.Module, z: Tensor, batch: int = 500) -> Tensor:
    """``generator(z)`` in eval mode without gradients (batch-norm running statistics), the model's mode and the
    global RNG left as they were."""
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return torch.cat([generator(z[i : i + batch]) for i in range(0, len(z), batch)])
    finally:
        generator.train(was_training)


def train_gan(
    recipe: Recipe,
    data: GanData,
    scorer: GanScorer,
    settings: GanSettings = GanSettings(),
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GanResult, nn.Module]:
    """Train G and D under ``recipe`` (see the module docstring); return the result and the trained generator.

    With ``out_dir``: ``checkpoint.pt`` after every epoch, ``metrics.csv``, ``samples.png`` (the fixed-noise
    grid) and ``result.json``; the directory is claimed as ``lowprec compare`` claims a run's (refused when it
    holds a run unless ``resume`` or ``overwrite``). ``resume`` continues from the last finished epoch and
    reaches the same weights as an uninterrupted run, also when ``settings.epochs`` is raised on resume (a
    longer run: nothing depends on the total). ``progress(step, total, loss_d)`` and ``after_step(step)``
    are called after every step."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in the directory, or replace it")
    settings = _settings_for(recipe, settings)
    settings.check()
    device = check_device(device)
    out = Path(out_dir) if out_dir is not None else None
    lock = claim(out, resume=resume, overwrite=overwrite) if out is not None else None
    try:
        return _train(recipe, data, scorer, settings, seed, out, resume, progress, after_step, device)
    finally:
        if lock is not None:
            lock.release()


def _train(recipe, data, scorer, settings, seed, out, resume, progress, after_step, device):
    trainer_g, trainer_d = _build(recipe, settings, seed, device)
    g, d = trainer_g.model, trainer_d.model
    train = data.train.to(device)
    n, batch = len(train), settings.batch_size
    steps_per_epoch = math.ceil(n / batch)
    total = settings.epochs * steps_per_epoch
    identity = {"recipe": recipe.label, "policy": recipe.policy.spec(), "seed": seed, "train_images": n,
                "settings": json.loads(json.dumps(asdict(settings)))}
    result = GanResult(recipe.label, seed)
    ckpt = out / "checkpoint.pt" if out else None
    if resume and ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        if _without_epochs(state.get("identity")) != _without_epochs(identity):
            raise CheckpointError(f"{ckpt} belongs to another GAN run (checkpoint {state.get('identity')!r}, this run "
                                  f"{identity!r}); resume with the same settings, or use another output folder")
        trainer_g.load_state_dict(state["g"])
        trainer_d.load_state_dict(state["d"])
        result = GanResult(**state["result"])
        if len(result.history) > settings.epochs:
            raise CheckpointError(f"{ckpt} holds {len(result.history)} epochs, more than the {settings.epochs} asked "
                                  "for; resume with at least as many epochs, or use another output folder")
    if out is not None:
        _write_metrics(out, result.history)
    ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, device=device)
    started = time.perf_counter() - result.seconds
    for epoch in range(len(result.history), settings.epochs):
        if result.diverged_epoch is not None:
            break
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).to(device)
        sums = [0.0, 0.0]
        for b in range(steps_per_epoch):
            real = train[order[b * batch : (b + 1) * batch]]
            k = len(real)
            fake = g(torch.randn(k, settings.nz, device=device))
            loss_d = (binary_cross_entropy_with_logits(d(real).float(), ones[:k])
                      + binary_cross_entropy_with_logits(d(fake.detach()).float(), zeros[:k]))
            result.skipped_d += int(trainer_d.step(loss_d).skipped)
            d.requires_grad_(False)  # G's step: no gradients into D
            try:
                loss_g = binary_cross_entropy_with_logits(d(fake).float(), ones[:k])
                result.skipped_g += int(trainer_g.step(loss_g).skipped)
            finally:
                d.requires_grad_(True)
            ld, lg = float(loss_d.detach()), float(loss_g.detach())
            result.losses_d.append(ld)
            result.losses_g.append(lg)
            sums[0], sums[1] = sums[0] + ld, sums[1] + lg
            step = epoch * steps_per_epoch + b + 1
            if progress:
                progress(step, total, ld)
            if after_step:
                after_step(step - 1)
            if not (math.isfinite(ld) and math.isfinite(lg)):
                result.diverged_epoch = epoch + 1
                if progress:
                    progress(total, total, ld)  # the bar ends here
                break
        images = generate(g, _noise(settings.samples, settings.nz, seed + _SCORE_SEED, device))
        row = {"epoch": epoch + 1, "loss_d": sums[0] / (b + 1), "loss_g": sums[1] / (b + 1), **scorer.score(images),
               "skipped_d": result.skipped_d, "skipped_g": result.skipped_g,
               "seconds": time.perf_counter() - started}
        result.history.append(row)
        result.seconds = row["seconds"]
        if out is not None:
            with writing("metrics", out / "metrics.csv"):
                _write_metrics(out, result.history)
            with writing("checkpoint", ckpt):
                save_checkpoint(ckpt, {"identity": identity, "g": trainer_g.state_dict(), "d": trainer_d.state_dict(),
                                       "result": asdict(result)})
    if out is not None:
        from .gan_report import save_grid

        grid = generate(g, _noise(settings.grid**2, settings.nz, seed + _GRID_SEED, device))
        with writing("sample grid", out / "samples.png"):
            save_grid(grid, settings.grid, out / "samples.png")
        with writing("result", out / "result.json"):
            (out / "result.json").write_text(json.dumps(asdict(result) | {"identity": identity}, indent=1))
    return result, g


def _without_epochs(identity: Any) -> Any:
    """A run's identity less its epoch count, which a resumed run may raise: no schedule depends on the total
    (Adam at a constant lr), so a longer run's first epochs are the same steps."""
    if not isinstance(identity, dict) or not isinstance(identity.get("settings"), dict):
        return identity
    return identity | {"settings": {k: v for k, v in identity["settings"].items() if k != "epochs"}}


def _write_metrics(out: Path, history: list[dict[str, float]]) -> None:
    import csv

    path = out / "metrics.csv"
    path.unlink(missing_ok=True)
    if history:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)


def gan_experiment(
    recipes: Sequence[Recipe],
    data: GanData,
    settings: GanSettings = GanSettings(),
    *,
    seed: int = 0,
    out_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress_factory: Callable[[Recipe], Callable[[int, int, float], None]] | None = None,
    on_scorer: Callable[[GanScorer], None] | None = None,
    device: str | torch.device = "cpu",
) -> list[GanResult]:
    """Every recipe's ``train_gan`` in ``out_dir/<run_dir_name(label)>``, then the tables and figures (see the
    module docstring). ``on_scorer`` is told the scorer once it is ready (its classifier's test accuracy)."""
    from .gan_report import plot_losses, save_side_by_side, write_scores

    labels = [r.label for r in recipes]
    if not recipes:
        raise ValueError("no recipes: give at least one")
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"recipes with the same label would share one run directory: {', '.join(twice)}")
    for recipe in recipes:  # refused before any training
        _settings_for(recipe, settings).check()
    out = Path(out_dir)
    for run_dir in [out / run_dir_name(label) for label in labels]:  # a refused directory: refused before training
        claim(run_dir, resume=resume, overwrite=overwrite).release()
    lock = claim(out, resume=resume, overwrite=overwrite)
    try:
        scorer = build_scorer(data, settings, seed, out / "classifier.pt")
    finally:
        lock.release()
    if on_scorer:
        on_scorer(scorer)
    results = []
    for recipe in recipes:
        progress = progress_factory(recipe) if progress_factory else None
        result, _ = train_gan(recipe, data, scorer, settings, seed=seed, out_dir=out / run_dir_name(recipe.label),
                              resume=resume, overwrite=overwrite, progress=progress, device=device)
        results.append(result)
    n = settings.samples
    real = scorer.score(data.train[:n]) if len(data.train) >= 2 else {}
    with writing("scores", out / "scores.csv"):
        write_scores(results, real, scorer.accuracy, out)
    with writing("figure", out / "samples.png"):
        save_side_by_side([(r.recipe, out / run_dir_name(r.recipe) / "samples.png") for r in results],
                          out / "samples.png")
    with writing("figure", out / "losses.png"):
        plot_losses(results, out / "losses.png")
    return results
