"""``convert(model, policy)``: swap a model's layers for quantized ones that follow the policy."""

from __future__ import annotations

import copy
import warnings

from torch import nn

from ..policy import Policy, as_policy
from .emulate import attach, detach
from .native import to_native
from .layers import QBatchNorm1d, QBatchNorm2d, QConv1d, QConv2d, QEmbedding, QLinear, QuantizedModule
from .recurrent import QGRU, QLSTM, QGRUCell, QLSTMCell
from .resolve import check_override_roles, module_policy
from .swapped import EMULATED_LAYERS, covered_by_ops, swapped_op

__all__ = ["convert", "CONVERSIONS"]

#: The torch layers ``convert`` swaps (exact types: a subclass may override forward) and their replacements.
CONVERSIONS: dict[type[nn.Module], type[QuantizedModule]] = {
    nn.Linear: QLinear,
    nn.Conv1d: QConv1d,
    nn.Conv2d: QConv2d,
    nn.LSTM: QLSTM,
    nn.GRU: QGRU,
    nn.LSTMCell: QLSTMCell,
    nn.GRUCell: QGRUCell,
    nn.BatchNorm1d: QBatchNorm1d,
    nn.BatchNorm2d: QBatchNorm2d,
    nn.Embedding: QEmbedding,
}


def _quantized_class(module: nn.Module) -> type[QuantizedModule] | None:
    if isinstance(module, QuantizedModule):  # converting again: re-configure under the new policy
        return type(module)
    return CONVERSIONS.get(type(module))


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
    covers (InstanceNorm, PReLU, EmbeddingBag, ...) run unquantized: one UserWarning names them all; after the
    first forward, a warning names every parameter that reached no quantized op. Returns a deep copy unless
    ``inplace=True`` (then the model itself, its layers changed in place: optimizers built on its
    parameters stay valid).

    A policy with ``path=native`` (fp16/bf16 only) gives the native model of ``lowprec.nn.native`` instead:
    parameters and activations really stored in that dtype, reductions in float32.

    Raises NotImplementedError (before changing anything) for a layer configuration the quantized layers do
    not support (a bidirectional LSTM, a sparse Embedding) when its policy quantizes it, and ValueError for an
    override that gives a format to a role no module it matches has (``resolve.check_override_roles``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    policy = as_policy(policy)
    if policy.path == "native":
        return to_native(model, policy, inplace=inplace)
    if not inplace:
        model = copy.deepcopy(model)
    plan, unknown, emulated_layers = [], [], set()
    for name, module in model.named_modules():
        cls = _quantized_class(module)
        if cls is not None:
            plan.append((name, module, cls))
        elif next(module.parameters(recurse=False), None) is not None and not covered_by_ops(module):
            unknown.append(f"{name or '(root)'} ({type(module).__name__})")
        if cls is None and isinstance(module, EMULATED_LAYERS):
            emulated_layers.add(name)
    swapped_layers = {name for name, _, cls in plan if cls.COUNTS_AS_LAYER}
    layers = [name for name, _ in model.named_modules() if name in swapped_layers or name in emulated_layers]
    first, last = (layers[0], layers[-1]) if layers else (None, None)
    check_override_roles(policy, model, plan, first, last)
    resolved = []
    for name, module, cls in plan:
        if cls.COUNTS_AS_LAYER:
            module_pol = module_policy(policy, name, module, first=name == first, last=name == last,
                                       op=swapped_op(cls))
        else:
            module_pol = policy.for_module(name, op=swapped_op(cls))
        resolved.append((module, cls, module_pol))
    for module, cls, module_pol in resolved:
        cls.check_supported(module, module_pol)
    for module, cls, module_pol in resolved:
        cls.adopt(module, module_pol)
    if policy.quantizes_anything:
        attach(model, policy, first, last)
    else:
        detach(model)
    if unknown:
        warnings.warn(
            "lowprec.convert: these modules have parameters but no quantized version; they run unquantized, "
            f"in their own precision: {', '.join(unknown)}",
            UserWarning,
            stacklevel=2,
        )
    _warn_float_accumulation(resolved)
    return model


def _warn_float_accumulation(resolved: list[tuple[nn.Module, type[QuantizedModule], Policy]]) -> None:
    """One warning when convolutions are asked for accumulation emulation (implemented for linear layers)."""
    skipped = sorted({cls.__name__ for _, cls, p in resolved
                      if p.get("accumulation") is not None and issubclass(cls, (QConv1d, QConv2d))})
    if skipped:
        warnings.warn(
            f"lowprec.convert: accumulation emulation covers linear and recurrent layers; {', '.join(skipped)} "
            "layers accumulate in float32",
            UserWarning,
            stacklevel=3,
        )
