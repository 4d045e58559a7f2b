"""Data-parallel tests in seconds: ``run_ranks(fn, ...)`` runs ``fn(rank, ...)`` in forked CPU processes joined in one
gloo process group, and returns what each rank returned.

A fork starts with torch, lowprec and whatever the test imported already loaded, so a two-process test costs its
training steps, not two interpreter start-ups (torchrun: tests/test_distributed.py). Each rank also gets the
environment a launcher gives it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so
accelerate and Lightning find the group that is already up and use it. A rank that raises fails the test with its
traceback; one that hangs (a collective its neighbour never joins) is killed at ``timeout``. The ranks run lowprec's
kernels eagerly (``LOWPREC_COMPILE=0``: the same bits as compiled; torch.compile's worker threads and processes do
not survive a fork).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, tmp: str, port: int, args: tuple) -> None:
    torch.set_num_threads(1)  # as DataLoader's forked workers: the parent's OpenMP pool does not survive a fork
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOWPREC_COMPILE="0")  # nor torch.compile's worker pool: the eager kernels, the same bits
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
    except BaseException:  # noqa: BLE001 - the group never formed: the machine's failure, run_ranks tries again
        torch.save({"unjoined": traceback.format_exc()}, Path(tmp) / f"rank{rank}.pt")
        os._exit(1)
    try:
        outcome = {"value": fn(rank, *args)}
        dist.barrier()
    except BaseException:  # noqa: BLE001 - everything goes back to the test, which raises it
        outcome, code = {"error": traceback.format_exc()}, 1
    torch.save(outcome, Path(tmp) / f"rank{rank}.pt")
    os._exit(code)  # no interpreter teardown in a forked pytest (and none for gloo's threads to abort)


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 120.0,
              attempts: int = 3) -> list[Any]:
    """``[fn(0, *args), fn(1, *args), ...]``, each computed in its own forked process (rank r of a gloo group of
    ``world_size``). ``fn`` and its results travel through fork and ``torch.save``: module-level functions and
    picklable values. Raises AssertionError with a failing rank's traceback, or on ``timeout``. A group that never
    formed (a rank's gloo connection closed while the ranks met, seen on a loaded machine) is formed again, up to
    ``attempts`` times: ``fn`` had not run on any rank."""
    for attempt in range(attempts):
        outcomes = _run_once(fn, args, world_size, timeout)
        unjoined = [r for r, o in enumerate(outcomes) if "unjoined" in o]
        if not unjoined or any("error" in o for o in outcomes) or attempt + 1 == attempts:
            break
    errors = [f"rank {r}:\n{o.get('error') or o.get('unjoined')}" for r, o in enumerate(outcomes)
              if "error" in o or "unjoined" in o]
    assert not errors, "\n".join(errors)
    return [o["value"] for o in outcomes]


def _run_once(fn: Callable[..., Any], args: tuple, world_size: int, timeout: float) -> list[dict[str, Any]]:
    """Each rank's outcome: {"value": ...}, {"error": traceback} or {"unjoined": traceback}."""
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, tmp, port, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):  # one failed: its neighbours wait on it
                deadline = min(deadline, time.monotonic() + 2)
            time.sleep(0.02)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        outcomes = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False)
                    if (Path(tmp) / f"rank{r}.pt").exists() else {"error": f"rank {r} did not finish"}
                    for r in range(world_size)]
    if any("unjoined" in o for o in outcomes):  # a rank its neighbour never met was killed waiting for it
        outcomes = [{"unjoined": o["error"]} if o.get("error", "").endswith("did not finish") else o
                    for o in outcomes]
    return outcomes


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` hold the same values bit for bit: tensors (dtype and every bit: ``torch.equal`` on the
    integer view, so NaNs compare by their bits), dicts, lists and tuples element by element, anything else by
    ``==``. The AssertionError names the first key path that differs."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        assert a.dtype == torch.bool or torch.equal(a.contiguous().view(view), b.contiguous().view(view)), where
        assert a.dtype != torch.bool or torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
