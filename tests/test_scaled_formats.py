"""MX and NVFP4 against the exact references of scaled_reference.py (and gfloat, where installed), bit for bit."""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import pytest
import torch

import lowprec as lp
from lowprec.formats import MXFormat, NVFP4, parse_format
from scaled_reference import EMAX, Grid, mx_block, mx_exponent, nvfp4_blocks

ELEMENTS = ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1", "int8"]
RULES = ["floor", "ceil", "even", "rceil"]


def bits(values) -> list[int]:
    """float32 bit patterns, all NaNs as one pattern (the scaled formats make a NaN block of fresh NaNs)."""
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    t = torch.where(torch.isnan(t), float("nan"), t)
    return t.view(torch.int32).tolist()


def f32(i: int) -> float:
    return struct.unpack("<f", struct.pack("<I", i & 0xFFFFFFFF))[0]


def check_mx(x: torch.Tensor, element: str, rule: str, block: int = 32) -> None:
    """quantize onto mx<element,block> (blocks along the last dim) equals the reference on every block."""
    fmt = MXFormat(element, block, rule)
    got = lp.quantize(x, fmt)
    rows = x.reshape(-1, x.shape[-1]).tolist()
    want = [y for row in rows for i in range(0, len(row), block) for y in mx_block(row[i : i + block], element, rule)]
    assert bits(got) == bits(want), (element, rule)


def random_blocks(gen: torch.Generator, nblocks: int, block: int = 32) -> torch.Tensor:
    """Blocks whose amax exponents cover all float32 binades (-149..127) and whose elements spread over 30
    binades below it (so every element binade, subnormals included, and underflow to zero occur)."""
    top = torch.randint(-149, 128, (nblocks, 1), generator=gen)
    spread = torch.randint(0, 30, (nblocks, block), generator=gen)
    mant = torch.rand(nblocks, block, generator=gen, dtype=torch.float64) + 1.0
    sign = torch.randint(0, 2, (nblocks, block), generator=gen) * 2 - 1
    x = (sign * mant * torch.exp2((top - spread).double())).float()
    return torch.where(torch.isinf(x), 3.0e38, x)


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("rule", RULES)
def test_mx_random_blocks_across_binades_equal_reference(element, rule):
    check_mx(random_blocks(torch.Generator().manual_seed(hash((element, rule)) % 2**31), 24), element, rule)


@pytest.mark.parametrize("element", ELEMENTS)
def test_mx_every_element_encoding_and_midpoint(element):
    """Every element value (both signs) times 2**e round-trips exactly; every midpoint between neighbours, and
    one float32 ulp either side of it, rounds as the reference (ties to the even encoding)."""
    grid = Grid(element)
    vals = sorted({float(v) for v in grid.pos} | {-float(v) for v in grid.neg})
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    near = [math.nextafter(m, math.inf) for m in mids] + [math.nextafter(m, -math.inf) for m in mids]
    top = float(grid.max)
    for e in (-127, -3, 0, 50):
        scale = 2.0**e
        for chunk_src in (vals, mids, near):
            pts = [v * scale for v in chunk_src]
            rows = [[top * scale] + pts[i : i + 31] for i in range(0, len(pts), 31)]
            rows = [r + [0.0] * (32 - len(r)) for r in rows]
            x = torch.tensor(rows, dtype=torch.float32)
            check_mx(x, element, "floor")
    inside = [v for v in vals if abs(v) <= top]  # int8's -2 alone would raise the block's exponent
    exact = torch.tensor([[top] + inside[i : i + 31] + [0.0] * (31 - len(inside[i : i + 31]))
                          for i in range(0, len(inside), 31)])
    assert bits(lp.quantize(exact, MXFormat(element))) == bits(exact if element != "int8" else exact + 0.0)


@pytest.mark.parametrize("element", ELEMENTS)
def test_mx_zeros_subnormals_nan_inf(element):
    tiny = f32(1)  # 2**-149
    rows = [
        [0.0] * 32,  # all-zero block: scale 2**-127, zeros out
        [-0.0, 0.0] * 16,
        [tiny * k for k in range(32)],  # float32 subnormals only
        [f32(0x007FFFFF), -tiny, 1e-45, 2.0**-126] + [0.0] * 28,
        [1.0, float("nan")] + [2.0] * 30,  # NaN -> whole block NaN
        [float("inf")] + [1.0] * 31,
        [-float("inf")] + [0.0] * 31,
        [3.0e38, -3.4028234663852886e38] + [1.0] * 30,  # the largest finite values
    ]
    for rule in RULES:
        check_mx(torch.tensor(rows, dtype=torch.float32), element, rule)
    y = lp.quantize(torch.tensor(rows), MXFormat(element))
    assert torch.isnan(y[4:7]).all() and not torch.isnan(y[:4]).any() and not torch.isnan(y[7]).any()


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("rule", RULES)
def test_mx_scale_clamping_edges(element, rule):
    """amax at and around the ends of the E8M0 range: the exponent clamps to -127 (tiny blocks) and stays <= 127."""
    emax = EMAX[element]
    amaxes = [f32(1), f32(2), f32(0x00400000), f32(0x00400001), 2.0**-126, 2.0**(-127 + emax), 2.0**(-126 + emax) * 1.99,
              2.0**127, 3.4028234663852886e38, 2.0 ** (127 + emax) if emax < 1 else 2.0**126]
    rows = [[a, -a / 3, a / 7, a * 0.5] + [f32(3)] * 28 for a in amaxes]
    check_mx(torch.tensor(rows, dtype=torch.float32), element, rule)
    for a in amaxes:
        e = mx_exponent(abs(Fraction(a)), element, rule)
        assert -127 <= e <= 127


@pytest.mark.parametrize("element", ELEMENTS)
def test_rceil_equals_the_float32_descale_rounded_up(element):
    """rceil is cuBLAS's / Transformer Engine's E8M0 of fl32(amax * fl32(1/max)) rounded up to a power of two, here
    computed on the bits as torchao does: on amax at each max * 2**k and its float32 neighbours the reference
    gives the same exponent; the kernel agrees with the reference on those blocks."""
    grid = Grid(element)
    mx = float(grid.max)
    amaxes = []
    for k in (-130, -100, -1, 0, 1, 60, 110):
        c = torch.tensor(mx * 2.0**k, dtype=torch.float32)
        ci = int(c.view(torch.int32))
        amaxes += [f32(ci + d) for d in (-2, -1, 0, 1, 2) if 0 < ci + d < 0x7F800000]
    a = torch.tensor(amaxes, dtype=torch.float32)
    descale = a * torch.tensor(1.0 / mx, dtype=torch.float32)
    d_bits = descale.view(torch.int32)
    expo = (d_bits >> 23) & 0xFF
    mant = d_bits & 0x7FFFFF
    up = torch.where(expo == 0, mant > 0x400000, mant != 0)
    cublas = (expo + up.to(torch.int32) - 127).clamp(max=127).tolist()
    ours = [mx_exponent(Fraction(v), element, "rceil") for v in amaxes]
    assert ours == cublas
    rows = torch.tensor([[v] + [0.0] * 31 for v in amaxes])
    check_mx(rows, element, "rceil")


def test_mx_blocks_along_an_axis_and_ragged_rows():
    gen = torch.Generator().manual_seed(3)
    x = random_blocks(gen, 4, 40).view(4, 40)  # 40 = a block of 32 and a short block of 8 per row
    check_mx(x, "e4m3", "floor")
    col = lp.quantize(x.t().contiguous(), MXFormat("e4m3", axis=0))
    assert bits(col.t()) == bits(lp.quantize(x, MXFormat("e4m3")))
    x3 = torch.randn(2, 64, 3, generator=gen)
    along1 = lp.quantize(x3, "mxfp4<axis=1>")
    assert bits(along1) == bits(lp.quantize(x3.movedim(1, -1).contiguous(), "mxfp4").movedim(-1, 1))


@pytest.mark.parametrize("rounding", ["stochastic", "toward_zero"])
def test_mx_other_roundings_stay_between_the_neighbours(rounding):
    """Elements round to one of their two reference neighbours (toward_zero: the smaller magnitude)."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    near = lp.quantize(x, "mxfp4")
    got = lp.quantize(x, "mxfp4", rounding, generator=torch.Generator().manual_seed(2))
    scale = torch.exp2(torch.floor(torch.log2(x.abs().amax(1, keepdim=True))) - 2)
    step = torch.where((x / scale).abs() < 2, 0.5, torch.where((x / scale).abs() < 4, 1.0, 2.0)) * scale
    assert ((got - x).abs() < step).all()
    if rounding == "toward_zero":
        assert (got.abs() <= x.abs()).all()
    else:
        assert (got != near).any()
        mean = torch.stack([lp.quantize(x, "mxfp4", "stochastic", generator=torch.Generator().manual_seed(s))
                            for s in range(200)]).mean(0)
        assert ((mean - x).abs() < 0.35 * step).float().mean() > 0.95


def test_mx_names_parse_back():
    for name in ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "mx<e2m1,16>",
                 "mxfp4<scale=rceil>", "mxfp8_e4m3<scale=even,axis=1>", "mx<int8,64,scale=ceil>"]:
        fmt = parse_format(name)
        assert repr(fmt) == name and parse_format(repr(fmt)) == fmt
    assert parse_format("mx<e2m1,32>") == parse_format("mxfp4") == MXFormat("e2m1")
    for bad, words in [("mx<e9m9,32>", "element"), ("mxfp4<scale=round>", "scale rule"), ("mxfp4<tile=1>", "unknown option"),
                       ("mx<e2m1,0>", "block")]:
        with pytest.raises(ValueError, match=words):
            parse_format(bad)
    with pytest.raises(ValueError, match="float32"):
        lp.quantize(torch.ones(4, dtype=torch.bfloat16), "mxfp4")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        lp.quantize(torch.ones(4, 4), "mxfp4<axis=2>")


# -- NVFP4 ---------------------------------------------------------------------------------------------------------

def check_nvfp4(x: torch.Tensor, fmt: str = "nvfp4") -> None:
    got = lp.quantize(x, fmt)
    rows = x.reshape(-1, 16).tolist()
    amaxes = None
    if fmt == "nvfp4<tile=16x16>":
        width = x.shape[-1] // 16
        t = x.abs().nan_to_num(nan=0.0).view(-1, 16, width, 16).amax(dim=(1, 3))  # per tile
        amaxes = t.repeat_interleave(16, 0).reshape(-1).tolist()
    want = nvfp4_blocks(rows, amaxes)
    assert bits(got) == bits([y for row in want for y in row])


def test_nvfp4_random_blocks_across_binades_equal_reference():
    gen = torch.Generator().manual_seed(7)
    for top in (-100, -20, 0, 30, 100):  # the tensor amax decides the tensor scale: one binade range per tensor
        x = random_blocks(gen, 16, 16)
        x = x / x.abs().max() * 2.0**top * 1.37
        check_nvfp4(x)


def test_nvfp4_tensor_scale_is_one_correctly_rounded_division():
    """s_enc = 2688 / amax rounded once in float32 (numpy's float32 division is IEEE), for amax whose quotient is
    not exact: torch's number / tensor is a reciprocal times the number, which is off by one ulp at amax 40."""
    import numpy as np
    from lowprec.formats.scaled_kernels import nvfp4_encode_scale

    amaxes = torch.cat([torch.tensor([40.0, 3.0, 7.0, 0.3, 1e-30, 3e30]),
                        torch.rand(256, generator=torch.Generator().manual_seed(5)) * 100 + 1e-3])
    for amax in amaxes.tolist():
        want = np.float32(2688.0) / np.float32(amax)
        assert nvfp4_encode_scale(torch.tensor([amax, -amax / 2])).item() == float(want), amax
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    check_nvfp4(x / x.abs().max() * 40.0)  # the whole quantization at that tensor scale


def test_nvfp4_every_element_and_scale_encoding():
    """Blocks whose amax runs over every e4m3 scale value (times 6) and whose elements are every e2m1 value and
    midpoint: the reference's steps agree bit for bit."""
    e4m3 = [float(v) for v in Grid("e4m3").pos if v > 0]
    e2m1 = sorted({float(v) for v in Grid("e2m1").pos} | {-float(v) for v in Grid("e2m1").pos})
    mids = [(a + b) / 2 for a, b in zip(e2m1, e2m1[1:])]
    rows = [[6.0 * s] + [v * s for v in (e2m1 + mids)[:15]] for s in e4m3]
    rows += [[6.0 * s] + [v * s for v in (e2m1 + mids)[15:]] + [0.0] * (15 - len((e2m1 + mids)[15:])) for s in e4m3]
    check_nvfp4(torch.tensor(rows, dtype=torch.float32) * 2.0**-5)


def test_nvfp4_zeros_subnormals_nan_inf_and_tiles():
    rows = [[0.0] * 16, [-0.0] * 16, [f32(k) for k in range(16)], [1.0, float("nan")] + [0.5] * 14,
            [float("inf")] + [1.0] * 15, [1e-40, -1e-39] + [3.0] * 14, [448.0 * 6 * 2] + [1.0] * 15]
    check_nvfp4(torch.tensor(rows))
    check_nvfp4(torch.zeros(3, 16))  # all-zero tensor: the tensor scale caps at FLT_MAX
    check_nvfp4(torch.full((1, 16), f32(1)))  # amax 2**-149
    x = random_blocks(torch.Generator().manual_seed(9), 32, 32).view(32, 32)
    check_nvfp4(x / x.abs().max(), "nvfp4<tile=16x16>")
    assert parse_format("nvfp4<tile=16x16>") == NVFP4("16x16") and repr(NVFP4()) == "nvfp4"


# -- gfloat: a public reference, bit for bit ------------------------------------------------------------------------

def test_mx_equals_gfloat_block_quantization():
    gfloat = pytest.importorskip("gfloat")
    import numpy as np
    from gfloat import formats as gf

    infos = {"e4m3": gf.format_info_mxfp8_e4m3, "e5m2": gf.format_info_mxfp8_e5m2, "e2m3": gf.format_info_mxfp6_e2m3,
             "e3m2": gf.format_info_mxfp6_e3m2, "e2m1": gf.format_info_mxfp4_e2m1, "int8": gf.format_info_mxint8}
    gen = torch.Generator().manual_seed(11)
    for element, info in infos.items():
        x = random_blocks(gen, 6)
        x[0] = 0.0
        got = lp.quantize(x, MXFormat(element))
        want = [gfloat.quantize_block(info, np.array(row, dtype=np.float64), gfloat.compute_scale_amax)
                for row in x.double().numpy()]
        want_t = torch.tensor(np.stack(want), dtype=torch.float64)
        assert torch.equal(want_t.float().double(), want_t)  # gfloat's values are float32 values
        # gfloat gives +0 for every zero; lowprec keeps the sign of zero for float elements (as the element casts do)
        assert bits(got.abs() if element != "int8" else got) == bits(want_t.float().abs() if element != "int8" else want_t.float())
        assert bits(torch.where(got == 0, 0.0, got)) == bits(torch.where(want_t.float() == 0, 0.0, want_t.float()))
