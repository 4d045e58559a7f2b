"""The torch functions the op-level emulation intercepts, and the role of each of their operands.

``bind(func, args, kwargs)`` turns one call of an intercepted function into an :class:`Invocation`: the op's
name (``lowprec.policy.ops.OP_KINDS``), its tensor operands with their names and forward roles, and ``fn``,
which recomputes the call on substituted operands. Roles:

==========================================  =================================================================
linear, conv1/2/3d, conv_transpose1/2/3d    input: activation, weight: weight, bias: bias
matmul, @, mm, bmm, mv, dot, inner, outer,   each operand: weight if it is a Parameter (or a view of one),
tensordot, vecdot, einsum / multi_dot        else activation (a product of two activations: both activation)
(two operands)
addmm, baddbmm, addbmm, addmv, addr          the added term: bias if a Parameter, else activation; the two
                                             factors as matmul
bilinear                                     input1, input2: activation, weight: weight, bias: bias
embedding, embedding_bag                     the table: weight (indices and offsets are not quantized);
                                             per_sample_weights: activation
layer_norm, group_norm, rms_norm, batch_norm input: activation, weight: weight, bias: bias; running
                                             statistics and the normalisation itself stay float32
attention (scaled_dot_product_attention)     Q, K, V and P = softmax(S): activation (see nn.attention)
mul, div, add, sub, addcmul, prelu           a Parameter operand only (``PARAMETER_OPS``): weight for a factor,
(elementwise, with a Parameter operand)      divisor or PReLU's slope, bias for a term; the other operands pass
                                             as they are
==========================================  =================================================================

Every op's result takes the output role; gradients the matching gradient roles (``opfunction.GRAD_ROLE``).

Block formats (MX, NVFP4) and rowwise scaling run along each operand's reduction dimension (``Invocation.axes``),
as a GEMM reads its operands: the first factor of matmul, mm, bmm, mv, addmm, baddbmm, addbmm and addmv along
its last dimension, the second along its dim -2 (a weight stored (in, out), K^T's head dimension, V's keys);
a two-operand einsum along the one index it contracts (several contracted indices: the last dimension),
tensordot and vecdot along the one dimension they contract; a convolution along channels, as the converted
layers: the input's and the result's (dim 1, dim 0 unbatched: ``Invocation.result_axis``) and the weight's
input channels (dim 1; dim 0 of a transposed convolution's weight). The others (linear, dot, inner, outer,
addr, bilinear, embeddings, norms; a tensordot contracting several dimensions) keep the format's own axis, the
last dimension. A gradient is blocked as the tensor it is the gradient of.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Invocation", "bind", "OPS", "FACTOR_AXES", "OPENED", "PARAMETER_OPS", "STATEFUL_OPS", "is_parameter"]

#: Ops whose call changes state besides computing its result (batch_norm updates its running statistics in
#: training): never run a second time to recompute the result in backward.
STATEFUL_OPS = frozenset({"batch_norm"})


def is_parameter(x: Any) -> bool:
    """Whether ``x`` is an nn.Parameter or a view of one (a chunk of MultiheadAttention's in_proj_weight)."""
    return isinstance(x, nn.Parameter) or isinstance(getattr(x, "_base", None), nn.Parameter)


@dataclass(frozen=True, eq=False)
class Invocation:
    """One call of an intercepted function: ``fn(*tensors)`` recomputes it (all other arguments fixed)."""

    op: str
    names: tuple[str, ...]
    tensors: tuple[Any, ...]
    roles: tuple[str | None, ...]
    fn: Callable[..., Tensor]
    options: dict[str, Any] = field(default_factory=dict)  # attention: attn_mask, dropout_p, is_causal, ...
    unsupported: str | None = None  # why the call cannot be quantized (it then runs as torch runs it)
    axes: tuple[int | None, ...] = ()  # per operand: the dimension its blocks run along (None, or none given:
    # the format's own), its reduction dimension (module docstring)
    result_axis: int | None = None  # the same for the result (None: the format's own)


# role kinds of an operand slot: a fixed role, or "auto"/"auto_bias" decided by whether it is a Parameter
_AUTO = {"auto": "weight", "auto_bias": "bias"}
# role kinds of an elementwise operand: the role if it is a Parameter, else none (the operand passes as it is)
_PARAMETER_ONLY = {"factor": "weight", "term": "bias"}


def _role(kind: str | None, x: Any) -> str | None:
    if kind is None or not isinstance(x, Tensor) or not x.is_floating_point():
        return None
    if kind in _AUTO:
        return _AUTO[kind] if is_parameter(x) else "activation"
    if kind in _PARAMETER_ONLY:
        return _PARAMETER_ONLY[kind] if is_parameter(x) else None
    return kind


@dataclass(frozen=True)
class _Slots:
    """An op whose operands sit at fixed positions: ``slots`` = ((position, name, role kind), ...)."""

    op: str
    slots: tuple[tuple[int, str, str | None], ...]
    axes: tuple[int | None, ...] = ()  # per slot: the operand's reduction dimension (``Invocation.axes``)

    def bind(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
        where = [(pos < len(args), pos, name) for pos, name, _ in self.slots]
        tensors = tuple(args[pos] if positional else kwargs.get(name) for positional, pos, name in where)
        # fn keeps the other arguments only: an operand it kept would stay alive as long as the autograd graph
        # of the call (a QOpFunction keeps its call for backward), beside the rounded copy saved for backward
        rest = [None if any(positional and pos == i for positional, pos, _ in where) else a
                for i, a in enumerate(args)]
        rest_kw = {k: v for k, v in kwargs.items() if all(positional or name != k for positional, _, name in where)}

        def fn(*new: Any) -> Tensor:
            a, kw = list(rest), dict(rest_kw)
            for (positional, pos, name), x in zip(where, new):
                if positional:
                    a[pos] = x
                else:
                    kw[name] = x
            return func(*a, **kw)

        roles = tuple(_role(kind, x) for (_, _, kind), x in zip(self.slots, tensors))
        names = tuple(name for _, name, _ in self.slots)
        return Invocation(self.op, names, tensors, roles, fn, unsupported=_unsupported(self.op, tensors, kwargs, args),
                          axes=self.axes)


def _unsupported(op: str, tensors: tuple[Any, ...], kwargs: dict[str, Any], args: tuple[Any, ...]) -> str | None:
    if any(isinstance(t, Tensor) and t.is_complex() for t in tensors):
        return "complex operands"
    if op in ("embedding", "embedding_bag") and kwargs.get("sparse"):
        return "sparse embedding gradients (build the Embedding or EmbeddingBag with sparse=False)"
    return None


@dataclass(frozen=True)
class _Conv(_Slots):
    """A convolution of ``dims`` spatial dimensions: blocks along channels (module docstring), which are dim 1 of
    a batched input and result, dim 0 of an unbatched one."""

    dims: int = 2
    transposed: bool = False

    def bind(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
        inv = super().bind(func, args, kwargs)
        x = inv.tensors[0]
        channels = 0 if isinstance(x, Tensor) and x.dim() == self.dims + 1 else 1
        return replace(inv, axes=(channels, 0 if self.transposed else 1, None), result_axis=channels)


@dataclass(frozen=True)
class _Contraction(_Slots):
    """``torch.tensordot(a, b, dims)`` and ``torch.linalg.vecdot(x, y, dim=)``: each operand along the one
    dimension the call contracts (tensordot: ``dims=1``, or one dimension a side); several contracted dimensions
    keep the format's own axis."""

    def bind(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
        inv = super().bind(func, args, kwargs)
        if self.op == "vecdot":
            dim = kwargs.get("dim", -1)
            return replace(inv, axes=(dim, dim))
        dims = args[2] if len(args) > 2 else kwargs.get("dims", 2)
        if isinstance(dims, Tensor):
            dims = dims.tolist()
        if dims == 1:
            return replace(inv, axes=(-1, 0))
        if isinstance(dims, (list, tuple)) and len(dims) == 2:
            a, b = ([d] if isinstance(d, int) else list(d) for d in dims)
            if len(a) == 1 and len(b) == 1:
                return replace(inv, axes=(a[0], b[0]))
        return inv


@dataclass(frozen=True)
class _Embedding(_Slots):
    """``F.embedding`` / ``F.embedding_bag`` (their parameters in ``signature`` order): bound by name; a
    ``max_norm`` renormalises the stored table first (in place, as torch does), then the lookup runs on the
    (quantized) table without it."""

    signature: tuple[str, ...] = ()

    def bind(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
        bound = dict(zip(self.signature, args)) | kwargs
        if bound.get("max_norm") is not None:
            with torch.no_grad():
                torch.embedding_renorm_(bound["weight"], bound["input"].contiguous(), bound["max_norm"],
                                        bound.get("norm_type", 2.0))
            bound["max_norm"] = None
        return super().bind(func, (), bound)


_SDPA_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass(frozen=True)
class _Attention(_Slots):
    """``F.scaled_dot_product_attention``: Q, K, V, and its other arguments by name in ``options``."""

    def bind(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
        options = dict(zip(_SDPA_OPTIONS, args[3:])) | {k: v for k, v in kwargs.items() if k in _SDPA_OPTIONS}
        return replace(super().bind(func, args, kwargs), options=options)


@dataclass(frozen=True)
class _Einsum:
    """``torch.einsum(equation, *operands)`` (or a list of operands), or a chain ``multi_dot([a, b, ...])`` /
    ``chain_matmul(a, b, ...)``: quantized when it has two operands (roles as matmul)."""

    op: str = "einsum"

    def bind(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation:
        head, operands = (args[:1], list(args[1:])) if self.op == "einsum" else ((), list(args))
        listed = len(operands) == 1 and isinstance(operands[0], (list, tuple))
        tensors = tuple(operands[0]) if listed else tuple(operands)
        why = None if len(tensors) == 2 else f"{self.op} of {len(tensors)} operands (only two are quantized)"
        roles = tuple(_role("auto", t) for t in tensors) if why is None else (None,) * len(tensors)

        def fn(*new: Any) -> Tensor:
            return func(*head, list(new), **kwargs) if listed else func(*head, *new, **kwargs)

        axes = _contracted_axes(head[0], tensors) if self.op == "einsum" and why is None else ()
        if self.op == "multi_dot" and why is None:
            axes = FACTOR_AXES
        return Invocation(self.op, tuple(f"operand{i}" for i in range(len(tensors))), tensors, roles, fn,
                          unsupported=why, axes=axes)


def _contracted_axes(equation: Any, tensors: tuple[Any, ...]) -> tuple[int | None, ...]:
    """Per operand of a two-operand einsum, the dimension of the one index it contracts (an index of both
    operands that the result does not keep), counted from the end after an ellipsis; () where the equation
    contracts no index or several (or is not a string): the operands then keep the format's own axis."""
    if not isinstance(equation, str):
        return ()
    spec = equation.replace(" ", "")
    inputs, arrow, result = spec.partition("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return ()
    letters = [t.replace("...", "") for t in terms]
    if not arrow:  # implicit result: the indices that appear once, in alphabetical order
        joined = "".join(letters)
        result = "".join(sorted(c for c in set(joined) if joined.count(c) == 1))
    contracted = (set(letters[0]) & set(letters[1])) - set(result)
    if len(contracted) != 1:
        return ()
    (index,) = contracted
    axes: list[int | None] = []
    for term, t in zip(terms, tensors):
        head, dots, tail = term.partition("...")
        axes.append(head.index(index) if index in head else tail.index(index) - len(tail))
    return tuple(axes)



@dataclass(frozen=True)
class _Elementwise(_Slots):
    """An elementwise op (``PARAMETER_OPS``): bound only when an operand is a Parameter (or a view of one), so
    that the many elementwise calls of a forward without one (residual additions, activations) cost one check."""

    def bind(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation | None:
        if not any(is_parameter(a) for a in (*args, *kwargs.values())):
            return None
        return super().bind(func, args, kwargs)


_LINEAR = ((0, "input", "activation"), (1, "weight", "weight"), (2, "bias", "bias"))
_PRODUCT = ((0, "input", "auto"), (1, "other", "auto"))
#: A product's factors as a GEMM reads them: the first along its last dimension, the second along dim -2.
FACTOR_AXES = (-1, -2)
_ADDED = ((0, "input", "auto_bias"), (1, "mat1", "auto"), (2, "mat2", "auto"))
_TENSOR = torch.Tensor
#: Other products of two operands (roles as matmul) and of an added term and two factors (as addmm).
_PRODUCTS = {
    "matmul": (torch.linalg.matmul,), "mv": (torch.mv, _TENSOR.mv), "dot": (torch.dot, _TENSOR.dot),
    "inner": (torch.inner, _TENSOR.inner), "outer": (torch.outer, _TENSOR.outer, torch.ger, _TENSOR.ger),
}
_ADDED_PRODUCTS = {
    "addmv": (torch.addmv, _TENSOR.addmv), "addr": (torch.addr, _TENSOR.addr),
    "addbmm": (torch.addbmm, _TENSOR.addbmm),
}

#: The products whose second factor is read along its dim -2 (``FACTOR_AXES``); dot and inner reduce along both
#: operands' last dimension, outer and addr reduce nothing, tensordot and vecdot over their ``dims`` / ``dim``
#: (``_Contraction``).
_GEMMS = frozenset({"matmul", "mv", "addmv", "addbmm"})

#: Intercepted function -> how its calls bind. Tensor methods and operators take ``self`` as position 0.
OPS: dict[Callable[..., Any], Any] = {
    F.linear: _Slots("linear", _LINEAR),
    **{getattr(F, f"conv{d}d"): _Conv(f"conv{d}d", _LINEAR, dims=d) for d in (1, 2, 3)},
    **{getattr(F, f"conv_transpose{d}d"): _Conv(f"conv_transpose{d}d", _LINEAR, dims=d, transposed=True)
       for d in (1, 2, 3)},
    **{f: _Slots("matmul", _PRODUCT, FACTOR_AXES) for f in (torch.matmul, _TENSOR.matmul, _TENSOR.__matmul__)},
    _TENSOR.__rmatmul__: _Slots("matmul", _PRODUCT, FACTOR_AXES[::-1]),  # b.__rmatmul__(a) is a @ b
    **{f: _Slots("mm", _PRODUCT, FACTOR_AXES) for f in (torch.mm, _TENSOR.mm)},
    **{f: _Slots("bmm", _PRODUCT, FACTOR_AXES) for f in (torch.bmm, _TENSOR.bmm)},
    **{f: _Slots("addmm", _ADDED, (None, *FACTOR_AXES)) for f in (torch.addmm, _TENSOR.addmm)},
    **{f: _Slots("baddbmm", _ADDED, (None, *FACTOR_AXES)) for f in (torch.baddbmm, _TENSOR.baddbmm)},
    **{f: _Slots(name, _PRODUCT, FACTOR_AXES if name in _GEMMS else ()) for name, fs in _PRODUCTS.items()
       for f in fs},
    torch.tensordot: _Contraction("tensordot", _PRODUCT),
    torch.linalg.vecdot: _Contraction("vecdot", _PRODUCT),
    **{f: _Slots(name, _ADDED, (None, *FACTOR_AXES) if name in _GEMMS else ()) for name, fs in _ADDED_PRODUCTS.items()
       for f in fs},
    F.bilinear: _Slots("bilinear", ((0, "input1", "activation"), (1, "input2", "activation"),
                                    (2, "weight", "weight"), (3, "bias", "bias"))),
    torch.linalg.multi_dot: _Einsum("multi_dot"),
    torch.chain_matmul: _Einsum("multi_dot"),
    torch.einsum: _Einsum(),
    F.embedding: _Embedding("embedding", ((0, "input", None), (1, "weight", "weight")), signature=(
        "input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")),
    F.embedding_bag: _Embedding("embedding_bag", (
        (0, "input", None), (1, "weight", "weight"), (8, "per_sample_weights", "activation")), signature=(
        "input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
        "per_sample_weights", "include_last_offset", "padding_idx")),
    F.layer_norm: _Slots("layer_norm", ((0, "input", "activation"), (2, "weight", "weight"), (3, "bias", "bias"))),
    F.group_norm: _Slots("group_norm", ((0, "input", "activation"), (2, "weight", "weight"), (3, "bias", "bias"))),
    F.batch_norm: _Slots("batch_norm", ((0, "input", "activation"), (1, "running_mean", None),
                                        (2, "running_var", None), (3, "weight", "weight"), (4, "bias", "bias"))),
    F.scaled_dot_product_attention: _Attention(
        "attention", ((0, "query", "activation"), (1, "key", "activation"), (2, "value", "activation"))),
}
if hasattr(F, "rms_norm"):
    OPS[F.rms_norm] = _Slots("rms_norm", ((0, "input", "activation"), (2, "weight", "weight")))

_FACTORS = ((0, "input", "factor"), (1, "other", "factor"))
_TERMS = ((0, "input", "term"), (1, "other", "term"))
#: Elementwise ops that quantize a Parameter operand (a hand-written norm's ``self.weight * x``, Llama's and T5's
#: RMSNorm, a learned scale or an added positional table): the emulation quantizes the operands that are
#: parameters of the module whose forward runs the op, and only those (``emulate.OpEmulation.call``).
PARAMETER_OPS: dict[Callable[..., Any], _Elementwise] = {
    **{f: _Elementwise("mul", _FACTORS) for f in (torch.mul, torch.multiply, _TENSOR.mul, _TENSOR.multiply,
                                                  _TENSOR.__mul__, _TENSOR.__rmul__)},
    **{f: _Elementwise("div", _FACTORS) for f in (torch.div, torch.divide, torch.true_divide, _TENSOR.div,
                                                  _TENSOR.divide, _TENSOR.true_divide, _TENSOR.__truediv__,
                                                  _TENSOR.__rtruediv__, _TENSOR.__rdiv__)},
    **{f: _Elementwise("add", _TERMS) for f in (torch.add, _TENSOR.add, _TENSOR.__add__, _TENSOR.__radd__)},
    **{f: _Elementwise("sub", _TERMS) for f in (torch.sub, torch.subtract, _TENSOR.sub, _TENSOR.subtract,
                                                _TENSOR.__sub__, _TENSOR.__rsub__)},
    **{f: _Elementwise("addcmul", ((0, "input", "term"), (1, "tensor1", "factor"), (2, "tensor2", "factor")))
       for f in (torch.addcmul, _TENSOR.addcmul)},
    **{f: _Elementwise("prelu", ((0, "input", None), (1, "weight", "factor"))) for f in {F.prelu, torch.prelu}},
}
OPS.update(PARAMETER_OPS)

#: Composite Python functions whose body the emulation opens, so that the ops inside them are intercepted
#: (MultiheadAttention's in-projection, its attention products and its out-projection).
OPENED: tuple[Callable[..., Any], ...] = (F.multi_head_attention_forward,)


def bind(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Invocation | None:
    """The Invocation of an intercepted call, or None when ``func`` is not an op lowprec quantizes."""
    binder = OPS.get(func)
    return None if binder is None else binder.bind(func, args, kwargs)
