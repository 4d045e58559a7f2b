"""Quantized layers: torch layers whose forward and backward round each tensor role per a policy.

Each class subclasses the torch layer it replaces (``QLinear`` is an ``nn.Linear``): same constructor, same
parameter names and shapes, so state dicts and optimizers carry over (a converted model's state dict has exactly
the plain model's keys; each layer's quantizer state rides in the state dict's metadata, see QuantizedModule).
The extra keyword ``policy`` (a Policy, preset name or policy string; default fp32) sets the roles;
``lowprec.convert`` builds them from existing layers instead and resolves overrides, ``@first``/``@last`` and
the classifier rule per module.

Every layer holds ``policy`` (its resolved Policy) and ``quantizers`` (role -> Quantizer, all LAYER_ROLES;
roles the layer does not have are identities; ``"accumulation"`` too where the policy emulates a narrow
accumulator). A layer whose quantizers are all identities runs the torch layer's own forward: bit for bit
the unconverted layer.

Where each role applies:

* QLinear, QConv1d, QConv2d: all eight roles, through QLinearFunction / QConvFunction (functions.py).
  Accumulation emulation (the ``accumulation`` role) covers QLinear; convolutions accumulate in float32.
* QBatchNorm1d/2d (Park et al.): activation on the input, output on the result, output_grad and
  activation_grad at the same two boundaries; statistics, normalisation and the affine parameters stay
  float32 (MPT: reductions in fp32). WRPN's clip formats (Uniform) are not applied here: they replace the ReLU
  in front of a weight layer and would clip batch-norm's signed input.
* QEmbedding: weight (the table, once per forward) and output; weight_grad and output_grad in backward.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..policy import LAYER_ROLES, Policy, Quant, Quantizer, Role, as_policy
from ..policy.roles import ALIASES
from .functions import ConvOp, QConvFunction, QLinearFunction, quantize_boundary
from .packed import recomputable
from .roles import Accumulator, clips_negatives

__all__ = [
    "QuantizedModule", "QLinear", "QConv1d", "QConv2d", "QBatchNorm1d", "QBatchNorm2d", "QEmbedding",
]

_EXTRA_STATE = "_extra_state"  # torch's state-dict key suffix for get_extra_state()
_METADATA_KEY = "lowprec_quantizers"  # a layer's quantizer state in the state dict's _metadata


class QuantizedModule:
    """Mixin of every quantized layer (put first in the bases, before the torch layer)."""

    #: The roles this layer's op has; the others stay identities whatever the policy says.
    OP_ROLES: tuple[str, ...] = LAYER_ROLES
    #: Whether the layer's matmuls emulate the policy's ``accumulation`` role.
    ACCUMULATES: bool = False
    #: Whether the layer counts for @first/@last (weight layers do; batch-norm does not).
    COUNTS_AS_LAYER: bool = True
    #: Whether the activation role always sees signed values (a recurrent layer's tanh hidden state).
    SIGNED_INPUTS: bool = False
    #: The layer's name in the model it was converted in (messages); empty for a layer built directly.
    layer_name: str = ""

    policy: Policy
    quantizers: dict[str, Quantizer]
    accumulator: Accumulator | None

    def __init__(self, *args: Any, policy: Policy | str = "fp32", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        resolved = as_policy(policy).for_module("")
        self.check_supported(self, resolved)
        self.configure(resolved)

    # -- conversion -----------------------------------------------------------------------------------------
    @classmethod
    def check_supported(cls, module: nn.Module, policy: Policy) -> None:
        """Raise (NotImplementedError) if ``module`` cannot run quantized under ``policy``; before adopt()."""

    @classmethod
    def quantizes_under(cls, policy: Policy) -> bool:
        """Whether a resolved module policy sets any role this layer has."""
        roles = cls.OP_ROLES + (("accumulation",) if cls.ACCUMULATES else ())
        return any(policy.get(role) is not None for role in roles)

    @classmethod
    def adopt(cls, module: nn.Module, policy: Policy) -> QuantizedModule:
        """Turn ``module`` (an instance of the torch layer this class extends) into this class, in place:
        its parameters, buffers and hooks stay the same objects."""
        module.__class__ = cls
        module.configure(policy)  # type: ignore[attr-defined]
        return module  # type: ignore[return-value]

    def configure(self, policy: Policy) -> None:
        """Build the quantizers of a resolved module policy (fresh dynamic-fixed-point exponents)."""
        self.policy = policy
        self.quantizers = {role: Quantizer(self._role_quant(role), policy, forward=not Role(role).gradient)
                           for role in LAYER_ROLES}
        self.accumulator = None
        # WRPN's unsigned activation clip, until the first input has been checked for negative values
        activation = self.quantizers["activation"]
        self._unchecked_clip = activation.quant if clips_negatives(activation) else None
        if self.ACCUMULATES and policy.get("accumulation") is not None:
            self.quantizers["accumulation"] = Quantizer(policy.get("accumulation"), policy)
            self.accumulator = Accumulator(self.quantizers["accumulation"], policy.accumulation_chunk)

    def _role_quant(self, role: str) -> Quant | None:
        if role not in self.OP_ROLES or (Role(role).bias and not self._has_bias()):
            return None
        return self.policy.get(role)

    def _has_bias(self) -> bool:
        return getattr(self, "bias", None) is not None

    def _check_input_sign(self, x: Tensor) -> None:
        """Once per configuration, when the activation role is WRPN's unsigned clip to [0, 1]: warn if the input
        has negative values (it is not a ReLU's output, e.g. a LayerNorm's), which the clip turns into 0."""
        clip, self._unchecked_clip = self._unchecked_clip, None
        negative = float((x.detach() < 0).float().mean()) if x.numel() else 0.0
        if negative > 0:
            warnings.warn(
                f"lowprec: layer {self.layer_name or type(self).__name__!r} quantizes its input with "
                f"{clip}, WRPN's clip to [0, 1] meant for a ReLU's output, but "
                f"{100 * negative:.1f}% of its input is negative (a signed input, e.g. a LayerNorm's output): the "
                "clip turns those values into 0. Fix: put a ReLU in front of it, or give it a signed format or "
                f"none (an override '{self.layer_name or '<name>'}: activation=uniform<k>' or 'activation=none')",
                UserWarning,
                stacklevel=3,
            )

    def parameter_roles(self) -> dict[str, str]:
        """Each parameter the layer rounds before using it, and the role that rounds it (weight or bias)."""
        return {n: n for n in ALIASES["params"] if n in self.OP_ROLES and getattr(self, n, None) is not None}

    @property
    def quantizing(self) -> bool:
        """False when every role is an identity: the layer then runs the plain torch forward."""
        return any(q.enabled for q in self.quantizers.values())

    # -- state: the quantizers' exponents travel in the state dict's metadata, not in its keys ----------------
    # A converted model's state_dict() has exactly the plain model's keys (it loads into the unconverted model
    # with strict=True); each layer's quantizer state (dfx exponents and their statistics) rides in the state
    # dict's ``_metadata`` entry of that layer, which torch.save, copy.deepcopy and load_state_dict carry.
    def _quantizer_state(self) -> dict[str, Any]:
        return {role: q.state_dict() for role, q in self.quantizers.items()}

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})[_METADATA_KEY] = self._quantizer_state()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore quantizer state saved under the ``<layer>._extra_state`` key (earlier lowprec versions)."""
        if set(state) != set(self.quantizers):
            raise ValueError(
                f"the checkpoint has quantizers for {sorted(state)}, this layer has {sorted(self.quantizers)} "
                "(was it converted under another policy?)"
            )
        for role, s in state.items():
            self.quantizers[role].load_state_dict(s)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # A state dict of the unconverted model has no quantizer state: keep the fresh quantizers.
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + _EXTRA_STATE
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)
        if _METADATA_KEY in local_metadata:
            self.set_extra_state(local_metadata[_METADATA_KEY])

    def extra_repr(self) -> str:
        roles = ", ".join(f"{role}={q.quant}" for role, q in self.quantizers.items() if q.enabled)
        return super().extra_repr() + f", quantized: {roles or 'nothing'}"  # type: ignore[misc]


class QLinear(QuantizedModule, nn.Linear):
    """``nn.Linear`` with quantized roles (QLinearFunction) and optional accumulation emulation.

    ``rht_seed``: the policy's ``rht_seed`` where its ``wgrad_rht`` is on and the layer's activation or
    output_grad role has a scaled format (the weight gradient through the random Hadamard transform,
    ``lowprec.nn.hadamard``), else None: a layer an override keeps in bf16 or fp32 computes it plainly, as in
    NVIDIA's NVFP4 recipe."""

    ACCUMULATES = True
    rht_seed: int | None = None

    def configure(self, policy: Policy) -> None:
        super().configure(policy)
        scaled = any((q := self.quantizers[r].quant) is not None and q.format.scaled
                     for r in ("activation", "output_grad"))
        self.rht_seed = policy.rht_seed if policy.wgrad_rht and scaled else None

    def forward(self, input: Tensor) -> Tensor:
        if not self.quantizing:
            return super().forward(input)
        if self._unchecked_clip is not None:
            self._check_input_sign(input)
        return QLinearFunction.apply(input, self.weight, self.bias, self.quantizers, self.accumulator,
                                     self.rht_seed)


class _QConv(QuantizedModule):
    """Shared forward of QConv1d/QConv2d: non-zero padding modes and string padding become an explicit
    ``F.pad`` of the input (as torch does), then QConvFunction with integer padding.

    Block formats (MX, NVFP4) and rowwise scaling run along the channel dimension (dim 1 of the input, the weight,
    the output and their gradients): the reduction dimension of the convolution as an implicit GEMM over
    channels-last data, as fp8/fp4 convolution kernels lay it out."""

    def configure(self, policy: Policy) -> None:
        super().configure(policy)
        for quantizer in self.quantizers.values():
            quantizer.block_axis = 1

    def forward(self, input: Tensor) -> Tensor:
        if not self.quantizing:  # a full-precision layer (WRPN's first): what it made is computed again in
            y = super().forward(input)  # type: ignore[misc]  # backward where a later op saves it
            recomputable(y, self._conv_forward, input, self.weight, self.bias)  # type: ignore[attr-defined]
            return y
        if self._unchecked_clip is not None:
            self._check_input_sign(input)
        dim = len(self.kernel_size)
        unbatched = input.dim() == dim + 1
        x = input.unsqueeze(0) if unbatched else input
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * dim
        op = ConvOp(dim, self.stride, padding, self.dilation, self.groups)
        y = QConvFunction.apply(x, self.weight, self.bias, self.quantizers, op)
        return y.squeeze(0) if unbatched else y


class QConv1d(_QConv, nn.Conv1d):
    """``nn.Conv1d`` with quantized roles (QConvFunction)."""


class QConv2d(_QConv, nn.Conv2d):
    """``nn.Conv2d`` with quantized roles (QConvFunction)."""


class _QBatchNorm(QuantizedModule):
    """Batch-norm between quantized boundaries; the normalisation itself is torch's, in float32."""

    OP_ROLES = Role.select(layer=True, parameter=False)
    COUNTS_AS_LAYER = False

    def _role_quant(self, role: str) -> Quant | None:
        quant = super()._role_quant(role)
        return None if quant is not None and quant.format.clip_range is not None else quant

    def forward(self, input: Tensor) -> Tensor:
        if not self.quantizing:
            return super().forward(input)  # type: ignore[misc]
        # the normalisation only reads its rounded input: an input already on the activation grid (a convolution's
        # rounded output) is shared, not copied (QuantizeFunction's ``share``)
        x = quantize_boundary(input, self.quantizers, "activation", "activation_grad", share=True)
        return quantize_boundary(super().forward(x), self.quantizers, "output", "output_grad")  # type: ignore[misc]


class QBatchNorm1d(_QBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with quantized input and output (Park et al.); statistics in float32."""


class QBatchNorm2d(_QBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with quantized input and output (Park et al.); statistics in float32."""


class QEmbedding(QuantizedModule, nn.Embedding):
    """``nn.Embedding`` whose table is quantized (weight role) before the lookup, and its output (output
    role); weight_grad rounds the (dense) table gradient. ``sparse=True`` is not supported when quantizing."""

    OP_ROLES = ("weight", "output", "output_grad", "weight_grad")  # no activation: the input is indices

    @classmethod
    def check_supported(cls, module: nn.Module, policy: Policy) -> None:
        if module.sparse and cls.quantizes_under(policy):
            raise NotImplementedError(
                "a quantized Embedding needs dense gradients: build it with sparse=False, or keep it in fp32 "
                "with a per-module override (e.g. '<name>: weight=none,output=none,grads=none')"
            )

    def forward(self, input: Tensor) -> Tensor:
        if not self.quantizing:
            return super().forward(input)
        if self.max_norm is not None:  # renormalise the stored table, as F.embedding does
            with torch.no_grad():
                torch.embedding_renorm_(self.weight, input.contiguous(), self.max_norm, self.norm_type)
        weight = quantize_boundary(self.weight, self.quantizers, "weight", "weight_grad")
        y = F.embedding(input, weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq)
        return quantize_boundary(y, self.quantizers, "output", "output_grad")
