"""The GAN experiment's tables and figures: sample grids, the recipes' grids side by side, loss curves, scores."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .gan import GanResult

__all__ = ["save_grid", "save_side_by_side", "plot_losses", "score_rows", "write_scores"]

#: Pixels between the images of a grid.
PAD = 2


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images: Tensor, side: int) -> Tensor:
    """(side*side, 1, H, W) images in [-1, 1] -> one (side*(H+PAD)+PAD, ...) grey image in [0, 1] (NaN -> 0)."""
    n, _, h, w = images.shape
    if n != side * side:
        raise ValueError(f"a {side}x{side} grid takes {side * side} images, got {n}")
    pixels = ((images[:, 0].float().cpu() + 1) / 2).nan_to_num(0.0).clamp(0, 1)
    canvas = torch.ones(side * (h + PAD) + PAD, side * (w + PAD) + PAD)
    for i in range(n):
        r, c = divmod(i, side)
        canvas[PAD + r * (h + PAD) : PAD + r * (h + PAD) + h, PAD + c * (w + PAD) : PAD + c * (w + PAD) + w] = pixels[i]
    return canvas


def save_grid(images: Tensor, side: int, path: Path) -> None:
    """A side x side grid of ``images`` (in [-1, 1]) as a grey PNG, 3 screen pixels per image pixel."""
    plt = _pyplot()
    canvas = tile(images, side).repeat_interleave(3, 0).repeat_interleave(3, 1)
    plt.imsave(path, canvas.numpy(), cmap="gray", vmin=0.0, vmax=1.0)


def save_side_by_side(grids: Sequence[tuple[str, Path]], path: Path) -> None:
    """The PNGs ``grids`` (title, file) in one row, each under its title."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids), 4.0), squeeze=False)
    for ax, (title, png) in zip(axes[0], grids):
        ax.imshow(plt.imread(png))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: Sequence[float]) -> list[float]:
    window = max(1, len(values) // 100)
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def plot_losses(results: Sequence["GanResult"], path: Path) -> None:
    """Three panels: D loss and G loss per step (moving mean), FID-like score per epoch; one line per recipe."""
    plt = _pyplot()
    fig, (ax_d, ax_g, ax_f) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        ax_d.plot(range(1, len(r.losses_d) + 1), _smooth(r.losses_d), label=r.recipe, lw=1.0)
        ax_g.plot(range(1, len(r.losses_g) + 1), _smooth(r.losses_g), label=r.recipe, lw=1.0)
        ax_f.plot([h["epoch"] for h in r.history], [h["fid"] for h in r.history], marker="o", label=r.recipe)
    ax_d.set(xlabel="step", ylabel="D loss (moving mean)", title="discriminator")
    ax_g.set(xlabel="step", ylabel="G loss (moving mean)", title="generator")
    ax_f.set(xlabel="epoch", ylabel="FID-like (LeNet features)", yscale="log", title="sample quality (lower: better)")
    for ax in (ax_d, ax_g, ax_f):
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value: float, digits: int) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def score_rows(results: Sequence["GanResult"], real: dict[str, float]) -> list[dict[str, str]]:
    """One row per recipe (its last epoch's scores) and one for real training images (``real``: their scores
    against the test images, the floor a generator can reach): recipe, epochs, FID-like, confidence, class
    entropy, Inception-score formula, final D and G losses, skipped steps, diverged (the epoch, or "no")."""
    rows = []
    for r in results:
        last = r.final
        rows.append({"recipe": r.recipe, "epochs": str(len(r.history)), "fid": _number(last.get("fid"), 2),
                     "confidence": _number(last.get("confidence"), 3),
                     "class_entropy": _number(last.get("class_entropy"), 3),
                     "inception_score": _number(last.get("inception_score"), 2),
                     "loss_d": _number(last.get("loss_d"), 3), "loss_g": _number(last.get("loss_g"), 3),
                     "skipped": f"{r.skipped_d}/{r.skipped_g}",
                     "diverged": "no" if r.diverged_epoch is None else f"epoch {r.diverged_epoch}"})
    if real:
        rows.append({"recipe": "real training images", "epochs": "-", "fid": _number(real["fid"], 2),
                     "confidence": _number(real["confidence"], 3), "class_entropy": _number(real["class_entropy"], 3),
                     "inception_score": _number(real["inception_score"], 2), "loss_d": "-", "loss_g": "-",
                     "skipped": "-", "diverged": "-"})
    return rows


def write_scores(results: Sequence["GanResult"], real: dict[str, float], classifier_accuracy: float, out: Path) -> None:
    """``scores.csv`` and ``scores.md`` (the same rows; the markdown names the scoring classifier's accuracy)."""
    rows = score_rows(results, real)
    with (out / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    lines.append(f"\nScored with an fp32 LeNet trained here ({classifier_accuracy:.2f} % test accuracy); fid: "
                 "Fréchet distance of its 500 penultimate features, generated vs test images; skipped: D/G steps.")
    (out / "scores.md").write_text("\n".join(lines) + "\n")
