"""Fixed point, dynamic fixed point (max-abs and overflow-rate exponents), block floating point."""

import numpy as np
import pytest
import torch

import lowprec as lp
from lowprec.formats import FixedPoint
from lowprec.scaling import DynamicExponent

pytestmark = pytest.mark.usefixtures("both_paths")


def test_courbariaux_fixed_point_saturates():
    # Q_fxp(1000; NOB=3 without sign, NOIB=2) == 3.5 is fixed<4,1> here (4 bits with the sign, 1 fraction bit)
    assert lp.quantize(torch.tensor([1000.0]), "fixed<4,1>").item() == 3.5
    assert FixedPoint(4, 1).int_bits == 2


def test_fixed_point_twos_complement_range_and_grid():
    f = lp.parse_format("fixed<8,4>")
    assert (f.min_value, f.max_value, f.step) == (-8.0, 7.9375, 0.0625)
    x = torch.tensor([-1e9, -8.03, -8.0, 7.97, 7.96875, 0.03125, 0.09375, float("inf"), float("-inf")])
    # ties to even: 7.96875 = 127.5 steps -> 128 -> saturates to 127; 0.03125 = 0.5 step -> 0; 0.09375 -> 2 steps
    assert lp.quantize(x, f).tolist() == [-8.0, -8.0, -8.0, 7.9375, 7.9375, 0.0, 0.125, 7.9375, -8.0]
    assert torch.isnan(lp.quantize(torch.tensor([float("nan")]), f)).all()


def test_dfx_max_abs_rule_chooses_smallest_covering_exponent():
    x = torch.tensor([0.3, -0.74, 0.01])  # max 0.74 < 2**0 -> r = 0, step 2**-7
    from lowprec.formats import max_abs_int_bits

    assert max_abs_int_bits(x).item() == 0
    assert max_abs_int_bits(torch.tensor([1.0])).item() == 1  # 1.0 is not < 2**0
    assert max_abs_int_bits(torch.tensor([0.0, 0.0])).item() == 0
    assert torch.equal(lp.quantize(torch.zeros(3), "dfx<8>"), torch.zeros(3))  # no 0 * inf
    tiny = torch.tensor([2.0**-140, -(2.0**-149)])  # r = -139: step 2**-146, so -2**-149 (1/8 step) rounds to -0
    assert lp.quantize(tiny, "dfx<8>").tolist() == [2.0**-140, -0.0]
    y = lp.quantize(x, "dfx<8>")
    assert torch.equal(y, lp.quantize(x, "fixed<8,7>"))
    assert torch.equal(lp.quantize(x, "dfx<8>", int_bits=3), lp.quantize(x, "fixed<8,4>"))


def test_int8_and_int16_are_dfx_presets():
    assert lp.parse_format("int8") == lp.DynamicFixedPoint(8)
    assert lp.parse_format("int16") == lp.DynamicFixedPoint(16)


def test_dfx_tensor_exponent_broadcasts():
    x = torch.tensor([[0.3, 3.0], [0.3, 3.0]])
    r = torch.tensor([[0], [2]])
    y = lp.quantize(x, "dfx<4>", int_bits=r)
    assert y.tolist() == [[0.25, 0.875], [0.5, 3.0]]  # r=0: step 1/8, max 7/8; r=2: step 1/2


def test_block_float_shares_one_exponent_per_block():
    x = torch.tensor([0.01, 0.02, 0.9, 0.1, 100.0, 3.0, 1.0, 0.4])
    y = lp.quantize(x, "bfp<4,4>")
    first = lp.quantize(x[:4], "fixed<4,3>")  # max 0.9 -> r = 0 -> step 2**-3
    second = lp.quantize(x[4:], "fixed<4,-4>")  # max 100 -> r = 7 -> step 16
    assert torch.equal(y, torch.cat([first, second]))
    odd = torch.randn(10)
    assert lp.quantize(odd, "bfp<8,4>").shape == odd.shape


def _feed(g: DynamicExponent, x: torch.Tensor, batches: int) -> None:
    for _ in range(batches):
        g.observe(x)
        g.update()


def test_overflow_rule_grows_by_one_per_interval():
    g = DynamicExponent("dfx<8>", int_bits=0, max_overflow_rate=0.01, interval=3)
    x = torch.full((100,), 20.0)  # needs r = 5
    _feed(g, x, 2)
    assert g.int_bits == 0  # interval not complete
    _feed(g, x, 1)
    assert g.int_bits == 1
    history = []
    for _ in range(8):
        _feed(g, x, 3)
        history.append(g.int_bits)
    assert history == [2, 3, 4, 5, 5, 5, 5, 5]


def test_overflow_rule_shrinks_and_holds_between_thresholds():
    g = DynamicExponent("dfx<8>", int_bits=8, max_overflow_rate=0.0, interval=1)
    x = torch.tensor([3.0, 0.5])  # overflow at r=1 (max 1.98), not at r=2 (max 3.97)
    moves = []
    for _ in range(10):
        _feed(g, x, 1)
        moves.append(g.int_bits)
    assert moves == [7, 6, 5, 4, 3, 2, 2, 2, 2, 2]
    assert all(abs(a - b) <= 1 for a, b in zip([8] + moves, moves))


def test_overflow_rate_counts_values_that_round_to_the_largest_code():
    g = DynamicExponent("dfx<4>", int_bits=0)  # step 1/8, max 7/8: x > 0.8125 reaches the max code
    rates = g.overflow_rates(torch.tensor([0.8125, 0.8126, -0.9, 0.1]))
    assert rates[0].item() == 0.5


def test_rate_between_thresholds_keeps_exponent():
    # rate(r) <= max_rate < rate(r-1): stay
    g = DynamicExponent("dfx<8>", int_bits=2, max_overflow_rate=0.3, interval=2)
    x = torch.tensor([2.5, 0.1, 0.1, 0.1])  # r=2: no overflow; r=1 (max ~1.98): 25% < 30% -> would shrink
    _feed(g, x, 2)
    assert g.int_bits == 1
    x = torch.tensor([2.5, 2.5, 0.1, 0.1])  # at r=1: 50% > 30% -> grow back to 2; at r=2, rate(1) = 50% -> hold
    _feed(g, x, 2)
    assert g.int_bits == 2
    _feed(g, x, 6)
    assert g.int_bits == 2


def test_dynamic_exponent_state_dict_round_trip():
    g = DynamicExponent("dfx<10>", int_bits=3, interval=4)
    g.observe(torch.randn(50) * 30)
    h = DynamicExponent("dfx<10>", int_bits=0, interval=4)
    h.load_state_dict(g.state_dict())
    x = torch.randn(50) * 30
    for _ in range(3):
        g.observe(x), h.observe(x)
    g.update(), h.update()
    assert g.int_bits == h.int_bits == 4
    with pytest.raises(ValueError, match="dfx<10>"):
        DynamicExponent("dfx<8>").load_state_dict(g.state_dict())


def test_dynamic_exponent_validation():
    with pytest.raises(ValueError, match="dynamic fixed point"):
        DynamicExponent("fp16")
    with pytest.raises(ValueError, match="interval"):
        DynamicExponent("dfx<8>", interval=0)
    with pytest.raises(ValueError, match="max_overflow_rate"):
        DynamicExponent("dfx<8>", max_overflow_rate=1.5)


def test_dfx_quantize_uses_current_exponent():
    g = DynamicExponent("dfx<8>", int_bits=1)
    y = g.quantize(torch.tensor([0.3, 5.0]))
    assert y.tolist() == [0.296875, 1.984375]
    assert g.batches == 1


@pytest.mark.parametrize("word,frac", [(8, 3), (16, 8), (20, 14), (4, 1), (12, -3)])
def test_fixed_values_are_multiples_of_the_step(word, frac):
    x = torch.from_numpy(np.random.default_rng(word).standard_normal(1000).astype(np.float32) * 2**6)
    y = lp.quantize(x, f"fixed<{word},{frac}>", "stochastic")
    k = y.double() * 2.0**frac
    assert torch.all(k == torch.round(k))
    assert torch.all((k >= -(2 ** (word - 1))) & (k <= 2 ** (word - 1) - 1))


def test_count_above_equals_a_direct_count():
    from lowprec.formats import count_above

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen) * 2.0 ** torch.randint(-6, 6, (5000,), generator=gen)
    x[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 63.9375, -31.96875])  # NaN never counts
    thresholds = (63.9375, 31.96875, 1e9)
    direct = [(x.abs() > t).sum().item() for t in thresholds]
    assert count_above(x, thresholds).tolist() == direct
    assert direct[1] > direct[0] > direct[2] == 2  # the infs
