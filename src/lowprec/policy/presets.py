"""The named recipes of the four papers (and fp8), as policies."""

from __future__ import annotations

import re
from dataclasses import replace

from .policy import Policy

__all__ = ["preset", "is_preset", "PRESETS"]

_ALL = "params={f},activations={f},grads={f}"

PRESETS: dict[str, str] = {
    # no quantization at all: identical to plain PyTorch training
    "fp32": "",
    # Micikevicius et al.: fp16 storage of everything, fp32 master weights and optimizer state, loss scaling
    "mixed-fp16": _ALL.format(f="fp16") + ",loss_scale=dynamic",
    "mixed-bf16": _ALL.format(f="bf16"),
    # the same recipes on the native path: real fp16/bf16 tensors, fp32 master weights (lowprec.nn.native)
    "native-fp16": _ALL.format(f="fp16") + ",loss_scale=dynamic,path=native",
    "native-bf16": _ALL.format(f="bf16") + ",path=native",
    # Park et al.: dynamic fixed point everywhere, parameters stored in INT8 (no fp32 master)
    # (Park leave the exponent rule open: max-abs of each tensor, as Flexpoint / Das et al. whom they cite)
    "int8": _ALL.format(f="int8") + ",master=int8,optimizer_state=int8,classifier_rule=on,exponent_rule=maxabs",
    "int8-lazy": _ALL.format(f="int8")
    + ",master=int8,optimizer_state=int8,accumulator=int16,classifier_rule=on,exponent_rule=maxabs",
    "int16": _ALL.format(f="int16") + ",master=int16,optimizer_state=int16,exponent_rule=maxabs",
    # Courbariaux et al.: 20-bit fixed point (5 integer bits), and dynamic fixed point 10-bit propagation /
    # 12-bit update with the overflow-rate exponent rule. The authors start every exponent at 5 and adapt them
    # in a 2-epoch full-precision warm-up (Trainer.warmup_exponents); the preset starts each group at the
    # max-abs exponent of the first tensor it sees instead, so it trains without one (init_int_bits=5 and a
    # warm-up give the authors' procedure).
    "fixed-20": _ALL.format(f="fixed<20,14>") + ",master=fixed<20,14>,optimizer_state=fixed<20,14>",
    "dfx-10-12": _ALL.format(f="dfx<10>") + ",master=dfx<12>,optimizer_state=dfx<10>"
    ",exponent_rule=overflow,max_overflow_rate=1e-4,exponent_interval=100,init_int_bits=auto",
    # fp8: e4m3 forward, e5m2 gradients (the usual hybrid), or one of them for everything
    "fp8-hybrid": "params=e4m3,activations=e4m3,grads=e5m2,loss_scale=dynamic",
    "fp8-e4m3": _ALL.format(f="e4m3") + ",loss_scale=dynamic",
    "fp8-e5m2": _ALL.format(f="e5m2") + ",loss_scale=dynamic",
    # Scaled formats (beyond the papers; docs/formats.md "Scaled formats"). Per-tensor scaled fp8, e4m3 forward
    # and e5m2 gradients: current scaling (torchao's tensorwise recipe) or Transformer Engine's HYBRID delayed
    # scaling (amax history 1024, max). The scale does what a loss scale would: none.
    "fp8-current": "params=scaled<e4m3>,activations=scaled<e4m3>,grads=scaled<e5m2>",
    "fp8-delayed": "params=scaled<e4m3,delayed>,activations=scaled<e4m3,delayed>,grads=scaled<e5m2,delayed>",
    # OCP MX, blocks of 32 along each tensor's last dimension (a linear layer's input features; a convolution's
    # channels): MXFP8 as Transformer Engine's MXFP8BlockScaling (e4m3 everywhere, RCEIL scales); MXFP6 with
    # e2m3 forward and e3m2 gradients and MXFP4 (gradients rounded stochastically), both with the spec's scales.
    "mxfp8": _ALL.format(f="mxfp8_e4m3<scale=rceil>"),
    "mxfp6": "params=mxfp6_e2m3,activations=mxfp6_e2m3,grads=mxfp6_e3m2",
    "mxfp4": "params=mxfp4,activations=mxfp4,grads=mxfp4/stochastic",
    # NVFP4 (NVIDIA's recipe): 16x16 block scales for weights, 1x16 for activations and gradients, gradients
    # rounded stochastically, the last layer kept in bf16. (The recipe's random Hadamard transform of the
    # weight-gradient GEMM's operands is not emulated.)
    "nvfp4": "weight=nvfp4<tile=16x16>,bias=nvfp4,activations=nvfp4,grads=nvfp4/stochastic; "
             "@last: " + _ALL.format(f="bf16"),
}


def _wrpn(weight_bits: int, act_bits: int) -> str:
    """Mishra et al.: k-bit weights on [-1,1], k-bit activations on [0,1], fp32 shadow weights and gradients,
    first and last layer full precision. 32 bits means not quantized."""
    parts = []
    if weight_bits != 32:
        parts.append(f"weight=uniform<{weight_bits}>")
    if act_bits != 32:
        parts.append(f"activation=uniform<{act_bits},unsigned>")
    return ",".join(parts) + "; @first: weight=none,activation=none; @last: weight=none,activation=none"


_WRPN = re.compile(r"wrpn-(\d+)-(\d+)")


def is_preset(name: str) -> bool:
    """Whether ``name`` names a preset (a fixed one or any wrpn-<w>-<a>)."""
    return name in PRESETS or _WRPN.fullmatch(name) is not None


def preset(name: str) -> Policy:
    """The policy of a named recipe; ValueError listing the names for anything else."""
    wrpn = _WRPN.fullmatch(name)
    if wrpn:
        w, a = int(wrpn[1]), int(wrpn[2])
        if not (1 <= w <= 16 or w == 32) or not (1 <= a <= 16 or a == 32):
            raise ValueError(f"WRPN bit widths must be 1..16 or 32, got {name!r}")
        spec = _wrpn(w, a)
    elif name in PRESETS:
        spec = PRESETS[name]
    else:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}, wrpn-<w>-<a> (e.g. wrpn-4-4)")
    return replace(Policy.parse(spec), name=name)
