"""Benchmark of whole training steps: the native bf16 path against fp32 and torch.autocast, the cost of
emulating each preset policy (beside QPyTorch doing the same roles), peak training memory per recipe, and a
transformer: the zoo's GPT trained with AdamW under every configuration in one table.

Run from the repository root:

    python benchmarks/training.py             # full run (about 3 minutes on 2 cores): rewrites the
                                              # <!-- training:begin/end --> block of BENCHMARKS.md
    python benchmarks/training.py --quick     # fewer rounds and models, prints only
    python benchmarks/training.py --gpt-only  # only the GPT section (4 layers, d=256, 4 heads, T=128, batch 32)
    python benchmarks/training.py --gpt-only --gpt-size 1,32,2,16,4 --rounds 1 --steps 1   # a smoke test

Timing. All configurations of one model are built first and then timed in interleaved rounds: a round runs
every configuration in turn, on the same fixed random batch, so that a slow spell of a shared machine hits all
of them alike; each configuration runs one untimed step (its caches were just evicted by the others: training
runs steps back to back) and then ``--steps`` timed steps. A step time is the median over rounds; a ratio is
the median over rounds of the per-round ratio to the baseline timed in that round. ``--cpu-time`` times in the
process's CPU time (``time.process_time``) instead of wall time: on a machine shared with other jobs, their
load then disturbs the times far less (it still shares caches and memory bandwidth). Baselines, written with
PyTorch alone: ``fp32`` (model, torch.optim.SGD(momentum=0.9), zero_grad, forward, loss.backward(), step),
``autocast`` (the same fp32 model with the forward under torch.autocast("cpu", bfloat16); bf16 needs no loss
scaling) and ``autocast + fused SGD`` (the same with torch.optim.SGD(fused=True), torch's fastest update).
lowprec's configurations use lowprec.Trainer with torch.optim.SGD (for the native path the Trainer updates its
fp32 master copies in one compiled pass, lowprec/train/fused.py), or lowprec.train.SGD, the same arithmetic,
for the lazy-update presets, to which it hands each step's update without a parameter snapshot.

Allocator. The process keeps freed blocks for reuse (``lowprec.train.retain_freed_memory``, as ``lowprec train``
does), for every configuration, the PyTorch baselines included: with glibc's defaults large blocks go back to
the kernel when freed and each step page-faults them in again, which makes the emulated steps both slower and
far noisier (``--glibc-defaults`` measures that way).

GPT. ``lowprec.models.GPT`` (hand-written attention, tied embedding/head, vocabulary 128) on a fixed batch of
random token ids, next-token cross-entropy at every position, AdamW (lr 3e-4) in every configuration:
``fp32`` (torch.optim.AdamW), ``autocast bf16`` (the same under torch.autocast), ``native-bf16`` (lowprec.Trainer
with torch.optim.AdamW on the fp32 masters) and each emulated preset (lowprec.Trainer with torch.optim.AdamW, or
lowprec.train.AdamW for the lazy-update presets), all timed in the same interleaved rounds; every entry is the
ratio of its step time to the fp32 step (below 1: faster).

Packed storage (``--packed-only``, or section 3b): the same peak of each emulated recipe with its saved tensors
stored packed (``lowprec.nn.packed``, the default) and with ``LOWPREC_PACKED=0`` (float32 containers, as before
packing existed), against the plain fp32 step; Park et al.'s Fig. 4 ratio int8-lazy / int16 on LeNet; the step
time with packing / without on every model of ``--models``, timed in the same interleaved rounds; and a bar
chart (docs/img/packed-memory.png). ``wrpn-4-4+recompute=off`` is WRPN with the policy's other trade-off: the
batch-norms' float32 inputs kept instead of computed again in backward (faster, more memory).

Memory. ``lowprec.diagnostics.memory.measure_peak_memory``: the peak bytes held by torch's CPU allocator during
one training step after two warm-up steps, parameters, gradients and optimizer state included. The split is
exact for what lives across steps (weights, fp32 master copies, optimizer state, lazy-update accumulators,
gradients: their bytes) and the rest of the peak is the step's own (saved activations and workspace).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowprec as lp
from common import Row, load_qtorch, lowprec_source, machine, markdown_table, print_table, write_section
from lowprec.diagnostics.memory import measure_peak_memory
from lowprec.formats.packing import Packed
from lowprec.models import GPT, build_model
from lowprec.train import cross_entropy

warnings.filterwarnings("ignore", category=UserWarning)  # fp16 on this CPU warns that it computes in fp32

SEED = 0
LR, MOMENTUM = 0.01, 0.9
ADAMW_LR = 3e-4
GPT_VOCAB = 128
EMULATED = ["fp32", "mixed-fp16", "mixed-bf16", "fp8-hybrid", "int8", "int8-lazy", "int16", "fixed-20",
            "dfx-10-12", "wrpn-4-4"]
MEMORY_RECIPES = ["native-bf16", "native-fp16", "mixed-fp16", "int8-lazy", "int16"]
PACKED_RECIPES = ["mixed-fp16", "mixed-bf16", "fp8-hybrid", "fp8-e4m3", "int8-lazy", "int16", "dfx-10-12",
                  "wrpn-4-4", "wrpn-4-4+recompute=off"]
#: The issue's targets for the packed peak / plain fp32 peak, ResNet-20 batch 128.
PACKED_TARGETS = {"mixed-fp16": 0.6, "mixed-bf16": 0.6, "fp8-hybrid": 0.45, "fp8-e4m3": 0.45, "int8-lazy": 0.45,
                  "wrpn-4-4": 0.35, "wrpn-4-4+recompute=off": 0.35}


@dataclass(frozen=True)
class Workload:
    """A model and the fixed batch its steps train on: N(0, 1) inputs and 10 classes, or, with ``vocab``, token
    ids of shape ``batch`` and the next token at every position; SGD with momentum, or AdamW."""

    name: str
    build: Callable[[], nn.Module]
    batch: tuple[int, ...]
    note: str
    vocab: int | None = None
    adamw: bool = False

    def data(self) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(SEED)
        if self.vocab is not None:
            tokens = torch.randint(0, self.vocab, self.batch, generator=gen)
            return tokens, tokens.roll(-1, dims=1)
        return torch.randn(self.batch, generator=gen), torch.randint(0, 10, (self.batch[0],), generator=gen)

    def optimizer(self, params, lazy: bool = False, fused: bool = False) -> torch.optim.Optimizer:
        """torch's SGD(momentum) or AdamW; lowprec's (same arithmetic) for the lazy update, which it feeds."""
        extra = {"fused": True} if fused else {}
        if self.adamw:
            return (lp.train.AdamW if lazy else torch.optim.AdamW)(params, lr=ADAMW_LR, **extra)
        return (lp.train.SGD if lazy else torch.optim.SGD)(params, lr=LR, momentum=MOMENTUM, **extra)


def gpt_workload(n_layer: int, n_embd: int, n_head: int, block_size: int, batch: int) -> Workload:
    return Workload("gpt", lambda: GPT(GPT_VOCAB, block_size=block_size, n_layer=n_layer, n_embd=n_embd,
                                       n_head=n_head),
                    (batch, block_size), f"GPT {n_layer} layers, d={n_embd}, {n_head} heads, T={block_size}, "
                    f"batch {batch}, AdamW", vocab=GPT_VOCAB, adamw=True)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


WORKLOADS = {
    "mlp": Workload("mlp", mlp, (128, 1, 28, 28), "784-1024-1024-10 MLP, batch 128"),
    "lenet": Workload("lenet", lambda: build_model("lenet"), (64, 1, 28, 28), "Caffe LeNet, batch 64 (Park)"),
    "resnet20": Workload("resnet20", lambda: build_model("resnet20"), (32, 3, 32, 32), "ResNet-20, 3x32x32, batch 32"),
    "lstm": Workload("lstm", lambda: build_model("lstm"), (64, 50, 13), "LSTM(200) classifier, 50 MFCC frames, batch 64"),
}

Step = Callable[[], object]
PACKED_PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "packed-memory.png"


# -- the configurations -------------------------------------------------------------------------------------------
def plain_step(work: Workload, autocast: bool = False, fused: bool = False) -> tuple[Step, tuple[object, ...]]:
    torch.manual_seed(SEED)
    model = work.build()
    opt = work.optimizer(model.parameters(), fused=fused)
    x, y = work.data()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        cross_entropy(out, y).backward()
        opt.step()

    return step, (model, opt)


def lowprec_step(work: Workload, recipe: str) -> tuple[Step, tuple[object, ...]]:
    torch.manual_seed(SEED)
    model = lp.convert(work.build(), recipe)
    lazy = lp.Policy.parse(recipe).get("accumulator") is not None  # lowprec's optimizers hand it its step
    trainer = lp.Trainer(model, work.optimizer(model.parameters(), lazy=lazy), recipe)
    x, y = work.data()
    return (lambda: trainer.step(cross_entropy(model(x), y))), (trainer,)


def qtorch_lenet_step(work: Workload, widths: tuple[int, int, int, int | None]) -> tuple[Step, tuple[object, ...]]:
    """LeNet with QPyTorch quantizing the same roles it can express: every layer's input and output (forward
    ``act`` bits, backward ``grad`` bits, block floating point with one exponent per tensor: its dfx), weights,
    gradients and momentum through OptimLP, and its fp32-copy accumulator rounded to ``acc`` bits."""
    from qtorch import BlockFloatingPoint
    from qtorch.optim import OptimLP
    from qtorch.quant import Quantizer, block_quantize

    act, grad, weight, acc = widths
    torch.manual_seed(SEED)
    layers = [m for m in work.build().modules() if not isinstance(m, nn.Sequential) and m is not None][1:]

    def q() -> nn.Module:
        return Quantizer(BlockFloatingPoint(act, dim=-1), BlockFloatingPoint(grad, dim=-1), "nearest", "nearest")

    seq: list[nn.Module] = []
    for layer in layers:
        seq += [q(), layer, q()] if isinstance(layer, (nn.Conv2d, nn.Linear)) else [layer]
    model = nn.Sequential(*seq)

    def bq(bits: int) -> Callable[[Tensor], Tensor]:
        return lambda t: block_quantize(t, bits, dim=-1, rounding="nearest")

    opt = OptimLP(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), weight_quant=bq(weight),
                  grad_quant=bq(grad), momentum_quant=bq(weight), acc_quant=bq(acc) if acc else None)
    x, y = work.data()

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, (model, opt)


QTORCH_ROLES = {"int8-lazy": (8, 8, 8, 16), "dfx-10-12": (10, 10, 12, None)}


# -- timing -------------------------------------------------------------------------------------------------------
#: The clock of ``time_rounds``: wall time, or (``--cpu-time``) the process's CPU time.
CLOCK = [time.perf_counter]


def time_rounds(steps: dict[str, Step], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each configuration in each round (interleaved; see the module docstring)."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            start = CLOCK[0]()
            for _ in range(per_round):
                step()
            times[name].append((CLOCK[0]() - start) / per_round)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def ms(times: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(times[name]) * 1e3:.2f}"


# -- the sections -------------------------------------------------------------------------------------------------
def native_section(workloads: list[Workload], rounds: int, per_round: int) -> tuple[Row, list[Row]]:
    header = ["model", "fp32 ms/step", "autocast bf16 ms/step", "autocast + fused SGD ms/step",
              "native-bf16 ms/step", "native vs fp32", "native vs autocast", "native vs autocast + fused SGD"]
    rows = []
    for work in workloads:
        steps = {"fp32": plain_step(work)[0], "autocast": plain_step(work, autocast=True)[0],
                 "autocast-fused": plain_step(work, autocast=True, fused=True)[0],
                 "native": lowprec_step(work, "native-bf16")[0]}
        t = time_rounds(steps, rounds, per_round)
        rows.append([work.note, ms(t, "fp32"), ms(t, "autocast"), ms(t, "autocast-fused"), ms(t, "native")]
                    + [f"{1 / ratio(t, 'native', b):.2f}x faster" for b in ("fp32", "autocast", "autocast-fused")])
        print(f"  native: {work.name} done", file=sys.stderr)
    return header, rows


def emulation_section(workloads: list[Workload], rounds: int, per_round: int, qtorch_ok: bool) -> tuple[Row, list[Row]]:
    header = ["model", "fp32 ms/step"] + EMULATED + ["QPyTorch int8-lazy roles", "QPyTorch dfx-10-12 roles"]
    rows = []
    for work in workloads:
        steps = {"plain": plain_step(work)[0]}
        steps.update({r: lowprec_step(work, r)[0] for r in EMULATED})
        if qtorch_ok and work.name == "lenet":
            steps.update({f"qtorch {r}": qtorch_lenet_step(work, w)[0] for r, w in QTORCH_ROLES.items()})
        t = time_rounds(steps, rounds, per_round)
        row = [work.note, ms(t, "plain")] + [f"{ratio(t, r, 'plain'):.2f}" for r in EMULATED]
        row += [f"{ratio(t, f'qtorch {r}', 'plain'):.2f} ({ratio(t, f'qtorch {r}', r):.1f}x lowprec)"
                if f"qtorch {r}" in t else "-" for r in QTORCH_ROLES]
        rows.append(row)
        print(f"  emulation: {work.name} done", file=sys.stderr)
    return header, rows


def gpt_section(work: Workload, rounds: int, per_round: int) -> tuple[Row, list[Row]]:
    """One row: the fp32 step time, and every configuration's step time as a ratio to it (same rounds)."""
    # AdamW: Courbariaux's presets keep their formats with the optimizer's own update (their rule is SGD's)
    emulated = [r if lp.Policy.preset(r).update_rule == "optimizer" else f"{r}+update_rule=optimizer"
                for r in EMULATED]
    configs = ["autocast bf16", "native-bf16", *emulated]
    header = ["model", "fp32 ms/step"] + [f"{c} / fp32" for c in configs] + ["native-bf16 / autocast"]
    steps = {"plain": plain_step(work)[0], "autocast bf16": plain_step(work, autocast=True)[0]}
    steps.update({r: lowprec_step(work, r)[0] for r in ["native-bf16", *emulated]})
    t = time_rounds(steps, rounds, per_round)
    row = [work.note, ms(t, "plain")] + [f"{ratio(t, c, 'plain'):.2f}" for c in configs]
    row.append(f"{ratio(t, 'native-bf16', 'autocast bf16'):.2f}")
    print(f"  gpt: {work.name} done", file=sys.stderr)
    return header, [row]


def _bytes(tensors) -> int:
    """Bytes of tensors, or of packed values (the optimizer state the Trainer keeps packed) as they are held."""
    return sum(t.nbytes if isinstance(t, Packed) else t.numel() * t.element_size() for t in tensors if t is not None)


def memory_split(config: str, work: Workload) -> dict[str, float]:
    """Peak and its split (MiB) for one training step of ``config`` after two warm-up steps."""
    if config in ("fp32", "autocast"):
        step, held = plain_step(work, autocast=config == "autocast")
        model, opt = held
        params, masters, accs = list(model.parameters()), [], []
    else:
        step, held = lowprec_step(work, config)
        trainer = held[0]
        opt = trainer.optimizer
        params = list(trainer.model.parameters())
        masters = [s.master_copy for s in trainer.slots]
        accs = trainer.slots
    for _ in range(2):
        step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, (Tensor, Packed))]
    if masters:  # the fused update keeps each parameter's own gradient; the unfused one an fp32 master gradient
        fused = trainer.fused is not None and not trainer.fused.failed
        grads = [s.param if fused or s.master_copy is None else s.master_copy for s in trainer.slots]
    else:
        grads = params
    peak = measure_peak_memory(step, held=held)
    mib = 2.0**20
    split = {"weights": _bytes(params) / mib, "master copies": _bytes(masters) / mib,
             "gradients": _bytes(grads) / mib, "optimizer state": _bytes(state) / mib,
             "accumulators": sum(s.acc_nbytes for s in accs) / mib}
    split["activations + workspace"] = peak / mib - sum(split.values())
    split["peak"] = peak / mib
    return split


@contextlib.contextmanager
def packing(on: bool):
    """LOWPREC_PACKED set for the duration (read by a converted model at every forward)."""
    old = os.environ.get("LOWPREC_PACKED")
    os.environ["LOWPREC_PACKED"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOWPREC_PACKED"]
        else:
            os.environ["LOWPREC_PACKED"] = old


def _switched(step: Step, on: bool) -> Step:
    def run() -> object:
        with packing(on):
            return step()

    return run


def packed_memory(work: Workload, recipes: list[str]) -> dict[str, dict[str, float]]:
    """Peak MiB of each recipe packed and unpacked, and of the plain fp32 step (key "fp32")."""
    peaks = {"fp32": {"packed": memory_split("fp32", work)["peak"]}}
    for recipe in recipes:
        peaks[recipe] = {}
        for on in (True, False):
            with packing(on):
                peaks[recipe]["packed" if on else "unpacked"] = memory_split(recipe, work)["peak"]
    print(f"  packed memory: {work.name} done", file=sys.stderr)
    return peaks


def packed_times(work: Workload, recipes: list[str], rounds: int, per_round: int) -> dict[str, float]:
    """Step time packed / unpacked per recipe (median of per-round ratios, interleaved rounds)."""
    steps = {}
    for recipe in recipes:
        for on in (True, False):
            step, _ = lowprec_step(work, recipe)
            steps[(recipe, on)] = _switched(step, on)
    times = time_rounds({f"{r}|{on}": s for (r, on), s in steps.items()}, rounds, per_round)
    print(f"  packed time: {work.name} done", file=sys.stderr)
    return {r: ratio(times, f"{r}|True", f"{r}|False") for r in recipes}


def packed_section(big: Workload, park: Workload, timed: list[Workload], rounds: int, per_round: int,
                   plot: Path | None) -> tuple[Row, list[Row]]:
    header = ["model", "recipe", "packed peak MiB", "packed / fp32", "target", "unpacked peak MiB",
              "unpacked / fp32"] + [f"step time packed / unpacked ({w.name})" for w in timed]
    times = {w.name: packed_times(w, PACKED_RECIPES, rounds, per_round) for w in timed}
    rows = []
    for work in (big, park):
        recipes = PACKED_RECIPES if work is big else ["int8-lazy", "int16"]
        peaks = packed_memory(work, recipes)
        base = peaks["fp32"]["packed"]
        blank = [""] * len(timed)
        rows.append([work.note, "fp32 (plain PyTorch)", f"{base:.1f}", "1.00", "", "", "", *blank])
        for r in recipes:
            p, u = peaks[r]["packed"], peaks[r]["unpacked"]
            target = f"<= {PACKED_TARGETS[r]}" if work is big and r in PACKED_TARGETS else ""
            rows.append([work.note, r, f"{p:.1f}", f"{p / base:.2f}", target, f"{u:.1f}", f"{u / base:.2f}",
                         *([f"{times[w.name][r]:.2f}" for w in timed] if work is big else blank)])
        if work is park:
            p8, p16 = peaks["int8-lazy"], peaks["int16"]
            rows.append([work.note, "int8-lazy / int16 (Park Fig. 4: 0.69)",
                         f"{p8['packed'] / p16['packed']:.2f}", "", "", f"{p8['unpacked'] / p16['unpacked']:.2f}",
                         "", *blank])
        if work is big and plot is not None:
            _plot_packed(plot, work.note, recipes, peaks)
    return header, rows


def _plot_packed(path: Path, title: str, recipes: list[str], peaks: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = peaks["fp32"]["packed"]
    x = range(len(recipes))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar([i - 0.2 for i in x], [peaks[r]["unpacked"] / base for r in recipes], 0.4, label="float32 containers")
    ax.bar([i + 0.2 for i in x], [peaks[r]["packed"] / base for r in recipes], 0.4, label="packed (default)")
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="plain fp32 step")
    ax.set_xticks(list(x), recipes, rotation=20)
    ax.set_ylabel("measured peak / fp32 peak")
    ax.set_title(f"{title}: measured peak memory of a training step")
    ax.set_ylim(0, 1.25 * max(1.0, *(peaks[r]["unpacked"] / base for r in recipes)))  # room for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_section(workloads: list[Workload], configs: list[str]) -> tuple[Row, list[Row]]:
    columns = ["weights", "master copies", "gradients", "optimizer state", "accumulators", "activations + workspace",
               "peak"]
    header = ["model", "recipe"] + [f"{c} MiB" for c in columns] + ["peak vs fp32"]
    rows = []
    for work in workloads:
        base = None
        for config in ["fp32", "autocast", *configs]:
            split = memory_split(config, work)
            base = base or split["peak"]
            rows.append([work.note, config] + [f"{split[c]:.1f}" for c in columns] + [f"{split['peak'] / base:.2f}"])
        print(f"  memory: {work.name} done", file=sys.stderr)
    return header, rows


def accuracy_section(epochs: int, seeds: list[int]) -> tuple[Row, list[Row]]:
    """The MLP trained on the shipped MNIST subset: fp32, autocast bf16, native bf16 (test accuracy, time)."""
    from lowprec.data import load_mnist

    x, y = load_mnist()
    xt, yt = load_mnist("test")
    header = ["recipe", "test accuracy % (mean ± sd)", "training seconds (mean)"]
    rows = []
    for config in ("fp32", "autocast", "native-bf16"):
        accs, secs = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            native = config == "native-bf16"
            model = lp.convert(mlp(), config) if native else mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=MOMENTUM)
            if native:
                trainer = lp.Trainer(model, opt, config)
            gen = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            for _ in range(epochs):
                for idx in torch.randperm(len(x), generator=gen).split(128):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config == "autocast"):
                        out = model(x[idx])
                    loss = F.cross_entropy(out.float(), y[idx])
                    if native:
                        trainer.step(loss)
                    else:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
            secs.append(time.perf_counter() - start)
            with torch.no_grad():
                accs.append(100 * (model(xt).float().argmax(1) == yt).float().mean().item())
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append([config, f"{statistics.mean(accs):.2f} ± {sd:.2f}", f"{statistics.mean(secs):.1f}"])
    return header, rows


# -- main ---------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, MLP and LeNet only, no file written")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 15, quick 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration per round, after "
                        "one untimed step (default 5)")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--no-qtorch", action="store_true", help="skip the QPyTorch comparison")
    parser.add_argument("--glibc-defaults", action="store_true", help="leave malloc as it is (see the docstring)")
    parser.add_argument("--gpt-size", default="4,256,4,128,32", help="the GPT row's n_layer,n_embd,n_head,T,batch "
                        "(default 4,256,4,128,32)")
    parser.add_argument("--gpt-only", action="store_true", help="time only the GPT (prints; writes no file)")
    parser.add_argument("--no-gpt", action="store_true", help="skip the GPT section")
    parser.add_argument("--cpu-time", action="store_true", help="time steps in the process's CPU time instead of "
                        "wall time (a machine shared with other jobs: their load then disturbs the times far less)")
    parser.add_argument("--packed-only", action="store_true", help="only the packed-storage section (prints; "
                        "writes docs/img/packed-memory.png)")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to update (default BENCHMARKS.md "
                        "for a full run, none for --quick)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    names = args.models.split(",") if args.models else (["mlp", "lenet"] if args.quick else list(WORKLOADS))
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    workloads = [WORKLOADS[n] for n in names]
    rounds = args.rounds or (4 if args.quick else 15)
    if args.cpu_time:
        CLOCK[0] = time.process_time
    try:
        gpt = gpt_workload(*(int(v) for v in args.gpt_size.split(",")))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--gpt-size: expected five integers n_layer,n_embd,n_head,T,batch ({err})") from None
    retained = not args.glibc_defaults and lp.train.retain_freed_memory()  # every section (--gpt-only, too)
    if args.gpt_only:
        print_table("GPT training step: each configuration / fp32", *gpt_section(gpt, rounds, args.steps))
        return
    resnet_b128 = Workload("resnet20-b128", lambda: build_model("resnet20"), (128, 3, 32, 32),
                           "ResNet-20, batch 128 (activation-heavy)")
    if args.packed_only:
        print_table("packed storage: measured peak vs plain fp32", *packed_section(
            resnet_b128, WORKLOADS["lenet"], workloads, rounds, args.steps, PACKED_PLOT))
        return
    output = args.output or (None if args.quick else Path("BENCHMARKS.md"))
    command = " ".join(["python benchmarks/training.py", *map(shlex.quote, sys.argv[1:])])
    qtorch_module, qtorch_status = load_qtorch(args.no_qtorch)
    source = lowprec_source()
    started = datetime.datetime.now(datetime.timezone.utc)

    sections = []
    header, rows = native_section(workloads, rounds, args.steps)
    print_table("native bf16 vs fp32 and torch.autocast (step time)", header, rows)
    sections.append(("### 1. Native bf16: training step time", header, rows))
    header, rows = accuracy_section(epochs=1 if args.quick else 3, seeds=[0] if args.quick else [0, 1, 2])
    print_table("MLP on MNIST (shipped 10k/2k subset)", header, rows)
    sections.append(("### 1b. Native bf16: the same accuracy (MLP, shipped MNIST subset, "
                     f"{1 if args.quick else 3} epochs, seeds {'0' if args.quick else '0, 1, 2'})", header, rows))
    header, rows = emulation_section(workloads, rounds, args.steps, qtorch_module is not None)
    print_table("emulation overhead: step time / fp32 step", header, rows)
    sections.append(("### 2. Emulation overhead: step time of each preset / plain fp32 step", header, rows))
    mem_workloads = [w for w in workloads if w.name != "resnet20"]
    mem_workloads.append(resnet_b128)
    header, rows = memory_section(mem_workloads, MEMORY_RECIPES)
    print_table("peak training memory", header, rows)
    sections.append(("### 3. Peak training memory per recipe (MiB)", header, rows))
    header, rows = packed_section(resnet_b128, WORKLOADS["lenet"], workloads, rounds, args.steps,
                                  None if output is None else PACKED_PLOT)
    print_table("packed storage: measured peak vs plain fp32", header, rows)
    sections.append(("### 3b. Packed storage: measured peak vs the plain fp32 step", header, rows))
    if not args.no_gpt:
        header, rows = gpt_section(gpt, rounds, args.steps)
        print_table("GPT training step: each configuration / fp32", header, rows)
        sections.append(("### 4. A transformer: GPT training step (AdamW), each configuration / plain fp32 step",
                         header, rows))

    if output is None:
        return
    if lowprec_source() != source:
        raise SystemExit("lowprec's source changed during the run; not writing the results")
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    body = [f"## Training steps (`{command}`)\n",
            f"- Run: {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} minutes; {source}",
            f"- Machine: {machine()}",
            "- Allocator: " + ("freed blocks kept for reuse (lowprec.train.retain_freed_memory), every configuration"
                               if retained else "the C library's defaults"),
            f"- Timing: {rounds} interleaved rounds of 1 untimed + {args.steps} timed steps per configuration; "
            "medians (see the "
            "script's docstring). QPyTorch: " + qtorch_status, ""]
    for title, header, rows in sections:
        body += [title, "", markdown_table(header, rows), ""]
    write_section(output, "training", "\n".join(body))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
