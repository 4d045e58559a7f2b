"""Op-level emulation: every GEMM-like op and norm a converted model runs, quantized per the policy.

``convert`` attaches an :class:`OpEmulation` to the model it returns. Forward pre/post hooks on every module
keep the path of the module running; while the outermost module's forward runs, a ``TorchFunctionMode`` sees
every torch function call, and each call of an op in ``ops.OPS`` (F.linear, the convolutions and transposed
convolutions, matmul / ``@`` / mm / bmm / addmm / baddbmm / two-operand einsum, F.embedding, the norms,
F.scaled_dot_product_attention, and mul / div / add / sub / addcmul with an operand that is a Parameter of the
module running them) runs through ``QOpFunction`` with the quantizers of the policy resolved for
that module path and op (``resolve.module_policy``: module and ``op:`` overrides, @first/@last, Park's
classifier rule: the same decision the swapped layers get). Attention runs as ``attention.emulated_attention``:
two quantized products around a float32 softmax, never a fused kernel. ``F.multi_head_attention_forward`` is
opened, so MultiheadAttention's in-projection (a raw Parameter) and products are quantized too.

Layers ``convert`` swaps (QLinear, QConv2d, QLSTM, ...) are the fast path: ops inside them are theirs.

A module's own parameter used elementwise (``self.weight * x`` in Llama's and T5's RMSNorm or a hand-written
LayerNorm, ``x + self.bias``, ``torch.addcmul(self.b, self.w, x)``) is quantized in the weight role (a factor or
divisor) or the bias role (a term), and its gradient in weight_grad / bias_grad; the op's other operands, its
result and their gradients stay float32 (the statistics and normalisation of a hand-written norm are float32, as
torch's norms compute them; the next GEMM quantizes the result as its input). A parameter of another module, or
an elementwise op without a parameter operand, runs as torch runs it.

Numerics the emulation keeps in float32: the softmax, every norm's statistics and normalisation, additions and
elementwise products of activations, activations, and anything not in ``ops.OPS``. Operands whose format is
WRPN's clip format (Uniform) are quantized only at weight layers: linear and convolution ops, and a matmul
with a Parameter operand (the layers WRPN quantizes; clipping a norm's, an attention's or an activation
product's signed operand to [0, 1] would be wrong).

State: the quantizers' states (dynamic-fixed-point exponents and their statistics, per call site) travel in
the converted model's own ``state_dict()``, in its ``_metadata`` entry of the model (key ``lowprec_ops``), as the
swapped layers keep theirs: the keys stay the plain model's (it loads into the unconverted model with
``strict=True``), and ``load_state_dict`` into a converted model restores them (sites not made yet are made from
it at the first forward), with ``layer_parameters`` (which parameters functional ops use as weights: the Trainer
reads it).

Warnings (once each): an op that cannot be quantized (an einsum of three operands, a sparse embedding), and,
after a forward, every parameter the forward used that reached no quantized op (e.g. one transformed before
use, ``x * self.log_scale.exp()``), named by its qualified name. A parameter whose values a repetition or
concatenation carries unchanged into a quantized operand (MultiheadAttention's ``bias_k`` / ``bias_v``
concatenated to K and V, a token ``torch.cat``-ed to a swapped layer's input) reaches that op, in its role.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..policy import LAYER_ROLES, Policy, Quant, Quantizer, Role
from ..policy.ops import OP_KINDS
from ..policy.quantizer import forward_ended, forward_started
from .attention import emulated_attention
from .edges import EdgeCheck
from .hooks import remove_forward_hooks, remove_state_dict_hooks
from .layers import QuantizedModule
from .opfunction import GRAD_ROLE, OpCall, run_op
from .ops import FACTOR_AXES, OPENED, STATEFUL_OPS, Invocation, bind, is_parameter
from .roles import clips_negatives, clips_signed
from .records import OperandRecord, OpRecord
from .resolve import Resolution
from .swapped import layer_operands

__all__ = ["OpEmulation", "attach", "detach", "emulation_of", "ZERO_WEIGHT_WARNING", "warn_zero_weights"]

_ATTR = "_lowprec_ops"  # the model attribute holding its OpEmulation
_METADATA_KEY = "lowprec_ops"  # the op quantizers' states in the model's state-dict metadata
_PARAMETERS_KEY = "lowprec_op_parameters"  # and ``layer_parameters``
_CLIP_KINDS = {"linear", "conv", "matmul"}  # with a weight operand, WRPN's clip formats (Uniform) apply
_PARAMETER_ROLES = Role.select(parameter=True, layer=True)  # the roles an elementwise op quantizes
_LAYER_KINDS = {"linear", "conv", "matmul", "embedding"}  # a Parameter operand of these: a weight layer's
_T = torch.Tensor
#: A warning names weights that WRPN's uniform<k> rounds to 0 in more than this share (convert's, the first forward's).
ZERO_WEIGHT_WARNING = 0.5


def warn_zero_weights(shares: dict[str, float], source: str, whose: str, fix: str, stacklevel: int) -> None:
    """Warn, from ``source``, naming the weights of ``shares`` (name -> share rounded to 0) above
    ZERO_WEIGHT_WARNING: WRPN's uniform<k> passes no signal through them; ``fix``: what to do."""
    listed = ", ".join(f"{n} {100 * z:.0f}%" for n, z in shares.items() if z > ZERO_WEIGHT_WARNING)
    if listed:
        warnings.warn(
            f"{source}: WRPN's uniform<k> weights clip to [-1, 1] in steps of 1/(2**(k-1)-1); these {whose} are far "
            f"smaller and mostly round to 0, so no signal flows through them: {listed}. Fix: {fix}",
            UserWarning, stacklevel=stacklevel + 1)
#: Functions that carry values unchanged into a new tensor (a repetition, a concatenation, a copy): a parameter
#: they carry (MultiheadAttention's bias_k / bias_v, a ViT's class token) reaches the op that quantizes the result.
_CARRIERS = {torch.cat, torch.concat, torch.stack, torch.repeat_interleave, torch.clone, torch.reshape, _T.repeat,
             _T.expand, _T.expand_as, _T.repeat_interleave, _T.contiguous, _T.clone, _T.reshape}


def _site(key: tuple[str, str, int, str]) -> str:
    name, op, index, product = key
    return f"{name}:{op}[{index}]" + (f".{product}" if product else "")


def _own(module: nn.Module, t: Any) -> bool:
    """Whether ``t`` is one of ``module``'s own parameters (or a view of one)."""
    base = t if isinstance(t, nn.Parameter) else getattr(t, "_base", None)
    return any(base is p for p in module._parameters.values())


def _own_operands(inv: Invocation, module: nn.Module) -> Invocation | None:
    """An elementwise invocation with roles only for ``module``'s own parameters; None when it has none."""
    roles = tuple(r if r is not None and _own(module, t) else None for r, t in zip(inv.roles, inv.tensors))
    return None if all(r is None for r in roles) else dataclasses.replace(inv, roles=roles)


def _flat(args: tuple, kwargs: dict[str, Any]) -> Iterator[Any]:
    """The arguments of a call, those in a list or tuple argument (``torch.cat([a, b])``) one by one."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


@dataclass
class _Frame:
    name: str
    module: nn.Module
    counts: Counter = field(default_factory=Counter)


class _Mode(TorchFunctionMode):
    def __init__(self, emulation: OpEmulation) -> None:
        super().__init__()
        self.emulation = emulation

    def __torch_function__(self, func: Callable[..., Any], types_: Any, args: tuple = (), kwargs: Any = None):
        return self.emulation.call(self, func, args, kwargs or {})


@functools.cache
def _opened(func: types.FunctionType) -> types.FunctionType:
    """A copy of a composite torch function without its ``has_torch_function`` guard: run under the mode, its
    body's ops are intercepted one by one instead of the whole call being handed over at once."""
    scope = dict(func.__globals__)
    for guard in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        scope[guard] = lambda *_: False
    opened = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, func.__closure__)
    opened.__kwdefaults__ = func.__kwdefaults__
    return opened


class OpEmulation:
    """The op-level quantization of one converted model (see the module docstring).

    ``resolution``: the model's plan (its policy, and the module names @first/@last stand for). Quantizers are
    made on first use, one set per (module path, op, call index within that module's forward, product), and
    kept: dynamic-fixed-point exponents are per op call site, as Courbariaux's per-layer groups.
    """

    def __init__(self, resolution: Resolution) -> None:
        self.resolution, self.policy = resolution, resolution.policy
        self.quantizer_sets: dict[tuple[str, str, int, str], dict[str, Quantizer]] = {}
        self.records: dict[tuple[str, str, int], OpRecord] | None = None  # set while a plan records
        self.observe_only = False  # quantizers made inside ``lowprec.nn.calibrating`` start observing
        #: When set, ``make_quantizer(site, role, quant, kind)`` makes each op quantizer in place of
        #: ``Quantizer(quant, policy)`` (None: that one): ``lowprec.inspect``'s recorders.
        self.make_quantizer: Callable[[str, str, Quant | None, str], Quantizer | None] | None = None
        #: the cross-process MAX the quantizers made from now on agree through (``Quantizer.set_agree``); set by
        #: ``lowprec.Trainer`` under torch.distributed, since most call sites are made at the first forward; not
        #: pickled (a copy in another process has no process group until its own Trainer is built)
        self.agree: Callable[[Tensor], Tensor] | None = None
        self.clip_exempt: set[tuple[str, str, int]] = set()  # call sites where a uniform role was left fp32
        self._pending: dict[str, dict[str, Any]] = {}  # loaded quantizer states of sites not made yet
        self._warned: set[str] = set()
        #: The parameters (qualified names) that functional ops use as a weight layer's weight or bias: a weight
        #: or bias operand of a linear, convolution, matmul or embedding op; None until a forward has run. The
        #: Trainer gives them their layer's update roles (master, accumulator, optimizer_state).
        self.layer_parameters: list[str] | None = None
        #: Every parameter a functional op rounds in its weight or bias role, by qualified name: its uses, each
        #: (call site, role, view geometry (size, stride, offset) or None for the whole parameter, axis);
        #: None until a forward has run (``round_parameters``, the export, reads it)
        self.rounded_parameters: dict[str, list[tuple[tuple[str, str, int, str], str, Any, Any]]] | None = None
        #: fill_clip_range=on: the first forward scales each weight a functional op rounds to WRPN's signed
        #: uniform<k> to reach +-1 before rounding it (as convert does for the swapped layers); off once a forward
        #: has run or a state dict was loaded into the model (its weights are then not initial ones)
        self.fill_pending = resolution.policy.fill_clip_range
        self._reset()

    def _reset(self) -> None:
        self._stack: list[_Frame] = []
        self._mode: _Mode | None = None
        self._swapped = 0
        self._used: dict[int, nn.Parameter] = {}
        self._covered: set[int] = set()
        self._weights: set[int] = set()  # the parameters weight-layer ops reached (layer_parameters)
        self._carried: dict[int, tuple[Tensor, set[int]]] = {}  # a carrier's result: (it, the parameters it holds)
        self._rounded: dict[int, list[tuple[Any, ...]]] = {}  # rounded_parameters by id, while a forward tracks
        self._checking = True  # the first forward looks for parameters that reach no quantized op
        self._edges = EdgeCheck(self.resolution)  # and for products with a weight beyond @first / @last

    def __getstate__(self) -> dict[str, Any]:  # pickling / deepcopy: the per-forward state is transient
        state = dict(self.__dict__)
        for key in ("_stack", "_mode", "_swapped", "_used", "_covered", "_weights", "_carried", "_rounded",
                    "_checking", "_edges", "records", "agree", "make_quantizer"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("fill_pending", False)
        self.__dict__.setdefault("rounded_parameters", None)
        self.records, self.make_quantizer, self.agree = None, None, None
        self._reset()

    @property
    def _tracking(self) -> bool:
        """Whether this forward records which parameters reach a quantized op (the first forward, and lp.plan):
        only then are ``_used``, ``_covered``, ``_weights`` and ``_carried`` kept."""
        return self._checking or self.records is not None

    # -- module hooks ---------------------------------------------------------------------------------------
    def enter(self, name: str, module: nn.Module, args: Any) -> None:
        if not self._stack:
            self._used, self._covered, self._weights, self._rounded = {}, set(), set(), {}
            self._edges.start()
            self._mode = _Mode(self)
            self._mode.__enter__()
            forward_started(inference=not module.training and not torch.is_grad_enabled())
        self._stack.append(_Frame(name, module))
        self._edges.enter(name)
        if isinstance(module, QuantizedModule):
            self._swapped += 1
            if self._tracking:  # its own parameters, and any its input carries (``_CARRIERS``)
                self._covered.update(id(p) for p in module.parameters(recurse=False))
                self._covered.update(*(self._parameters_in(a) for a in _flat(args, {})))
            if self._swapped == 1:
                self._record_layer(name, module)

    def exit(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not self._stack or self._stack[-1].module is not module:
            return  # a module called outside the converted model's forward
        self._stack.pop()
        self._edges.exit(name)
        if isinstance(module, QuantizedModule):
            self._swapped -= 1
        if not self._stack:
            forward_ended()
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            self._carried = {}
            if self._tracking:
                self._warn_uncovered(name, module)
                self._checking = False

    # -- interception ---------------------------------------------------------------------------------------
    def call(self, mode: _Mode, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._swapped:
            return func(*args, **kwargs)
        if self._tracking:
            for a in (*args, *kwargs.values()):
                if is_parameter(a):
                    p = a if isinstance(a, nn.Parameter) else a._base
                    self._used[id(p)] = p
            if func in _CARRIERS:
                carried = set().union(*(self._parameters_in(a) for a in _flat(args, kwargs)))
                if carried:
                    out = func(*args, **kwargs)
                    self._carried[id(out)] = (out, carried)
                    return out
        if func in OPENED:
            with mode:
                return _opened(func)(*args, **kwargs)
        try:
            inv = bind(func, args, kwargs)
        except TypeError:  # an unhashable callable: not one of ours
            inv = None
        frame = self._stack[-1]
        if inv is not None and OP_KINDS[inv.op] == "elementwise":
            inv = _own_operands(inv, frame.module)
        if inv is None:
            return func(*args, **kwargs)
        index = frame.counts[inv.op]
        frame.counts[inv.op] += 1
        if self._tracking:
            self._covered.update(*(self._parameters_in(t) for t, r in zip(inv.tensors, inv.roles) if r is not None))
            if OP_KINDS[inv.op] in _LAYER_KINDS:
                self._weights.update(id(t if isinstance(t, nn.Parameter) else t._base)
                                     for t, r in zip(inv.tensors, inv.roles) if r in ("weight", "bias")
                                     and is_parameter(t))
            if OP_KINDS[inv.op] in _CLIP_KINDS:
                self._edges.product(frame.name, inv.op, set().union(
                    *(self._parameters_in(t) for t, r in zip(inv.tensors, inv.roles) if r == "weight")))
        if inv.unsupported is not None:
            self._unquantized(frame.name, inv, index)
            return func(*args, **kwargs)
        if inv.op == "attention":
            return self._attention(frame, inv, index)
        quantizers = self.quantizers(frame, inv.op, index, "", weight_layer="weight" in inv.roles)
        if self._tracking:
            if self._checking:
                if self.fill_pending:
                    _fill_clip_range(inv, quantizers)
                self._check_input_signs(frame.name, inv, index, quantizers)
            self._note_rounded((frame.name, inv.op, index, ""), inv, quantizers)
        call = OpCall(inv.fn, inv.roles, quantizers, self._on_backward(frame.name, inv.op, index),
                      recompute=inv.op not in STATEFUL_OPS, axes=inv.axes, result_axis=inv.result_axis)
        self._record(frame.name, inv.op, index, self._operands(inv.names, inv.roles, quantizers))
        return run_op(call, *inv.tensors)

    def _note_rounded(self, key: tuple[str, str, int, str], inv: Invocation,
                      quantizers: dict[str, Quantizer]) -> None:
        """Record each parameter operand (or view of one) this call rounds in its weight or bias role."""
        axes = inv.axes or (None,) * len(inv.tensors)
        for t, role, axis in zip(inv.tensors, inv.roles, axes):
            if role in ("weight", "bias") and quantizers[role].enabled and is_parameter(t):
                base = t if isinstance(t, nn.Parameter) else t._base
                view = None if t is base else (tuple(t.size()), tuple(t.stride()), t.storage_offset())
                self._rounded.setdefault(id(base), []).append((key, role, view, axis))

    def _check_input_signs(self, name: str, inv: Invocation, index: int, quantizers: dict[str, Quantizer]) -> None:
        """First forward, where the op's activation role is WRPN's unsigned clip to [0, 1] (a weight layer's
        input): warn if an input has negative values, which the clip turns into 0, as a swapped layer warns."""
        quantizer = quantizers["activation"]
        if not clips_negatives(quantizer):
            return
        for t, role in zip(inv.tensors, inv.roles):
            if role == "activation" and isinstance(t, Tensor) and t.numel():
                negative = float((t.detach() < 0).float().mean())
                if negative > 0:
                    self._warn_once(
                        f"{name or '(root)'}:{inv.op}[{index}] quantizes its input with {quantizer.quant}, WRPN's "
                        f"clip to [0, 1] meant for a ReLU's output, but {100 * negative:.1f}% of that input is "
                        "negative (a signed input, e.g. a LayerNorm's output): the clip turns those values into 0. "
                        "Fix: put a ReLU in front of it, or give it a signed format or none (an override "
                        f"'{name or '<name>'}: activation=uniform<k>' or 'op:{inv.op}: activation=none')")

    def clip_weights(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Callable[[Tensor], Tensor]]]:
        """``(name, parameter, its rounding)`` for each parameter a functional op rounds in its weight role to
        WRPN's signed ``uniform<k>`` (GPT-2's Conv1D, MultiheadAttention's projections, ``x @ self.w``): known
        from a forward, none before."""
        for name, uses in (self.rounded_parameters or {}).items():
            for key, role, _, axis in uses:
                quantizer = self.quantizer_sets[key][role]
                if role == "weight" and clips_signed(quantizer):
                    yield name, model.get_parameter(name), functools.partial(quantizer.round, axis=axis)
                    break

    @torch.no_grad()
    def round_parameters(self, model: nn.Module) -> None:
        """Replace every parameter (or view of one) a functional op rounds in its weight or bias role by that
        rounding (``Quantizer.round``: the site's current exponent or scale, nothing recorded), as the export
        (``lowprec.unconvert``) does for the swapped layers' weights. A parameter used by several sites is
        rounded by each in turn (the same value again where they share a deterministic format)."""
        if self.rounded_parameters is None:
            raise RuntimeError(
                "lowprec: which parameters this converted model's functional ops round (LayerNorm's, "
                "MultiheadAttention's, a Conv1D's, one used elementwise) is known from a forward, and none has "
                "run yet: run one forward of the converted model (any input of the right shape) first")
        for name, uses in self.rounded_parameters.items():
            param = model.get_parameter(name)
            for key, role, view, axis in uses:
                t = param if view is None else param.as_strided(*view)
                t.copy_(self.quantizer_sets[key][role].round(t, axis))

    def _parameters_in(self, x: Any) -> set[int]:
        """The ids of the parameters ``x`` is, views or carries (``_CARRIERS``), in a forward that tracks them."""
        if is_parameter(x):
            return {id(x if isinstance(x, nn.Parameter) else x._base)}
        for t in (x, getattr(x, "_base", None)):
            if t is not None and id(t) in self._carried:
                return self._carried[id(t)][1]
        return set()

    def _attention(self, frame: _Frame, inv: Invocation, index: int) -> Tensor:
        sets = {name: self.quantizers(frame, "attention", index, name) for name in ("scores", "out")}
        if not any(OpCall(torch.matmul, ("activation", "activation"), qs).quantizes for qs in sets.values()):
            self._record(frame.name, "attention", index, self._attention_operands(sets))
            return inv.fn(*inv.tensors)  # the policy keeps attention in fp32: torch's own kernel
        on_backward = self._on_backward(frame.name, "attention", index)

        def product(name: str, a: Tensor, b: Tensor) -> Tensor:
            return run_op(OpCall(torch.matmul, ("activation", "activation"), sets[name], on_backward,
                                 axes=FACTOR_AXES), a, b)

        self._record(frame.name, "attention", index, self._attention_operands(sets))
        return emulated_attention(*inv.tensors, **inv.options, product=product)

    # -- quantizers and policy ------------------------------------------------------------------------------
    def quantizers(self, frame: _Frame, op: str, index: int, product: str, *,
                   weight_layer: bool = False) -> dict[str, Quantizer]:
        """The quantizers of one op call site (made on first use). ``weight_layer``: the op multiplies by a
        weight (a Parameter operand), so WRPN's clip formats apply to it as to a linear layer."""
        key = (frame.name, op, index, product)
        found = self.quantizer_sets.get(key)
        if found is None:
            policy = self.resolution.module_policy(frame.name, frame.module, op=op)
            kind = OP_KINDS[op]
            clips = weight_layer and kind in _CLIP_KINDS
            found = {role: self._made(key, role, self._quant(policy, role, clips, kind), policy, kind)
                     for role in LAYER_ROLES}
            if any((quant := policy.get(role)) is not None and quant.format.clip_range is not None
                   and not q.enabled for role, q in found.items()):
                self.clip_exempt.add((frame.name, op, index))
            if policy.get("accumulation") is not None and kind not in ("norm", "elementwise"):
                self._warn_once(f"{frame.name or '(root)'}: {op} accumulates in fp32: accumulation emulation "
                                f"(accumulation={policy.get('accumulation')}) covers swapped Linear and recurrent "
                                "layers only")
            for q in found.values():
                q.observe_only = self.observe_only
                q.set_agree(self.agree)
            for role, state in self._pending.pop(_site(key), {}).items():
                found[role].load_state_dict(state)
            self.quantizer_sets[key] = found
        return found

    def _made(self, key: tuple[str, str, int, str], role: str, quant: Quant | None, policy: Policy,
              kind: str) -> Quantizer:
        made = None if self.make_quantizer is None else self.make_quantizer(_site(key), role, quant, kind)
        return made if made is not None else Quantizer(quant, policy, forward=not Role(role).gradient)

    @staticmethod
    def _quant(policy: Policy, role: str, clips: bool, kind: str) -> Quant | None:
        quant = policy.get(role)
        if kind == "elementwise" and role not in _PARAMETER_ROLES:
            return None  # the elementwise op itself stays float32: only the parameter's roles are quantized
        if quant is not None and quant.format.clip_range is not None and not clips:
            return None
        return quant

    def all_quantizers(self) -> Iterator[tuple[str, str, Quantizer]]:
        """``(call site, role, quantizer)`` of every op quantizer made so far; a site is named
        ``module:op[index]`` (``.scores`` / ``.out`` for the two products of an attention)."""
        for key, qs in self.quantizer_sets.items():
            for role, q in qs.items():
                yield _site(key), role, q

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The op quantizers' states (dynamic-fixed-point exponents), by call site and role; a loaded site not made
        yet (no forward since ``load_state_dict``) as it was loaded."""
        made = {_site(key): {role: q.state_dict() for role, q in qs.items()} for key, qs in self.quantizer_sets.items()}
        return self._pending | made

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore ``state_dict()``: sites already made now, the others when the forward first makes them."""
        self._pending = {site: dict(roles) for site, roles in state.items()}
        for key, qs in self.quantizer_sets.items():
            for role, s in self._pending.pop(_site(key), {}).items():
                qs[role].load_state_dict(s)

    def save_to_metadata(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                         local_metadata: dict[str, Any]) -> None:
        """``state_dict`` post-hook of the model: its metadata entry carries ``state_dict()``."""
        local_metadata[_METADATA_KEY] = self.state_dict()
        if self.layer_parameters is not None:
            local_metadata[_PARAMETERS_KEY] = list(self.layer_parameters)

    def load_from_metadata(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                           local_metadata: dict[str, Any], *_: Any) -> None:
        """``load_state_dict`` pre-hook of the model: restore what ``save_to_metadata`` saved (a state dict of the
        plain model has none: the quantizers stay as they are)."""
        self.fill_pending = False  # the weights loaded are not initial ones: a forward keeps them as they are
        if _METADATA_KEY in local_metadata:
            self.load_state_dict(local_metadata[_METADATA_KEY])
        if _PARAMETERS_KEY in local_metadata and self.layer_parameters is None:
            self.layer_parameters = list(local_metadata[_PARAMETERS_KEY])

    # -- plan records and warnings --------------------------------------------------------------------------
    @staticmethod
    def _operands(names: tuple[str, ...], roles: tuple[str | None, ...], quantizers: dict[str, Quantizer],
                  result: str = "result") -> list[OperandRecord]:
        ops = [OperandRecord.of(n, r, quantizers[r]) for n, r in zip(names, roles) if r is not None]
        ops.append(OperandRecord.of(result, "output", quantizers["output"]))
        ops.append(OperandRecord.of(f"d {result}", "output_grad", quantizers["output_grad"]))
        ops += [OperandRecord.of(f"d {n}", GRAD_ROLE[r], quantizers[GRAD_ROLE[r]]) for n, r in zip(names, roles)
                if r is not None]
        return ops

    def _attention_operands(self, sets: dict[str, dict[str, Quantizer]]) -> list[OperandRecord]:
        s, o = sets["scores"], sets["out"]
        return (self._operands(("Q", "K^T"), ("activation", "activation"), s, "S")
                + self._operands(("P", "V"), ("activation", "activation"), o, "O"))

    def _record(self, module: str, op: str, index: int, operands: list[OperandRecord]) -> None:
        if self.records is None:
            return
        rec = self.records.get((module, op, index))
        if rec is None:
            quantized = any(o.quantized for o in operands)
            note = "" if quantized else "the policy keeps every role of this op in fp32"
            if (module, op, index) in self.clip_exempt:
                note = "WRPN's clip formats (uniform) apply to weight layers only: those roles stay fp32"
            rec = self.records[(module, op, index)] = OpRecord(
                module, op, "op emulation" if quantized else "unquantized", operands, note, index=index)
        rec.calls += 1

    def _record_layer(self, name: str, module: QuantizedModule) -> None:
        if self.records is None:
            return
        op, operands = layer_operands(module)
        rec = self.records.setdefault((name, op, 0), OpRecord(name, op, "layer swap", operands))
        rec.calls += 1
        if not rec.quantized:
            rec.path, rec.note = "unquantized", "the policy keeps every role of this layer in fp32"

    def _on_backward(self, module: str, op: str, index: int) -> Callable[[], None] | None:
        if self.records is None:
            return None
        records = self.records

        def mark() -> None:
            if (module, op, index) in records:
                records[(module, op, index)].backward = True

        return mark

    def _unquantized(self, module: str, inv: Invocation, index: int) -> None:
        where = f"{module or '(root)'}: {inv.op}"
        if self.records is not None:
            rec = self.records.setdefault(
                (module, inv.op, index),
                OpRecord(module, inv.op, "unquantized", [OperandRecord(n, "-", "fp32") for n in inv.names],
                         f"not quantized: {inv.unsupported}", index=index))
            rec.calls += 1
        self._warn_once(f"{where} runs unquantized, in fp32: {inv.unsupported}")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"lowprec: {message}", UserWarning, stacklevel=5)

    def _warn_uncovered(self, root_name: str, root: nn.Module) -> None:
        names = {id(p): n for n, p in root.named_parameters()}
        self.layer_parameters = sorted(names[i] for i in self._weights if i in names)
        self.rounded_parameters = {names[i]: uses for i, uses in self._rounded.items() if i in names}
        if self._checking:
            self.fill_pending = False
            self._warn_zero_clip_weights(root)
        missing = sorted(names[i] for i in self._used.keys() - self._covered if i in names)
        if self.records is not None:
            for n in missing:
                self.records.setdefault(("param", n, 0), OpRecord(
                    n.rpartition(".")[0], f"parameter {n.rpartition('.')[2]}", "unquantized",
                    [OperandRecord(n, "-", "fp32")], "used by no quantized op (transformed before use, used "
                    "elementwise by another module, or by an op lowprec does not quantize)", calls=1))
        for message in self._edges.messages(names):
            self._warn_once(message)
        fresh = [n for n in missing if n not in self._warned]
        if fresh:
            self._warned.update(fresh)
            warnings.warn(
                "lowprec: these parameters reach no quantized op and run unquantized, in fp32: "
                f"{', '.join(fresh)} (lp.plan shows every op and its formats)", UserWarning, stacklevel=3)

    @torch.no_grad()
    def _warn_zero_clip_weights(self, root: nn.Module) -> None:
        """After the first forward: name the weights of functional ops that WRPN's uniform<k> mostly rounds to 0
        (convert names the swapped layers' before)."""
        shares = {name: float((rounding(param.detach()) == 0).float().mean())
                  for name, param, rounding in self.clip_weights(root)}
        warn_zero_weights(
            shares, "lowprec", "weights of functional ops (the first forward showed them)",
            "lowprec.nn.fill_clip_range(model) now (scales each weight to reach +-1: a change of initialisation, for "
            "training from scratch), or fill_clip_range=on in the policy before the first forward (the wrpn presets' "
            "default)", stacklevel=3)


@torch.no_grad()
def _fill_clip_range(inv: Invocation, quantizers: dict[str, Quantizer]) -> None:
    """Scale each Parameter this op rounds to WRPN's signed uniform<k> as its weight (the whole parameter, of which
    the operand may be a view) so that its largest magnitude is 1 (``lowprec.nn.fill_clip_range``)."""
    if not clips_signed(quantizers["weight"]):
        return
    for t, role in zip(inv.tensors, inv.roles):
        if role == "weight" and is_parameter(t):
            param = t if isinstance(t, nn.Parameter) else t._base
            peak = param.abs().max()
            if peak > 0:
                param.div_(peak)


def attach(model: nn.Module, resolution: Resolution) -> OpEmulation:
    """Give ``model`` (already layer-swapped) op-level emulation under the plan ``resolution``; replaces any
    earlier one."""
    detach(model)
    emulation = OpEmulation(resolution)
    setattr(model, _ATTR, emulation)
    for name, module in model.named_modules():
        module.register_forward_pre_hook(functools.partial(emulation.enter, name))
        module.register_forward_hook(functools.partial(emulation.exit, name), always_call=True)
    model.register_state_dict_post_hook(functools.partial(emulation.save_to_metadata))
    model.register_load_state_dict_pre_hook(functools.partial(emulation.load_from_metadata))
    return emulation


def _is_ours(hook: Any) -> bool:
    return isinstance(hook, functools.partial) and isinstance(getattr(hook.func, "__self__", None), OpEmulation)


def detach(model: nn.Module) -> None:
    """Remove the op-level emulation ``attach`` gave ``model`` (no-op when it has none)."""
    for module in model.modules():
        remove_forward_hooks(module, _is_ours)
    remove_state_dict_hooks(model, _is_ours)
    if _ATTR in model.__dict__:
        delattr(model, _ATTR)


def emulation_of(model: nn.Module) -> OpEmulation | None:
    """The OpEmulation ``convert`` attached to ``model``, or None."""
    return model.__dict__.get(_ATTR)
