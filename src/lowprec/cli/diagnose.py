"""``lowprec inspect`` and ``lowprec memory``: the diagnostics on the command line (wiring only)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from .argtypes import count, fraction, positive, seed

#: Input shapes for models run on made-up data (a model without a task, and every ``lowprec memory`` run).
EXAMPLE_INPUTS = {"lenet": (1, 28, 28), "small-cnn": (1, 28, 28), "conv-maxout": (1, 28, 28),
                  "maxout-mlp": (784,), "resnet20": (3, 32, 32)}


def build_target_model(target: str, **kwargs: Any):
    """A built-in model by name, or a user's ``package.module:factory`` called with ``kwargs`` (a recipe's model
    settings, e.g. width=2). The current directory is importable, as for ``python -m``."""
    from torch import nn

    from ..models import build_model

    if ":" not in target:
        return build_model(target, **kwargs)
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a user model is written module:factory (e.g. mypkg.models:build), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for the model {target!r}: {err} (run lowprec from the "
                         "folder that holds the package, or put it on PYTHONPATH)") from None
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ValueError(f"{target!r}: {module_name} has no callable {attr!r} (the function that builds the model)")
    try:
        model = factory(**kwargs)
    except TypeError as err:
        if not kwargs:
            raise
        raise ValueError(f"{target!r} does not take the recipe's model settings {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 3,32,32``: one example's shape (the batch dimension is added)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers like 3,32,32, got {text!r}")
    return shape


def example_batch(model, target: str, batch: int, seed: int, input_shape: tuple[int, ...] | None = None,
                  vocab: int | None = None):
    """Made-up (inputs, labels) for ``model``: N(0, 1) inputs of shape (batch, *input_shape) (built-in models
    have a default shape), or token ids in [0, vocab) when ``vocab`` is given; labels uniform over the classes
    of the model's output, which an eval-mode forward on the inputs tells: its last dimension holds the
    classes, the others are labelled ((batch, classes) logits: a label per example; (batch, time, vocab): one
    per position)."""
    import torch

    from ..train.evaluating import evaluating

    shape = input_shape or EXAMPLE_INPUTS.get(target)
    if shape is None:
        raise ValueError(f"no example input for the model {target!r}: give --input-shape (one example's shape, "
                         f"e.g. 3,32,32; with --vocab N for token ids); built-in shapes: {', '.join(EXAMPLE_INPUTS)}")
    g = torch.Generator().manual_seed(seed)
    inputs = (torch.randint(0, vocab, (batch, *shape), generator=g) if vocab
              else torch.randn(batch, *shape, generator=g))
    try:
        with evaluating(model):
            out = model(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        kind = f"token ids < {vocab}" if vocab else "N(0,1) values"
        raise ValueError(f"{target!r} fails on made-up inputs of shape {tuple(inputs.shape)} ({kind}): {err}. Check "
                         "--input-shape (one example's shape), and give --vocab N for a model that takes token ids"
                         ) from None
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != batch:
        shown = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the command line scores a model whose output is (batch, ..., classes) logits; "
                         f"{target!r} returned {shown} for inputs of shape {tuple(inputs.shape)}. Use lp.inspect / "
                         "lp.diagnostics.estimate_memory from Python with your own loss_fn")
    return inputs, torch.randint(0, out.shape[-1], tuple(out.shape[:-1]), generator=g)


def _inspect_setup(args):
    """(model, batches, loss multiplier, where the data came from) for a task name or a model name."""
    import torch

    from ..experiments import TASKS, load_task_data

    task = TASKS.get(args.target) or next((t for t in TASKS.values() if t.model == args.target), None)
    torch.manual_seed(args.seed)
    if task is None:
        model = build_target_model(args.target)
        batches = [example_batch(model, args.target, args.batch, args.seed + i, args.input_shape, args.vocab)
                   for i in range(args.steps)]
        kind = f"random token ids < {args.vocab}" if args.vocab else "random N(0,1) inputs"
        return model, batches, 1.0, f"{args.target} on {kind}"
    data = load_task_data(task, args.data_root)
    b = args.batch
    batches = [(data.train_inputs[0][i * b : (i + 1) * b], data.train_labels[i * b : (i + 1) * b])
               for i in range(args.steps)]
    model = build_target_model(task.model, **task.model_kwargs, **data.model_kwargs)
    return model, batches, task.loss_multiplier, f"task {task.name}"


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..diagnostics import inspect
    from ..experiments import parse_recipe
    from ..train import cross_entropy

    console = Console(width=None if sys.stdout.isatty() else 160)
    recipe = parse_recipe(args.recipe)
    model, batches, multiplier, source = _inspect_setup(args)
    multiplier *= args.loss_multiplier
    if args.plan:
        return _print_plan(console, model, recipe, batches[0][0], Path(args.out))

    def loss_fn(m, batch):
        return cross_entropy(m(batch[0]), batch[1]) * multiplier

    report = inspect(model, batches, recipe.policy, steps=args.steps, formats=args.format, loss_fn=loss_fn,
                     max_lost=args.max_lost)
    rows = report.rows(per_module=args.per_module)
    table = Table(title=f"{report.model} under {recipe.label}: {source}, batch {args.batch}, {args.steps} float32 "
                        "steps (lost / subnormal / overflow: % of the non-zero values)")
    for column in rows[0]:  # a module or op call site (blocks.0.attn:matmul[1].scores) is shown whole
        table.add_column(column, justify="left" if column in ("module", "role", "format") else "right",
                         min_width=max(len(r[column]) for r in rows) if column == "module" else None)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for note in report.notes():
        console.print(note)
    out = Path(args.out)
    pngs = report.plot(out)
    console.print(f"json: {report.to_json(out / 'report.json')}   pictures: {', '.join(p.name for p in pngs)} in {out}/")
    return 0


def _print_plan(console, model, recipe, inputs, out: Path) -> int:
    """``lowprec inspect --plan``: every op of one step with its operands' formats, as a table and plan.json."""
    from ..nn import plan

    p = plan(model, recipe.policy, inputs)
    console.print(p.table())
    for warning in p.warnings:
        console.print(f"warning: {warning}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(p.to_json())
    console.print(f"{len(p.ops)} ops, {len(p.unquantized)} unquantized; json: {out / 'plan.json'}")
    return 0


def cmd_memory(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..diagnostics import COMPONENTS, estimate_memory, measure_step_memory, wrpn_footprint
    from ..diagnostics.plots import plot_memory
    from ..experiments import parse_recipe

    console = Console(width=None if sys.stdout.isatty() else 160)
    estimates, batch = [], None
    for text in args.recipe or ["fp32"]:
        recipe = parse_recipe(text)
        model = build_target_model(args.model, **recipe.model)
        if batch is None:
            batch = example_batch(model, args.model, args.batch, args.seed, args.input_shape, args.vocab)
        est = estimate_memory(model, recipe.policy, batch, optimizer=args.optimizer, label=recipe.label)
        if not args.no_measure:
            from dataclasses import replace

            est = replace(est, measured=measure_step_memory(model, recipe.policy, batch,
                                                           optimizer=args.optimizer).peak)
        estimates.append(est)
        wrpn = re.fullmatch(r"wrpn-(\d+)-(\d+)", recipe.policy.name or "")
        if wrpn:
            formula = wrpn_footprint(recipe.model.get("width", 1.0), int(wrpn[1]), int(wrpn[2]))
            console.print(f"{recipe.label}: WRPN footprint vs fp32 at width 1 (Mishra et al., spec 2d): "
                          + ", ".join(f"{k} {v:g}x" for k, v in formula.items()))
    mib = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    table = Table(title=f"{args.model}, batch {args.batch}, optimizer {args.optimizer}: one training step, MiB "
                        "(emulated: what the process holds; ideal: every tensor at its format's width)")
    # forward: the forward pass's own peak (saved tensors and activations in flight), beside the state
    for column in ("recipe", *COMPONENTS, "forward", "estimate", "measured", "error %", "ideal", "ideal vs first"):
        if column == "recipe":  # never cut: the numbers' headers shrink instead
            table.add_column(column, min_width=max(len(est.recipe) for est in estimates))
        else:
            table.add_column(column, justify="right")
    for est in estimates:
        measured = "-" if est.measured is None else mib(est.measured)
        error = "-" if est.error is None else f"{100 * est.error:+.1f}"
        table.add_row(est.recipe, *(mib(est.emulated[c]) for c in COMPONENTS), mib(est.forward), mib(est.total),
                      measured, error, mib(est.total_ideal), f"{est.total_ideal / estimates[0].total_ideal:.3f}")
    console.print(table)
    out = Path(args.out or f"runs/memory-{args.model.replace(':', '-')}")
    out.mkdir(parents=True, exist_ok=True)
    png = plot_memory(out / "memory.png", estimates, f"{args.model}, batch {args.batch}: estimated memory of a "
                                                     "training step per component")
    console.print(f"bar chart: {png}")
    return 0


def _add_input_options(p) -> None:
    p.add_argument("--input-shape", type=_input_shape, dest="input_shape",
                   help="one example's shape for made-up inputs, e.g. 3,32,32 (needed for a module:factory model)")
    p.add_argument("--vocab", type=count, help="made-up inputs are token ids in [0, VOCAB) (embedding and sequence "
                   "models) instead of N(0,1) values")


def add_parsers(sub) -> None:
    """Register ``inspect`` and ``memory`` on the main parser's subcommands."""
    p = sub.add_parser("inspect", help="histograms, underflow/overflow per layer and role, loss-scale advice")
    p.add_argument("target", help="a task (mnist-lenet, ...), a model (lenet, resnet20, ...; random inputs "
                   "unless a task uses it) or your own as module:factory (e.g. mypkg.models:build)")
    p.add_argument("--recipe", default="mixed-fp16", help="the policy whose formats are counted")
    p.add_argument("--batch", type=count, default=64)
    p.add_argument("--steps", type=count, default=3)
    p.add_argument("--format", action="append", default=[], help="also count in this format (repeatable)")
    p.add_argument("--max-lost", type=fraction, default=1e-3, dest="max_lost",
                   help="share of non-zero gradients the advised loss scale may lose (default 0.001)")
    p.add_argument("--loss-multiplier", type=positive, default=1.0, dest="loss_multiplier",
                   help="multiply the loss (moves every gradient; builds underflow cases)")
    p.add_argument("--per-module", action="store_true", dest="per_module", help="one row per module and role")
    _add_input_options(p)
    p.add_argument("--plan", action="store_true",
                   help="show the precision plan instead: every op of one step, its operands' roles and formats, "
                        "what ran unquantized and why (also plan.json in --out)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--out", default="runs/inspect", help="folder for the PNGs and report.json")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("memory", help="estimated (and measured) memory of a training step per recipe")
    p.add_argument("model", help=f"a model ({', '.join(sorted(EXAMPLE_INPUTS))}) or your own as module:factory "
                   "(e.g. mypkg.models:build; called with the recipe's model settings such as width=2)")
    _add_input_options(p)
    p.add_argument("--recipe", action="append", help="repeatable; default fp32")
    p.add_argument("--batch", type=count, default=64)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "sgd-plain", "adam"])
    p.add_argument("--no-measure", action="store_true", dest="no_measure", help="estimate only")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", help="folder for memory.png (default runs/memory-<model>)")
    p.set_defaults(func=cmd_memory)


__all__ = ["add_parsers", "cmd_inspect", "cmd_memory", "EXAMPLE_INPUTS", "build_target_model", "example_batch"]
