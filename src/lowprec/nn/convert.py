"""``convert(model, policy)``: swap a model's layers for quantized ones that follow the policy."""

from __future__ import annotations

import copy
import warnings

from torch import nn

from ..policy import Policy, as_policy
from .emulate import attach, detach, warn_zero_weights
from .native import is_native_layer, to_native
from .originals import mark_replaced
from .packed import install_packing, remove_packing
from .layers import QBatchNorm1d, QBatchNorm2d, QConv1d, QConv2d, QEmbedding, QLinear, QuantizedModule
from .recurrent import QGRU, QLSTM, QRNN, QGRUCell, QLSTMCell, QRNNCell
from .resolve import Resolution, check_override_roles, is_weight_layer, record_resolution
from .roles import clips_negatives
from .swapped import covered_by_ops, swapped_op
from .widen import fill_clip_range, zero_weight_shares

__all__ = ["convert", "conversion_policy", "policy_label", "CONVERSIONS"]

#: Where ``convert`` records the policy on the module it returns.
_POLICY_ATTR = "_lowprec_policy"

#: The torch layers ``convert`` swaps (exact types: a subclass may override forward) and their replacements.
CONVERSIONS: dict[type[nn.Module], type[QuantizedModule]] = {
    nn.Linear: QLinear,
    nn.Conv1d: QConv1d,
    nn.Conv2d: QConv2d,
    nn.LSTM: QLSTM,
    nn.GRU: QGRU,
    nn.LSTMCell: QLSTMCell,
    nn.GRUCell: QGRUCell,
    nn.RNN: QRNN,
    nn.RNNCell: QRNNCell,
    nn.BatchNorm1d: QBatchNorm1d,
    nn.BatchNorm2d: QBatchNorm2d,
    nn.Embedding: QEmbedding,
}


def _quantized_class(module: nn.Module) -> type[QuantizedModule] | None:
    if isinstance(module, QuantizedModule):  # a layer built as one (QLinear(...)): configured under the policy
        return type(module)
    return CONVERSIONS.get(type(module))


def policy_label(policy: Policy) -> str:
    """A policy as messages name it: its preset name (``mixed-fp16``), else its spec (``fp32`` when empty)."""
    return policy.name or policy.spec() or "fp32"


def _recorded_policies(model: nn.Module) -> list[Policy]:
    """The policies ``convert`` recorded on ``model`` and its submodules, in module order."""
    return [getattr(m, _POLICY_ATTR) for m in model.modules() if hasattr(m, _POLICY_ATTR)]


def conversion_policy(model: nn.Module) -> Policy | None:
    """The policy ``convert`` gave ``model`` (or the parts of it it converted); None where it never converted
    any. ValueError when parts were converted under different policies."""
    found = set(_recorded_policies(model))
    if len(found) > 1:
        shown = ", ".join(sorted(policy_label(p) for p in found))
        raise ValueError(f"parts of this model were converted under different policies ({shown}); pass the policy "
                         "explicitly")
    return next(iter(found), None)


def _check_not_converted(model: nn.Module, policy: Policy) -> None:
    """ValueError for a model ``convert`` already converted: a second conversion would compose two policies'
    roundings (or keep one dtype under another policy's name)."""
    done = _recorded_policies(model)
    native = any(is_native_layer(m) for m in model.modules())
    if done or native:
        before = policy_label(done[0]) if done else "a native policy"
        raise ValueError(
            f"lowprec.convert: this model is already converted (under {before}); converting it again under "
            f"{policy_label(policy)} would round its tensors under both policies. Convert the original model "
            "instead: convert() returns a converted copy and leaves its argument as it was (unless inplace=True)."
        )


def convert(model: nn.Module, policy: Policy | str, *, inplace: bool = False) -> nn.Module:
    """A model whose layers quantize every tensor role per ``policy``, in forward and backward.

    ``policy``: a Policy, a preset name (``"int8"``) or a policy string (``"weight=int8,grads=int16"``).
    Every layer in CONVERSIONS becomes its quantized version (same parameters, buffers and hooks) with
    ``layer.policy = policy.for_module(name, first=..., last=...)``, where @first/@last are the first and
    last weight layers (Linear, Conv, LSTM, GRU, cells, Embedding; not batch-norm) in ``named_modules()``
    order (ConvTranspose and Conv3d count too), and Park's classifier rule applied to the last one
    (``resolve.module_policy``). When the policy quantizes anything, the model also gets op-level emulation
    (``lowprec.nn.emulate``): every other GEMM-like op and norm its forward runs (functional F.linear,
    matmul / ``@``, attention, LayerNorm, ConvTranspose, MultiheadAttention's in-projection, ...) is quantized
    per the same resolved policy, with ``op:<kind>`` overrides. torch modules with parameters that neither path
    covers (InstanceNorm, ...) run unquantized: one UserWarning names them all; after the
    first forward, a warning names every parameter that reached no quantized op. The policy is recorded on
    the result (``conversion_policy``): ``lowprec.Trainer`` takes it by default and refuses another.

    ``inplace=False`` (default): returns a deep copy and leaves ``model`` as it was; an optimizer built over
    ``model``'s parameters before the conversion would train nothing, and its first step raises RuntimeError
    (``originals.py``). ``inplace=True``: converts ``model`` itself and returns it; its parameters stay the same
    objects (native: cast to fp16/bf16 in place), so optimizers built over them stay valid.

    With the policy's ``packed`` setting on (the default), what the model's forward saves for backward is
    stored packed in its format (``lowprec.nn.packed``).

    A policy with ``path=native`` (fp16/bf16 only) gives the native model of ``lowprec.nn.native`` instead:
    parameters and activations really stored in that dtype, reductions in float32.

    Raises NotImplementedError (before changing anything) for a layer configuration the quantized layers do
    not support (an LSTM with proj_size, a sparse Embedding) when its policy quantizes it, ValueError for an
    override that gives a format to a role no module it matches has (``resolve.check_override_roles``), and
    ValueError for a model ``convert`` already converted (a second conversion would compose two policies).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    policy = as_policy(policy)
    _check_not_converted(model, policy)
    original, model = model, (model if inplace else copy.deepcopy(model))
    if policy.path == "native":
        to_native(model, policy, inplace=True)
    else:
        _convert_emulated(model, policy)
    setattr(model, _POLICY_ATTR, policy)
    if not inplace:
        mark_replaced(original)
    return model


def _convert_emulated(model: nn.Module, policy: Policy) -> None:
    """Swap the layers of ``model`` in place and attach the op-level emulation (``convert``)."""
    plan, unknown, layers = [], [], []
    for name, module in model.named_modules():  # one walk: the layers to swap, their kinds, @first/@last
        cls = _quantized_class(module)
        if cls is not None:
            plan.append((name, module, cls))
        elif next(module.parameters(recurse=False), None) is not None and not covered_by_ops(module):
            unknown.append(f"{name or '(root)'} ({type(module).__name__})")
        if is_weight_layer(module, cls):
            layers.append((name, module, cls))
    resolution = Resolution.of_layers(policy, layers)
    check_override_roles(policy, model, plan, resolution.first, resolution.last)
    resolved = [(module, cls, resolution.module_policy(name, module, op=swapped_op(cls))) for name, module, cls in plan]
    for module, cls, module_pol in resolved:
        cls.check_supported(module, module_pol)
    for (name, _, _), (module, cls, module_pol) in zip(plan, resolved):
        cls.adopt(module, module_pol)
        module.layer_name = name
    record_resolution(model, resolution)
    if policy.quantizes_anything:
        attach(model, resolution)
    else:
        detach(model)
    if unknown:
        warnings.warn(
            "lowprec.convert: these modules have parameters but no quantized version; they run unquantized, "
            f"in their own precision: {', '.join(unknown)}",
            UserWarning,
            stacklevel=3,
        )
    _warn_float_accumulation(resolved)
    _wrpn_checks(model, policy, plan)
    if policy.packed and policy.quantizes_anything:
        install_packing(model, recompute=policy.recompute)
    else:
        remove_packing(model)


def _wrpn_checks(model: nn.Module, policy: Policy, plan: list[tuple[str, nn.Module, type[QuantizedModule]]]) -> None:
    """WRPN's clip formats: fill the weights' clip range when the policy says so, else warn about layers whose
    weights mostly round to 0; warn about recurrent layers whose unsigned activation clip meets signed values."""
    if policy.fill_clip_range:
        fill_clip_range(model)
    else:
        warn_zero_weights(
            zero_weight_shares(model), "lowprec.convert", "layers' weights",
            "lowprec.nn.fill_clip_range(model) after convert (scales each layer's weights to reach +-1: a change of "
            "initialisation, for training from scratch), or fill_clip_range=on in the policy (e.g. "
            "'wrpn-4-4+fill_clip_range=on', the wrpn presets' default)", stacklevel=3)
    signed = [name for name, module, cls in plan
              if cls.SIGNED_INPUTS and clips_negatives(module.quantizers["activation"])]
    if signed:
        warnings.warn(
            "lowprec.convert: WRPN's unsigned activation clip [0, 1] replaces a ReLU, but in these recurrent layers "
            "the activation role also rounds the hidden state h, a tanh output in (-1, 1), whose negative half "
            f"becomes 0: {', '.join(signed)}. Fix: a signed format for them (an override "
            f"'{signed[0]}: activation=uniform<k>') or none ('{signed[0]}: activation=none')",
            UserWarning,
            stacklevel=3,
        )


def _warn_float_accumulation(resolved: list[tuple[nn.Module, type[QuantizedModule], Policy]]) -> None:
    """One warning when convolutions are asked for accumulation emulation (implemented for linear layers)."""
    skipped = sorted({cls.__name__ for _, cls, p in resolved
                      if p.get("accumulation") is not None and issubclass(cls, (QConv1d, QConv2d))})
    if skipped:
        warnings.warn(
            f"lowprec.convert: accumulation emulation covers linear and recurrent layers; {', '.join(skipped)} "
            "layers accumulate in float32",
            UserWarning,
            stacklevel=4,
        )
