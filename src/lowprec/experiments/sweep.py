"""Sweeps: a grid of recipes from one template, each trained on a task, as a CSV and a figure.

The template is a recipe string with ``{name}`` fields (``str.format`` syntax), e.g. ``dfx-{p}-{u}`` for
Courbariaux's propagation/update widths, ``fixed-20+...`` or ``fixed<20,{f}>`` policies, or
``dfx-10-12+max_overflow_rate={r}``. Every field gets a list of values; the grid is their Cartesian product,
the first field varying slowest. Each cell is one ``run`` in ``out_dir/<recipe>`` (metrics, checkpoints,
``result.json``); after each cell ``sweep.csv`` is rewritten (one row per finished cell: the field values,
the recipe, the test error and accuracy (at the final epoch, or at the best validation epoch when the task
holds a validation split out: ``RunResult.reported_accuracy``), the best accuracy, the last epoch's training
loss, skipped steps, seconds) and ``sweep.png`` drawn: test error against the one field, a heatmap over two fields (first field down,
second across), or lines against the first field, one per combination of the others.

``resume=True`` continues an interrupted sweep: a finished cell is read back from its checkpoint without
training, a partial one continues from its last checkpoint (bit-exactly, ``run``), and a cell whose checkpoint
belongs to other settings is refused (``CheckpointError`` naming the difference).
"""

from __future__ import annotations

import csv
import itertools
import math
import string
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..train import distributed
from .compare import run_dir_name
from .recipes import Recipe, parse_recipe
from .runner import RunResult, run
from .tasks import Task, TaskData

__all__ = ["Cell", "expand_grid", "parse_grid_values", "sweep", "write_sweep_csv", "plot_sweep"]


@dataclass(frozen=True)
class Cell:
    """One grid point: the field values (in the template's field order) and the recipe they give."""

    values: tuple[tuple[str, str], ...]
    recipe: str


def _fields(template: str) -> list[str]:
    """The template's ``{name}`` fields in order of first appearance; ValueError for positional or formatted
    fields and for unbalanced braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"sweep template {template!r}: {err} (write fields as {{name}})") from None
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"sweep template {template!r}: field {{{name}}} must be a plain name like {{p}}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"sweep template {template!r} has no {{name}} field to vary (e.g. 'dfx-{{p}}-12')")
    return names


def expand_grid(template: str, grid: Mapping[str, Sequence[Any]]) -> list[Cell]:
    """The cells of ``template`` over ``grid`` (field -> values), the template's first field varying slowest.
    ValueError when a field has no values, repeats a value, or the grid and the template name different fields."""
    fields = _fields(template)
    reserved = [f for f in fields if f in _COLUMNS]
    if reserved:
        raise ValueError(f"sweep template {template!r}: fields may not be named {reserved} (a column of sweep.csv)")
    missing, extra = [f for f in fields if f not in grid], [f for f in grid if f not in fields]
    if missing or extra:
        raise ValueError(f"sweep template {template!r} has fields {fields}; the grid gives {list(grid)}"
                         + (f" (no values for {missing})" if missing else "")
                         + (f" ({extra} not in the template)" if extra else ""))
    values = {f: [str(v) for v in grid[f]] for f in fields}
    for f, vs in values.items():
        if not vs:
            raise ValueError(f"sweep field {f!r} has no values")
        if len(set(vs)) != len(vs):
            raise ValueError(f"sweep field {f!r} repeats a value: {vs}")
    return [Cell(tuple(zip(fields, combo)), template.format(**dict(zip(fields, combo))))
            for combo in itertools.product(*(values[f] for f in fields))]


def parse_grid_values(items: Sequence[str]) -> dict[str, list[str]]:
    """``["p=8,10,12", "u=12"]`` -> ``{"p": ["8", "10", "12"], "u": ["12"]}``; ValueError naming a bad item."""
    grid: dict[str, list[str]] = {}
    for item in items:
        name, eq, rest = item.partition("=")
        name = name.strip()
        values = [v.strip() for v in rest.split(",") if v.strip()]
        if not eq or not name.isidentifier() or not values:
            raise ValueError(f"sweep values {item!r}: write NAME=V1,V2,... (e.g. p=8,10,12)")
        if name in grid:
            raise ValueError(f"sweep field {name!r} given twice")
        grid[name] = values
    return grid


def sweep(
    task: Task,
    template: str,
    grid: Mapping[str, Sequence[Any]],
    data: TaskData,
    *,
    out_dir: str | Path,
    seed: int = 0,
    resume: bool = False,
    on_cell: Callable[[int, int, Recipe, bool], Callable[[int, int, float], None] | None] | None = None,
    **run_options: Any,
) -> list[tuple[Cell, RunResult]]:
    """Train every cell of the grid (``expand_grid``) on ``task``, writing ``sweep.csv`` and ``sweep.png`` in
    ``out_dir`` after each (rank 0 only under torch.distributed). Every recipe is parsed before the first cell
    trains, so a bad grid fails at once. ``on_cell(index, count, recipe, finished)`` is called before each cell
    (``recipe.label`` is the cell's recipe string; ``finished``: ``resume`` and the cell already has its
    ``result.json``) and may return the cell's ``progress`` callback. ``run_options`` go to every ``run``
    (device, checkpoint_every, ...)."""
    cells = expand_grid(template, grid)
    recipes = [parse_recipe(c.recipe) for c in cells]
    out = Path(out_dir)
    done: list[tuple[Cell, RunResult]] = []
    for i, (cell, recipe) in enumerate(zip(cells, recipes)):
        cell_dir = out / run_dir_name(recipe.label)
        finished = resume and (cell_dir / "result.json").exists()
        progress = on_cell(i, len(cells), recipe, finished) if on_cell else None
        result = run(task, recipe, data, seed=seed, out_dir=cell_dir, resume=resume, progress=progress,
                     **run_options)
        done.append((cell, result))
        if distributed.rank() == 0:
            write_sweep_csv(done, out / "sweep.csv")
            plot_sweep(cells, done, out / "sweep.png", title=f"{task.name}: {template}, {data.source}, "
                       f"{task.epochs} epochs, seed {seed}")
    return done


_COLUMNS = ("recipe", "test error %", "test acc %", "best %", "train loss", "skipped", "seconds")


def _row(cell: Cell, result: RunResult) -> dict[str, str]:
    return {**dict(cell.values), "recipe": cell.recipe,
            "test error %": f"{100.0 - result.reported_accuracy:.2f}",
            "test acc %": f"{result.reported_accuracy:.2f}",
            "best %": f"{result.best_accuracy:.2f}",
            "train loss": f"{result.history[-1]['train_loss']:.4f}" if result.history else "nan",
            "skipped": str(result.skipped_steps),
            "seconds": f"{result.seconds:.1f}"}


def write_sweep_csv(done: Sequence[tuple[Cell, RunResult]], path: Path) -> None:
    """One row per finished cell (``_row``), written whole to a temporary file and renamed over ``path``."""
    rows = [_row(c, r) for c, r in done]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _axis(values: Sequence[str]) -> tuple[list[float], str]:
    """Positions for values on an axis and its scale: the numbers themselves ("log" when all positive and
    spanning over 100x, else "linear"), or 0, 1, 2, ... ("category") for values that are not all numbers."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return [float(i) for i in range(len(values))], "category"
    log = all(x > 0 for x in numbers) and max(numbers) / min(numbers) > 100
    return numbers, "log" if log else "linear"


def plot_sweep(cells: Sequence[Cell], done: Sequence[tuple[Cell, RunResult]], path: Path, title: str = "") -> None:
    """Test error (%) over the grid: a line for one field, a heatmap for two (cells not yet run left blank),
    lines against the first field for more. ``cells`` is the whole grid, ``done`` the finished part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [name for name, _ in cells[0].values]
    levels = {f: list(dict.fromkeys(dict(c.values)[f] for c in cells)) for f in fields}
    error = {c.values: 100.0 - r.reported_accuracy for c, r in done}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if len(fields) == 2:
        rows, cols = levels[fields[0]], levels[fields[1]]
        grid = [[error.get(((fields[0], a), (fields[1], b)), math.nan) for b in cols] for a in rows]
        image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    light = image.norm(value) < 0.5  # viridis_r: low errors are drawn light
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="k" if light else "w")
        ax.set(xticks=range(len(cols)), xticklabels=cols, yticks=range(len(rows)), yticklabels=rows,
               xlabel=fields[1], ylabel=fields[0])
        fig.colorbar(image, ax=ax, label="test error (%)")
    else:
        x_field, others = fields[0], fields[1:]
        xs, scale = _axis(levels[x_field])
        for rest in itertools.product(*(levels[f] for f in others)):
            key = tuple(zip(others, rest))
            points = [(x, error.get(((x_field, v), *key))) for x, v in zip(xs, levels[x_field])]
            points = [(x, e) for x, e in points if e is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=", ".join(f"{f}={v}" for f, v in key) or None)
        if scale == "log":
            ax.set_xscale("log")
        ax.set_xticks(xs, levels[x_field])
        ax.set(xlabel=x_field, ylabel="test error (%)")
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=8)
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)  # a long template would run off the figure
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
