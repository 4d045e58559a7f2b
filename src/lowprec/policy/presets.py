"""The named recipes of the four papers (and fp8), as policies."""

from __future__ import annotations

import re
from dataclasses import replace

from .policy import Policy

__all__ = ["preset", "is_preset", "PRESETS"]

_ALL = "params={f},activations={f},grads={f}"


def _dfx(prop_bits: int, update_bits: int) -> str:
    """Courbariaux's dynamic fixed point: every layer role and the momentum in dfx<prop_bits>, the stored
    parameters in dfx<update_bits> (bit counts include the sign), overflow-rate exponents (see PRESETS)."""
    return (_ALL.format(f=f"dfx<{prop_bits}>") + f",master=dfx<{update_bits}>,optimizer_state=dfx<{prop_bits}>"
            ",exponent_rule=overflow,max_overflow_rate=1e-4,exponent_interval=10,init_int_bits=auto"
            ",update_rule=courbariaux")


def _gemms(weight: str, activation: str, gradient: str, settings: str = "") -> str:
    """A scaled-format recipe as practice runs it (Transformer Engine, torchao's float8, NVIDIA's NVFP4 recipe): the
    low format for the GEMMs' operands only, the weight and activation in forward and the output gradient in
    backward (the operand of both backward GEMMs), and bf16 for everything else: the GEMMs' results (output,
    activation_grad, weight_grad), biases, and the norms, embeddings and a module's own parameters used
    elementwise (a hand-written RMSNorm's weight) in every role. A norm's gamma near 1 would otherwise sit still
    on a coarse grid (MXFP4 rounds every gamma in [0.75, 1.5) to 1) and a residual stream would be kept in 4 bits."""
    rest = ",".join(f"{role}=bf16" for role in ("bias", "output", "activation_grad", "weight_grad", "bias_grad"))
    others = "".join(f"; op:{kind}: " + _ALL.format(f="bf16") for kind in ("norm", "embedding", "elementwise"))
    return f"weight={weight},activation={activation},output_grad={gradient},{rest}{settings}{others}"


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
    # 12-bit update with the overflow-rate exponent rule (max rate 0.01 %). The authors start every exponent at
    # 5, adapt them in a 2-epoch full-precision warm-up (Trainer.warmup_exponents) and then move them every 100
    # batches. The preset starts each group at the max-abs exponent of the first tensor it sees instead and
    # moves it every 10 batches: a fresh network's layer outputs grow by about two binades in their first ~30
    # batches, which an exponent moving one binade per 100 batches cannot follow (the logits saturate and
    # LeNet or the PI-MNIST maxout MLP stop learning; docs/training.md). init_int_bits=5,exponent_interval=100
    # and a warm-up give the authors' procedure.
    # Their update applies the rounded velocity: v <- Q(M v - LR g), W <- Q(W + v) (update_rule=courbariaux).
    "fixed-20": _ALL.format(f="fixed<20,14>") + ",master=fixed<20,14>,optimizer_state=fixed<20,14>"
    ",update_rule=courbariaux",
    "dfx-10-12": _dfx(10, 12),  # and any dfx-<p>-<u>
    # fp8: e4m3 forward, e5m2 gradients (the usual hybrid), or one of them for everything
    "fp8-hybrid": "params=e4m3,activations=e4m3,grads=e5m2,loss_scale=dynamic",
    "fp8-e4m3": _ALL.format(f="e4m3") + ",loss_scale=dynamic",
    "fp8-e5m2": _ALL.format(f="e5m2") + ",loss_scale=dynamic",
    # Scaled formats (beyond the papers; docs/formats.md "Scaled formats"), the GEMMs' operands only (_gemms: the
    # rest in bf16). Per-tensor scaled fp8, e4m3 forward
    # and e5m2 gradients: current scaling (torchao's tensorwise recipe) or Transformer Engine's HYBRID delayed
    # scaling (amax history 1024, max). The scale does what a loss scale would: none.
    "fp8-current": _gemms("scaled<e4m3>", "scaled<e4m3>", "scaled<e5m2>"),
    "fp8-delayed": _gemms("scaled<e4m3,delayed>", "scaled<e4m3,delayed>", "scaled<e5m2,delayed>"),
    # OCP MX, blocks of 32 along each tensor's last dimension (a linear layer's input features; a convolution's
    # channels): MXFP8 as Transformer Engine's MXFP8BlockScaling (e4m3 everywhere, RCEIL scales); MXFP6 with
    # e2m3 forward and e3m2 gradients and MXFP4 (gradients rounded stochastically), both with the spec's scales.
    "mxfp8": _gemms(*["mxfp8_e4m3<scale=rceil>"] * 3),
    "mxfp6": _gemms("mxfp6_e2m3", "mxfp6_e2m3", "mxfp6_e3m2"),
    "mxfp4": _gemms("mxfp4", "mxfp4", "mxfp4/stochastic"),
    # NVFP4 (NVIDIA's recipe): 16x16 block scales for weights, 1x16 for activations and gradients, gradients
    # rounded stochastically, the weight-gradient GEMM's operands through the 16x16 random Hadamard transform
    # (wgrad_rht, seed 0), the last layer kept in bf16 (more of the last layers: an override, docs/formats.md).
    "nvfp4": _gemms("nvfp4<tile=16x16>", "nvfp4", "nvfp4/stochastic", ",wgrad_rht=on") + "; @last: "
    + _ALL.format(f="bf16"),
}


def _wrpn(weight_bits: int, act_bits: int) -> str:
    """Mishra et al.: k-bit weights on [-1,1], k-bit activations on [0,1], fp32 shadow weights and gradients,
    first and last layer full precision. 32 bits means not quantized. WRPN trains from scratch: convert
    scales the initial weights to fill the clip range (fill_clip_range=on), else most round to 0."""
    parts = []
    if weight_bits != 32:
        parts.append(f"weight=uniform<{weight_bits}>,fill_clip_range=on")
    if act_bits != 32:
        parts.append(f"activation=uniform<{act_bits},unsigned>")
    return ",".join(parts) + "; @first: weight=none,activation=none; @last: weight=none,activation=none"


_WRPN = re.compile(r"wrpn-(\d+)-(\d+)")
_DFX = re.compile(r"dfx-(\d+)-(\d+)")


def is_preset(name: str) -> bool:
    """Whether ``name`` names a preset (a fixed one, any wrpn-<w>-<a> or dfx-<p>-<u>)."""
    return name in PRESETS or any(p.fullmatch(name) is not None for p in (_WRPN, _DFX))


def preset(name: str) -> Policy:
    """The policy of a named recipe; ValueError listing the names for anything else."""
    wrpn, dfx = _WRPN.fullmatch(name), _DFX.fullmatch(name)
    if wrpn:
        w, a = int(wrpn[1]), int(wrpn[2])
        if not (1 <= w <= 16 or w == 32) or not (1 <= a <= 16 or a == 32):
            raise ValueError(f"WRPN bit widths must be 1..16 or 32, got {name!r}")
        spec = _wrpn(w, a)
    elif name in PRESETS:
        spec = PRESETS[name]
    elif dfx:
        p, u = int(dfx[1]), int(dfx[2])
        if not (2 <= p <= 32 and 2 <= u <= 32):
            raise ValueError(f"dfx-<p>-<u> bit widths (propagation p, update u, sign included) must be 2..32, "
                             f"got {name!r}")
        spec = _dfx(p, u)
    else:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}, wrpn-<w>-<a> (e.g. wrpn-4-4), "
                         "dfx-<p>-<u> (e.g. dfx-8-12)")
    return replace(Policy.parse(spec), name=name)
