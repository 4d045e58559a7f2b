"""One training run: a task trained under one recipe, with metrics, logs, checkpoints and resume.

The run directory holds ``metrics.csv`` (one row per epoch), TensorBoard event files (when tensorboard is
installed), ``checkpoint.pt`` (written atomically after every epoch) and ``result.json`` when finished.
``resume=True`` continues from the checkpoint and reaches the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import apply_max_norm, build_model
from ..nn import convert, fill_clip_range
from ..train import SGD, AdamW, Trainer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .recipes import Recipe
from .tasks import Task, TaskData

__all__ = ["RunResult", "run", "evaluate"]


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


def _optimizer(task: Task, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """lowprec's multi-tensor SGD/AdamW (torch.optim semantics; they hand the lazy update its Δ directly).
    Adam with L2 weight decay is not offered: the "adam" tasks use AdamW's decoupled decay (0 by default)."""
    if task.optimizer == "adam":
        return AdamW(params, lr=lr, weight_decay=weight_decay, eps=task.adam_eps)
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _lr_at(task: Task, base: float, step: int, total: int) -> float:
    if task.schedule == "inv":
        return base * (1 + 1e-4 * step) ** -0.75
    if task.schedule == "linear":
        return base * (1 - 0.9 * min(step / max(total, 1), 1.0))
    return base


@torch.no_grad()
def evaluate(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, batch_size: int = 500) -> float:
    """Accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(*(t[i : i + batch_size] for t in inputs))
        correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(len(labels), 1)


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
) -> RunResult:
    """Train ``task`` under ``recipe`` on ``data`` on ``device``; evaluate on the test split after every epoch.

    ``progress(step, total_steps, loss)`` is called after every step; ``after_step(step, step_result)`` too
    (tests use it to interrupt runs). With ``out_dir``, metrics, TensorBoard logs and an atomic checkpoint are
    written every epoch; ``resume`` continues from that checkpoint (bit-exactly).
    """
    settings = {"lr": task.lr, "epochs": task.epochs, "batch_size": task.batch_size, "schedule": task.schedule,
                "loss_multiplier": task.loss_multiplier, "momentum": task.momentum,
                "weight_decay": task.weight_decay, **recipe.train}
    torch.manual_seed(seed)
    model = convert(build_model(task.model, **{**task.model_kwargs, **recipe.model}), recipe.policy)
    fill_clip_range(model)  # WRPN's uniform<k> weights: start spread over the clip range, not all at 0
    model.to(device)
    data = TaskData(*(tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)
                      for v in (data.train_inputs, data.train_labels, data.test_inputs, data.test_labels)),
                    data.source)
    optimizer = _optimizer(task, model.parameters(), settings["lr"], settings["momentum"], settings["weight_decay"])
    trainer = Trainer(model, optimizer, recipe.policy)
    result = RunResult(task.name, recipe.label, seed)
    n, batch = len(data.train_labels), settings["batch_size"]
    steps_per_epoch = math.ceil(n / batch)
    total = settings["epochs"] * steps_per_epoch
    start_epoch = 0

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    identity = {"task": task.name, "recipe": recipe.label, "policy": recipe.policy.spec(), "seed": seed,
                "settings": settings}
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state["identity"] != identity:
            diff = {k for k in identity if state["identity"].get(k) != identity[k]}
            raise CheckpointError(f"{ckpt_path} belongs to another run (differs in: {', '.join(sorted(diff))})")
        trainer.load_state_dict(state["trainer"])
        result = RunResult(**state["result"])
        start_epoch = state["epoch"] + 1
    elif out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.csv").unlink(missing_ok=True)  # a fresh run starts a fresh log
    writer = _writer(out) if out else None

    started = time.perf_counter() - result.seconds
    for epoch in range(start_epoch, settings["epochs"]):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).to(device)
        epoch_loss, epoch_steps = 0.0, 0
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            idx = order[b * batch : (b + 1) * batch]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(task, settings["lr"], step, total)
            logits = model(*(t[idx] for t in data.train_inputs))
            loss = F.cross_entropy(logits.float(), data.train_labels[idx])
            step_result = trainer.step(loss * settings["loss_multiplier"])
            if task.max_norm is not None and not step_result.skipped:
                apply_max_norm(model, task.max_norm)
                trainer.requantize_()
            value = loss.item()
            result.losses.append(value)
            result.skipped_steps += int(step_result.skipped)
            epoch_loss, epoch_steps = epoch_loss + value, epoch_steps + 1
            if progress:
                progress(step + 1, total, value)
            if after_step:
                after_step(step, step_result)
        row = {"epoch": epoch + 1, "train_loss": epoch_loss / max(epoch_steps, 1),
               "test_accuracy": evaluate(model, data.test_inputs, data.test_labels),
               "loss_scale": float(step_result.next_scale), "skipped_steps": result.skipped_steps,
               "seconds": time.perf_counter() - started}
        result.history.append(row)
        result.seconds = row["seconds"]
        if out is not None:
            _log_epoch(out, writer, row)
            save_checkpoint(ckpt_path, {"identity": identity, "epoch": epoch, "trainer": trainer.state_dict(),
                                        "result": asdict(result)})
    if out is not None:
        (out / "result.json").write_text(json.dumps(asdict(result) | {"identity": identity}, indent=1))
        if writer:
            writer.close()
    return result


def _log_epoch(out: Path, writer, row: dict[str, float]) -> None:
    path = out / "metrics.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    if writer is not None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
