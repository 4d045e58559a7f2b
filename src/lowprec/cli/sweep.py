"""``lowprec sweep``: a grid of recipes from a template on one task (wiring only; experiments/sweep.py)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub, common) -> None:
    """Register ``sweep`` on the subparsers ``sub``; ``common`` adds the task/schedule/output options."""
    p = sub.add_parser("sweep", help="train a grid of recipes from a template: CSV + heatmap/line plot")
    common(p)
    p.add_argument("--template", required=True,
                   help="recipe with {name} fields, e.g. 'dfx-{p}-{u}' or 'dfx-10-12+max_overflow_rate={r}'")
    p.add_argument("--values", nargs="+", required=True, metavar="NAME=V1,V2,...",
                   help="the values of each field, e.g. p=8,10,12 u=10,12,14")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from rich.console import Console

    from ..experiments import load_task_data, parse_grid_values, sweep
    from .main import _print_table, _progress_factory, _task_with

    console = Console()
    task = _task_with(args)
    grid = parse_grid_values(args.values)
    data = load_task_data(task, args.data_root)
    out = Path(args.out or f"runs/sweep-{task.name}")
    values = " ".join(f"{name}={','.join(vs)}" for name, vs in grid.items())
    console.print(f"[bold]{task.name}[/]: sweep {args.template} over {values}\ndata: {data.source}; "
                  f"{task.epochs} epochs; seed {args.seed}; output {out}/" + ("; resuming" if args.resume else ""))
    bars = _progress_factory(console)

    def on_cell(index, count, recipe, finished):
        console.print(f"cell {index + 1}/{count}: {recipe.label}" + (" (finished, read back)" if finished else ""))
        return None if finished else bars(recipe)

    done = sweep(task, args.template, grid, data, out_dir=out, seed=args.seed, resume=args.resume,
                 on_cell=on_cell, device=args.device)
    _print_table(console, [r for _, r in done], f"{task.name} sweep ({data.source}, {task.epochs} epochs, "
                 f"seed {args.seed})")
    console.print(f"table: {out / 'sweep.csv'}   plot: {out / 'sweep.png'}")
    return 0

