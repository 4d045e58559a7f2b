"""``unconvert(model)``: a converted model back as the plain torch model, its weights as the layers use them.

The export of a converted model: every quantized layer becomes its torch layer again (``QLinear`` ->
``nn.Linear``, native ``NativeLinear`` -> ``nn.Linear``, ...), same parameter names, shapes and buffers, and
every parameter a layer rounds before using it (its weight and bias roles) holds that rounded value. So the
plain model computes what the converted model computes with its weights but everything else in float32:
bit for bit the converted model under a policy that keeps only its weight and bias roles (the activations,
outputs and gradients then run in float32). Its state_dict loads into a freshly built plain model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .convert import _POLICY_ATTR, CONVERSIONS
from .emulate import detach, emulation_of
from .layers import QuantizedModule
from .native import from_native
from .packed import remove_packing
from .resolve import record_resolution

__all__ = ["unconvert"]


def _torch_class(cls: type) -> type[nn.Module]:
    """The torch layer a quantized class extends (its first base in CONVERSIONS)."""
    return next(base for base in cls.__mro__ if base in CONVERSIONS)


@torch.no_grad()
def unconvert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The plain torch model of a converted one (module docstring); a deep copy unless ``inplace=True``.

    Each weight and bias a layer rounds is replaced by ``quantizer.round(value)`` of its role (the layer's
    current dynamic-fixed-point exponent, without adding to its statistics; stochastic rounding takes one
    draw); so is each parameter a functional op rounds in its weight or bias role (LayerNorm's affine pair,
    MultiheadAttention's projections, a Conv1D's ``addmm`` operands, a parameter used elementwise: the op-level
    emulation records them at a forward, ``OpEmulation.round_parameters``). A model with such parameters whose
    converted form has not run a forward yet is refused (RuntimeError: run one forward first). A model that was
    never converted comes back unchanged. The stored (master) values are lost in the export: keep the converted
    model, or its checkpoint, to go on training it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unconvert takes an nn.Module, got {type(model).__name__}")
    emulation = emulation_of(model)
    if (emulation is not None and emulation.rounded_parameters is None
            and any(not isinstance(m, QuantizedModule) and any(True for _ in m.parameters(recurse=False))
                    for m in model.modules())):
        emulation.round_parameters(model)  # raises: no forward has shown which parameters functional ops round
    if not inplace:
        model = copy.deepcopy(model)
        emulation = emulation_of(model)
    if emulation is not None and emulation.rounded_parameters is not None:
        emulation.round_parameters(model)
    detach(model)  # the op-level emulation's hooks
    record_resolution(model, None)
    for module in list(model.modules()):
        module.__dict__.pop(_POLICY_ATTR, None)  # no longer converted: it may be converted again
        if not isinstance(module, QuantizedModule):
            continue
        for name, role in module.parameter_roles().items():
            param = getattr(module, name)
            param.copy_(module.quantizers[role].round(param))
        module.__class__ = _torch_class(type(module))
        for attr in ("policy", "quantizers", "accumulator", "layer_name", "_unchecked_clip"):
            module.__dict__.pop(attr, None)
    remove_packing(model)
    return from_native(model)
