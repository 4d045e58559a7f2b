"""The native path: a model that really stores (and, where the hardware can, computes) in fp16 or bf16.

``convert(model, policy)`` comes here when ``policy.path == "native"`` (presets ``native-bf16``,
``native-fp16``). Instead of float32 containers rounded at every role boundary (the emulated path), the
tensors *are* the format: half the bytes, and the device's own fp16/bf16 kernels. What the model becomes:

* Storage dtype S: the policy's format (bf16 or fp16). Every parameter and floating buffer of a weight layer
  (and of any other module with parameters) is cast to S, round to nearest even (torch's cast). The model's
  floating inputs are cast to S at its entrance, so activations and activation gradients live in S.
* Compute dtype C: S where the device multiplies S natively (bf16: CUDA, and CPUs with AVX512-BF16 or AMX, as
  oneDNN reports; fp16: CUDA, and CPUs with AVX512-FP16/AMX-FP16). Otherwise C = float32 and one warning:
  each weight layer then casts its input and parameters to float32, computes, and rounds its output to S,
  under activation checkpointing so that only the S tensors are kept for backward (fp16 storage, fp32
  compute: the memory saving, at the price of computing each layer's forward twice). Products are accumulated
  in float32 either way (oneDNN, cuBLAS), as in MPT.
* Reductions in float32 (MPT §3.3): batch-norm, layer-norm, group-norm and instance-norm modules keep float32
  parameters, running statistics and affine terms and run torch's mixed-dtype kernels on their S input: the
  mean and variance are accumulated in float32 and the output is rounded to S once (the input saved for
  backward stays in S). Softmax/LogSoftmax modules compute on the float32 value of their input and round
  their result to S. (torch.autocast on CPU runs all of these in bf16.) The model's floating outputs are
  returned in float32, so the softmax and the loss the caller computes from them are float32.
* Attention runs in S: ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``/``DecoderLayer``)
  becomes a native layer whose bf16/fp16 projections feed torch's fused scaled-dot-product attention, and a
  model's own ``F.scaled_dot_product_attention`` or ``q @ k.transpose(-2, -1)`` runs on its S operands. The
  fused CPU and CUDA attention kernels keep the softmax's running max and sum in float32 and round P once;
  a hand-written softmax runs in float32 only where the model asks for it (``F.softmax(scores.float())``, as
  lowprec's GPT does): functional calls are not intercepted on this path.
* Weight tying is kept: parameters are cast in place (``p.data``), so a parameter shared by two modules (a
  GPT's token embedding and LM head) stays ONE Parameter, stored once in S, with one float32 master copy in
  the Trainer (``named_parameters()`` lists it once); its gradient sums both uses in S.
* Master weights: ``lowprec.Trainer`` keeps a float32 master copy of every S parameter, lets the optimizer
  update the masters and rounds them back into the parameters after each step (``train.update``); gradients
  are copied to float32 before they are unscaled, clipped or applied.
* Pickling: a native model pickles whole (``torch.save(model)``, ``copy.deepcopy``; load it with
  ``torch.load(..., weights_only=False)`` as any whole pickled model). Its layer classes (``NativeLinear``,
  ...) are built at run time and rebuilt on load; its entrance and exit casts are module-level hooks.

Limits (ValueError naming the cause): the eight layer roles must all be the same fp16 or bf16 format with
nearest rounding (autograd keeps one dtype through a layer); no master, accumulator or accumulation role and
no per-module overrides (use the emulated path for those); fp8 has no native path yet. Reductions that a
module's own forward calls as functions (``F.softmax`` inside a custom forward) are not seen: they run in S.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..policy import LAYER_ROLES, ROLES, Policy, Role
from .hooks import remove_forward_hooks

__all__ = ["to_native", "from_native", "is_native_layer", "native_dtype", "compute_dtype", "NORM_MODULES",
           "FLOAT32_MODULES"]

_DTYPES = (torch.bfloat16, torch.float16)  # the dtypes a native policy may run in

#: Normalization layers: float32 parameters and statistics, torch's mixed-dtype kernels on S inputs.
NORM_MODULES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
#: Modules computed on the float32 value of their input.
FLOAT32_MODULES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax)


def native_dtype(policy: Policy) -> torch.dtype:
    """The torch dtype a native policy stores tensors in; ValueError when the policy has no native form."""
    quants = {policy.get(role) for role in LAYER_ROLES}
    fmt = next(iter(quants)).format if len(quants) == 1 and None not in quants else None
    if fmt is None or not fmt.floating:
        shown = ", ".join(f"{r}={policy.get(r) or 'fp32'}" for r in LAYER_ROLES)
        raise ValueError(
            f"path=native needs one fp16 or bf16 format for all eight layer roles, got {shown}. Set them "
            "together (params=bf16,activations=bf16,grads=bf16) or use path=emulated."
        )
    if fmt.torch_dtype not in _DTYPES:
        hint = " (fp8 has no native path yet: use the emulated fp8 presets)" if fmt.bits == 8 else ""
        raise ValueError(f"path=native supports fp16 and bf16, not {fmt!r}{hint}; use path=emulated")
    rounding = next(iter(quants)).rounding
    if rounding != "nearest":
        raise ValueError(f"path=native rounds like torch's casts (nearest); {rounding} rounding needs path=emulated")
    for role in (r for r in ROLES if not Role(r).layer and r != Role.OPTIMIZER_STATE):  # the optimizer keeps its own
        if policy.get(role) is not None:
            raise ValueError(
                f"path=native keeps float32 master weights and accumulates in float32; {role}={policy.get(role)} "
                "needs path=emulated"
            )
    if policy.overrides:
        raise ValueError(
            f"path=native applies one dtype to the whole model; per-module overrides "
            f"({', '.join(p for p, _ in policy.overrides)}) need path=emulated"
        )
    return fmt.torch_dtype


@functools.cache
def _native_on(dtype: torch.dtype, device_type: str) -> bool:
    if device_type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
        probe = getattr(torch.ops.mkldnn, check, None)
        return bool(probe is not None and probe())
    return False


def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """``dtype`` where ``device`` multiplies it natively, else float32."""
    return dtype if _native_on(dtype, torch.device(device).type) else torch.float32


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) cast to ``dtype``; everything else as it is.
    Containers keep their type: a namedtuple stays one, a dict subclass (OrderedDict, a Hugging Face
    ``ModelOutput``, whose fields are also attributes) is a copy with its entries replaced."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        items = [_cast(v, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        items = {k: _cast(v, dtype) for k, v in value.items()}
        if type(value) is dict:
            return items
        out = copy.copy(value)
        for k, v in items.items():
            out[k] = v
        return out
    return value


def _native_instance(mixin: type, cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``cls`` with ``mixin`` in front: how a pickled native module is rebuilt."""
    native = _with_mixin(mixin, cls)
    return native.__new__(native)


class _NativeMixin:
    """Base of the mixins below. The classes ``to_native`` builds (``NativeLinear``, ...) exist only at run
    time, so a native module pickles (``torch.save`` of a whole model, ``copy.deepcopy``) as "the mixin over
    the torch class, with this state", which ``_native_instance`` rebuilds on load."""

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        mixin, cls = type(self).__bases__
        state = super().__reduce_ex__(max(int(protocol), 2))[2:]  # type: ignore[misc]  # (state, items, ...)
        return (_native_instance, (mixin, cls), *state)


class _Float32Compute(_NativeMixin):
    """Mixin: compute in float32 on the upcast input, return the result in the input's dtype."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return super().forward(x.float(), *args, **kwargs).to(x.dtype)  # type: ignore[misc]


class _NativeLayer(_NativeMixin):
    """Mixin of a layer whose parameters are stored in S: the torch layer's own forward where the device
    multiplies S natively; otherwise float32 compute on float32 copies of the inputs and parameters, rounded to
    S, with the copies recomputed in backward (checkpointing) instead of being kept. Decided per call by the
    device the parameters are on, so a model may be converted first and moved to a GPU later."""

    _lowprec_storage: torch.dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device = next(p for p in self._parameters.values() if p is not None).device.type  # type: ignore[attr-defined]
        if _native_on(self._lowprec_storage, device):
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        _warn_storage_only(self._lowprec_storage, device)
        return checkpoint(self._compute_in_float32, *args, use_reentrant=False, **kwargs)

    def _compute_in_float32(self, *args: Any, **kwargs: Any) -> Any:
        params = {f"layer.{name}": p.float() for name, p in self.named_parameters()}  # type: ignore[attr-defined]
        out = functional_call(_Plain(self), params, _cast(args, torch.float32), _cast(kwargs, torch.float32))
        return _cast(out, self._lowprec_storage)


def is_native_layer(module: nn.Module) -> bool:
    """Whether ``to_native`` made ``module`` a layer stored in fp16/bf16."""
    return isinstance(module, _NativeLayer)


@functools.cache
def _warn_storage_only(dtype: torch.dtype, device_type: str) -> None:
    warnings.warn(
        f"lowprec: {device_type} has no native {dtype} matmul; storing in {dtype} and computing in float32 "
        "(memory saved, no speed-up)", UserWarning, stacklevel=4,
    )


class _Plain(nn.Module):
    """A view of a _NativeLayer that runs the torch layer's own forward (for functional_call)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base = next(c for c in type(self.layer).__mro__[1:] if c is not _NativeLayer and issubclass(c, nn.Module))
        return base.forward(self.layer, *args, **kwargs)


@functools.cache
def _with_mixin(mixin: type, cls: type[nn.Module]) -> type[nn.Module]:
    return type(f"Native{cls.__name__}", (mixin, cls), {"__module__": __name__})


def to_native(model: nn.Module, policy: Policy, *, inplace: bool = False) -> nn.Module:
    """The model on the native path of ``policy`` (module docstring). A deep copy unless ``inplace``."""
    storage = native_dtype(policy)
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, NORM_MODULES):
            module.float()
            continue
        if isinstance(module, FLOAT32_MODULES):
            module.__class__ = _with_mixin(_Float32Compute, type(module))
            continue
        for p in module._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.detach().to(storage)  # the same Parameter object: ties, hooks, optimizers stay valid
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(storage)
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
        if any(p is not None for p in module._parameters.values()):
            module.__class__ = _with_mixin(_NativeLayer, type(module))
            module._lowprec_storage = storage
    # module-level functions (not lambdas), so that the model pickles
    model.register_forward_pre_hook(functools.partial(_cast_inputs, storage), with_kwargs=True)
    model.register_forward_hook(_float32_outputs)
    return model


def _cast_inputs(storage: torch.dtype, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """The native model's entrance: floating inputs cast to the storage dtype."""
    return _cast(args, storage), _cast(kwargs, storage)


def _float32_outputs(module: nn.Module, args: Any, out: Any) -> Any:
    """The native model's exit: floating outputs returned in float32."""
    return _cast(out, torch.float32)


def _is_entrance_or_exit(hook: Any) -> bool:
    return hook is _float32_outputs or (isinstance(hook, functools.partial) and hook.func is _cast_inputs)


def from_native(model: nn.Module) -> nn.Module:
    """Undo ``to_native`` in place: every module back to its torch class, floating parameters and buffers in
    float32 (the fp16/bf16 values exactly: the stored weights, as the native model rounded them), the entrance
    and exit casts removed. Returns the model."""
    for module in model.modules():
        cls = type(module)
        if cls.__module__ == __name__ and issubclass(cls, (_NativeLayer, _Float32Compute)):
            module.__class__ = cls.__bases__[1]
            module.__dict__.pop("_lowprec_storage", None)
        for p in module._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.detach().float()
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.float()
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
    remove_forward_hooks(model, _is_entrance_or_exit)
    return model

