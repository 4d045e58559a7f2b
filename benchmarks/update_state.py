"""Step time with the update state packed against the same steps with it in float32 containers.

The update state is what a step leaves for the next: Park's lazy-update accumulator and the optimizer state
(momentum, Adam's moments, Courbariaux's velocity) of every parameter whose policy gives it a format
(``lowprec.train.stored``). Only that storage differs between the two sides: the saved activations are packed
alike in both (``LOWPREC_PACKED`` on), and the float32 side is what ``packed=off`` keeps for the update state.

Run from the repository root (about a minute on 2 cores):

    python benchmarks/update_state.py
    python benchmarks/update_state.py --models mlp --recipes int16 --rounds 25

Timing: both sides of every recipe are built first; a round runs, per recipe, the packed and the float32 side
(in alternating order from round to round), each one untimed step and then ``--steps`` timed steps, on the
model's fixed batch (benchmarks/training.py's workloads: the 784-1024-1024-10 MLP at batch 128, Caffe LeNet at
batch 64; SGD with momentum 0.9, lowprec.train.SGD for the lazy update, AdamW with eps 1e-3 for
``...:adamw``). Each side's
step is timed by the wall clock and by this process's CPU time (what the step costs, without the time other
processes of a shared machine took the core); the ratio is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

import lowprec as lp
from lowprec.train import cross_entropy, stored
from training import ADAMW_LR, LR, MOMENTUM, SEED, WORKLOADS, Workload

RECIPES = ["int8-lazy", "int16", "dfx-10-12", "int16:adamw"]


@contextlib.contextmanager
def update_state_packed(on: bool) -> Iterator[None]:
    """The update state packed (as the policy says) or kept in float32 containers, for the duration."""
    original = stored.packing_on
    if not on:
        stored.packing_on = lambda policy: False  # type: ignore[assignment]
    try:
        yield
    finally:
        stored.packing_on = original  # type: ignore[assignment]


def trainer_step(work: Workload, recipe: str) -> Callable[[], object]:
    name, _, optimizer = recipe.partition(":")
    torch.manual_seed(SEED)
    model = lp.convert(work.build(), name)
    lazy = lp.Policy.parse(name).get("accumulator") is not None
    if optimizer == "adamw":
        # eps 1e-3, as Park et al.'s INT16 Adam: with torch's 1e-8 a second moment rounded to 0 makes steps of
        # lr * m / eps and the run diverges (NaN state, which is kept unpacked: not the cost measured here)
        opt = (lp.train.AdamW if lazy else torch.optim.AdamW)(model.parameters(), lr=ADAMW_LR, eps=1e-3)
    else:
        opt = (lp.train.SGD if lazy else torch.optim.SGD)(model.parameters(), lr=LR, momentum=MOMENTUM)
    trainer = lp.Trainer(model, opt, name)
    x, y = work.data()
    return lambda: trainer.step(cross_entropy(model(x), y))


def measure(work: Workload, recipes: list[str], rounds: int, steps: int) -> None:
    sides = {}
    for recipe in recipes:
        for on in (True, False):
            with update_state_packed(on):
                step = trainer_step(work, recipe)
                for _ in range(3):
                    step()
            sides[recipe, on] = step
    wall: dict[tuple[str, bool], list[float]] = {k: [] for k in sides}
    cpu: dict[tuple[str, bool], list[float]] = {k: [] for k in sides}
    for i in range(rounds):
        for recipe in recipes:
            for on in (True, False) if i % 2 == 0 else (False, True):
                with update_state_packed(on):
                    sides[recipe, on]()
                    w, c = time.perf_counter(), time.process_time()
                    for _ in range(steps):
                        sides[recipe, on]()
                    wall[recipe, on].append((time.perf_counter() - w) / steps)
                    cpu[recipe, on].append((time.process_time() - c) / steps)
    for recipe in recipes:
        line = [f"{work.name:6s} {recipe:12s}"]
        for label, t in (("cpu", cpu), ("wall", wall)):
            ratios = sorted(a / b for a, b in zip(t[recipe, True], t[recipe, False]))
            q = len(ratios) // 4
            line.append(f"{label}: packed {statistics.median(t[recipe, True]) * 1e3:6.1f} ms, float32 "
                        f"{statistics.median(t[recipe, False]) * 1e3:6.1f} ms, ratio {statistics.median(ratios):.3f} "
                        f"({ratios[q]:.2f}-{ratios[-1 - q]:.2f})")
        print("  ".join(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="presets; ':adamw' for AdamW instead of SGD")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lp.train.retain_freed_memory()
    print(f"rounds {args.rounds} x {args.steps} steps, torch {torch.__version__}, 1 thread; ratio: median "
          "(quartiles) of packed / float32", file=sys.stderr)
    for name in args.models.split(","):
        measure(WORKLOADS[name], args.recipes.split(","), args.rounds, args.steps)


if __name__ == "__main__":
    main()
