"""Compare recipes on one task: a table like the papers' tables and one convergence plot."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

from ..train import distributed
from .recipes import Recipe
from .runner import RunResult, run
from .tasks import Task, TaskData

__all__ = ["compare", "write_table", "plot_runs", "format_table", "run_dir_name"]


def compare(
    task: Task,
    recipes: Sequence[Recipe],
    data: TaskData,
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress_factory: Callable[[Recipe], Callable[[int, int, float], None]] | None = None,
    device: str = "cpu",
    **run_options: Any,
) -> list[RunResult]:
    """Run every recipe (each in ``out_dir/<run_dir_name(label)>``; two recipes with one label are refused), then write ``results.csv`` and ``convergence.png``
    (rank 0 only under torch.distributed). ``run_options`` go to every ``run`` (checkpoint_every, ...)."""
    out = Path(out_dir) if out_dir is not None else None
    labels = [r.label for r in recipes]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"recipes with the same label would share one run directory: {', '.join(twice)}; give "
                         "each recipe once, or its own label (a TOML recipe's label = ...)")
    results = []
    for recipe in recipes:
        run_dir = out / run_dir_name(recipe.label) if out else None
        progress = progress_factory(recipe) if progress_factory else None
        results.append(run(task, recipe, data, seed=seed, out_dir=run_dir, resume=resume, progress=progress,
                           device=device, **run_options))
    if out is not None and distributed.rank() == 0:
        write_table(results, out / "results.csv")
        plot_runs(results, out / "convergence.png", title=f"{task.name}: {data.source}")
    return results


#: Longest recipe label shown whole in the plot's legend.
MAX_LEGEND = 48
#: Longest run directory name: well below the 255 bytes of common file systems, leaving room for suffixes.
MAX_DIR_NAME = 80


def run_dir_name(label: str) -> str:
    """The run directory name of a recipe label: the label itself where it is a safe file name (letters,
    digits, ``-``, ``_``, ``.``; not starting with a dot; at most ``MAX_DIR_NAME`` characters), else a safe
    prefix of it and 10 hex digits of its SHA-256, so two labels never share a directory and any label works
    (``fp16/stochastic`` in every role makes a label longer than a file name may be)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in label).lstrip(".")
    if safe == label and 0 < len(label) <= MAX_DIR_NAME:
        return label
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe[: MAX_DIR_NAME - 11].rstrip('_') or 'recipe'}-{digest}"


def format_table(results: Sequence[RunResult]) -> list[dict[str, str]]:
    """Rows of strings: recipe, final and best test accuracy, the test accuracy at the best validation epoch
    (runs with a validation split), final train loss, skipped steps, seconds, and the
    accuracy difference to the fp32 run. For a language-model task (its history holds ``val_loss``): recipe,
    final validation loss (nats per token), perplexity, best perplexity, per-token accuracy, final train loss,
    skipped steps, seconds, and the validation-loss difference to the fp32 run."""
    if results and all(r.history and "val_loss" in r.history[-1] for r in results):
        return _language_model_table(results)
    base = next((r for r in results if r.recipe == "fp32"), None)
    rows = []
    for r in results:
        row = {
            "recipe": r.recipe,
            "test acc %": f"{r.final_accuracy:.2f}",
            "best %": f"{r.best_accuracy:.2f}",
            **({"test @best val %": f"{r.reported_accuracy:.2f}"}
               if r.history and "val_accuracy" in r.history[0] else {}),
            "train loss": f"{r.history[-1]['train_loss']:.4f}" if r.history else "-",
            "skipped": str(r.skipped_steps),
            "seconds": f"{r.seconds:.1f}",
        }
        if base is not None:
            row["vs fp32"] = f"{r.final_accuracy - base.final_accuracy:+.2f}"
        rows.append(row)
    return rows


def _language_model_table(results: Sequence[RunResult]) -> list[dict[str, str]]:
    base = next((r for r in results if r.recipe == "fp32"), None)
    rows = []
    for r in results:
        last = r.history[-1]
        row = {
            "recipe": r.recipe,
            "val loss": f"{last['val_loss']:.4f}",
            "perplexity": f"{last['perplexity']:.3f}",
            "best ppl": f"{min(h['perplexity'] for h in r.history):.3f}",
            "token acc %": f"{last['test_accuracy']:.2f}",
            "train loss": f"{last['train_loss']:.4f}",
            "skipped": str(r.skipped_steps),
            "seconds": f"{r.seconds:.1f}",
        }
        if base is not None:
            row["vs fp32"] = f"{last['val_loss'] - base.history[-1]['val_loss']:+.4f}"
        rows.append(row)
    return rows


def write_table(results: Sequence[RunResult], path: Path) -> None:
    rows = format_table(results)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_runs(results: Sequence[RunResult], path: Path, title: str = "") -> None:
    """Training loss per step (smoothed) and test accuracy per epoch (validation perplexity for a language
    model), one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    language_model = any(r.history and "perplexity" in r.history[0] for r in results)
    metric, ylabel, panel = (("perplexity", "validation perplexity", "perplexity") if language_model
                             else ("test_accuracy", "test accuracy (%)", "accuracy"))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        window = max(1, len(r.losses) // 50)
        smooth = [sum(r.losses[max(0, i - window + 1) : i + 1]) / len(r.losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(r.losses))]
        name = r.recipe if len(r.recipe) <= MAX_LEGEND else r.recipe[: MAX_LEGEND - 3] + "..."  # a legend, not a page
        ax_loss.plot(range(1, len(smooth) + 1), smooth, label=name, lw=1.2)
        ax_acc.plot([h["epoch"] for h in r.history], [h[metric] for h in r.history], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss (moving mean)", yscale="log", title="convergence")
    ax_acc.set(xlabel="epoch", ylabel=ylabel, title=panel)
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3, which="both")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
