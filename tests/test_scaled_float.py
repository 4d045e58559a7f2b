"""Per-tensor scaled floats: current scaling against an exact reference, delayed scaling's scale trajectory,
checkpoints and ranks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import lowprec as lp
from lowprec.formats import ScaledFloat, parse_format
from lowprec.policy import Policy, Quant, Quantizer
from lowprec.scaling import DelayedScale
from scaled_reference import FLT_MAX, Grid, fl, floor_log2
from test_scaled_formats import bits

GRIDS = {"e4m3": Grid("e4m3"), "e5m2": Grid("e5m2")}


def fl32(v: Fraction) -> Fraction:
    return min(fl(v), FLT_MAX) if v > 0 else fl(v)


def ref_scale(amax: Fraction, element: str, pow2: bool) -> Fraction:
    if amax == 0:
        return Fraction(1)
    s = fl32(GRIDS[element].max / amax)
    return Fraction(2) ** floor_log2(s) if pow2 else s


def ref_apply(xs: list[float], s: Fraction, element: str) -> list[float]:
    out = []
    for x in xs:
        if math.isnan(x):
            out.append(x)
            continue
        v = fl32(Fraction(x) * s) if math.isfinite(x) else math.copysign(1, x) * GRIDS[element].max
        q = GRIDS[element].nearest(v)
        y = fl32(q / s)
        out.append(float(y) if y != 0 else math.copysign(0.0, x))
    return out


def spread(gen: torch.Generator, shape, lo: int = -40, hi: int = 40) -> torch.Tensor:
    e = torch.randint(lo, hi, shape, generator=gen).float()
    return torch.randn(shape, generator=gen) * torch.exp2(e)


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
@pytest.mark.parametrize("pow2", [False, True])
def test_current_scaling_equals_reference(element, pow2):
    gen = torch.Generator().manual_seed(5)
    for top in (-120, -10, 0, 17, 100):
        x = spread(gen, (256,))
        x = x / x.abs().max() * 2.0**top * 1.3
        x[:4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
        fmt = ScaledFloat(parse_format(element), pow2=pow2)
        amax = max(abs(Fraction(v)) for v in x.tolist() if math.isfinite(v))
        want = ref_apply(x.tolist(), ref_scale(amax, element, pow2), element)
        assert bits(lp.quantize(x, fmt)) == bits(want)
    assert bits(lp.quantize(torch.zeros(8), ScaledFloat(parse_format(element)))) == bits(torch.zeros(8))


def test_rowwise_scaling_has_one_scale_per_row():
    x = spread(torch.Generator().manual_seed(1), (6, 40))
    got = lp.quantize(x, "scaled<e4m3,rowwise>")
    for r in range(6):
        row = x[r].tolist()
        want = ref_apply(row, ref_scale(max(abs(Fraction(v)) for v in row), "e4m3", False), "e4m3")
        assert bits(got[r]) == bits(want)
    cols = lp.quantize(x.t().contiguous(), "scaled<e4m3,rowwise,axis=0>")
    assert bits(cols.t()) == bits(got)


def test_explicit_scale_and_errors():
    x = torch.tensor([1.0, 3.0, -500.0])
    assert lp.quantize(x, "scaled<e4m3>", scale=0.5).tolist() == [1.0, 3.0, -512.0]  # -250 -> -256 on e4m3
    with pytest.raises(ValueError, match="amax history"):
        lp.quantize(x, "scaled<e4m3,delayed>")
    with pytest.raises(ValueError, match="positive and finite"):
        lp.quantize(x, "scaled<e4m3>", scale=0.0)
    for fmt in ("fp16", "mxfp8_e4m3", "nvfp4"):  # block formats compute their own scales
        with pytest.raises(ValueError, match="scale= applies"):
            lp.quantize(x, fmt, scale=2.0)
    with pytest.raises(ValueError, match="rowwise applies to current"):
        parse_format("scaled<e4m3,delayed,rowwise>")
    for name in ["scaled<e4m3>", "scaled<e5m2,delayed>", "scaled<e4m3,delayed,history=16,algo=most_recent,margin=2>",
                 "scaled<e4m3,pow2,rowwise>"]:
        assert repr(parse_format(name)) == name


def trajectory(fmt: str, amaxes: list[float]) -> list[float]:
    """Scales of a DelayedScale fed one tensor with each amax per step (the scale used at each step)."""
    state = DelayedScale(fmt)
    used = []
    for a in amaxes:
        used.append(float(state.scale))
        state.quantize(torch.tensor([a, -a / 3, 0.0]))
        state.update()
    return used


AMAXES = [2.0, 8.0, 0.0, 0.5, 0.25, 1e-3, 300.0, 0.0, 0.1]


def expected(amaxes, history, algo, margin, pow2=False, maxval=Fraction(448)):
    """TE's rule on exact values: s = fl32(fl32(max / amax) / 2**margin), kept where the combined amax is 0."""
    hist, s, used = [Fraction(0)] * history, Fraction(1), []
    for a in amaxes:
        used.append(float(s))
        hist = [Fraction(torch.tensor(a).item())] + hist[:-1]  # the float32 amax
        comb = max(hist) if algo == "max" else hist[0]
        if comb > 0:
            s = fl32(fl32(maxval / comb) / 2**margin)
            s = Fraction(2) ** floor_log2(s) if pow2 else s
    return used


@pytest.mark.parametrize("history,algo,margin", [(1, "max", 0), (3, "max", 0), (3, "max", 1), (4, "most_recent", 0),
                                                 (1024, "max", 0)])
def test_delayed_scale_trajectory_on_a_built_amax_sequence(history, algo, margin):
    spec = f"scaled<e4m3,delayed,history={history},algo={algo},margin={margin}>"
    assert trajectory(spec, AMAXES) == expected(AMAXES, history, algo, margin)
    # written out for the history of 3, max, margin 0: the amax of the last three steps sets the next scale
    if (history, algo, margin) == (3, "max", 0):
        assert trajectory(spec, AMAXES)[:6] == [1.0, 224.0, 56.0, 56.0, 56.0, 896.0]


def test_delayed_scale_ignores_inf_and_nan_and_empty_steps():
    s = DelayedScale("scaled<e4m3,delayed,history=2>")
    s.quantize(torch.tensor([4.0, float("inf"), float("nan")]))
    s.update()
    assert float(s.scale) == 112.0  # amax over finite values: 4
    assert not s.update() and float(s.scale) == 112.0  # nothing observed: no step in the history
    s.quantize(torch.empty(0))
    assert not s.update()


def test_delayed_scale_checkpoint_resumes_bit_exactly():
    gen = torch.Generator().manual_seed(2)
    xs = [spread(gen, (64,), -20, 20) * (i + 1) for i in range(12)]
    spec = "scaled<e5m2,delayed,history=5>"

    def run(state, steps):
        out = []
        for x in steps:
            out.append(bits(state.quantize(x)) + bits(state.scale))
            state.update()
        return out

    full = DelayedScale(spec)
    straight = run(full, xs)
    first = DelayedScale(spec)
    run(first, xs[:7])
    first.quantize(xs[7])  # a checkpoint taken mid-step keeps the pending amax
    saved = first.state_dict()
    resumed = DelayedScale(spec)
    resumed.load_state_dict(saved)
    resumed.update()
    assert run(resumed, xs[8:]) == straight[8:]
    with pytest.raises(ValueError, match="checkpoint holds a scale for"):
        DelayedScale("scaled<e4m3,delayed>").load_state_dict(saved)


def test_two_ranks_agree_on_the_scale():
    """``agree`` (a cross-process MAX, here over two in-process "ranks") makes ranks that saw different data push
    the same amax and hold the same scale."""
    ranks = [DelayedScale("scaled<e4m3,delayed,history=4>") for _ in range(2)]
    data = [[torch.tensor([1.0, 2.0]), torch.tensor([7.0])], [torch.tensor([0.5]), torch.tensor([3.0, -9.0])]]
    for step in range(2):
        for r, x in zip(ranks, data[step]):
            r.quantize(x)
        pending = [r.pending for r in ranks]
        for r in ranks:
            r.agree = lambda t: torch.maximum(pending[0], pending[1])
            r.update()
        assert bits(ranks[0].scale) == bits(ranks[1].scale)
    assert bits(ranks[0].scale) == bits(torch.tensor(448.0) / 9.0)
    alone = DelayedScale("scaled<e4m3,delayed,history=1>")
    alone.quantize(data[1][0])
    alone.update()
    assert float(alone.scale) == 896.0  # without agreement rank 0 would have scaled by its own amax 0.5


def test_quantizer_carries_and_checkpoints_the_delayed_scale():
    q = Quantizer(Quant(parse_format("scaled<e4m3,delayed,history=2>")), Policy())
    assert q.scale_state is not None
    y = q(torch.tensor([1.0, 30.0]))
    assert y.tolist() == [1.0, 30.0]  # scale 1 at the first step: e4m3 holds 1 and 30 exactly
    q.update()
    assert float(q.scale_state.scale) == float(torch.tensor(448.0) / 30.0)
    other = Quantizer(Quant(parse_format("scaled<e4m3,delayed,history=2>")), Policy())
    other.load_state_dict(q.state_dict())
    x = torch.tensor([0.3, -29.0])
    assert bits(other(x)) == bits(q(x))
    assert bits(q.round(x)) == bits(q(x))
