"""How the swapped layers (the fast path of ``convert``) and the op-level emulation share the work.

``swapped_op(cls)``: the op a converted layer class runs (its name in ``lowprec.policy.ops.OP_KINDS``), so
that ``op:`` overrides reach swapped layers as they reach intercepted ops. ``EMULATED_LAYERS``: torch weight
layers that are not swapped but whose forward the op-level emulation quantizes (they count for @first/@last).
``covered_by_ops(module)``: whether a module that is not swapped still gets its parameters quantized.
"""

from __future__ import annotations

from torch import nn

from ..policy import Role
from .layers import QBatchNorm1d, QBatchNorm2d, QConv1d, QConv2d, QEmbedding, QLinear, QuantizedModule
from .records import OperandRecord
from .recurrent import QGRU, QLSTM, QRNN, QGRUCell, QLSTMCell, QRNNCell

__all__ = ["swapped_op", "layer_op", "EMULATED_LAYERS", "covered_by_ops", "layer_operands"]

_SWAPPED_OPS: dict[type, str] = {
    QLinear: "linear", QConv1d: "conv1d", QConv2d: "conv2d", QBatchNorm1d: "batch_norm",
    QBatchNorm2d: "batch_norm", QEmbedding: "embedding", QLSTM: "lstm", QGRU: "gru", QLSTMCell: "lstm_cell",
    QGRUCell: "gru_cell", QRNN: "rnn", QRNNCell: "rnn_cell",
}

#: Weight layers the op-level emulation quantizes (not swapped), and the op each runs.
_EMULATED_OPS: dict[type[nn.Module], str] = {
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d", nn.Conv3d: "conv3d",
}
#: Weight layers the op-level emulation quantizes (not swapped); they count for @first/@last.
EMULATED_LAYERS: tuple[type[nn.Module], ...] = tuple(_EMULATED_OPS)

#: torch modules whose forward runs only ops the emulation quantizes (F.linear, F.conv*, F.layer_norm,
#: F.embedding_bag, F.prelu, ...).
_COVERED: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.PReLU, nn.LayerNorm,
    nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.MultiheadAttention,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

_OPERAND_NAMES = {
    "activation": "input", "weight": "weight", "bias": "bias", "output": "result", "output_grad": "d result",
    "activation_grad": "d input", "weight_grad": "d weight", "bias_grad": "d bias",
}


def swapped_op(cls: type) -> str | None:
    """The op a swapped layer class runs (None for a class that is not one)."""
    return next((_SWAPPED_OPS[c] for c in cls.__mro__ if c in _SWAPPED_OPS), None)


def layer_op(module: nn.Module, quantized: type | None) -> str | None:
    """The op a weight layer runs, by which ``op:`` overrides select it: its swapped class's (``quantized``, before
    or after the swap), or the op an emulated layer's forward calls; None for any other module."""
    if quantized is not None:
        return swapped_op(quantized)
    return next((op for cls, op in _EMULATED_OPS.items() if isinstance(module, cls)), None)


def covered_by_ops(module: nn.Module) -> bool:
    """Whether the op-level emulation quantizes what ``module`` (not swapped) does with its parameters: torch's
    linear, convolution, embedding, norm and attention modules; user modules are checked as their forward runs
    (a warning after the first forward names each parameter that reached no quantized op)."""
    return isinstance(module, _COVERED) or not type(module).__module__.startswith("torch.")


def layer_operands(module: QuantizedModule) -> tuple[str, list[OperandRecord]]:
    """A swapped layer's op and the role and format of each of its tensors, for the plan."""
    operands = [
        OperandRecord.of(_OPERAND_NAMES.get(role, role), role, q)
        for role, q in module.quantizers.items()
        if role in type(module).OP_ROLES and (not Role(role).bias or module._has_bias())
    ]
    return swapped_op(type(module)) or type(module).__name__, operands
