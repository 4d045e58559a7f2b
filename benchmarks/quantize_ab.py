"""Before/after timing of a few formats in one process: prints one JSON line with ``copy_`` and
``lowprec.quantize(x, fmt, rounding, out=dst)`` throughput in Melem/s (median of 5 calls after 2 warm-ups) for
nearest and stochastic rounding, on the 16M float32 values of ``benchmarks/quantize.py`` (z * 2**k, k in
[-10, 10]). Compare two trees by alternating processes on the same machine, e.g. (OLD: a checkout's ``src``):

    for i in 1 2 3; do for src in OLD/src src; do
      echo "$src $(PYTHONPATH=$src OMP_NUM_THREADS=1 python benchmarks/quantize_ab.py 'bfp<8,16>;nvfp4')"
    done; done
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

import lowprec as lp


def melem_per_s(fn: Callable[[], object], numel: int) -> float:
    """numel / the median wall time of 5 calls of ``fn`` after 2 warm-ups, in Melem/s."""
    fn()
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return numel / statistics.median(times) / 1e6


def main(formats: list[str]) -> None:
    numel = 1 << 24
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g) * torch.exp2(torch.randint(-10, 11, (numel,), generator=g).float())
    out = torch.empty_like(x)
    result = {"copy_": melem_per_s(lambda: out.copy_(x), numel)}
    gen = torch.Generator().manual_seed(1)
    for fmt in formats:
        for rounding in ("nearest", "stochastic"):
            result[f"{fmt} {rounding}"] = melem_per_s(
                lambda: lp.quantize(x, fmt, rounding, generator=gen, out=out), numel
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1].split(";"))
