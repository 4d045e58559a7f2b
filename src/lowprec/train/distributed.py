"""Data-parallel training with torch.distributed: what lowprec's scale state agrees on across processes.

Launch with torchrun (``python -m torch.distributed.run``, or ``lowprec train --nproc N``); gloo on CPU,
NCCL on GPU. Wrap the converted model in ``torch.nn.parallel.DistributedDataParallel`` for the forward pass
and give ``lowprec.Trainer`` the inner model, built after ``init_process_group``. The Trainer then keeps
every rank's state identical:

* Loss scaling: the vector of non-finite flags (one per parameter, plus the loss) is reduced with MAX over the
  ranks inside ``LossScaler.unscale_``, right before its single host sync (``all_max``): one rank's overflow
  skips the step on every rank, every rank backs off the scale, every rank reports the same names. With plain
  DDP an inf already spreads through the gradient all-reduce; the agreement also covers an inf or NaN that
  appears after it (a comm hook, a sharded optimizer, code between backward and the step) and a non-finite
  loss whose gradients are finite.
* Dynamic fixed point, "overflow" rule: each rank observes its own activations and gradients, so overflow
  rates differ. Before the exponents move, the interval's counters of every group (overflow rate at r and at
  r - 1, batches) are summed over the ranks in one all-reduce (``sum_exponent_counters``); every rank then
  applies Courbariaux's rule to the pooled rate and holds the same exponent. With ``init_int_bits=auto`` the
  start exponent is the MAX over the ranks of each rank's first max-abs exponent.
* Delayed scaling (``scaled<...,delayed>``): every rank pushes the MAX over the ranks of its pending amax, so
  every rank holds the same amax history and scale.
* The quantizers of functional ops, which the op-level emulation makes at the first forward (after the Trainer
  was built), take the same agreement (``OpEmulation.agree``); start exponents chosen by a forward before the
  Trainer was built (a ``GradScaler`` bound at its first step) are agreed when it is (``agree_quantizers``).
* Dynamic fixed point, "maxabs" rule: stateless; each tensor takes its exponent from its own max|x|. Weights,
  master weights and optimizer state are the same on every rank, so their exponents are too; activations and
  the gradients each rank computes before the all-reduce take their exponent from that rank's own batch, as
  any per-tensor computation on local data does. Nothing needs agreeing: the parameters stay identical.
* Parameters: DDP's averaged gradients are identical on every rank, so identical optimizer steps keep them
  identical. Stochastic rounding of the master weights draws from torch's global RNG: every rank must use
  the same seed and draw the same amounts (same batch shapes), which the runner arranges (``shard``).

Process lifetime under a launcher: ``die_with_parent()`` has the kernel kill a worker when its launcher dies
(Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; a SIGKILLed launcher cannot take its workers down itself), and
``leave(code)`` ends a worker after its last collective: a barrier, ``destroy_process_group``, then
``os._exit`` without the interpreter's finalization, during which gloo's threads can still hold Python-owned
tensors and abort a process whose work is done (SIGABRT, "terminate called without an active exception").

``quantized_allreduce_hook(fmt)`` is a DDP comm hook that sends gradients through the all-reduce in a
reduced format. Costs: one small all-reduce per step for the flags (on the existing sync), one per exponent
interval for the counters, one per ``auto`` start. None of it runs without an initialised process group.

FSDP (``torch.distributed.fsdp.fully_shard``) works with the native path (``native-bf16``/``native-fp16``): the
Trainer's float32 master copies are DTensor shards like the parameters, and the finite flags computed from the
sharded gradients are DTensors that torch reduces over the shards (one small all-reduce per parameter) before
``all_max``. Pass ``MixedPrecisionPolicy(reduce_dtype=torch.float32)`` to average the fp16/bf16 gradients in
float32. Only the native path is tested under FSDP; emulated policies run, but their update-role quantizers
(master, optimizer_state, accumulator) then round DTensor shards, and per-tensor dfx exponents are not
guaranteed to be the exponents of the whole tensor.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..formats import Format, parse_format, quantize
from ..nn import emulation_of
from ..nn import quantizers as layer_quantizers
from ..scaling import DynamicExponent

__all__ = [
    "is_initialized", "rank", "world_size", "all_max", "agree_quantizers", "mean_over_ranks", "sum_exponent_counters",
    "quantized_allreduce_hook", "init_from_env", "shard", "die_with_parent", "leave", "LAUNCHER_PID",
]

#: Environment variable a launcher sets to its pid, so that a worker can tell its launcher died before
#: ``die_with_parent`` armed the signal (the worker's parent is then another process).
LAUNCHER_PID = "LOWPREC_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def is_initialized() -> bool:
    """Whether a torch.distributed process group is up (lowprec's collectives run only then)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def _device() -> torch.device:
    """Where the default group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_max(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over all ranks (bool, integer or float), on ``t``'s device and dtype."""
    from torch.distributed.tensor import DTensor  # only here: a process group is up

    if isinstance(t, DTensor):  # flags computed from FSDP's sharded gradients
        t = t.full_tensor()
    work = t.to(_device(), torch.uint8 if t.dtype == torch.bool else t.dtype, copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return work.to(t.device, t.dtype)


def agree_quantizers(model: nn.Module) -> None:
    """Have every quantizer of ``model`` agree across the ranks: its layers' and its functional ops' (also those
    the op-level emulation makes later, at a first forward: ``OpEmulation.agree``) take ``all_max`` for their
    dfx start exponents and delayed-scaling amaxes; start exponents already chosen (a forward ran before, e.g.
    under a ``GradScaler`` bound to its optimizer at the first step) become their MAX over the ranks now, in one
    all-reduce, which is what the agreement would have given them. Call on every rank, after the same forwards
    (the same quantizers on each); ``lowprec.Trainer`` does, when built under a process group."""
    found = [q for _, _, q in layer_quantizers(model)]
    for q in found:
        q.set_agree(all_max)
    emulation = emulation_of(model)
    if emulation is not None:
        emulation.agree = all_max
    exponents = [q.exponent for q in found if q.exponent is not None]
    if exponents:
        unset = torch.iinfo(torch.int64).min  # not started yet (no tensor seen): stays so unless another rank's has
        agreed = all_max(torch.tensor([unset if e.int_bits is None else e.int_bits for e in exponents]))
        for e, r in zip(exponents, agreed.tolist()):
            e.int_bits = None if r == unset else r


def mean_over_ranks(value: Tensor) -> float:
    """The mean of a scalar tensor over all ranks, as a Python float (``value.item()`` in one process)."""
    if not is_initialized():
        return value.item()
    work = value.detach().to(_device(), torch.float64).reshape(1)
    dist.all_reduce(work)
    return work.item() / dist.get_world_size()


def sum_exponent_counters(exponents: Iterable[DynamicExponent]) -> None:
    """Sum the counters of every exponent whose interval is complete over all ranks, in one all-reduce.

    Call on every rank before the exponents' ``update()``, with the groups in the same order on every rank
    (the model's own order). Groups not ``due`` are left alone; a no-op without a process group."""
    due = [e for e in exponents if e.due]
    if not due or not is_initialized():
        return
    counters = torch.stack([e.counters().to(_device()) for e in due])
    dist.all_reduce(counters, op=dist.ReduceOp.SUM)
    for e, c in zip(due, counters.cpu()):
        e.set_counters(c)


def quantized_allreduce_hook(fmt: Format | str) -> Callable:
    """A DDP comm hook averaging gradients in the number format ``fmt`` (e.g. the policy's gradient format).

    ``ddp.register_comm_hook(None, quantized_allreduce_hook(policy.get("weight_grad").format))``. For each
    parameter's gradient in the bucket: divide by the world size, round to ``fmt`` (round to nearest; dfx takes
    each gradient's own max-abs exponent), all-reduce (SUM, in the bucket's dtype), round the sum to ``fmt``
    again. The last rounding acts on values that are identical on every rank, so every rank receives the same
    gradients. Non-finite values pass through unrounded (a saturating format would otherwise turn an inf into
    its largest value and hide an overflow from the loss scaler). This emulates the numerics of a
    reduced-precision all-reduce; it moves the same bytes as fp32 (for bandwidth use torch's
    ``fp16_compress_hook`` / ``bf16_compress_hook``). The hook's ``state`` is the process group (None: all ranks).
    """
    fmt = parse_format(fmt)

    def round_each(grads: list[Tensor]) -> None:
        for g in grads:
            g.copy_(torch.where(torch.isfinite(g), quantize(g, fmt), g))

    def hook(state, bucket):  # no annotations: DDP compares them to real types (they are strings here)
        group = state if state is not None else dist.group.WORLD
        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size(group))
        round_each(bucket.gradients())
        future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

        def finish(fut):
            round_each(bucket.gradients())
            return fut.value()[0]

        return future.then(finish)

    return hook


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the environment).

    Does nothing (returns False) outside torchrun or when a group is already up. gloo for a CPU device, NCCL
    for CUDA (each process then uses the GPU of its LOCAL_RANK). Returns True when this call created it."""
    if is_initialized() or "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def shard(order: Tensor) -> Tensor:
    """This rank's share of an epoch's example order, as DistributedSampler does it: the order is padded by
    repeating its start to a multiple of the world size, and rank k takes positions k, k + W, k + 2W, ... All
    ranks get equally many examples (so equal steps and batch shapes); with one process, ``order`` itself."""
    n, w = len(order), world_size()
    if w == 1 or n == 0:
        return order
    total = -(-n // w) * w
    return order.repeat(-(-total // n))[:total][rank() :: w]


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent process ends (Linux; elsewhere a no-op returning
    False). Call first thing in a worker a launcher started. If ``LOWPREC_LAUNCHER_PID`` names a parent that is
    already gone (it died before the call), the process exits at once with status 1."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is not None and launcher.isdigit() and os.getppid() != int(launcher):
        os._exit(1)
    return True


def leave(code: int = 0) -> NoReturn:
    """End this worker with exit status ``code`` once every rank is done: barrier, destroy the process group,
    flush stdout and stderr, ``os._exit(code)``. Skipping the interpreter's finalization is the point: gloo's
    threads may still hold tensors owned by Python (DDP buckets, comm-hook futures) whose release during
    finalization aborts the process after its work is done, which torchrun reports as a failed run."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to say on it
            pass
    os._exit(code)
