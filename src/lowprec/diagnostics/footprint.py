"""The memory of a training step, estimated per component (and measured, for comparison).

Two views of the same step (``MemoryEstimate``): *emulated*, what the process holds (emulated formats in
float32 containers), and *ideal*, every tensor packed at its format's width (Park et al. Fig. 4). The counts,
the phases and the workspace model are described in docs/diagnostics.md; ``measure_step_memory`` checks the
emulated estimate against the measured peak (``profile_peak_memory``). WRPN's footprint formulas
(spec 2d) are ``wrpn_footprint``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..train import cross_entropy
from .memory import PeakMemory, profile_peak_memory

__all__ = ["COMPONENTS", "MemoryEstimate", "estimate_memory", "measure_step_memory", "wrpn_footprint"]

#: The components of a training step's memory, in bar-chart order.
COMPONENTS = ("weights", "master copy", "weight copies", "gradients", "optimizer state", "accumulators",
              "saved activations", "backward workspace")

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component (COMPONENTS) of one training step of ``model`` under ``recipe``.

    ``emulated``: what the process holds: emulated parameters live in float32 containers, so a parameter costs
    4 bytes whatever its format, and each quantized layer keeps a rounded copy of its weight for backward
    ("weight copies"); optimizer state and lazy-update accumulators with a format count as the Trainer keeps
    them between steps, packed (int8 momentum: 1 byte a value; ``lowprec.train.stored``), and unpacked to
    float32 during the update (its workspace). ``ideal``: every tensor packed at its format's width (int8: 1
    byte, fp16: 2, uniform<4>: half a byte), what Park et al.'s Fig. 4 compares: the fp32 master copy of mixed
    precision and WRPN appears as its own component. ``measured``: the measured peak of a steady-state step (``measure_step_memory``),
    when measured. The emulated total is the largest of three phases (see ``docs/diagnostics.md``): forward
    (state and ``forward``, the forward pass's own measured peak), backward (everything but the update
    workspace) and update (state, gradients and the update workspace); the ideal total has the last two.
    """

    model: str
    recipe: str
    batch: int
    optimizer: str
    emulated: dict[str, int]
    ideal: dict[str, int]
    update_workspace: int  # emulated bytes of the optimizer step's temporaries (Δ and rounding copies)
    measured: int | None = None
    forward: int = 0  # emulated bytes the forward pass has alive at its highest point, beyond the state

    @property
    def total(self) -> int:
        """The emulated estimate of the peak: max(forward phase, backward phase, update phase)."""
        return max(_peak(self.emulated, self.update_workspace), _state(self.emulated) + self.forward)

    @property
    def total_ideal(self) -> int:
        return _peak(self.ideal, 0)

    @property
    def error(self) -> float | None:
        """(estimate - measured) / measured, when measured."""
        return None if self.measured is None else (self.total - self.measured) / self.measured


def _state(view: dict[str, int]) -> int:
    """What a step holds before its forward starts (the gradients were dropped after the last update)."""
    return view["weights"] + view["master copy"] + view["optimizer state"] + view["accumulators"]


def _peak(view: dict[str, int], update_workspace: int) -> int:
    state = _state(view)
    backward = state + view["weight copies"] + view["gradients"] + view["saved activations"] + view[
        "backward workspace"]
    update = state + view["gradients"] + update_workspace
    return max(backward, update)


def _bits(quant: Any, default: int = 32) -> float:
    bits = None if quant is None else quant.bits
    return float(default if bits is None else bits)


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass(frozen=True, eq=False)
class _Saved:
    """A tensor autograd saved, the quantized layer running when it was saved, and the bytes it is stored in
    (packed, or its own size)."""

    tensor: Tensor
    layer: nn.Module | None
    stored: int

    @property
    def size(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def _rerun_workspace(operands: tuple[Any, ...], out: Tensor) -> int:
    """Bytes the backward of an op-level product that runs its op again (``QOpFunction`` under packing) has in
    flight at once beyond what it saved: its operands unpacked (those stored packed), the result computed
    again, the output gradient and its rounded copy, and each operand's gradient and its rounded copy."""
    from ..formats.packing import marked_format

    floats = [t for t in operands if isinstance(t, Tensor) and t.is_floating_point()]
    unpacked = sum(t.numel() * t.element_size() for t in floats if marked_format(t) is not None)
    return unpacked + 3 * out.numel() * out.element_size() + 2 * sum(t.numel() * t.element_size() for t in floats)


#: torch's fused recurrent kernels (oneDNN on the CPU): their backward allocates scratch that no saved tensor
#: shows (it grows with the byte-typed workspace they save, in steps of the kernel's blocking).
_FUSED_RNN = ("MkldnnRnnLayerBackward0", "CudnnRnnBackward0", "MiopenRnnBackward0")


def _graph_workspaces(loss: Tensor) -> list[tuple[int, bool]]:
    """Bytes in flight in backward nodes of ``loss``'s graph that the per-saved-tensor model of
    ``_backward_workspace`` misses: a fused recurrent kernel's backward, measured by running
    that node once on zero gradients (its peak, less the weight and state gradients it returns, which the
    estimate counts as gradients); a slice or select of a larger tensor (an unrolled recurrent layer's gate
    pre-activations, computed for every step at once), whose backward builds a zero tensor of the whole
    base plus the slice's gradient; where several slices of one tensor are taken (the steps), the base's
    gradient accumulates while the steps' weight gradients are computed (the second item of each entry:
    whether a weight gradient is in flight beside it)."""
    out: list[tuple[int, bool]] = []
    slices: dict[Any, list[int]] = {}  # the node that made the sliced tensor -> its slices' bytes
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name in _FUSED_RNN:
            grads = [torch.zeros(tuple(m.shape), dtype=m.dtype, device=m.device) for m in node._input_metadata]
            results: list[Any] = []
            with torch.no_grad():  # as the engine runs it (with grad on, the call would record a graph)
                node(*grads)  # the first call may set the kernel up (caches that later steps reuse)
                peak = profile_peak_memory(lambda: results.append(node(*grads))).peak
            returned = sum(g.numel() * g.element_size() for g in results[0][1:] if isinstance(g, Tensor))
            out.append((max(peak - returned, 0), False))
        elif name in ("SliceBackward0", "SelectBackward0"):
            meta = node._input_metadata[0]
            itemsize = torch.empty((), dtype=meta.dtype).element_size()
            base, part = math.prod(node._saved_self_sym_sizes), math.prod(meta.shape)
            if base > part:
                slices.setdefault(node.next_functions[0][0], []).append((base + part) * itemsize)
        stack.extend(n for n, _ in node.next_functions)
    # several slices of one tensor are the steps of an unrolled recurrence: a weight gradient beside each
    return out + [(max(sizes), len(sizes) > 1) for sizes in slices.values()]


def _saved_tensors(model: nn.Module, batch: Batch, loss_fn: Callable[[nn.Module, Batch], Tensor],
                   exclude: set[int]) -> tuple[list[_Saved], list[tuple[int, int, bool]], dict[int, int]]:
    """Every tensor autograd saves for backward in one forward + loss (storages in ``exclude``, the parameters,
    left out), in the order saved, with the innermost quantized layer running when it was saved. A model that
    packs its saved tensors (``lowprec.nn.packed``) is counted as it stores them: each packed save at its
    packed size, once however many ops save it; a tensor saved unpacked once per storage, as torch shares it.
    Also returns, for each op-level product that runs its op again in backward, (how many saved tensors
    precede its backward, the bytes it has in flight: ``_rerun_workspace``, False), and likewise for the
    backward nodes ``_graph_workspaces`` finds (counted with every saved tensor held); and the bytes of each
    quantized layer's output (id(layer) -> bytes; its last call's)."""
    from ..formats.packing import Packed
    from ..nn import QuantizedModule
    from ..nn.opfunction import observing_recomputed
    from ..nn.packed import (PackedSavedTensors, install_packing, is_packing, pack_saved, packing_enabled,
                             recomputes, remove_packing)

    stack: list[nn.Module] = []
    saved: list[_Saved] = []
    reruns: list[tuple[int, int, bool]] = []
    shared: set[int] = set()  # storages saved unpacked and packed forms already counted
    outputs: dict[int, int] = {}  # id(quantized layer) -> bytes of its output
    packing = is_packing(model) and packing_enabled()
    recompute = recomputes(model)

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key in exclude:
            return t
        stored = pack_saved(t) if packing else t
        layer = stack[-1] if stack else None
        if isinstance(stored, Packed):
            if id(stored) not in shared:  # one packed form shared by several saves counts once
                shared.add(id(stored))
                saved.append(_Saved(t, layer, stored.nbytes))
        elif key not in shared:
            shared.add(key)
            saved.append(_Saved(t, layer, t.numel() * t.element_size()))
        return t

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, _inputs: Any, output: Any) -> None:
        stack.pop()
        if isinstance(output, Tensor):
            outputs[id(module)] = output.numel() * output.element_size()

    layers = [m for m in model.modules() if isinstance(m, QuantizedModule)]
    hooks = [h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    if packing:
        remove_packing(model)  # this function's hook sees every save and packs it as the model's would
    try:
        saving = (functools.partial(PackedSavedTensors, recompute=recompute) if packing
                  else torch.autograd.graph.saved_tensors_hooks)
        with saving(pack, lambda t: t), observing_recomputed(
                lambda operands, out: reruns.append((len(saved), _rerun_workspace(operands, out), False))):
            loss = loss_fn(model, batch)  # packing: as the model's own hooks, recomputable outputs recorded
        reruns += [(len(saved), bytes_, beside) for bytes_, beside in _graph_workspaces(loss)]
    finally:
        for h in hooks:
            h.remove()
        if packing:
            install_packing(model, recompute)
    return saved, reruns, outputs


def _forward_peak(model: nn.Module, batch: Batch, loss_fn: Callable[[nn.Module, Batch], Tensor]) -> int:
    """Bytes the forward pass of ``model`` (as converted, with its own saved-tensor storage) has alive at its
    highest point: the saved tensors stored so far, the activations in flight (a residual block's input kept for
    its shortcut and a stage's input held by its caller, a layer's float32 output and its rounded copy, an
    output computed again in backward but float32 while forward uses it) and the kernels' scratch. Measured by
    running the forward once (``profile_peak_memory``): which float32 tensors are alive together depends on how
    the model's Python code holds its intermediates, which no saved-tensor hook sees."""
    return profile_peak_memory(lambda: loss_fn(model, batch)).peak


def _is_weight_copy(t: Tensor, layer: nn.Module | None) -> bool:
    """A tensor a quantized layer saved with the shape of one of its parameters: its rounded weight or bias
    (or their straight-through masks)."""
    return layer is not None and any(t.shape == p.shape for p in layer.parameters(recurse=False))


def _optimizer(name: str, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    from ..train import SGD, AdamW

    if name == "sgd":
        return SGD(params, lr=0.01, momentum=0.9)
    if name == "sgd-plain":
        return SGD(params, lr=0.01)
    if name == "adam":
        return AdamW(params, lr=1e-3, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}; use sgd (momentum 0.9), sgd-plain or adam")


_STATE_BUFFERS = {"sgd": 1, "sgd-plain": 0, "adam": 2}


def _step_setup(model: nn.Module, policy: Any, optimizer: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The converted copy, its optimizer and its Trainer, as ``lowprec train`` builds them."""
    from ..nn import convert
    from ..train import Trainer

    work = convert(model, policy)
    opt = _optimizer(optimizer, [p for p in work.parameters() if p.requires_grad])
    return work, opt, Trainer(work, opt, policy)


def cross_entropy_step_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The loss of a training step, as ``lowprec train`` computes it (``lowprec.train.cross_entropy``)."""
    return cross_entropy(model(batch[0]), batch[1])


def _rounding_scratch(quant: Any, policy: Any, numel: int) -> int:
    """Bytes one rounding of a ``numel``-element float32 tensor needs beyond its input and output, measured
    once per (format, size) on the quantizer the layers use: fused (compiled) kernels need none, eager ones a
    few temporaries. 0 for an unquantized role."""
    if quant is None or numel == 0:
        return 0
    return _scratch(str(quant), policy, numel)


@functools.lru_cache(maxsize=64)
def _scratch(quant: str, policy: Any, numel: int) -> int:
    from ..policy import Quant, Quantizer

    rounder = Quantizer(Quant.parse(quant), policy)
    x = torch.randn(numel)
    rounder(x)  # the first call may compile the kernel
    measured = profile_peak_memory(lambda: rounder(x), held=(x,))
    return max(measured.peak - measured.baseline - numel * 4, 0)


def _clipped(quant: Any) -> bool:
    """WRPN's clip formats: their straight-through estimator masks the gradient (a masked copy)."""
    return quant is not None and quant.format.clip_range is not None


def _backward_workspace(saved: list[_Saved], policy: Any, reruns: list[tuple[int, int, bool]],
                        outputs: dict[int, int]) -> int:
    """Bytes the backward pass needs beyond the saved tensors (which it frees as it goes, last saved first).

    Walking the saved activations in reverse, at activation i the tensors saved up to i are still held (as
    stored), a packed one unpacked beside its packed form, and its op's output and input gradients are in
    flight (``outputs``: a quantized layer's output bytes), with the rounded copies its layer makes (see the
    comment below); at a layer whose weight gradient is rounded or masked, the unrounded dE/dW is in flight
    (the result is the gradient, counted as such), beside the unpacked weight copy where it is stored packed.
    An op-level product that runs its op again and the nodes of ``_graph_workspaces`` (``reruns``) add the
    moment of their backward: the tensors saved up to it held, its own bytes in flight, and, where a weight
    gradient is computed beside it (an unrolled recurrent step), the largest weight gradient's bytes in flight
    and that gradient accumulating over the steps. Returns the largest of these moments minus all saved tensors
    as stored (>= 0)."""
    native = getattr(policy, "path", "emulated") == "native"  # real fp16/bf16 tensors: nothing is rounded
    rounds = None if native else policy.get("output_grad")
    held, moments, done, weight_extra = 0, [0], set(), 0
    held_before = [0]  # held_before[k]: the saved activations among the first k saves, as stored
    for item in saved:
        t, layer, size = item.tensor, item.layer, item.size
        unpacked = size if item.stored != size else 0
        if _is_weight_copy(t, layer):
            q = layer.policy.get("weight_grad")
            w = next(p for p in layer.parameters(recurse=False) if p.shape == t.shape)  # its weight (or bias)
            rounded = q is not None or _clipped(layer.policy.get("weight"))
            key = (id(layer), tuple(t.shape))  # a recurrent layer has several weights; a mask shares its shape
            if key not in done and (rounded or unpacked):
                # a packed weight copy is unpacked beside its packed form while dE/dW is computed
                extra = unpacked + w.numel() * 4 + _rounding_scratch(q, layer.policy, w.numel())
                moments.append(held + extra)
                # beside a step's slice (reruns): also the weight's gradient accumulating over the steps
                weight_extra = max(weight_extra, extra + w.numel() * 4)
            done.add(key)
            held_before.append(held)  # weight copies are counted apart
            continue
        if t.is_floating_point():
            # the backward of the op that saved it: its output's and its input's gradients (or, clipping,
            # the raw and the masked one) side by side, the tensor still held (in a quantized layer the output's
            # gradient has the layer's output size), and the rounded copy of each gradient the layer rounds
            # (dE/dz before the product, dE/dx after it: the unrounded one still alive); then, at the layer
            # below, the gradient and its rounded copy with the kernel's scratch, the tensor freed
            out = size if layer is None else outputs.get(id(layer), size)
            grads = out + size
            if layer is not None and not native:
                grads += out if layer.policy.get("output_grad") is not None else 0
                grads += size if layer.policy.get("activation_grad") is not None else 0
            moments.append(held + item.stored + unpacked + grads)
            if rounds is not None:
                moments.append(held + 2 * size + _rounding_scratch(rounds, policy, t.numel()))
        held += item.stored
        held_before.append(held)
    moments += [held_before[k] + bytes_ + (weight_extra if beside else 0) for k, bytes_, beside in reruns]
    return max(max(moments) - held, 0)


def _state_bytes(slot: Any) -> float:
    """Bytes of one optimizer-state buffer of a parameter between steps: packed in its optimizer_state format
    where the Trainer keeps it packed (``lowprec.train.stored``), float otherwise."""
    from ..train.stored import bytes_per_value

    holder = slot.holder
    return holder.numel() * bytes_per_value(slot.state_quant, slot.policy, holder.element_size())


def _update_workspace(trainer: Any, stepped: list[Tensor], delta_optimizer: bool, n_state: int) -> int:
    """Temporaries of the optimizer step. lowprec's SGD/AdamW are driven one parameter at a time: its Δ, its
    optimizer state unpacked from its packed form, then the rounding into the master format (Δ still held) or
    Park's lazy update (its accumulator unpacked and three parameter-sized temporaries), then the rounding of
    its state. torch's optimizers read all the state unpacked during ``step()``, then each parameter's storage
    rule and state rounding follow. On the native path the float32 master copies' gradients are held too."""
    masters = [s.master_copy for s in trainer.slots if getattr(s, "master_copy", None) is not None]
    base = sum(t.numel() * t.element_size() for t in masters)  # native path: the masters' float32 gradients
    unpacked = [n_state * (s.holder.numel() * s.holder.element_size() - _state_bytes(s)) for s in trainer.slots]
    everything = sum(unpacked)
    phases = [base + (0 if delta_optimizer else everything)]
    for slot, own_state in zip(trainer.slots, unpacked):
        n = slot.param.numel()
        held = base + (n * 4 + own_state if delta_optimizer else everything)  # its Δ and its unpacked state
        master = slot.policy.get("master")
        if slot.lazy:
            phases.append(held + 4 * n * 4 + _rounding_scratch(master, slot.policy, n))
        elif master is not None:
            phases.append(held + n * 4 + _rounding_scratch(master, slot.policy, n))
        if slot.state_quant is not None:
            phases.append(held + n * 4 + _rounding_scratch(slot.state_quant, slot.policy, n))
    return int(max(phases)) if stepped else 0


def estimate_memory(
    model: nn.Module,
    policy: Any,
    batch: Batch,
    *,
    optimizer: str = "sgd",
    label: str | None = None,
    loss_fn: Callable[[nn.Module, Batch], Tensor] = cross_entropy_step_loss,
) -> MemoryEstimate:
    """Estimate the bytes of one steady-state training step of ``model`` (unconverted; it is not changed)
    under ``policy`` on ``batch`` with ``optimizer`` ("sgd": momentum 0.9, "sgd-plain", "adam").

    Parameters, gradients, optimizer state and accumulators are counted from the tensors the converted model
    and its Trainer hold (and the optimizer's buffers per parameter); saved activations by recording, with
    ``torch.autograd.graph.saved_tensors_hooks``, what autograd keeps during one forward pass (no backward
    runs). See MemoryEstimate for the two views and the phases.
    """
    from ..policy import as_policy
    from ..train import DeltaOptimizer

    pol = as_policy(policy)
    work, opt, trainer = _step_setup(model, pol, optimizer)
    params = [p for p in work.parameters() if p.requires_grad]
    masters = [s.master_copy for s in trainer.slots if getattr(s, "master_copy", None) is not None]
    stepped = masters or params  # what the optimizer updates (native path: the fp32 master copies)
    n_state = _STATE_BUFFERS[optimizer]
    saved, reruns, outputs = _saved_tensors(
        work, batch, loss_fn, {_storage_key(t) for t in (*work.parameters(), *work.buffers(), *masters)})
    forward = _forward_peak(work, batch, loss_fn)  # after _saved_tensors' forward: kernels already compiled
    activations = [item for item in saved if not _is_weight_copy(item.tensor, item.layer)]
    workspace = _backward_workspace(saved, pol, reruns, outputs)
    emulated = {
        "weights": _bytes((*work.parameters(), *work.buffers())),
        "master copy": _bytes(masters),
        "weight copies": sum(item.stored for item in saved if _is_weight_copy(item.tensor, item.layer)),
        "gradients": _bytes(params),
        "optimizer state": int(n_state * sum(_state_bytes(s) for s in trainer.slots)),
        "accumulators": sum(s.acc_nbytes for s in trainer.slots),
        "saved activations": sum(item.stored for item in activations),
        "backward workspace": workspace,
    }
    ideal = _ideal_view(work, pol, n_state, activations, workspace)
    return MemoryEstimate(
        model=type(model).__name__, recipe=label or pol.name or pol.spec() or "fp32", batch=len(batch[1]),
        optimizer=optimizer, emulated=emulated, ideal=ideal,
        update_workspace=_update_workspace(trainer, stepped, isinstance(opt, DeltaOptimizer), n_state),
        forward=forward,
    )


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ideal_view(work: nn.Module, policy: Any, n_state: int, activations: list[_Saved],
                workspace: int) -> dict[str, int]:
    """Every component at its format's width (MemoryEstimate). A weight layer's parameters take its policy's
    formats (stored: the master format, else the weight's; an fp32 master beside a quantized weight, as MPT
    and WRPN keep; gradients at weight_grad; state at optimizer_state; the accumulator); other parameters and
    buffers stay float32. Saved floating tensors take the activation width of the layer that saved them (the
    base policy's outside layers), or their packed size where that is smaller (a ReLU's one bit a value);
    others their own size."""
    from ..nn import QuantizedModule

    layer_of = {id(p): m.policy for m in work.modules() if isinstance(m, QuantizedModule) and m.COUNTS_AS_LAYER
                for p in m.parameters(recurse=False)}
    ideal = dict.fromkeys(COMPONENTS, 0.0)
    for p in work.parameters():
        if not p.requires_grad:
            continue
        pol = layer_of.get(id(p))
        get = (lambda role: pol.get(role)) if pol is not None else (lambda role: None)  # noqa: E731
        n = p.numel()
        ideal["weights"] += n * _bits(get("master") or get("weight")) / 8
        ideal["master copy"] += 4 * n if get("master") is None and get("weight") is not None else 0
        ideal["gradients"] += n * _bits(get("weight_grad")) / 8
        ideal["optimizer state"] += n_state * n * _bits(get("optimizer_state")) / 8
        ideal["accumulators"] += n * _bits(get("accumulator")) / 8 if get("accumulator") is not None else 0
    ideal["weights"] += _bytes(work.buffers())
    base = _bits(policy.get("activation"))
    for item in activations:
        t, layer = item.tensor, item.layer
        if t.is_floating_point():
            width = t.numel() * (_bits(layer.policy.get("activation")) if layer else base) / 8
            ideal["saved activations"] += min(width, item.stored)
        else:
            ideal["saved activations"] += item.stored
    ideal["backward workspace"] = workspace * _bits(policy.get("activation_grad")) / 32
    return {k: int(round(v)) for k, v in ideal.items()}


def measure_step_memory(
    model: nn.Module,
    policy: Any,
    batch: Batch,
    *,
    optimizer: str = "sgd",
    warmup: int = 2,
    loss_fn: Callable[[nn.Module, Batch], Tensor] = cross_entropy_step_loss,
) -> PeakMemory:
    """The measured peak of one steady-state training step, the converted model, optimizer, Trainer and batch
    held (``profile_peak_memory``). Steady state: ``warmup`` steps that were applied (not skipped for an
    overflow: a dynamic loss scale starting high skips the first ones, and the optimizer state exists only
    after an applied step) come first; RuntimeError if 50 steps do not give them."""
    from ..policy import as_policy

    pol = as_policy(policy)
    work, opt, trainer = _step_setup(model, pol, optimizer)

    def step() -> Any:
        return trainer.step(loss_fn(work, batch))

    applied = sum(not step().skipped for _ in range(warmup))
    for _ in range(50):
        if applied >= warmup:
            return profile_peak_memory(step, held=(work, opt, trainer, batch))
        applied += not step().skipped
    raise RuntimeError(f"no steady state: fewer than {warmup} of 50 training steps were applied (all overflowed)")


def wrpn_footprint(width: float, weight_bits: int, act_bits: int) -> dict[str, float]:
    """Mishra et al.'s footprint model (spec 2d), relative to the float32 network at width 1: a network
    widened by ``width`` (beta) with ``weight_bits``-bit weights and ``act_bits``-bit activations, first and
    last layer kept in float32. 2x wide at 4/4 bits: inner weights 0.5x, activations 0.25x, MACs 4x."""
    return {
        "inner-layer weight memory": width**2 * weight_bits / 32,
        "first/last-layer weight memory": width,
        "activation memory": width * act_bits / 32,
        "MACs": width**2,
        "bit cost per MAC": weight_bits * act_bits / (32 * 32),
    }
