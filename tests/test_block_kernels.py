"""The two-kernel form of the block formats (per-row scales, then the elements) that compiled CPU code runs gives
the bits of the one-kernel form, on every element format, scale rule and rounding, on blocks of every kind: all
binades, float32 subnormals, zeros and -0, NaN and inf, the largest scales and the smallest ones."""

import importlib

import pytest
import torch

import lowprec as lp
from lowprec.formats import compile_enabled
from lowprec.formats import scaled_kernels as sk
from lowprec.formats.kernels import NEAREST, ROUNDINGS, STOCHASTIC, hash_below_mask, random_bits, random_bits31
from lowprec.formats.scaled import ELEMENTS, SCALE_RULES


def blocks_of_every_kind(gen: torch.Generator, rows: int = 2048, block: int = 32, tiny: bool = True) -> torch.Tensor:
    """Rows of ``block``: random float32 bit patterns (every binade, subnormals, NaN, inf), all-zero rows, rows
    with -0, rows at the top of the range, rows of float32 subnormals beside normals, and (``tiny``) rows whose
    amax is below 2**-120 (their block exponent is below the element's normal range scaled to float32's)."""
    x = torch.randint(-(2**31), 2**31 - 1, (rows, block), generator=gen, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32).clone()
    kind = torch.arange(rows) % 12
    n = int((kind == 5).sum())
    normal = torch.randn(rows, block, generator=gen)
    x[kind == 0] = 0.0
    x[kind == 1] = -0.0
    x[kind == 2] = normal[kind == 2] * 2.0**126  # amax near FLT_MAX: the largest block exponents
    x[kind == 3] = torch.tensor(3.4028234663852886e38)  # FLT_MAX itself
    x[kind == 4] = normal[kind == 4]
    x[kind == 4, :4] = torch.tensor([1e-40, -1e-45, 2.0**-126, -0.0])  # float32 subnormals in a normal block
    x[kind == 5] = normal[kind == 5] * 2.0 ** (-90 + (torch.arange(n) % 24)[:, None].float())  # small, above the bound
    x[kind == 6] = torch.where(normal[kind == 6] > 0, 1.5, -1.75) * 2.0**-6  # ties and powers of two
    x[kind == 7, 3] = float("nan")
    x[kind == 8, 5] = float("-inf")
    if tiny:
        x[kind == 9] = normal[kind == 9] * 2.0**-140  # float32 subnormals only
        x[kind == 10] = normal[kind == 10] * 2.0**-124
    return x


def without_huge_blocks(x: torch.Tensor) -> torch.Tensor:
    """x with every value of magnitude 2**100 or more scaled by 2**-40 (inf stays inf): no block whose MX nearest
    magic number 2**(e + qmin + 23) overflows (``mx_scales``), so the two kernels take it."""
    return torch.where(x.abs() >= 2.0**100, x * 2.0**-40, x)


def split_mx(x: torch.Tensor, args: tuple) -> tuple[bool, torch.Tensor]:
    exact, *per_row = sk.mx_scales(x, *args)
    return bool(exact), sk.mx_elements(x, x.view(torch.int32), *per_row, *args).view(torch.float32)


def test_random_bits31_equals_the_int64_hash():
    for key in (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 - 1, 0x123456789ABCDEF):
        k = torch.tensor(key, dtype=torch.int64)
        for shape in ((1,), (1000,), (7, 33)):
            expected = random_bits(torch.Size(shape), k, 31, "cpu").to(torch.int32)
            assert torch.equal(random_bits31(torch.Size(shape), k, "cpu"), expected)


def test_hash_below_mask_compares_the_top_31_bits():
    """-1 exactly where the hash's 31-bit random integer (its top bits, logical shift) is below f, on random hashes
    of both signs and the edges: f = 0 (never), f = 2**31 - 1, R = f - 1, f, f + 1."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randint(-(2**31), 2**31, (100_000,), generator=gen, dtype=torch.int64)
    f = torch.randint(0, 2**31, (100_000,), generator=gen, dtype=torch.int64)
    r = torch.where(h < 0, h + 2**32, h) >> 1  # the 31-bit integer, in int64
    f = torch.cat([f, torch.zeros(10, dtype=torch.int64), torch.full((10,), 2**31 - 1), r[:10] + 1, r[:10], r[:10] - 1])
    f = f.clamp(0, 2**31 - 1)
    h = torch.cat([h, h[:50]])
    r = torch.cat([r, r[:50]])
    expected = -(r < f).to(torch.int32)
    assert torch.equal(hash_below_mask(h.to(torch.int32), f.to(torch.int32)), expected)


@pytest.mark.parametrize("element", sorted(ELEMENTS))
@pytest.mark.parametrize("rule", SCALE_RULES)
@pytest.mark.parametrize("rounding", sorted(ROUNDINGS))
def test_mx_two_kernels_equal_one(element, rule, rounding):
    el = ELEMENTS[element]
    mode = ROUNDINGS[rounding]
    key = torch.tensor(0x5DEECE66D, dtype=torch.int64) if mode == STOCHASTIC else None
    args = (rule, el.emax, el.man_bits, el.qmin, el.max_value, el.min_value, el.integer, mode, key)
    gen = torch.Generator().manual_seed(7)
    x = blocks_of_every_kind(gen, tiny=False)
    exact, y = split_mx(x, args)
    if mode == NEAREST:  # its magic number 2**(e + qmin + 23) overflows for blocks near FLT_MAX: the one kernel runs
        assert exact == (128 - el.emax <= 104 - el.qmin)  # only e5m2's largest block exponents stay below the bound
        x = without_huge_blocks(x)
        exact, y = split_mx(x, args)
    assert exact
    assert torch.equal(y.view(torch.int32), sk.mx_fp32(x.view(-1), 32, *args).view(x.shape).view(torch.int32))
    assert not split_mx(blocks_of_every_kind(gen), args)[0]  # tiny blocks: the one kernel runs instead


@pytest.mark.parametrize("rounding", sorted(ROUNDINGS))
def test_nvfp4_two_kernels_equal_one(rounding):
    mode = ROUNDINGS[rounding]
    key = torch.tensor(0x5DEECE66D, dtype=torch.int64) if mode == STOCHASTIC else None
    gen = torch.Generator().manual_seed(8)
    x = blocks_of_every_kind(gen, block=16)
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    for blocks, exact in ((finite, True), (finite * 2.0**-100, True), (x, False)):
        got_exact, *scales = sk.nvfp4_1x16_scales(blocks, mode, key)
        assert bool(got_exact) == exact
        one = sk.nvfp4_1x16_fp32(blocks.view(-1), mode, key).view(blocks.shape)
        if exact:
            assert torch.equal(sk.nvfp4_elements(blocks, *scales, mode, key).view(torch.int32), one.view(torch.int32))


@pytest.mark.skipif(not compile_enabled(), reason="torch.compile unavailable here")
@pytest.mark.parametrize(("fmt", "rounding"), [("mxfp4", "nearest"), ("mxfp8_e5m2", "stochastic"),
                                               ("nvfp4", "stochastic"), ("bfp<8,16>", "nearest"),
                                               ("bfp<6,32>", "stochastic"), ("bfp<4,16>", "toward_zero")])
@pytest.mark.parametrize("tiny", [False, True])
def test_compiled_block_formats_equal_eager_on_every_kind_of_block(fmt, rounding, tiny, monkeypatch):
    """Through quantize on a tensor large enough to be compiled: the two kernels (no tiny blocks, for NVFP4 no NaN
    or inf, for MX nearest no block near FLT_MAX; bfp: every block), or the one kernel they hand back to."""
    quantize_module = importlib.import_module("lowprec.formats.quantize")
    split_ran = []
    run_split = quantize_module._run_split
    monkeypatch.setattr(quantize_module, "_run_split", lambda *a: split_ran.append(run_split(*a)) or split_ran[-1])
    x = blocks_of_every_kind(torch.Generator().manual_seed(9), rows=1 << 12, tiny=tiny).view(-1)
    if fmt == "nvfp4" and not tiny:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if fmt.startswith("mx") and rounding == "nearest":
        x = without_huge_blocks(x)
    compiled = lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1))
    assert split_ran == [not tiny or fmt.startswith("bfp")]
    monkeypatch.setenv("LOWPREC_COMPILE", "0")
    plain = lp.quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1))
    assert torch.equal(compiled.view(torch.int32), plain.view(torch.int32))
