"""The ``lowprec`` command: train, compare, data. It only wires the layers below together."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_RECIPES = ["fp32", "mixed-fp16", "mixed-bf16", "native-bf16", "fp8-hybrid", "int8", "int8-lazy", "fixed-20"]


def _progress_factory(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    def factory(recipe):
        progress = Progress(TextColumn(f"[bold]{recipe.label:<18}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console,
                            disable=not console.is_terminal and os.environ.get("CI") is not None)
        state = {}

        def update(step: int, total: int, loss: float) -> None:
            if "task" not in state:
                progress.start()
                state["task"] = progress.add_task(recipe.label, total=total, loss=loss)
            progress.update(state["task"], completed=step, loss=loss)
            if step == total:
                progress.stop()

        return update

    return factory


def _print_table(console, results, title: str) -> None:
    from rich.table import Table

    from ..experiments.compare import format_table

    rows = format_table(results)
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


def _task_with(args):
    from dataclasses import replace

    from ..experiments import get_task

    task = get_task(args.task)
    changes = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "schedule", "train_limit", "test_limit",
                                             "warmup_epochs")
               if getattr(args, k, None) is not None}
    if changes.get("warmup_epochs", 0) < 0:
        raise ValueError(f"--warmup-epochs must be >= 0, got {changes['warmup_epochs']}")
    return replace(task, **changes)


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lowprec <argv>`` (less ``--nproc``) in ``nproc`` processes on this machine with torchrun
    (torch.distributed.run, rendezvous on a free local port)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    rest = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))]
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "--module", "lowprec", *rest])
    except ChildFailedError as err:
        print(f"lowprec: error: a training process failed: {err}", file=sys.stderr)
        return 1
    return 0


def _join_process_group(args) -> bool:
    """Under torchrun: join the process group, each rank on its own GPU for a CUDA device. True if joined here."""
    from ..train import distributed

    if "LOCAL_RANK" in os.environ and str(args.device).startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    return distributed.init_from_env(args.device)


def cmd_compare(args) -> int:
    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc, args.argv)
    from ..train import retain_freed_memory

    retain_freed_memory()  # training reallocates the same blocks every step (lowprec/train/allocator.py)
    joined = _join_process_group(args)
    if not joined:
        return _compare(args)
    import torch.distributed as dist

    try:
        code = _compare(args)
        dist.barrier()  # every rank done before any tears its connections down
        return code
    finally:
        dist.destroy_process_group()


def _compare(args) -> int:
    from rich.console import Console

    from ..experiments import compare, load_task_data, parse_recipe
    from ..train import distributed

    console = Console(quiet=distributed.rank() != 0)
    task = _task_with(args)
    recipes = [parse_recipe(r) for r in args.recipes]
    data = load_task_data(task, args.data_root)
    out = Path(args.out or f"runs/compare-{task.name}")
    ranks = f"; {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    console.print(f"[bold]{task.name}[/]: {task.paper}\ndata: {data.source}; {task.epochs} epochs; seed {args.seed}"
                  f"{ranks}; output {out}/")
    results = compare(task, recipes, data, seed=args.seed, out_dir=out, resume=args.resume,
                      progress_factory=_progress_factory(console) if distributed.rank() == 0 else None,
                      device=args.device, checkpoint_every=args.checkpoint_every,
                      allreduce_format=args.allreduce_format)
    _print_table(console, results, f"{task.name} ({data.source}, {task.epochs} epochs, seed {args.seed})")
    console.print(f"table: {out / 'results.csv'}   plot: {out / 'convergence.png'}")
    return 0


def cmd_train(args) -> int:
    args.recipes = [args.recipe]
    return cmd_compare(args)


def cmd_underflow(args) -> int:
    """MPT Fig. 3 as numbers: the share of activation gradients a format flushes to zero, per loss scale."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..experiments import gradient_census, load_task_data
    from ..models import build_model

    task = _task_with(args)
    data = load_task_data(task, args.data_root)
    torch.manual_seed(args.seed)
    model = build_model(task.model, **task.model_kwargs, **data.model_kwargs)
    b = task.batch_size
    batches = [(tuple(t[i : i + b] for t in data.train_inputs), data.train_labels[i : i + b])
               for i in range(0, min(args.batches * b, len(data.train_labels)), b)]
    census = gradient_census(model, batches, args.format, args.scales, task.loss_multiplier)
    table = Table(title=f"{task.name}: activation gradients (dE/dz of every layer) lost in {args.format}, "
                        f"{census.total:,} values over {len(batches)} batches at initialisation")
    for column in ("loss scale S", "lost to zero %", "overflow %"):
        table.add_column(column, justify="right")
    for s in args.scales:
        table.add_row(f"{s:g}", f"{100 * census.lost_fraction(s):.2f}", f"{100 * census.overflow[s] / census.total:.4f}")
    Console().print(table)
    Console().print(f"already zero in fp32: {100 * census.zero_fp32 / census.total:.2f} %")
    return 0


def cmd_data(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..data import data_dir, dataset_status

    console = Console()
    table = Table(title=f"data sets (data directory: {data_dir()}; set LOWPREC_DATA to change)")
    for column in ("name", "present", "where", "how to obtain"):
        table.add_column(column)
    for s in dataset_status():
        table.add_row(s.name, "yes" if s.present else "no", str(s.path), s.how_to_obtain)
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowprec", description="Train PyTorch models in reduced and mixed precision.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--task", default="mnist-lenet", help="task name (see `lowprec tasks`)")
        p.add_argument("--epochs", type=int)
        p.add_argument("--batch-size", type=int, dest="batch_size")
        p.add_argument("--lr", type=float)
        p.add_argument("--schedule", choices=["constant", "inv", "linear", "courbariaux"],
                       help="learning-rate schedule (inv: Caffe's lr (1 + 1e-4 step)^-0.75; linear: down to lr/10 "
                       "at the end; courbariaux: per epoch down to lr/10 at half the epochs, momentum ramp)")
        p.add_argument("--warmup-epochs", type=int, dest="warmup_epochs", metavar="N",
                       help="full-precision epochs warming dynamic fixed point exponents up before training "
                       "(pimnist-maxout: 2, Courbariaux's)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        p.add_argument("--train-limit", type=int, dest="train_limit", help="use the first N training examples")
        p.add_argument("--test-limit", type=int, dest="test_limit")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--data-root", dest="data_root", help="data folder (default $LOWPREC_DATA or ~/.cache/lowprec, "
                       "then the MNIST subset shipped with lowprec)")
        p.add_argument("--out", help="output folder (default runs/compare-<task>)")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")

    def training(p):
        p.add_argument("--checkpoint-every", type=int, dest="checkpoint_every", metavar="STEPS",
                       help="also checkpoint every STEPS steps (default: after every epoch only)")
        p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun; "
                       "gloo on CPU, NCCL on GPU); under torchrun already, its own process count applies")
        p.add_argument("--allreduce-format", dest="allreduce_format", metavar="FORMAT",
                       help="average gradients across processes in this number format ('grad': the policy's "
                       "weight_grad format); default float32")

    p = sub.add_parser("compare", help="train several recipes on one task: table + convergence plot")
    common(p)
    training(p)
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                   help="presets, PRESET+key=value,..., policy strings or .toml files")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train one recipe on one task")
    common(p)
    training(p)
    p.add_argument("--recipe", default="fp32")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("underflow", help="share of activation gradients a format flushes to zero, per loss scale")
    common(p)
    p.add_argument("--format", default="fp16")
    p.add_argument("--scales", nargs="+", type=float, default=[1, 8, 256, 4096, 65536])
    p.add_argument("--batches", type=int, default=4)
    p.set_defaults(func=cmd_underflow)

    from .diagnose import add_parsers as add_diagnostics

    add_diagnostics(sub)  # inspect, memory

    from .sweep import add_parser as add_sweep

    add_sweep(sub, common)

    p = sub.add_parser("tasks", help="list the tasks")
    p.set_defaults(func=lambda a: print("\n".join(f"{t.name:<22} {t.paper}" for t in _tasks())) or 0)

    p = sub.add_parser("data", help="which data sets are present and how to obtain the others")
    p.add_argument("action", nargs="?", default="list", choices=["list"])
    p.set_defaults(func=cmd_data)
    return parser


def _tasks():
    from ..experiments import TASKS

    return TASKS.values()


def main(argv: Sequence[str] | None = None) -> int:
    from ..scaling import LossScaleCollapse

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, LossScaleCollapse) as err:
        print(f"lowprec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
