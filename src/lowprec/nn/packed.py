"""Packed saved tensors: what autograd keeps between forward and backward, stored in its format's width.

While a converted model runs forward, ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor any op
saves for backward (lowprec's own Functions, torch's convolutions, norms, activations, matmuls: no op needs to
know). A saved tensor that a role quantizer produced (marked by ``lowprec.formats.packing.mark``, unchanged
since) is stored packed in its format (``lowprec.formats.packing.pack``: fp16/bf16/fp8 casts, int8/int16 codes,
4- and 2-bit codes two or four a byte, block codes; a fixed-point or dfx rounding makes that form itself as it
rounds: ``lowprec.formats.packing.take_packed``); a saved boolean mask (WRPN's clipped-STE masks, dropout)
eight values a byte; the result a ReLU saves for its own backward, which only reads where it is not <= 0
(positive or NaN), as that one bit a value (a ReLU's output that another op saves is that op's saved tensor,
stored as above); and a quantized layer's unrounded output (a layer whose output role is not set, WRPN's
convolutions: what the batch-norm after it saves), as nothing at all: it is ``op(xq, wq, bq)`` of the rounded input and weight that
the layer itself saved packed, and backward computes it again from those, bit for bit where the op is
deterministic (always on the CPU; on a GPU only with ``torch.use_deterministic_algorithms(True)`` or
``torch.backends.cudnn.deterministic``, otherwise such an output is saved as it is; with the policy setting
``recompute=off`` it is always saved as it is: faster, more memory). Backward unpacks each one when it needs it,
bit for bit (integer codes have one zero: a -0 comes back +0, the same number); a value several ops saved (or a
recomputed output's argument) is unpacked once and shared until the last of them has read it. Everything else
is saved as torch saves it. The hooks run with torch-function modes off (their tensor ops are storage, not model
ops for a mode such as the op-level emulation to intercept).

Default on; off with the policy setting ``packed=off`` (e.g. ``"int8-lazy+packed=off"``) or the environment
variable ``LOWPREC_PACKED=0`` (read at every forward), for comparison. Packing is for first-order gradients:
the unpacked tensors carry no autograd history (``create_graph=True`` double backward is not supported while it
is on). A saved tensor changed in place after it was saved (``torch.sigmoid(h).mul_(2)``: sigmoid saved its
result) raises the RuntimeError torch raises without hooks when backward reads it, packed or not (a saved-tensor
hook alone would hide the change: torch checks versions only where no hook is set); one stored packed and no
longer alive when backward runs cannot be checked, and its packed copy holds the value it had when saved.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from ..formats.packing import MIN_NUMEL, Bits, Packed, RoundingPacks, marked_format, pack, pack_bool, take_packed
from .hooks import remove_forward_hooks

__all__ = ["PackedSavedTensors", "packing_enabled", "install_packing", "remove_packing", "is_packing", "pack_saved",
           "recomputable", "recomputes", "saving_packed", "saving_through_hooks", "MIN_NUMEL"]

_ENV = "LOWPREC_PACKED"


def packing_enabled() -> bool:
    """Whether the environment allows packing (``LOWPREC_PACKED`` unset or not 0)."""
    return os.environ.get(_ENV, "1") != "0"


@dataclass(frozen=True, eq=False)
class _Positive(Packed):
    """What ReLU's backward reads of its saved result: where it is not <= 0 (as 1.0, else 0.0), one bit a value.

    ``threshold_backward(grad, result, 0)`` gives 0 where result <= 0 and passes ``grad`` elsewhere (a NaN result
    included), so 1.0/0.0 in place of the result gives the same gradient, bit for bit. A ReLU's result is never
    negative: ``result != 0`` is that bit."""

    positive: Packed  # Bits, in the result's memory order (_in_memory_order)
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self.positive.shape

    def unpack(self) -> Tensor:
        p = self.positive  # Bits, or Bits in a permuted layout (_Permuted): 0/1 values straight from the bytes
        return p.unpack_as(self.dtype) if isinstance(p, Bits) else p.inner.unpack_as(self.dtype).permute(p.inverse)

    @property
    def nbytes(self) -> int:
        return self.positive.nbytes


def _relu_saving_its_result(t: Tensor) -> bool:
    """Whether this save of ``t`` is the ReLU that made it saving its own result (whose backward only reads
    where it is > 0), not a later op saving the ReLU's output: the ReLU's node is the last autograd node made
    (the next sequence number follows its own) and its saved result is the one being built now (no data, no
    hook yet). Telling the two apart by which save the hook sees first is wrong where the ReLU saved through
    other hooks (an activation checkpoint's, ``torch.autograd.graph.save_on_cpu``) or ran before the model's
    forward: the first save seen is then another op's (a checkpoint saving its input), which reads the values."""
    node = t.grad_fn
    if type(node).__name__ != "ReluBackward0" or not t.dtype.is_floating_point or torch.compiler.is_compiling():
        return False
    building = node._raw_saved_result  # type: ignore[union-attr]
    return (node._sequence_nr() + 1 == torch._C._autograd._get_sequence_nr()  # type: ignore[union-attr]
            and building.data is None and building.unpack_hook is None)


#: tensor -> (its version, its Packed form): a tensor saved by several ops (a recurrent layer's rounded weight,
#: saved at every time step) is packed once and shared, as torch shares the tensor itself.
_PACKED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


class _Shared:
    """How a Packed value saved by several ops (or an argument of a recomputed output too) is unpacked: once
    for all of them. The first unpacking keeps its tensor until the last of the ``uses`` reads it (autograd
    runs each saving op's backward once), then drops it: the unpacked tensor lives from the first backward that
    reads it to the last, as the one tensor torch itself would have shared, and each of the saving ops reads
    the same values."""

    __slots__ = ("uses", "left", "value")

    def __init__(self) -> None:
        self.uses, self.left, self.value = 1, 1, None

    def add_use(self) -> None:
        self.uses += 1
        self.left = self.uses

    def unpack(self, packed: Packed) -> Tensor:
        value = self.value if self.value is not None else packed.unpack()
        self.left -= 1
        if self.left > 0:
            self.value = value
        else:  # the last reader (a retained graph's next backward starts again)
            self.value, self.left = None, self.uses
        return value


#: Packed value -> its _Shared state, for a Packed value that more than one saved slot holds.
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _share(packed: Packed) -> None:
    """Record one more saved slot holding ``packed`` (its first is implicit)."""
    state = _SHARED.get(packed)
    if state is None:
        state = _SHARED[packed] = _Shared()
    state.add_use()


def _packed_once(t: Tensor, pack_fn: Any) -> Tensor | Packed:
    entry = _PACKED.get(t)
    if entry is not None and entry[0] == t._version:
        _share(entry[1])
        return entry[1]
    packed = pack_fn(t)
    if packed.nbytes >= t.numel() * t.element_size():
        return t
    _PACKED[t] = (t._version, packed)
    for slots, i in _WAITING.pop(t, ()):  # recorded ops that t is an argument of hold it packed from now on
        slots[i] = packed
    return packed


@dataclass(frozen=True, eq=False)
class _Recomputed(Packed):
    """A saved tensor held as the deterministic op that made it and that op's arguments in their saved form
    (Packed values shared with the op's own saved tensors, or small tensors): ``unpack()`` runs the op again."""

    fn: Callable[..., Tensor]
    args: tuple[Tensor | Packed | None, ...]
    shape: torch.Size
    dtype: torch.dtype
    #: (argument, its version when recorded) of the large arguments held as they are (alive, not packed)
    live: tuple[tuple[Tensor, int], ...] = ()

    def unpack(self) -> Tensor:
        for a, version in self.live:
            if a._version != version:
                raise RuntimeError(
                    f"a {tuple(a.shape)} argument of the op that made a saved {tuple(self.shape)} tensor was "
                    f"changed in place between forward and backward; packed storage computes that tensor again "
                    f"from its arguments and would get other values. Fix: change it after backward, or turn "
                    f"packing off (policy setting packed=off, or LOWPREC_PACKED=0).")
        return self.fn(*(None if a is None else _unpack_saved(a) for a in self.args))

    def __post_init__(self) -> None:
        for a in self.args:  # its packed arguments are read once more: by this recomputation
            if isinstance(a, Packed):
                _share(a)

    @property
    def nbytes(self) -> int:
        return 0  # the arguments are the op's own saved tensors, counted there


#: tensor -> (its version, the op that made it, its arguments): see ``recomputable``. An argument is held
#: weakly (a weakref.ref) until the hook packs it, then as its Packed form.
_RECOMPUTE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()

#: marked argument tensor -> the (argument list, index) slots of the recorded ops waiting for its Packed form.
_WAITING: WeakTensorKeyDictionary = WeakTensorKeyDictionary()

#: The open PackedSavedTensors contexts, innermost last: ``recomputable`` records nothing outside them, nor
#: inside one opened with recompute=False; ``saving_packed`` asks whether one of their hooks is innermost.
_open: list[PackedSavedTensors] = []


def recomputable(out: Tensor, fn: Callable[..., Tensor], *args: Tensor | None) -> None:
    """Record that ``out`` is ``fn(*args)``, a deterministic op whose tensor arguments the op that made ``out``
    saves for backward (a quantized layer's rounded input and weight). Saved by a later op (the batch-norm
    after a convolution), ``out`` is then stored as that recipe and the arguments' saved forms alone, and
    computed again when backward reads it. Recorded only while packing is on, with recomputation (the policy's
    ``recompute`` setting, default on); nothing keeps an argument alive."""
    if not _open or not _open[-1].recompute:
        return
    slots: list[Any] = [None if a is None else weakref.ref(a) for a in args]
    for i, a in enumerate(args):
        if a is not None and marked_format(a) is not None:  # only a marked tensor is packed (and then dies)
            _WAITING.setdefault(a, []).append((slots, i))
    _RECOMPUTE[out] = (out._version, fn, slots, [None if a is None else a._version for a in args])


def saving_packed() -> bool:
    """Whether what autograd saves now is stored packed (or recorded by a memory estimate standing in for the
    packing): a PackedSavedTensors context is open and its hooks are the innermost ones. Under other hooks
    opened inside it (a non-reentrant activation checkpoint's, in forward and when its backward recomputes the
    block, where no context is open) it is False both times."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and any(top[0] is context.pack_hook for context in _open)


def saving_through_hooks() -> bool:
    """Whether saved-tensor hooks take what autograd saves now: the packing's (``saving_packed``) or another's (a
    non-reentrant activation checkpoint's, in its forward and in its recomputation alike;
    ``torch.autograd.graph.save_on_cpu``). An op that saves differently under hooks (QOpFunction: its rounded
    operands, not its graph) thus saves the same tensors in a checkpointed forward and in the recomputation."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _reproducible(t: Tensor) -> bool:
    """Whether running an op again on ``t``'s device gives the same bits (see the module docstring)."""
    return t.device.type == "cpu" or torch.are_deterministic_algorithms_enabled() or (
        torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark)


def _recipe(t: Tensor) -> _Recomputed | None:
    """``t`` as the op that made it (``recomputable``), if it was recorded, is unchanged since, and each
    argument is stored packed or still alive (saved as it is)."""
    entry = _RECOMPUTE.pop(t, None)
    if entry is None or entry[0] != t._version or not _reproducible(t):
        return None
    args = [a() if isinstance(a, weakref.ref) else a for a in entry[2]]
    if any(a is None and slot is not None for a, slot in zip(args, entry[2])):
        return None  # an argument neither packed nor alive: not saved by the op that made t
    live = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor)]
    if any(a._version != entry[3][i] for i, a in live):
        return None  # an argument alive and changed in place since the op ran: t is saved as it is
    for i, a in live:  # a small one (a bias, which the op does not save) is copied: later changes do not reach it
        if a.numel() < MIN_NUMEL:
            args[i] = a.detach().clone()
    large = tuple((a, a._version) for a in args if isinstance(a, Tensor) and a.numel() >= MIN_NUMEL)
    return _Recomputed(entry[1], tuple(args), t.shape, t.dtype, large)


@dataclass(frozen=True, eq=False)
class _Permuted(Packed):
    """A saved tensor laid out as a permutation of a contiguous one (a transpose, channels_last), packed in its
    memory order: ``unpack()`` gives it back with its own strides (``inner``'s values, dimensions permuted by
    ``inverse``), so backward's kernels read the layout forward saved. Unpacked contiguous, a reduction over it
    (a batch-norm's weight gradient over a transposed input) could sum in another order: other bits."""

    inner: Packed
    inverse: tuple[int, ...]

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return torch.Size(self.inner.shape[i] for i in self.inverse)

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.inner.dtype

    def unpack(self) -> Tensor:
        return self.inner.unpack().permute(self.inverse)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


def _in_memory_order(t: Tensor, pack_fn: Callable[[Tensor], Packed]) -> Packed:
    """``pack_fn(t)``, for a non-contiguous ``t`` that is a permutation of a contiguous layout applied to that
    contiguous view (no copy) and wrapped in ``_Permuted``; any other layout (a strided slice, an expanded
    tensor) is packed as it is and comes back contiguous."""
    if t.is_contiguous():
        return pack_fn(t)
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    dense = t.permute(order)
    if not dense.is_contiguous():
        return pack_fn(t)
    return _Permuted(pack_fn(dense), tuple(order.index(d) for d in range(t.dim())))


def pack_saved(t: Tensor) -> Tensor | Packed:
    """What the hook stores for a saved tensor: a Packed value, or ``t`` itself (module docstring)."""
    if t.numel() < MIN_NUMEL or t.layout != torch.strided:
        return t
    if t.dtype == torch.bool:
        return _packed_once(t, lambda x: _in_memory_order(x, pack_bool))
    if _RECOMPUTE and t in _RECOMPUTE:
        again = _recipe(t)
        if again is not None:
            return _packed_once(t, lambda _: again)
    fmt = marked_format(t)
    if fmt is not None:
        made = take_packed(t)  # the rounding's own packed form: no pass of its own
        return _packed_once(t, lambda x: made if made is not None else _in_memory_order(
            x, lambda y: pack(y, fmt, verify=False)))
    if _relu_saving_its_result(t):  # t.bool() is t != 0 (NaN true, -0 false), a cast 9x faster than the compare
        return _Positive(_in_memory_order(t.bool(), pack_bool), t.dtype)
    return t


def _unpack_saved(p: Tensor | Packed) -> Tensor:
    if not isinstance(p, Packed):
        return p
    shared = _SHARED.get(p)
    return p.unpack() if shared is None else shared.unpack(p)


@dataclass(frozen=True, eq=False)
class _Saved:
    """What the hook keeps of one save: ``stored`` (``pack_saved``'s answer), the saved tensor (itself when
    stored as it is, else a weak reference: the packed form must not keep it alive; None: not checked) and its
    version then."""

    stored: Tensor | Packed
    tensor: Tensor | weakref.ref | None
    version: int


def _pack_checked(t: Tensor) -> _Saved:
    """``pack_saved(t)``, with what ``_unpack_checked`` needs to see whether ``t`` changed in place since (not
    while torch.compile traces the hook: a traced tensor's version is not the one backward will see). Both hooks
    run with torch-function modes and subclasses off: a hook runs inside whatever op saves, and its own tensor
    ops are storage, not model ops for a mode (lowprec's op-level emulation) to intercept."""
    with torch._C.DisableTorchFunction():
        stored = pack_saved(t)
    if torch.compiler.is_compiling():
        return _Saved(stored, None, 0)
    return _Saved(stored, t if stored is t else weakref.ref(t), t._version)


def _unpack_checked(saved: _Saved) -> Tensor:
    """The saved tensor's values; RuntimeError (torch's own check, which its hooks turn off) when the tensor was
    changed in place after it was saved."""
    t = saved.tensor() if isinstance(saved.tensor, weakref.ref) else saved.tensor
    if t is not None and t._version != saved.version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"a {tuple(t.shape)} {t.dtype} tensor saved for backward at version {saved.version} is now at version "
            f"{t._version} (lowprec's packed saved tensors check it as torch does). Fix: use the out-of-place op "
            f"(y = y * 2 in place of y.mul_(2), nn.ReLU(inplace=False)), or clone the tensor before changing it.")
    with torch._C.DisableTorchFunction():
        return _unpack_saved(saved.stored)


class PackedSavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: inside it, saved tensors on a format's grid are stored packed (module docstring)."""

    def __init__(self, pack_hook: Callable[[Tensor], Any] | None = None,
                 unpack_hook: Callable[[Any], Tensor] | None = None, *, recompute: bool = True) -> None:
        """Other hooks (a memory estimate that records each save) may stand in for ``pack_saved`` and its
        unpacking; ``recomputable`` records while such a context is open innermost, unless ``recompute`` is
        False (unrounded layer outputs then saved as they are)."""
        super().__init__(pack_hook or _pack_checked, unpack_hook or _unpack_checked)
        self.recompute = recompute
        #: with the default hooks, the roundings inside make their results' packed forms as they go
        self._roundings = RoundingPacks() if pack_hook is None else None

    def __enter__(self) -> None:
        super().__enter__()
        _open.append(self)
        if self._roundings is not None:
            self._roundings.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._roundings is not None:
            self._roundings.__exit__(*exc)
        _open.remove(self)
        super().__exit__(*exc)


class _ForwardHooks:
    """The forward pre-hook and hook pair that keeps PackedSavedTensors open during a model's forward."""

    def __init__(self, recompute: bool) -> None:
        self.recompute = recompute
        self.open: list[PackedSavedTensors | None] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        ctx = (PackedSavedTensors(recompute=self.recompute) if packing_enabled() and torch.is_grad_enabled()
               else None)
        if ctx is not None:
            ctx.__enter__()
        self.open.append(ctx)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        ctx = self.open.pop() if self.open else None
        if ctx is not None:
            ctx.__exit__(None, None, None)


def install_packing(model: nn.Module, recompute: bool = True) -> None:
    """Store what ``model``'s forward saves for backward packed (idempotent: replaces an earlier install);
    ``recompute`` False keeps unrounded layer outputs that a later op saves as they are (``recomputable``)."""
    remove_packing(model)
    hooks = _ForwardHooks(recompute)
    model.register_forward_pre_hook(hooks.enter)
    model.register_forward_hook(hooks.exit, always_call=True)


def is_packing(model: nn.Module) -> bool:
    """Whether ``install_packing`` hooks are on ``model``."""
    return any(_is_ours(h) for h in model._forward_pre_hooks.values())


def recomputes(model: nn.Module) -> bool:
    """Whether the ``install_packing`` hooks on ``model`` compute unrounded layer outputs again in backward
    (True where none are installed: the default)."""
    return all(h.__self__.recompute for h in model._forward_pre_hooks.values() if _is_ours(h))


def _is_ours(hook: Any) -> bool:
    return isinstance(getattr(hook, "__self__", None), _ForwardHooks)


def remove_packing(model: nn.Module) -> None:
    """Undo ``install_packing`` (nothing if it was not installed). The hooks are found by what they are, not by
    handle, so this works on a deep copy of the model too."""
    remove_forward_hooks(model, _is_ours)
