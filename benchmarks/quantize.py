"""Benchmark of lowprec's quantize core against the memory-bandwidth ceiling and QPyTorch.

Run from the repository root:

    python benchmarks/quantize.py                     # full run (a few minutes), rewrites BENCHMARKS.md
    python benchmarks/quantize.py --numel 1048576 --repeats 3 --formats 'fp16,bfp<8,16>' --no-qtorch
    python benchmarks/quantize.py --scaled            # only the block and scaled formats' section

Input: ``numel`` float32 values x = z * 2**k with z ~ N(0, 1) and k drawn uniformly from {-10, ..., 10}
per element (fixed seed), so that about 25 binades are exercised rather than the few of a plain randn.

Every throughput is numel / (median wall time of ``repeats`` calls after 2 warm-ups, more calls when they
take under 0.5 s in all), in Melem/s; a timing disturbed by other processes is retried (see ``measure``). The
ceiling is ``dst.copy_(x)`` into a preallocated tensor (one read and one write of each element), the
reference the targets below are defined against. The script writes (or replaces) the block between
``<!-- quantize:begin -->`` and ``<!-- quantize:end -->`` of the markdown output, so other benchmark
sections can live in the same file.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

import lowprec as lp
from common import Row, load_qtorch, lowprec_source, machine, markdown_table, others_busy_seconds, print_table, write_section

FORMATS = ["fp16", "bf16", "e4m3", "e5m2", "fixed<16,8>", "dfx<8>", "uniform<4>", "bfp<8,16>"]
ROUNDINGS = ["nearest", "stochastic", "toward_zero"]

#: Targets from the issue: throughput with ``out=`` as a fraction of the copy ceiling, per rounding.
CEILING_TARGETS = {"nearest": 0.70, "stochastic": 0.35}
#: Targets from the issue: lowprec (``out=``) at least this many times QPyTorch's throughput.
QTORCH_SPEEDUP_TARGET = 3.0

#: Float formats whose values torch can cast to natively (the bit-exactness check).
TORCH_CASTS = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}

QTORCH_NOTE = """QPyTorch calls compared (its CPU extension: single-threaded scalar loops). Its formats follow its own
rules (nearest rounds ties away from zero, overflow saturates, a block's exponent is chosen differently), so
the speed columns compare comparable work, not identical results:

"""

#: Timing: every measurement times at least this long; it is retried while others use more than QUIET_SHARE.
MIN_TIMED_SECONDS = 0.5
QUIET_SHARE = 0.10
MAX_TRIES = 4

SEED = 0

QuantizeFn = Callable[[Tensor, str], Tensor]


#: The block and scaled formats (section "scaled"), their targets as fractions of copy_ (the block formats'
#: issue), and gfloat's vectorised equivalents where gfloat is installed.
SCALED_FORMATS = ["bfp<8,16>", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4",
                  "scaled<e4m3>"]
BLOCK_TARGETS = {"nearest": 0.5, "stochastic": 0.3}
GFLOAT_MX = {"mxfp8_e4m3": "format_info_mxfp8_e4m3", "mxfp8_e5m2": "format_info_mxfp8_e5m2",
             "mxfp6_e2m3": "format_info_mxfp6_e2m3", "mxfp6_e3m2": "format_info_mxfp6_e3m2",
             "mxfp4": "format_info_mxfp4_e2m1", "mxint8": "format_info_mxint8"}
GFLOAT_NOTE = """gfloat's column: its vectorised rounding (`gfloat.round_ndarray(etype, x / scale, sat=True) * scale`) on
numpy float64 blocks of 32, with the scale of its `compute_scale_amax` (floor(log2 amax) - emax, clipped to
[-127, 127], 2**-127 for a zero block): the same values as lowprec's (the differing-values column counts float32
bit patterns, the sign of zero ignored: gfloat returns +0). One timed call after one warm-up."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 24, help="elements of the input (default 2**24)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (default 10)")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help=f"comma-separated formats (default {','.join(FORMATS)})"
    )
    parser.add_argument("--no-qtorch", action="store_true", help="skip the QPyTorch comparison")
    parser.add_argument("--scaled", action="store_true",
                        help=f"benchmark only the block and scaled formats ({', '.join(SCALED_FORMATS)}) into their "
                             "own section, against copy_ and gfloat")
    parser.add_argument("--no-gfloat", action="store_true", help="--scaled: skip the gfloat comparison")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"), help="markdown file to update")
    return parser.parse_args()


def split_formats(text: str) -> list[str]:
    """Split a comma list of formats, keeping the commas inside <...> (``bfp<8,16>``)."""
    formats, depth, current = [], 0, ""
    for char in text:
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "," and depth == 0:
            formats.append(current.strip())
            current = ""
        else:
            current += char
    formats.append(current.strip())
    formats = [f for f in formats if f]
    for fmt in formats:
        lp.parse_format(fmt)  # fail early on a typo
    return formats


def make_input(numel: int) -> Tensor:
    gen = torch.Generator().manual_seed(SEED)
    z = torch.randn(numel, generator=gen)
    k = torch.randint(-10, 11, (numel,), generator=gen)
    return z * torch.exp2(k.float())


@dataclass(frozen=True)
class Timing:
    melem_per_s: float  # numel / median seconds per call, in millions
    others_share: float  # share of the machine's CPUs that other processes used while it was timed


def time_calls(fn: Callable[[], object], numel: int, repeats: int) -> Timing:
    """Median of at least ``repeats`` calls and at least MIN_TIMED_SECONDS of calls (so that /proc/stat's
    10 ms ticks resolve the interference share)."""
    times: list[float] = []
    others_before = others_busy_seconds()
    while len(times) < repeats or sum(times) < MIN_TIMED_SECONDS:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    share = (others_busy_seconds() - others_before) / (sum(times) * (os.cpu_count() or 1))
    return Timing(numel / statistics.median(times) / 1e6, min(max(share, 0.0), 1.0))


def measure(fn: Callable[[], object], numel: int, repeats: int) -> Timing:
    """Throughput after 2 warm-ups (the first lowprec call of a format compiles its kernel). A noisy neighbour
    on a small machine stalls torch's parallel regions, so a timing during which other processes used more
    than QUIET_SHARE of the CPUs is retried, up to MAX_TRIES times; the least disturbed one is kept."""
    fn()
    fn()
    best = time_calls(fn, numel, repeats)
    for _ in range(MAX_TRIES - 1):
        if best.others_share <= QUIET_SHARE:
            break
        best = min(best, time_calls(fn, numel, repeats), key=lambda t: t.others_share)
    return best


#: The QPyTorch call closest to each lowprec format: (description, call(qtorch.quant, x, rounding)).
QTORCH_EQUIVALENTS: dict[str, tuple[str, Callable[[ModuleType, Tensor, str], Tensor]]] = {
    "fp16": ("float_quantize(x, exp=5, man=10)", lambda q, x, r: q.float_quantize(x, exp=5, man=10, rounding=r)),
    "bf16": ("float_quantize(x, exp=8, man=7)", lambda q, x, r: q.float_quantize(x, exp=8, man=7, rounding=r)),
    "e4m3": ("float_quantize(x, exp=4, man=3)", lambda q, x, r: q.float_quantize(x, exp=4, man=3, rounding=r)),
    "e5m2": ("float_quantize(x, exp=5, man=2)", lambda q, x, r: q.float_quantize(x, exp=5, man=2, rounding=r)),
    "fixed<16,8>": (
        "fixed_point_quantize(x, wl=16, fl=8)",
        lambda q, x, r: q.fixed_point_quantize(x, wl=16, fl=8, rounding=r),
    ),
    "dfx<8>": (
        "block_quantize(x, wl=8, dim=-1) (one exponent for the whole tensor)",
        lambda q, x, r: q.block_quantize(x, wl=8, dim=-1, rounding=r),
    ),
    "bfp<8,16>": (
        "block_quantize(x.view(-1, 16), wl=8, dim=0) (one exponent per 16 elements)",
        lambda q, x, r: q.block_quantize(x.view(-1, 16), wl=8, dim=0, rounding=r),
    ),
}




def verdict(rounding: str, ceiling_ratio: float, speedup: float | None) -> str:
    """PASS / FAIL against the issue's targets for this rounding ("-" when it sets none)."""
    if rounding not in CEILING_TARGETS:
        return "-"
    failed = []
    if ceiling_ratio < CEILING_TARGETS[rounding]:
        failed.append("ceiling")
    if speedup is not None and speedup < QTORCH_SPEEDUP_TARGET:
        failed.append("QPyTorch")
    if failed:
        return f"FAIL ({', '.join(failed)})"
    return "PASS" if speedup is not None else "PASS (ceiling; no QPyTorch)"


def benchmark_baselines(x: Tensor, repeats: int) -> tuple[float, list[Row]]:
    """The copy ceiling (Melem/s) and the reference rows."""
    dst = torch.empty_like(x)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("dst.copy_(x)  (ceiling)", lambda: dst.copy_(x)),
        ("x.clone()", lambda: x.clone()),
        ("x.half().float()", lambda: x.half().float()),
        ("x.bfloat16().float()", lambda: x.bfloat16().float()),
    ]
    timings = [measure(fn, x.numel(), repeats) for _, fn in cases]
    ceiling = timings[0].melem_per_s
    rows = [
        [name, f"{t.melem_per_s:,.0f}", f"{t.melem_per_s / ceiling:.2f}", f"{t.others_share:.0%}"]
        for (name, _), t in zip(cases, timings)
    ]
    return ceiling, rows


def benchmark_formats(
    x: Tensor, formats: list[str], repeats: int, ceiling: float, qtorch_fns: dict[str, QuantizeFn]
) -> list[Row]:
    dst = torch.empty_like(x)
    gen = torch.Generator().manual_seed(SEED)
    rows = []
    for fmt in formats:
        for rounding in ROUNDINGS:
            call = functools.partial(lp.quantize, x, fmt, rounding, generator=gen)
            timings = [measure(functools.partial(call, out=dst), x.numel(), repeats), measure(call, x.numel(), repeats)]
            qfn = qtorch_fns.get(fmt) if rounding in ("nearest", "stochastic") else None
            if qfn:
                timings.append(measure(functools.partial(qfn, x, rounding), x.numel(), repeats))
            with_out, allocating = timings[0].melem_per_s, timings[1].melem_per_s
            qspeed = timings[2].melem_per_s if qfn else None
            speedup = with_out / qspeed if qspeed else None
            rows.append(
                [
                    fmt,
                    rounding,
                    f"{with_out:,.0f}",
                    f"{with_out / ceiling:.2f}",
                    f"{allocating:,.0f}",
                    f"{allocating / ceiling:.2f}",
                    f"{qspeed:,.0f}" if qspeed else "-",
                    f"{speedup:.1f}x / {allocating / qspeed:.1f}x" if qspeed else "-",
                    verdict(rounding, with_out / ceiling, speedup),
                    f"{max(t.others_share for t in timings):.0%}",
                ]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)  # progress
    return rows


def count_bit_mismatches(x: Tensor, formats: list[str], qtorch_fns: dict[str, QuantizeFn]) -> list[Row]:
    """How many values differ bit-for-bit from torch's own cast (round to nearest even)."""
    rows = []
    for fmt in formats:
        if fmt not in TORCH_CASTS:
            continue
        reference = x.to(TORCH_CASTS[fmt]).float().view(torch.int32)
        ours = int((lp.quantize(x, fmt, "nearest").view(torch.int32) != reference).sum())
        theirs = "-"
        if fmt in qtorch_fns:
            theirs = f"{int((qtorch_fns[fmt](x, 'nearest').view(torch.int32) != reference).sum()):,}"
        rows.append([fmt, f"x.to({TORCH_CASTS[fmt]}).float()", f"{ours:,}", theirs])
    return rows






def gfloat_mx(info: object, x: Tensor) -> Tensor:
    """MX through gfloat (see GFLOAT_NOTE) of a flat float32 tensor whose length is a multiple of 32."""
    import gfloat
    import numpy as np

    blocks = x.numpy().reshape(-1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax == 0, -127.0, np.clip(np.floor(np.log2(amax)) - info.etype.emax, -127.0, 127.0))
    scale = 2.0**e
    return torch.from_numpy((gfloat.round_ndarray(info.etype, blocks / scale, sat=True) * scale).astype(np.float32)).view(-1)


def _block_scale_only(x: Tensor, out: Tensor) -> None:
    """The structure of a fused block kernel with no element rounding, on rows of the block (as lowprec's kernels
    get them: inductor then fuses the row loops, one pass): per row, amax and one multiply."""
    torch.mul(x, x.abs().amax(dim=-1, keepdim=True), out=out)


def _row_amax(x: Tensor) -> Tensor:
    """The first kernel of the two-kernel form alone: per row, the amax (one read of x)."""
    return x.abs().amax(dim=-1, keepdim=True)


def benchmark_bounds(x: Tensor, repeats: int, ceiling: float) -> list[Row]:
    """What bounds the block kernels: the passes they cannot avoid, timed alone on the same tensor."""
    dst = torch.empty_like(x)
    scale_only = torch.compile(_block_scale_only, dynamic=False)
    row_amax = torch.compile(_row_amax, dynamic=False)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("torch.amax(x.view(-1, 32).abs(), dim=1) (eager: abs pass + reduction)",
         lambda: torch.amax(x.view(-1, 32).abs(), dim=1)),
        ("torch.aminmax(x) (one read: the amax of scaled<...>)", lambda: torch.aminmax(x)),
    ]
    for block in (16, 32):
        rows, out_rows = x.view(-1, block), dst.view(-1, block)
        cases += [
            (f"compiled: per row of {block}, amax then x * amax (a fused block kernel without rounding)",
             lambda rows=rows, out_rows=out_rows: scale_only(rows, out_rows)),
            (f"compiled: per row of {block}, the amax alone (the first of two kernels)",
             lambda rows=rows: row_amax(rows)),
        ]
    rows = []
    for name, fn in cases:
        t = measure(fn, x.numel(), repeats)
        rows.append([name, f"{t.melem_per_s:,.0f}", f"{t.melem_per_s / ceiling:.2f}", f"{t.others_share:.0%}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def benchmark_scaled(x: Tensor, repeats: int, ceiling: float, use_gfloat: bool) -> tuple[list[Row], str]:
    """Rows of the block and scaled formats: throughput with out=, ratio to copy_ and to gfloat, the targets."""
    try:
        if not use_gfloat:
            raise ImportError
        from gfloat import formats as gf
        gfloat_status = "gfloat installed"
    except ImportError:
        gf = None
        gfloat_status = "gfloat not compared (--no-gfloat)" if not use_gfloat else "gfloat not installed (pip install gfloat)"
    dst = torch.empty_like(x)
    gen = torch.Generator().manual_seed(SEED)
    rows = []
    for fmt in SCALED_FORMATS:
        for rounding in ("nearest", "stochastic"):
            t = measure(functools.partial(lp.quantize, x, fmt, rounding, generator=gen, out=dst), x.numel(), repeats)
            ratio = t.melem_per_s / ceiling
            gspeed, differ = None, "-"
            if gf is not None and fmt in GFLOAT_MX and rounding == "nearest":
                info = getattr(gf, GFLOAT_MX[fmt])
                ref = gfloat_mx(info, x)
                gspeed = time_calls(lambda: gfloat_mx(info, x), x.numel(), 1).melem_per_s
                ours = lp.quantize(x, fmt)
                differ = f"{int((ours.abs().view(torch.int32) != ref.abs().view(torch.int32)).sum()):,}"
            verdict_ = "PASS" if ratio >= BLOCK_TARGETS[rounding] else "FAIL"
            rows.append([fmt, rounding, f"{t.melem_per_s:,.0f}", f"{ratio:.2f}",
                         f"{gspeed:,.1f}" if gspeed else "-", f"{t.melem_per_s / gspeed:,.0f}x" if gspeed else "-",
                         differ, f"{verdict_} (>= {BLOCK_TARGETS[rounding]})", f"{t.others_share:.0%}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows, gfloat_status


def main_scaled(args: argparse.Namespace, command: str, source: str, x: Tensor) -> None:
    ceiling, baseline_rows = benchmark_baselines(x, args.repeats)
    bound_rows = benchmark_bounds(x, args.repeats, ceiling)
    rows, gfloat_status = benchmark_scaled(x, args.repeats, ceiling, not args.no_gfloat)
    threads = torch.get_num_threads()
    bound_header = ["bound", "Melem/s", "x copy_", "others' CPU"]
    header = ["format", "rounding", "out= Melem/s", "x copy_", "gfloat Melem/s", "vs gfloat",
              "values differing from gfloat", "target", "others' CPU"]
    print_table("block and scaled formats", header, rows)
    print_table("bounds", bound_header, bound_rows)
    section = f"""## block and scaled formats ({threads} thread{"s" if threads > 1 else ""})

- Command: `{command}`
- Code: {source}
- Machine: {machine()}
- Date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- Input, timing and interference: as in "quantize core" ({args.numel:,} float32 values over about 25 binades);
  `quantize(x, fmt, rounding, generator=g, out=dst)`.
- Ceiling: `dst.copy_(x)`: {ceiling:,.0f} Melem/s. Targets (block formats): nearest >= {BLOCK_TARGETS["nearest"]}
  x copy_, stochastic >= {BLOCK_TARGETS["stochastic"]} x copy_.
- gfloat: {gfloat_status}. {GFLOAT_NOTE}

{markdown_table(header, rows)}

What bounds them, timed alone on the same input:

{markdown_table(bound_header, bound_rows)}
"""
    write_section(args.output, f"scaled-{threads}t", section)
    print(f"wrote {args.output}")


def main() -> None:
    args = parse_args()
    formats = split_formats(args.formats)
    command = " ".join(["python benchmarks/quantize.py", *map(shlex.quote, sys.argv[1:])])
    source = lowprec_source()  # the code imported above; checked again at the end
    torch.manual_seed(SEED)  # QPyTorch's stochastic fixed point draws from torch's default generator
    x = make_input(args.numel)
    if args.scaled:
        main_scaled(args, command, source, x)
        return

    qtorch_module, qtorch_status = load_qtorch(args.no_qtorch)
    qtorch_fns: dict[str, QuantizeFn] = (
        {fmt: functools.partial(call, qtorch_module) for fmt, (_, call) in QTORCH_EQUIVALENTS.items()}
        if qtorch_module
        else {}
    )
    print(f"QPyTorch: {qtorch_status}", file=sys.stderr)

    ceiling, baseline_rows = benchmark_baselines(x, args.repeats)
    format_rows = benchmark_formats(x, formats, args.repeats, ceiling, qtorch_fns)
    mismatch_rows = count_bit_mismatches(x, formats, qtorch_fns)

    baseline_header = ["baseline", "Melem/s", "x copy_", "others' CPU"]
    format_header = [
        "format",
        "rounding",
        "out= Melem/s",
        "out= x copy_",
        "alloc Melem/s",
        "alloc x copy_",
        "QPyTorch Melem/s",
        "vs QPyTorch (out= / alloc)",
        "targets",
        "others' CPU",
    ]
    mismatch_header = ["format", "reference", "lowprec differing values", "QPyTorch differing values"]
    print_table("baselines", baseline_header, baseline_rows)
    print_table("lowprec.quantize", format_header, format_rows)
    print_table(f"bit-for-bit vs torch casts ({args.numel:,} values)", mismatch_header, mismatch_rows)
    print(f"QPyTorch: {qtorch_status}")
    worst = max(int(row[-1].rstrip("%")) for row in baseline_rows + format_rows)
    print(f"Other processes used at most {worst}% of the CPUs during any timed measurement.")

    if lowprec_source() != source:
        source += " (the files changed during the run; the numbers are for this hash, imported at the start)"
    qtorch_calls = "\n".join(
        f"- `{fmt}`: `{description}`" for fmt, (description, _) in QTORCH_EQUIVALENTS.items() if fmt in formats
    )
    section = f"""## quantize core

- Command: `{command}`
- Code: {source}
- Machine: {machine()}
- Date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- Input: {args.numel:,} float32 values x = z * 2**k, z ~ N(0, 1), k uniform in {{-10, ..., 10}} per element
  (torch seed {SEED}), so about 25 binades are exercised.
- Timing: median of {args.repeats} calls (more for fast calls: at least {MIN_TIMED_SECONDS} s of them) after 2
  warm-ups (the warm-ups include lowprec's torch.compile), `time.perf_counter`, default torch threads.
  Melem/s = numel / median time.
- Interference: column "others' CPU" is the largest share of the CPUs that other processes used (from
  /proc/stat) while that row was timed; a measurement above {QUIET_SHARE:.0%} is retried up to {MAX_TRIES} times and the
  least disturbed kept. At most {worst}% in this run. More than a few percent means that row is pessimistic
  (a busy neighbour stalls torch's parallel regions).
- Ceiling: `dst.copy_(x)` into a preallocated tensor: {ceiling:,.0f} Melem/s
  ({ceiling * 8 / 1e3:,.1f} GB/s read + write).
- Targets (issue): with `out=`, nearest >= {CEILING_TARGETS["nearest"]} x copy_, stochastic >=
  {CEILING_TARGETS["stochastic"]} x copy_, and both >= {QTORCH_SPEEDUP_TARGET:g}x QPyTorch. The `targets`
  column judges the `out=` throughput; toward_zero has no target.
- QPyTorch: {qtorch_status}.

### Baselines

{markdown_table(baseline_header, baseline_rows)}

### lowprec.quantize

"out=" writes into a preallocated tensor (`quantize(x, fmt, rounding, generator=g, out=dst)`); "alloc"
returns a fresh tensor. QPyTorch always allocates its result and has no toward_zero rounding.

{markdown_table(format_header, format_rows)}

{QTORCH_NOTE + qtorch_calls if qtorch_fns else "QPyTorch columns are empty: " + qtorch_status + "."}

### Bit-for-bit agreement with torch's casts

Round to nearest on the same input, counted as differing float32 bit patterns.

{markdown_table(mismatch_header, mismatch_rows)}
"""
    write_section(args.output, "quantize", section)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
