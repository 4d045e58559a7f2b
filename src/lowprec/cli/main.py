"""The ``lowprec`` command: train, compare, sweep, gan, data. It only wires the layers below together.

Every failure ends in one line on stderr, ``lowprec: error: <what and the fix>``, and exit status 2 (bad
input, a run directory that cannot be used, a collapsed loss scale) or 1 (anything else: a bug, reported with
its type; ``LOWPREC_TRACEBACK=1`` shows the traceback). Ctrl-C prints ``lowprec: interrupted ...`` and exits
130, launcher (``--nproc``) included. Long values are shortened in messages.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path
from typing import Sequence

from .argtypes import count, natural, positive, seed

#: Longest error message printed whole; a longer one is cut (a message repeats what it was given).
MAX_MESSAGE = 400
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports a process that SIGINT ended.
INTERRUPTED = 130

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
    return replace(task, **changes)


class UsageError(ValueError):
    """A command line argparse refuses (its message, without the usage block)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError (one ``lowprec: error:`` line) instead of printing
    the usage block and exiting from inside the parser."""

    def error(self, message: str):
        command = self.prog.removeprefix("lowprec").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


#: A worker of ``--nproc``: SIGINT (Ctrl-C reaches every process of the terminal's group; torchrun forwards its
#: own) ends it at once and silently, even while it is still importing, since the launcher reports the
#: interruption; the run directory's lock goes with the process and checkpoints are written atomically.
_WORKER = ("import os, signal, sys; signal.signal(signal.SIGINT, lambda *_: os._exit(130)); "
           "from lowprec.cli import main; sys.exit(main())")


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lowprec <argv>`` (less ``--nproc``) in ``nproc`` processes on this machine with torchrun
    (torch.distributed.run, rendezvous on a free local port). The workers die with this process
    (``distributed.die_with_parent``, told this pid); torchrun's own log is kept to errors; a failed worker
    or Ctrl-C ends in one line."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from ..train.distributed import LAUNCHER_PID

    rest = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))]
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each has its own level: the parent's is not enough
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "--max-restarts=0", "--no-python", sys.executable,
                  "-c", _WORKER, *rest])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode in (INTERRUPTED, -signal.SIGINT):
            return _interrupted()
        if failure.exitcode == 2:  # the worker has said why, in a lowprec: line of its own
            return 2
        print(f"lowprec: error: training process {rank} of {nproc} failed (exit status {failure.exitcode}; "
              "its output above says why)", file=sys.stderr)
        return 1
    except (SignalException, KeyboardInterrupt):
        return _interrupted()
    finally:
        os.environ.pop(LAUNCHER_PID, None)
    return 0


def _interrupted() -> int:
    print("lowprec: interrupted (a run continues from its last checkpoint with --resume)", file=sys.stderr)
    return INTERRUPTED


def _join_process_group(args) -> bool:
    """Under torchrun: join the process group, each rank on its own GPU for a CUDA device. True if joined here."""
    from ..train import distributed

    if "LOCAL_RANK" in os.environ and str(args.device).startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    return distributed.init_from_env(args.device)


def cmd_compare(args) -> int:
    from ..experiments.validate import check_device
    from ..train import distributed, retain_freed_memory

    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the runs in --out, or replace them")
    under_torchrun = "WORLD_SIZE" in os.environ
    if under_torchrun:
        distributed.die_with_parent()  # a worker must not outlive its launcher (SIGKILL cannot be forwarded)
    check_device(args.device)
    task, recipes = _task_with(args), _recipes(args.recipes)  # refused here, before any worker starts
    if args.nproc > 1 and not under_torchrun:
        return _launch(args.nproc, args.argv)
    retain_freed_memory()  # training reallocates the same blocks every step (lowprec/train/allocator.py)
    if not _join_process_group(args):
        return _compare(args, task, recipes)
    distributed.leave(_compare(args, task, recipes))  # every rank done, then out without a teardown that can fail


def _recipes(texts: Sequence[str]):
    from ..experiments import parse_recipe

    return [parse_recipe(r) for r in texts]


def _compare(args, task, recipes) -> int:
    from rich.console import Console

    from ..experiments import compare, load_task_data
    from ..train import distributed

    console = Console(quiet=distributed.rank() != 0)
    data = load_task_data(task, args.data_root)
    out = Path(args.out or f"runs/compare-{task.name}")
    ranks = f"; {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    console.print(f"[bold]{task.name}[/]: {task.paper}\ndata: {data.source}; {task.epochs} epochs; seed {args.seed}"
                  f"{ranks}; output {out}/")
    results = compare(task, recipes, data, seed=args.seed, out_dir=out, resume=args.resume,
                      progress_factory=_progress_factory(console) if distributed.rank() == 0 else None,
                      device=args.device, checkpoint_every=args.checkpoint_every,
                      allreduce_format=args.allreduce_format, overwrite=args.overwrite)
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
    from ..experiments.validate import check_device
    from ..models import build_model

    check_device(args.device)  # the census runs on the CPU; a device that is not there is still a mistake
    task = _task_with(args)
    data = load_task_data(task, args.data_root)
    torch.manual_seed(args.seed)
    model = build_model(task.model, **task.model_kwargs, **data.model_kwargs)
    b = task.batch_size
    batches = [(tuple(t[i : i + b] for t in data.train_inputs), data.train_labels[i : i + b])
               for i in range(0, min(args.batches * b, len(data.train_labels)), b)]
    if not batches:
        raise ValueError(f"no batches: the training split has {len(data.train_labels)} examples")
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
    from ..experiments.validate import SCHEDULES

    parser = _Parser(prog="lowprec", description="Train PyTorch models in reduced and mixed precision.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--task", default="mnist-lenet", help="task name (see `lowprec tasks`)")
        p.add_argument("--epochs", type=count)
        p.add_argument("--batch-size", type=count, dest="batch_size")
        p.add_argument("--lr", type=positive)
        p.add_argument("--schedule", choices=SCHEDULES,
                       help="learning-rate schedule (inv: Caffe's lr (1 + 1e-4 step)^-0.75; linear: down to lr/10 "
                       "at the end; courbariaux: per epoch down to lr/10 at half the epochs, momentum ramp)")
        p.add_argument("--warmup-epochs", type=natural, dest="warmup_epochs", metavar="N",
                       help="full-precision epochs warming dynamic fixed point exponents up before training "
                       "(pimnist-maxout: 2, Courbariaux's)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        p.add_argument("--train-limit", type=count, dest="train_limit", help="use the first N training examples")
        p.add_argument("--test-limit", type=count, dest="test_limit")
        p.add_argument("--seed", type=seed, default=0)
        p.add_argument("--data-root", dest="data_root", help="data folder (default $LOWPREC_DATA or ~/.cache/lowprec, "
                       "then the MNIST subset shipped with lowprec)")
        p.add_argument("--out", help="output folder (default runs/compare-<task>)")
        p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
        p.add_argument("--overwrite", action="store_true", help="replace the runs in --out (without it, a run "
                       "directory that holds a run is refused)")

    def training(p):
        p.add_argument("--checkpoint-every", type=count, dest="checkpoint_every", metavar="STEPS",
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
    p.add_argument("--scales", nargs="+", type=positive, default=[1, 8, 256, 4096, 65536])
    p.add_argument("--batches", type=count, default=4)
    p.set_defaults(func=cmd_underflow)

    from .diagnose import add_parsers as add_diagnostics

    add_diagnostics(sub)  # inspect, memory

    from .sweep import add_parser as add_sweep

    add_sweep(sub, common)

    from .gan import add_parser as add_gan

    add_gan(sub)

    p = sub.add_parser("tasks", help="list the tasks")
    p.set_defaults(func=lambda a: print("\n".join(f"{t.name:<22} {t.paper}" for t in _tasks())) or 0)

    p = sub.add_parser("data", help="which data sets are present and how to obtain the others")
    p.add_argument("action", nargs="?", default="list", choices=["list"])
    p.set_defaults(func=cmd_data)
    return parser


def _tasks():
    from ..experiments import TASKS

    return TASKS.values()


def _one_line(message: str) -> str:
    """``message`` on one line (line breaks become "; "), cut to ``MAX_MESSAGE`` characters."""
    line = re.sub(r"\s*\n\s*", "; ", str(message).strip())
    return line if len(line) <= MAX_MESSAGE else f"{line[:MAX_MESSAGE]}... (message cut; {len(line):,} characters)"


def _error(message: str) -> None:
    print(f"lowprec: error: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status (see the module
    docstring: 0, 2 for bad input, 1 for a bug, 130 after Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import torch

        from ..scaling import LossScaleCollapse
    except KeyboardInterrupt:
        return _interrupted()
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except KeyboardInterrupt:
        return _interrupted()
    except (ValueError, OSError, LossScaleCollapse) as err:
        _error(str(err))
        return 2
    except (MemoryError, torch.OutOfMemoryError) as err:
        _error(f"out of memory ({str(err).splitlines()[0] if str(err) else 'MemoryError'}): use a smaller batch, "
               "model width or data limit")
        return 2
    except Exception as err:  # a bug: still one line; the traceback on request
        if os.environ.get("LOWPREC_TRACEBACK"):
            raise
        _error(f"unexpected {type(err).__name__}: {err} (a bug in lowprec; please report it with the command "
               "line; LOWPREC_TRACEBACK=1 shows the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
