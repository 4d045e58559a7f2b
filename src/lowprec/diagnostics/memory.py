"""Measured peak memory of a piece of work on the CPU.

torch has no allocator statistics for the CPU, so the peak is rebuilt from the allocator's own event stream:
``torch.profiler`` with ``profile_memory=True`` reports every allocation and free that goes through torch's CPU
allocator while it runs, intra-op temporaries (convolution column buffers, oneDNN scratch) included. The live
bytes at any moment are the bytes alive at the start plus the running sum of those events; the peak is their
maximum.

The profiler cannot see a free of a block allocated before profiling started. Tensors alive at the start that
belong to the measurement (parameters, gradients, optimizer state) are therefore passed as ``held``: their bytes
form the baseline, and a weak reference on each storage marks the moment it is freed (``zero_grad`` setting the
gradients to ``None`` frees them mid-step), so the running sum falls when it should.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["PeakMemory", "measure_peak_memory", "profile_peak_memory"]

_FREE_MARK = "lowprec.memory.free:"


@dataclass(frozen=True)
class PeakMemory:
    """Bytes held by torch's CPU allocator: at the start of ``fn`` (``baseline``, the ``held`` tensors only),
    at its highest point during ``fn`` (``peak``) and at its end (``final``)."""

    baseline: int
    peak: int
    final: int


def _tensors(obj: object, seen: set[int] | None = None) -> Iterator[Tensor]:
    """Every tensor an object holds: a module's parameters, their gradients and its buffers; an optimizer's
    parameters, gradients and state; a tensor and its gradient; the items of a list, tuple or dict; the
    attributes of any other object (a Trainer, a lazy-update state). Each object is visited once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
        return
    if isinstance(obj, nn.Module):
        children: Iterable[object] = (*obj.parameters(), *obj.buffers())
    elif isinstance(obj, torch.optim.Optimizer):
        children = (obj.param_groups, obj.state)
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        children = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = vars(obj).values()
    else:
        return
    for child in children:
        yield from _tensors(child, seen)


def _held_storages(held: Iterable[object]) -> dict[int, torch.UntypedStorage]:
    storages: dict[int, torch.UntypedStorage] = {}
    for obj in held:
        for t in _tensors(obj):
            if t.device.type == "cpu" and t.untyped_storage().nbytes() > 0:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st
    return storages


def _events(prof: profile) -> list[Any]:
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    out = []
    while stack:
        e = stack.pop()
        out.append(e)
        stack.extend(e.children)
    return sorted(out, key=lambda e: e.start_time_ns)


def profile_peak_memory(fn: Callable[[], Any], held: Iterable[object] = ()) -> PeakMemory:
    """Run ``fn()`` once and return the baseline, peak and final bytes held by torch's CPU allocator.

    Counted: every tensor block ``fn`` allocates through torch's CPU allocator (outputs, saved activations,
    gradients, optimizer state created on the first step, temporaries inside kernels), plus the blocks of the
    ``held`` objects alive at the start (modules, optimizers, tensors, or objects whose attributes are such),
    until they are freed. Not counted: tensors alive at the start that are not in ``held`` (their frees are
    ignored too), memory outside torch's allocator (Python objects, library code, allocator caches).
    """
    storages = _held_storages(held)
    baseline = sum(st.nbytes() for st in storages.values())
    sizes = {ptr: st.nbytes() for ptr, st in storages.items()}

    def mark(ptr: int) -> Callable[[object], None]:
        def freed(_ref: object) -> None:
            with record_function(f"{_FREE_MARK}{ptr}"):
                pass
        return freed

    refs = [weakref.ref(st, mark(ptr)) for ptr, st in storages.items()]
    del storages
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    del refs  # no marks after the profile closes

    live = peak = baseline
    unfreed = set(sizes)  # held blocks still alive
    allocated: set[int] = set()  # blocks allocated inside fn
    for e in _events(prof):
        if e.name.startswith(_FREE_MARK):
            ptr = int(e.name[len(_FREE_MARK):])
            if ptr in unfreed:
                unfreed.discard(ptr)
                live -= sizes[ptr]
            continue
        fields = e.extra_fields
        if not hasattr(fields, "alloc_size") or fields.alloc_size == 0:
            continue
        ptr, size = fields.ptr, fields.alloc_size
        if size > 0:
            allocated.add(ptr)
            live += size
            peak = max(peak, live)
        elif ptr in allocated:
            allocated.discard(ptr)
            live += size
        elif ptr in unfreed:  # a held block the allocator still knew from an earlier profile
            unfreed.discard(ptr)
            live -= sizes[ptr]
    return PeakMemory(baseline=baseline, peak=peak, final=live)


def measure_peak_memory(fn: Callable[[], Any], held: Iterable[object] = ()) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn()`` runs (``fn`` is called once; its result dropped).

    The count is the tensor memory of the work: everything ``fn`` allocates (activations saved for backward,
    gradients, optimizer state, kernel temporaries) plus the tensors of ``held`` that are alive at the start
    (pass the model and the optimizer so that parameters, gradients and optimizer state alive during ``fn``
    count; a block of ``held`` freed during ``fn`` stops counting at that moment). A ``fn`` that builds its
    model itself needs no ``held``. Memory outside torch's allocator (Python objects, code) is not counted.
    See :func:`profile_peak_memory` for the baseline and final bytes as well.

    >>> step_bytes = measure_peak_memory(lambda: train_step(batch), held=(model, optimizer))
    """
    return profile_peak_memory(fn, held).peak
