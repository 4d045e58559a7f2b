"""One training run: a task trained under one recipe, with metrics, logs, checkpoints and resume.

The run directory holds ``metrics.csv`` (one row per epoch), TensorBoard event files (when tensorboard is
installed), ``checkpoint.pt`` (written atomically after every epoch, and every ``checkpoint_every`` steps) and
``result.json`` when finished. ``resume=True`` continues from the checkpoint, mid-epoch included, and reaches
the same final weights as an uninterrupted run: the checkpoint holds the next step, the epoch's running loss
and the trainer's state with torch's RNG; each epoch's example order is a function of (seed, epoch).

Before training, a run checks its settings, device and data (``validate``: an infinite learning rate, an
empty split, a label the model has no output for, inputs of the wrong shape are refused) and claims its
directory (``rundir``: writable, locked for the run's duration, and a directory that already holds a run is
refused unless ``resume`` or ``overwrite`` is given); a failed write later is a ``RunDirectoryError`` naming the
file and the cause, with the previous checkpoint intact.

Under torch.distributed (torchrun) the model runs wrapped in DistributedDataParallel, every rank uses the same
seed and trains on its shard of each epoch's order (``lowprec.train.distributed.shard``), the logged loss is
the mean over the ranks, every rank evaluates the whole test set (so all ranks draw the same random numbers),
and rank 0 alone writes metrics, logs and checkpoints. A checkpoint resumes only with the same number of ranks.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..diagnostics.overflow import describe_skipped_step
from ..formats import Format, parse_format
from ..models import apply_max_norm, build_model
from ..nn import convert, quantizers
from ..policy import Policy
from ..train import SGD, AdamW, Trainer, cross_entropy, distributed
from ..train.evaluating import evaluating
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .recipes import Recipe
from .rundir import claim, writing
from .tasks import Task, TaskData
from .validate import check_data_fits, check_device, check_finite, check_settings, check_value

__all__ = ["RunResult", "run", "evaluate", "evaluate_loss"]

log = logging.getLogger("lowprec.train")


@dataclass
class RunResult:
    """What a run produced: per-epoch history and the summary numbers."""

    task: str
    recipe: str
    seed: int
    history: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step's (unscaled) training loss
    skipped_steps: int = 0
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["test_accuracy"] if self.history else float("nan")

    @property
    def best_accuracy(self) -> float:
        return max((h["test_accuracy"] for h in self.history), default=float("nan"))

    @property
    def reported_accuracy(self) -> float:
        """The test accuracy a paper would report: at the first epoch of best validation accuracy when the run
        has a validation split (Courbariaux's protocol), else at the final epoch."""
        if not self.history or "val_accuracy" not in self.history[0]:
            return self.final_accuracy
        return max(self.history, key=lambda h: (h["val_accuracy"], -h["epoch"]))["test_accuracy"]


def _optimizer(task: Task, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """lowprec's multi-tensor SGD/AdamW (torch.optim semantics; they hand the lazy update its Δ directly).
    Adam with L2 weight decay is not offered: the "adam" tasks use AdamW's decoupled decay (0 by default)."""
    if task.optimizer == "adam":
        return AdamW(params, lr=lr, weight_decay=weight_decay, eps=task.adam_eps)
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _lr_at(task: Task, base: float, step: int, total: int, epoch: int, epochs: int) -> float:
    """The learning rate of step ``step`` of ``total`` (in epoch ``epoch`` of ``epochs``, from 0)."""
    if task.schedule == "inv":
        return base * (1 + 1e-4 * step) ** -0.75
    if task.schedule == "linear":
        return base * (1 - 0.9 * min(step / max(total, 1), 1.0))
    if task.schedule == "courbariaux":  # per epoch, to base/10 at half the epochs (theirs: 400 of 800)
        return base * (1 - 0.9 * min(epoch / max(epochs / 2, 1), 1.0))
    return base


def _momentum_at(task: Task, base: float, epoch: int, epochs: int) -> float:
    """Momentum in epoch ``epoch`` (from 0): under the "courbariaux" schedule linear from ``base`` to
    ``task.momentum_final`` over the first quarter of the epochs (theirs: 0.5 to 0.7 by epoch 200 of 800)."""
    if task.schedule != "courbariaux" or task.momentum_final is None:
        return base
    return base + (task.momentum_final - base) * min(epoch / max(epochs / 4, 1), 1.0)


def _apply_schedule(optimizer: torch.optim.Optimizer, task: Task, settings: dict[str, Any], step: int, total: int,
                    epoch: int) -> None:
    """Every param group's lr (``_lr_at``) and, where it has one, momentum (``_momentum_at``) for this step."""
    for group in optimizer.param_groups:
        group["lr"] = _lr_at(task, settings["lr"], step, total, epoch, settings["epochs"])
        if "momentum" in group:
            group["momentum"] = _momentum_at(task, settings["momentum"], epoch, settings["epochs"])


def _scores(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
            batch_size: int, with_loss: bool) -> tuple[float, float]:
    """(correct predictions, summed cross-entropy: each batch's float32 sum added in float64; 0 unless
    ``with_loss``) over every label (every position of a language model), in eval mode, ``batch_size`` examples
    at a time. The sums stay on the device until the end: one host sync, not two per batch."""
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    loss = torch.zeros((), dtype=torch.float64, device=labels.device)
    with evaluating(model):
        for i in range(0, len(labels), batch_size):
            logits = model(*(t[i : i + batch_size] for t in inputs))
            correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum()
            if with_loss:
                loss += cross_entropy(logits, labels[i : i + batch_size], reduction="sum").double()
    return float(correct.item()), loss.item()


def evaluate(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, batch_size: int = 500) -> float:
    """Accuracy in percent over every label: per example, or per position of a language model's (N, T) labels."""
    return 100.0 * _scores(model, inputs, labels, batch_size, with_loss=False)[0] / max(labels.numel(), 1)


def evaluate_loss(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
                  batch_size: int = 500) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy in nats) over every label; perplexity is exp(loss)."""
    correct, loss = _scores(model, inputs, labels, batch_size, with_loss=True)
    n = max(labels.numel(), 1)
    return 100.0 * correct / n, loss / n


def _writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def run(
    task: Task,
    recipe: Recipe,
    data: TaskData,
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    after_step: Callable[[int, Any], None] | None = None,
    device: str | torch.device = "cpu",
    checkpoint_every: int | None = None,
    allreduce_format: str | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train ``task`` under ``recipe`` on ``data`` on ``device``; evaluate on the test split after every epoch.

    ``progress(step, total_steps, loss)`` is called after every step; ``after_step(step, step_result)`` too
    (tests use it to interrupt runs). With ``out_dir``, metrics, TensorBoard logs and an atomic checkpoint are
    written every epoch, and every ``checkpoint_every`` steps; ``resume`` continues from the latest checkpoint
    (bit-exactly) and refuses, with CheckpointError naming what differs, one written by another run or one whose
    position does not fit this run's schedule. A directory that already holds a run is refused (RunDirectoryError)
    unless ``resume`` or ``overwrite`` (start afresh, removing its checkpoint, metrics and result) is given; a
    run holds a lock on its directory while it writes there. Under torch.distributed, ``allreduce_format``
    averages the gradients in that format (``"grad"``: the policy's weight_grad format;
    ``distributed.quantized_allreduce_hook``) instead of float32. Raises ValueError for settings that cannot
    train (no examples, a batch size or epoch count below 1, a learning rate that is not a finite positive
    number, an unknown schedule, a device this machine lacks), for data holding NaN or inf (a Trainer would skip
    every step that sees them) and for data the model cannot take (``validate.check_data_fits``).
    """
    settings = {"lr": task.lr, "epochs": task.epochs, "batch_size": task.batch_size, "schedule": task.schedule,
                "loss_multiplier": task.loss_multiplier, "momentum": task.momentum,
                "weight_decay": task.weight_decay, **recipe.train}
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in the directory, or replace it")
    check_settings(settings, len(data.train_labels), checkpoint_every)
    device = check_device(device)
    model_kwargs = {**task.model_kwargs, **data.model_kwargs, **recipe.model}
    if "width" in recipe.model:
        check_value("width", recipe.model["width"])
    check_finite(data)
    check_data_fits(build_model(task.model, **model_kwargs), data, task.name)
    allreduce = _allreduce_format(recipe.policy, allreduce_format)
    writes = out_dir is not None and distributed.rank() == 0
    out = Path(out_dir) if out_dir is not None else None
    lock = claim(out, resume=resume, overwrite=overwrite) if writes else None
    try:
        return _train(task, recipe, data, settings, model_kwargs, seed=seed, out=out, writes=writes, resume=resume,
                      progress=progress, after_step=after_step, device=device, checkpoint_every=checkpoint_every,
                      allreduce_format=allreduce_format, allreduce=allreduce)
    finally:
        if lock is not None:
            lock.release()


def _train(task: Task, recipe: Recipe, data: TaskData, settings: dict[str, Any], model_kwargs: dict[str, Any], *,
           seed: int, out: Path | None, writes: bool, resume: bool, progress, after_step, device: torch.device,
           checkpoint_every: int | None, allreduce_format: str | None, allreduce: Format | None) -> RunResult:
    """``run`` once its inputs are checked and its directory claimed (``allreduce``: ``allreduce_format``
    resolved against the policy)."""
    torch.manual_seed(seed)
    model = convert(build_model(task.model, **model_kwargs), recipe.policy)
    model.to(device)
    data = replace(data, **{k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)
                            for k, v in (("train_inputs", data.train_inputs), ("train_labels", data.train_labels),
                                         ("test_inputs", data.test_inputs), ("test_labels", data.test_labels),
                                         ("val_inputs", data.val_inputs), ("val_labels", data.val_labels))
                            if v is not None})
    optimizer = _optimizer(task, model.parameters(), settings["lr"], settings["momentum"], settings["weight_decay"])
    trainer = Trainer(model, optimizer, recipe.policy)
    net = _data_parallel(model, device, allreduce)
    result = RunResult(task.name, recipe.label, seed)
    n, batch = len(data.train_labels), settings["batch_size"]
    steps_per_epoch = math.ceil(math.ceil(n / distributed.world_size()) / batch)
    total = settings["epochs"] * steps_per_epoch
    step, epoch_sums = 0, (0.0, 0)  # the next step to run; the running loss sum and steps of its epoch

    ckpt_path = out / "checkpoint.pt" if out else None
    identity = {"task": task.name, "recipe": recipe.label, "policy": recipe.policy.spec(), "seed": seed,
                "world_size": distributed.world_size(), "allreduce_format": allreduce_format, "settings": settings}
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = _load_resumable(ckpt_path, identity, total, steps_per_epoch)
        trainer.load_state_dict(state["trainer"])
        result = RunResult(**state["result"])
        step, epoch_sums = state["next_step"], tuple(state["epoch_sums"])
        if writes:
            with writing("metrics", out / "metrics.csv"):
                _rewrite_metrics(out, result.history)  # rows logged after the checkpoint are logged again
    elif writes:
        (out / "metrics.csv").unlink(missing_ok=True)  # a fresh run starts a fresh log
    writer = _writer(out) if writes else None

    def checkpoint() -> None:
        with writing("checkpoint", ckpt_path):
            save_checkpoint(ckpt_path, {"identity": identity, "next_step": step, "epoch_sums": epoch_sums,
                                        "trainer": trainer.state_dict(), "result": asdict(result)})

    if step == 0 and task.warmup_epochs and any(q.exponent is not None for _, _, q in quantizers(model)):
        _warmup(task, trainer, net, data, settings, seed, n, steps_per_epoch)
    started = time.perf_counter() - result.seconds
    for epoch in range(step // steps_per_epoch, settings["epochs"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        order = distributed.shard(order).to(device)
        if step == epoch * steps_per_epoch:
            epoch_sums = (0.0, 0)
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            _apply_schedule(optimizer, task, settings, step, total, epoch)
            logits = net(*(t[idx] for t in data.train_inputs))
            loss = cross_entropy(logits, data.train_labels[idx])
            step_result = trainer.step(loss * settings["loss_multiplier"])
            if task.max_norm is not None and not step_result.skipped:
                apply_max_norm(model, task.max_norm)
                trainer.requantize_()
            value = distributed.mean_over_ranks(loss.detach())
            result.losses.append(value)
            result.skipped_steps += int(step_result.skipped)
            if step_result.skipped and distributed.rank() == 0:  # which modules and roles overflowed: no extra work
                log.warning(describe_skipped_step(step, step_result))
            epoch_sums = (epoch_sums[0] + value, epoch_sums[1] + 1)
            step += 1
            if writes and checkpoint_every and step % checkpoint_every == 0 and b + 1 < steps_per_epoch:
                checkpoint()
            if progress:
                progress(step, total, value)
            if after_step:
                after_step(step - 1, step_result)
        row = {"epoch": epoch + 1, "train_loss": epoch_sums[0] / max(epoch_sums[1], 1),
               **_held_out_metrics(task, model, data),
               "loss_scale": float(trainer.scaler.scale), "skipped_steps": result.skipped_steps,
               "seconds": time.perf_counter() - started}
        result.history.append(row)
        result.seconds = row["seconds"]
        if writes:
            with writing("metrics", out / "metrics.csv"):
                _log_epoch(out, writer, row)
            checkpoint()
    if writes:
        with writing("result", out / "result.json"):
            (out / "result.json").write_text(json.dumps(asdict(result) | {"identity": identity}, indent=1))
        if writer:
            writer.close()
    return result


def _warmup(task: Task, trainer: Trainer, net: nn.Module, data: TaskData, settings: dict[str, Any], seed: int,
            n: int, steps_per_epoch: int) -> None:
    """Courbariaux's range initialisation: ``task.warmup_epochs`` epochs in full precision (the first epoch's
    learning rate and momentum, shuffled by their own seeds) that only move the dynamic fixed point exponents;
    the initial parameters and optimizer state are then restored (``Trainer.warmup_exponents``)."""
    batch = settings["batch_size"]

    def batches():
        for e in range(task.warmup_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + 500 + e))
            order = distributed.shard(order).to(data.train_labels.device)
            for b in range(steps_per_epoch):
                yield order[b * batch : (b + 1) * batch]

    def loss_fn(_model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        logits = net(*(t[idx] for t in data.train_inputs))
        return cross_entropy(logits, data.train_labels[idx]) * settings["loss_multiplier"]

    _apply_schedule(trainer.optimizer, task, settings, 0, 1, 0)
    trainer.warmup_exponents(batches(), loss_fn)


def _held_out_metrics(task: Task, model: nn.Module, data: TaskData) -> dict[str, float]:
    """``test_accuracy`` (and ``val_accuracy`` with a validation split); for a language model also
    ``val_loss`` (nats per token) and ``perplexity``."""
    if not task.language_model:
        metrics = {"test_accuracy": evaluate(model, data.test_inputs, data.test_labels)}
        if data.val_labels is not None:
            metrics["val_accuracy"] = evaluate(model, data.val_inputs, data.val_labels)
        return metrics
    accuracy, loss = evaluate_loss(model, data.test_inputs, data.test_labels)
    return {"test_accuracy": accuracy, "val_loss": loss, "perplexity": math.inf if loss > 700 else math.exp(loss)}


def _allreduce_format(policy: Policy, name: str | None) -> Format | None:
    """The format gradients are averaged in across ranks: None (float32), a format string, or "grad"."""
    if name != "grad":
        return None if name is None else parse_format(name)
    grad = policy.get("weight_grad")
    if grad is None:
        raise ValueError("allreduce_format='grad' but the policy leaves weight_grad in float32; name a format")
    return grad.format


def _data_parallel(model: nn.Module, device: str | torch.device, allreduce: Format | None) -> nn.Module:
    """The module the forward pass goes through: DDP around ``model`` under torch.distributed (averaging the
    gradients in ``allreduce`` when given), else ``model``."""
    if not distributed.is_initialized():
        return model
    device = torch.device(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if allreduce is not None:
        ddp.register_comm_hook(None, distributed.quantized_allreduce_hook(allreduce))
    return ddp


_RESUMABLE = ("identity", "next_step", "epoch_sums", "trainer", "result")


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """``key: checkpoint X, this run Y`` for every differing entry of two (nested) dicts."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in sorted(set(saved) | set(now), key=str)
                for d in _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else str(k))]
    return [] if saved == now else [f"{where}: checkpoint {saved!r}, this run {now!r}"]


def _load_resumable(path: Path, identity: dict[str, Any], total: int, steps_per_epoch: int) -> dict[str, Any]:
    """The checkpoint at ``path`` if it is intact, belongs to this run and sits on its schedule (``total`` steps,
    ``steps_per_epoch``); CheckpointError saying what differs."""
    state = load_checkpoint(path)
    missing = [k for k in _RESUMABLE if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a run checkpoint of this lowprec (no {', '.join(missing)}); "
                              "start afresh without --resume or remove it")
    diff = _differences(state["identity"], identity)
    if diff:
        raise CheckpointError(f"{path} belongs to another run; it differs in {'; '.join(diff)}. Resume with the "
                              "same settings, or use another output folder")
    step, result = state["next_step"], state["result"]
    history = result.get("history") if isinstance(result, dict) else None
    losses = result.get("losses") if isinstance(result, dict) else None
    if (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total
            or not isinstance(history, list) or len(history) != step // steps_per_epoch
            or not isinstance(losses, list) or len(losses) != step):
        raise CheckpointError(f"{path} does not fit this run's schedule: next step {step!r} of {total}, "
                              f"{len(history) if isinstance(history, list) else '?'} epochs logged, "
                              f"{len(losses) if isinstance(losses, list) else '?'} losses; a checkpoint of this "
                              "run holds next step <= the total, one logged epoch per finished epoch and one loss "
                              "per step. Start afresh with --overwrite")
    return state


def _rewrite_metrics(out: Path, history: list[dict[str, float]]) -> None:
    (out / "metrics.csv").unlink(missing_ok=True)
    for row in history:
        _append_row(out / "metrics.csv", row)


def _append_row(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _log_epoch(out: Path, writer, row: dict[str, float]) -> None:
    _append_row(out / "metrics.csv", row)
    if writer is not None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
