"""Outside checks of the scaled formats (MX, NVFP4, scaled<...>) and their presets: what each GEMM operand of a
model lowprec never saw really holds (seen at the aten level by a dispatch mode, independent of lowprec's own
records), the scales at float32's edges, @first/@last on a functional head, half containers, and the MX scale
rules against gfloat."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowprec as lp
from lowprec.formats import MXFormat
from test_scaled_formats import bits

aten = torch.ops.aten

#: MXFP4 in every role (the mxfp4 preset rounds only the GEMMs' operands; these tests read results too)
MXFP4_EVERY_ROLE = "params=mxfp4,activations=mxfp4,grads=mxfp4/stochastic"


class GemmOperands(TorchDispatchMode):
    """Records the float32 operands of every aten GEMM run inside it: (op, operand index, tensor)."""

    GEMMS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
             aten.baddbmm.default: (1, 2), aten.convolution.default: (0, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for i in self.GEMMS.get(func, ()):
            self.seen.append((str(func), i, args[i].detach().clone()))
        return func(*args, **(kwargs or {}))


def forward_operands(model: nn.Module, *inputs: torch.Tensor) -> list[tuple[str, int, torch.Tensor]]:
    with torch.no_grad(), GemmOperands() as mode:
        model(*inputs)
    return mode.seen


def along(x: torch.Tensor, axis: int) -> list[int]:
    return bits(lp.quantize(x.contiguous(), MXFormat("e2m1", axis=axis)))


def spread(*shape: int) -> torch.Tensor:
    """Values whose magnitude changes by 10^4 along dim -2 and by 10^2 along dim -1: a block along either
    dimension gets other scales than one along the other."""
    return (torch.randn(*shape) * torch.logspace(-2, 2, shape[-2])[:, None]
            * torch.logspace(-1, 1, shape[-1]))


class FunctionalConv(nn.Module):
    """A convolution called functionally in forward (``fn(x, self.w)``), with a copy of ``w`` as its Parameter."""

    def __init__(self, fn, w: torch.Tensor) -> None:
        super().__init__()
        self.fn, self.w = fn, nn.Parameter(w.clone())

    def forward(self, x):
        return self.fn(x, self.w)


class Products(nn.Module):
    """The products of hand-written attention and of a weight stored (in, out), as GPT-2's Conv1D stores it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(spread(64, 48))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(q @ k.transpose(-2, -1), -1)
        return (p @ v).sum() + (q[0] @ self.w).sum() + torch.addmm(self.w[0], q[0], self.w).sum()


def test_mx_blocks_of_a_products_second_operand_run_along_its_reduction_dimension():
    """x @ W reduces over W's dim -2 (rows of a weight stored (in, out), K^T's head dimension, V's sequence):
    an MX block must run along it, as the hardware GEMM reads it; blocks along dim -1 (the output columns)
    gave each product a scale per output column instead."""
    torch.manual_seed(0)
    q, k, v = spread(2, 16, 64), spread(2, 16, 64), spread(2, 16, 64)
    model = lp.convert(Products(), MXFP4_EVERY_ROLE)
    seen = forward_operands(model, q, k, v)
    assert [(op, i) for op, i, _ in seen] == [("aten.bmm.default", 0), ("aten.bmm.default", 1)] * 2 + [
        ("aten.mm.default", 0), ("aten.mm.default", 1), ("aten.addmm.default", 1), ("aten.addmm.default", 2)]
    qk, kt, _, v_seen, x_mm, w_mm, x_add, w_add = (t for _, _, t in seen)
    assert bits(qk) == along(q, -1)
    assert bits(kt) == along(k.transpose(-2, -1), -2)  # K's head dimension
    assert bits(v_seen) == along(v, -2)  # V's sequence dimension, the reduction of P @ V
    assert bits(x_mm) == along(q[0], -1) and bits(x_add) == along(q[0], -1)
    assert bits(w_mm) == along(model.w.detach(), -2) and bits(w_add) == along(model.w.detach(), -2)


def test_mx_blocks_of_scaled_dot_product_attention_run_along_each_products_reduction():
    """F.scaled_dot_product_attention: S = Q K^T reduces over the head dimension (Q's and K's last), O = P V
    over the keys (V's dim -2)."""
    torch.manual_seed(0)
    q, k, v = spread(2, 16, 32), spread(2, 16, 32), spread(2, 16, 32)

    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    seen = forward_operands(lp.convert(Attention(), MXFP4_EVERY_ROLE), q, k, v)
    assert len(seen) == 4
    assert bits(seen[0][2]) == along(q, -1) and bits(seen[1][2]) == along(k.transpose(-2, -1), -2)
    assert bits(seen[3][2]) == along(v, -2)


def test_mx_blocks_of_an_einsum_run_along_its_contracted_index():
    torch.manual_seed(0)
    p, v = spread(2, 16, 16).softmax(-1), spread(2, 16, 32)

    class Mix(nn.Module):
        def forward(self, p, v):
            return torch.einsum("bqk,bkd->bqd", p, v)

    seen = forward_operands(lp.convert(Mix(), MXFP4_EVERY_ROLE), p, v)
    assert bits(seen[0][2].reshape(p.shape)) == along(p, -1)
    assert bits(seen[1][2].reshape(v.shape)) == along(v, -2)


def test_mx_blocks_of_a_functional_convolution_run_along_channels_as_a_converted_conv2d():
    """F.conv2d called in a forward is blocked along the channel dimension, as QConv2d (what convert makes of
    nn.Conv2d) blocks it, not along the image width."""
    torch.manual_seed(0)
    x, w = spread(2, 40, 6, 6), spread(8, 40, 3, 3)

    layer = nn.Conv2d(40, 8, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    functional_model = lp.convert(FunctionalConv(F.conv2d, w), MXFP4_EVERY_ROLE)
    swapped_model = lp.convert(layer, MXFP4_EVERY_ROLE)
    functional = forward_operands(functional_model, x)
    swapped = forward_operands(swapped_model, x)
    assert bits(functional[0][2]) == bits(swapped[0][2]) == along(x, 1)
    assert bits(functional[1][2]) == bits(swapped[1][2]) == along(w, 1)
    # and backward: the output gradient, the input's and the weight's gradients blocked as the layer blocks them
    g = spread(2, 8, 4, 4)
    grads = []
    for net in (functional_model, swapped_model):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(1)  # stochastic gradients: the same bits for both
        net(leaf).backward(g)
        grads.append((leaf.grad, next(net.parameters()).grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])



def test_mx_blocks_of_a_transposed_convolution_run_along_its_input_channels():
    """conv_transpose2d reduces over the input channels: dim 1 of its input, dim 0 of its weight (in, out, kh, kw);
    blocks along the weight's last dimension (the kernel width) mixed input channels' scales."""
    torch.manual_seed(0)
    x, w = spread(2, 40, 5, 5), spread(40, 6, 3, 3)

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(40, 6, 3, bias=False)
            with torch.no_grad():
                self.up.weight.copy_(w)

        def forward(self, x):
            return self.up(x)

    seen = forward_operands(lp.convert(Up(), MXFP4_EVERY_ROLE), x)
    assert [(op, i) for op, i, _ in seen] == [("aten.convolution.default", 0), ("aten.convolution.default", 1)]
    assert bits(seen[0][2]) == along(x, 1)
    assert bits(seen[1][2]) == along(w, 0)


def test_mx_blocks_of_an_unbatched_functional_convolution_run_along_its_channels():
    """F.conv1d of an unbatched (C, L) input: the channels are dim 0 of the input and of the result; they were
    blocked along the length (dim -1), where the converted Conv1d (which adds the batch dimension) blocks along
    the channels. Forward operands, the result (seen by the next product) and the input's gradient."""
    torch.manual_seed(0)
    x, w = spread(40, 7), spread(48, 40, 3)

    model = lp.convert(FunctionalConv(F.conv1d, w), MXFP4_EVERY_ROLE)
    seen = forward_operands(model, x)
    assert bits(seen[0][2]) == along(x, 0) and bits(seen[1][2]) == along(w, 1)
    y = model(x)
    assert bits(y) == along(F.conv1d(lp.quantize(x, MXFormat("e2m1", axis=0)),
                                     lp.quantize(w, MXFormat("e2m1", axis=1))), 0)
    swapped = lp.convert(nn.Conv1d(40, 48, 3, bias=False), MXFP4_EVERY_ROLE)
    with torch.no_grad():
        swapped.weight.copy_(w)
    assert bits(swapped(x)) == bits(y)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = spread(48, 5)
    for net, leaf in ((swapped, xs), (model, xf)):
        torch.manual_seed(1)  # the gradients round stochastically: the same bits for both
        net(leaf).backward(g)
    assert torch.equal(xf.grad, xs.grad)  # the same values (the two convolution kernels may differ in -0)

# -- scales at the edges of float32 ----------------------------------------------------------------------------------

def test_pow2_current_scale_of_a_narrow_element_is_a_power_of_two_when_max_over_amax_is_subnormal():
    """float<e=2,m=1> (largest value 3) scaled for an amax of 3e38: s = fl(3 / 3e38) is a float32 subnormal; pow2
    rounds it down to the power of two below it (2**-127 here), where clearing the fraction bits gave 0 and the
    call failed with "a scale must be positive and finite" although no scale was passed."""
    x = torch.tensor([3.0e38, 1.0, -2.0e38, 2.0**-127 * 3])
    s = float(torch.tensor(3.0) / x[0])  # float32 division, as the format computes it
    assert 0 < s < 2.0**-126
    want_s = 2.0 ** math.floor(math.log2(s))
    assert want_s == 2.0**-127
    got = lp.quantize(x, "scaled<float<e=2,m=1>,pow2>")
    assert bits(got) == bits(lp.quantize(x, "scaled<float<e=2,m=1>>", scale=want_s))
    # the element (values 0.5, 1, 1.5, 2, 3) rounds x * 2**-127 (exact): 3e38 -> 1.763 -> 2, whose 2 * 2**127 is
    # beyond float32 (FLT_MAX, below); -2e38 -> -1.175 -> -1; 1 and 3 * 2**-127 -> 0
    assert got.tolist() == [3.4028234663852886e38, 0.0, -(2.0**127), 0.0]


def test_scaled_float_never_turns_a_finite_value_into_inf():
    """y = fl(q / s) saturates at +-FLT_MAX, as the element saturates (satfinite): amax within half an element
    step of 2**128 rounds up to a q whose q / s is beyond float32; it was +-inf."""
    top = 3.4028234663852886e38
    for name, x in [("scaled<e4m3>", [top, -top, 1.0]), ("scaled<e4m3,pow2>", [top, -1.0]),
                    ("scaled<float<e=3,m=0>,pow2>", [3.0e38, -3.0e38]), ("scaled<e5m2,rowwise>", [[top, 2.0]])]:
        y = lp.quantize(torch.tensor(x), name)
        assert torch.isfinite(y).all(), (name, y)
        assert y.abs().max() == top
    # +-inf inputs saturate to +-max / s (here amax 1: s = 448), NaN stays
    y = lp.quantize(torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0]), "scaled<e4m3>")
    assert y[:2].tolist() == [1.0, -1.0] and bool(torch.isnan(y[2]))


def test_delayed_scale_with_a_large_margin_stays_positive():
    """s = fl(fl(448 / amax) / 2**margin) underflows to 0 for amax 1e30 and margin 126; the scale is clamped at the
    smallest float32 subnormal, where 0 made every later quantize fail ("a scale must be positive and finite")."""
    from lowprec.scaling import DelayedScale

    state = DelayedScale("scaled<e4m3,delayed,margin=126>")
    state.quantize(torch.tensor([1e30, -3.0]))
    state.update()
    assert bits(state.scale) == bits(torch.tensor(2.0**-149))
    y = state.quantize(torch.tensor([1e30, 3e38, -1.0]))
    # x * 2**-149 is below half e4m3's least value 2**-9 for every finite float32 x: all flush to (signed) zero
    assert bits(y) == bits(torch.tensor([0.0, 0.0, -0.0]))


# -- @last (the nvfp4 preset's bf16 head) on a model whose head is a functional product ---------------------------

class FunctionalHead(nn.Module):
    """A convolution, then a head written as F.linear on the module's own Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Parameter(torch.randn(10, 4 * 16) * 0.1)

    def forward(self, x):
        return F.linear(F.relu(self.conv(x)).flatten(1), self.head)


def test_last_override_names_a_functional_head_it_does_not_reach():
    """nvfp4's "@last: bf16" stands for the last weight layer, here the convolution; the real head, F.linear on
    ``head``, runs after it in NVFP4. That was silent (the first layer in bf16, the head in fp4); the first forward
    now warns, naming the op and its parameter."""
    model = lp.convert(FunctionalHead(), "nvfp4")
    with pytest.warns(UserWarning, match=r"@last .*'conv'.* linear .*\(root\).*head"):
        model(torch.randn(2, 3, 4, 4))


def test_last_override_on_a_model_whose_head_is_the_last_layer_does_not_warn():
    class LayerHead(FunctionalHead):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4 * 16, 10)

        def forward(self, x):  # functional products before @last, the last layer fc
            h = F.relu(F.conv2d(x, self.conv.weight, padding=1)).flatten(1)
            side = F.linear(h, self.head).sum()
            return self.fc(h) + side

    model = lp.convert(LayerHead(), "nvfp4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 3, 4, 4))
    assert not [w for w in caught if "@last" in str(w.message)]


# -- a converted model under torch.autocast or made bf16 ---------------------------------------------------------

@pytest.mark.parametrize("preset", ["mxfp8", "fp8-current", "fp8-delayed"])
def test_scaled_preset_under_autocast_or_in_bf16_says_what_to_change_in_the_model(preset):
    """The scaled formats round float32 only; a converted model run under torch.autocast (or made bf16) reached
    them with bf16 tensors and failed with the advice for a direct call ("quantize(x.float(), ...)"), which a
    model's user cannot follow. The error now says to keep the model float32 and outside torch.autocast."""
    torch.manual_seed(0)
    model = lp.convert(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)), preset)
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match=r"torch\.bfloat16.*Keep the converted model float32 .*torch\.autocast"):
        with torch.autocast("cpu", torch.bfloat16):
            model(x)
    with pytest.raises(ValueError, match=r"torch\.bfloat16.*model\.float\(\)"):
        model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert torch.isfinite(model.float()(x)).all()


# -- the non-spec MX scale rules against gfloat with the rule written here ------------------------------------------

def _ceil_log2(v: float) -> int:
    m, k = math.frexp(v)  # v = m * 2**k, m in [0.5, 1)
    return k - 1 if m == 0.5 else k


def _rule_scale(rule: str, man_bits: int, max_value: float):
    """gfloat's compute_scale for lowprec's ceil / even / rceil rules, from their definitions (docs/formats.md)."""
    import numpy as np

    def scale(emax: float, vals) -> float:
        amax = float(np.max(np.abs(vals)))
        if amax == 0:
            e = -127
        elif rule == "ceil":
            e = _ceil_log2(amax) - int(emax)
        elif rule == "even":  # amax to man_bits + 1 significant bits, ties away from zero
            m, k = math.frexp(amax)
            e = math.frexp(math.floor(m * 2 ** (man_bits + 1) + 0.5) * 2.0 ** (k - man_bits - 1))[1] - 1 - int(emax)
        else:  # rceil: the float32 product amax * fl(1 / max), rounded up to a power of two
            d = float(np.float32(amax) * np.float32(1.0 / max_value))
            e = _ceil_log2(d) if d > 0 else -127
        return 2.0 ** min(max(e, -127), 127)

    return scale


@pytest.mark.parametrize("rule", ["ceil", "even", "rceil"])
def test_mx_scale_rules_equal_gfloat_with_the_rule_as_documented(rule):
    gfloat = pytest.importorskip("gfloat")
    import numpy as np
    from gfloat import formats as gf

    infos = {"e4m3": (gf.format_info_mxfp8_e4m3, 3, 448.0), "e5m2": (gf.format_info_mxfp8_e5m2, 2, 57344.0),
             "e2m3": (gf.format_info_mxfp6_e2m3, 3, 7.5), "e3m2": (gf.format_info_mxfp6_e3m2, 2, 28.0),
             "e2m1": (gf.format_info_mxfp4_e2m1, 1, 6.0), "int8": (gf.format_info_mxint8, 6, 127 / 64)}
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(48, 32, generator=gen) * torch.exp2(torch.randint(-8, 8, (48, 32), generator=gen).float())
    x = x * torch.exp2(torch.randint(-150, 110, (48, 1), generator=gen).float())  # subnormal amaxes included
    x[:12] = (torch.randint(-64, 64, (12, 32), generator=gen).float() / 8) * 2.0 ** torch.arange(-130, 110, 20)[:, None]
    x[12] = 0.0
    for element, (info, man_bits, max_value) in infos.items():
        if rule == "even" and element == "int8":
            continue  # torchao's EVEN is defined for float elements
        want = np.stack([gfloat.quantize_block(info, row, _rule_scale(rule, man_bits, max_value))
                         for row in x.double().numpy()])
        got = lp.quantize(x, MXFormat(element, scale_rule=rule))
        want_t = torch.tensor(want, dtype=torch.float32)
        assert torch.equal(want_t.double(), torch.tensor(want))  # gfloat's values are float32 values
        # the sign of zero aside (lowprec keeps it for float elements, docs/formats.md): the same bits
        assert bits(torch.where(got == 0, 0.0, got)) == bits(torch.where(want_t == 0, 0.0, want_t)), element


def test_mx_blocks_of_tensordot_and_vecdot_run_along_the_contracted_dimension():
    """tensordot(a, b, dims=1) contracts a's last and b's first dimension; dims=([1], [1]) one given dimension a
    side; vecdot(x, y, dim=0) dimension 0 of both. They were blocked along the last dimension."""
    torch.manual_seed(0)
    a, b = spread(16, 64), spread(64, 16)

    class Contract(nn.Module):
        def forward(self, a, b):
            return torch.tensordot(a, b, dims=1).sum() + torch.tensordot(a, b.t(), dims=([1], [1])).sum()

    seen = forward_operands(lp.convert(Contract(), MXFP4_EVERY_ROLE), a, b)
    assert [t.shape for _, _, t in seen] == [(16, 64), (64, 16)] * 2  # both as one mm
    assert bits(seen[0][2]) == bits(seen[2][2]) == along(a, -1)
    assert bits(seen[1][2]) == bits(seen[3][2]) == along(b, 0)

    class VecDot(nn.Module):
        def forward(self, x, y):
            return torch.linalg.vecdot(x, y, dim=0)

    with torch.no_grad():
        got = lp.convert(VecDot(), MXFP4_EVERY_ROLE)(a.t(), b)
    want = torch.linalg.vecdot(lp.quantize(a.t(), MXFormat("e2m1", axis=0)), lp.quantize(b, MXFormat("e2m1", axis=0)),
                               dim=0)
    assert bits(got) == bits(lp.quantize(want, "mxfp4"))  # and the result rounded in the output role
