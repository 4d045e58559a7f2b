"""Packed storage (lowprec.formats.packing): bit-exact round trips for every format family, the stored widths,
and sub-byte layouts checked against a numpy reference."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowprec.formats import BlockFloat, DynamicFixedPoint, FixedPoint, FloatFormat, Uniform, parse_format, quantize
from lowprec.formats.packing import BlockCodes, Cast, Codes, Raw, pack, pack_bool, storage_of

SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-45, 3e38, -3e38, 1e-8, 65504.0, 448.0,
            449.0, 57344.0, 0.5, -1.0, 1.0]


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def _inputs(seed: int, n: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    return torch.cat([torch.tensor(SPECIALS), torch.randn(n, generator=g) * scale])


def _assert_round_trip(q: torch.Tensor, fmt, integer_codes: bool) -> None:
    packed = pack(q, fmt)
    back = packed.unpack()
    assert back.dtype == q.dtype and back.shape == q.shape
    assert torch.equal(torch.isnan(back), torch.isnan(q))
    finite = ~torch.isnan(q)
    # integer codes have one zero: -0 unpacks as +0 (a tensor with NaN is kept as it is)
    expect = q[finite] + 0.0 if integer_codes and not isinstance(packed, Raw) else q[finite]
    assert np.array_equal(_bits(back[finite]), _bits(expect))


float_formats = st.builds(
    FloatFormat,
    exp_bits=st.integers(2, 8),
    man_bits=st.integers(1, 23),
    subnormals=st.booleans(),
    overflow=st.sampled_from(["inf", "saturate"]),
)


@given(fmt=float_formats, seed=st.integers(0, 2**16))
def test_float_round_trip_bit_exact(fmt, seed):
    q = quantize(_inputs(seed), fmt)
    _assert_round_trip(q, fmt, integer_codes=False)


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                         ("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_presets_are_stored_in_their_torch_dtype(name, dtype):
    fmt = parse_format(name)
    q = quantize(_inputs(0), fmt)
    packed = pack(q, fmt)
    assert isinstance(packed, Cast) and packed.data.dtype == dtype
    assert torch.equal(packed.data.float().isnan(), q.isnan())  # NaN, inf, -0, subnormals, saturated kept
    _assert_round_trip(q, fmt, integer_codes=False)
    assert storage_of(fmt).dtype == dtype


def test_small_float_grids_take_float8():
    assert storage_of(parse_format("float<e=3,m=2>")).dtype == torch.float8_e5m2
    assert storage_of(parse_format("float<e=4,m=2,overflow=saturate>")).dtype == torch.float8_e4m3fn
    # e4m3fn has no inf: an IEEE e4m3 grid (with inf) needs float16
    assert storage_of(parse_format("float<e=4,m=3>")).dtype == torch.float16
    fmt = parse_format("float<e=4,m=3>")
    _assert_round_trip(quantize(_inputs(3), fmt), fmt, integer_codes=False)


fixed_formats = st.builds(FixedPoint, word=st.integers(2, 24), frac=st.integers(-20, 40))


@given(fmt=fixed_formats, seed=st.integers(0, 2**16))
def test_fixed_round_trip_bit_exact(fmt, seed):
    q = quantize(_inputs(seed), fmt)
    _assert_round_trip(q, fmt, integer_codes=True)
    finite = q[~q.isnan()]
    packed = pack(finite, fmt)
    assert isinstance(packed, Codes)
    ref = np.round(finite.double().numpy() * 2.0**fmt.frac).astype(np.int64)  # independent of the packer
    assert np.array_equal(packed.codes().numpy().astype(np.int64), ref)
    assert ref.min() >= -(2 ** (fmt.word - 1)) and ref.max() <= 2 ** (fmt.word - 1) - 1


@given(bits=st.integers(2, 24), seed=st.integers(0, 2**16), scale=st.integers(-140, 100))
def test_dfx_round_trip_bit_exact(bits, seed, scale):
    fmt = DynamicFixedPoint(bits)
    x = _inputs(seed)[len(SPECIALS):] * 2.0**scale
    q = quantize(x, fmt)
    _assert_round_trip(q, fmt, integer_codes=True)
    assert isinstance(pack(q, fmt), Codes)


@given(bits=st.integers(1, 16), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_uniform_round_trip_bit_exact(bits, signed, seed):
    fmt = Uniform(bits, signed)
    q = quantize(_inputs(seed), fmt)
    _assert_round_trip(q, fmt, integer_codes=True)


@given(bits=st.integers(2, 24), block=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_block_round_trip_bit_exact(bits, block, seed):
    fmt = BlockFloat(bits, block)
    x = _inputs(seed)[len(SPECIALS):].reshape(-1)
    x[5:9] = 0.0  # an all-zero block somewhere
    q = quantize(x, fmt)
    packed = pack(q, fmt)
    assert isinstance(packed, BlockCodes) and packed.fracs.numel() == math.ceil(x.numel() / block)
    _assert_round_trip(q, fmt, integer_codes=True)


def _nibbles_reference(codes: np.ndarray, width: int) -> np.ndarray:
    """Codes packed little-end first, 8 // width to a byte (two's complement in ``width`` bits)."""
    per = 8 // width
    c = (codes.astype(np.int64) & (2**width - 1)).tolist()
    c += [0] * (-len(c) % per)
    return np.array([sum(c[i + j] << (width * j) for j in range(per)) for i in range(0, len(c), per)],
                    dtype=np.uint8)


@pytest.mark.parametrize("spec, width", [("fixed<4,2>", 4), ("uniform<4,unsigned>", 4), ("uniform<3>", 4),
                                         ("fixed<2,0>", 2), ("uniform<2>", 2), ("uniform<1>", 2),
                                         ("uniform<2,unsigned>", 2), ("dfx<4>", 4)])
def test_sub_byte_codes_share_a_byte(spec, width):
    fmt = parse_format(spec)
    x = torch.linspace(-3, 3, 37)  # odd length: the last byte is partly padding; both ends saturate
    q = quantize(x, fmt)
    packed = pack(q, fmt)
    assert packed.data.dtype == torch.uint8 and packed.data.numel() == math.ceil(37 * width / 8)
    assert np.array_equal(packed.data.numpy(), _nibbles_reference(packed.codes().numpy(), width))
    _assert_round_trip(q, fmt, integer_codes=True)
    assert storage_of(fmt).bits == width


def test_widths_of_whole_byte_codes():
    assert pack(quantize(torch.randn(10), parse_format("int8")), parse_format("int8")).data.dtype == torch.int8
    assert pack(quantize(torch.randn(10), parse_format("int16")), parse_format("int16")).data.dtype == torch.int16
    u8 = parse_format("uniform<8,unsigned>")
    assert pack(quantize(torch.rand(10), u8), u8).data.dtype == torch.uint8
    assert storage_of(parse_format("fixed<20,14>")).dtype == torch.int32
    assert storage_of(BlockFloat(8, 16)).bytes_per_value == 1 + 2 / 16


def test_nan_in_integer_format_is_kept_raw():
    fmt = parse_format("fixed<8,4>")
    q = quantize(torch.tensor([1.0, float("nan")]), fmt)
    assert isinstance(pack(q, fmt), Raw)


def test_off_grid_tensor_is_refused():
    with pytest.raises(ValueError, match="not on the grid of fixed<8,4>"):
        pack(torch.tensor([0.01, 1.0]), parse_format("fixed<8,4>"))
    with pytest.raises(ValueError, match="not on the grid of e4m3"):
        pack(torch.tensor([0.1]), parse_format("e4m3"))
    with pytest.raises(TypeError, match="floating-point"):
        pack(torch.tensor([1, 2]), parse_format("int8"))


@given(n=st.integers(0, 70), seed=st.integers(0, 2**16))
def test_bool_masks_pack_eight_a_byte(n, seed):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_bool(mask.reshape(n, 1))
    assert packed.data.numel() == math.ceil(n / 8)
    assert np.array_equal(packed.data.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(packed.unpack(), mask.reshape(n, 1))


def test_storage_is_a_property_of_the_format():
    assert parse_format("e4m3").storage.dtype == torch.float8_e4m3fn
    assert parse_format("uniform<4>").storage.bytes_per_value == 0.5
    assert parse_format("uniform<2,unsigned>").storage.bytes_per_value == 0.25


@pytest.mark.parametrize("spec", ["uniform<4>", "uniform<2,unsigned>", "uniform<1>", "fixed<8,4>", "fixed<16,8>",
                                  "fixed<4,2>", "dfx<4>", "dfx<12>"])
def test_chunked_packing_matches_one_pass(spec, monkeypatch):
    """A tensor larger than CHUNK is coded a chunk at a time: the same bytes, the same round trip."""
    from lowprec.formats import packing

    fmt = parse_format(spec)
    q = quantize(torch.randn(1001, generator=torch.Generator().manual_seed(7)) * 3, fmt)
    whole = pack(q, fmt)
    monkeypatch.setattr(packing, "CHUNK", 64)
    chunked = pack(q, fmt)
    assert chunked.data.dtype == whole.data.dtype and torch.equal(chunked.data, whole.data.reshape(-1))
    _assert_round_trip(q, fmt, integer_codes=True)


def test_block_codes_at_the_ends_of_the_float_range():
    """Blocks of subnormals and of values near the float32 maximum: the exponents 2**frac are applied as two
    normal factors on the device, and the codes come back bit for bit."""
    fmt = BlockFloat(8, 4)
    x = torch.tensor([1e-45, -3e-45, 2e-42, 0.0, 3e38, -1e38, 2e37, 1.0, -1e-40, 5e-39, 0.0, -0.0])
    q = quantize(x, fmt)
    packed = pack(q, fmt)
    assert isinstance(packed, BlockCodes)
    _assert_round_trip(q, fmt, integer_codes=True)


@given(n=st.integers(0, 70), seed=st.integers(0, 2**16), width=st.sampled_from([1, 2, 4]))
def test_lane_layout_in_tensor_ops_matches_a_reference(n, seed, width):
    """The tensor-op lanes (what a GPU runs; the CPU packs masks with numpy) against numpy's packbits (masks)
    and a per-value reference (2- and 4-bit codes), and back."""
    from lowprec.formats.packing import _from_lanes_torch, _to_lanes_torch

    values = torch.randint(0, 2**width, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    stored = _to_lanes_torch(values, width)
    ref = (np.packbits(values.numpy().astype(bool), bitorder="little") if width == 1
           else _nibbles_reference(values.numpy(), width))
    assert np.array_equal(stored.numpy(), ref)
    assert torch.equal(_from_lanes_torch(stored, width, n), values)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_large_float8_unpacks_bit_exact(dtype):
    """Above COMPILE_MIN_NUMEL a float8 tensor is widened by a compiled cast: every one of the 256 codes comes
    back as torch's eager cast gives it (NaN as NaN)."""
    from lowprec.formats.packing import Cast
    from lowprec.formats.quantize import COMPILE_MIN_NUMEL

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(COMPILE_MIN_NUMEL // 256 + 1)
    data = codes.view(dtype)
    back, ref = Cast(data, torch.float32).unpack(), data.to(torch.float32)
    nan = ref.isnan()
    assert torch.equal(back.isnan(), nan) and torch.equal(back[~nan].view(torch.int32), ref[~nan].view(torch.int32))


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_large_float8_packs_bit_exact(name):
    """Above COMPILE_MIN_NUMEL a tensor on a float8 grid is narrowed by a compiled cast: each of the 256 float8
    values (as float32: -0, NaN, e5m2's infinities, subnormals, the largest values) is stored with the bits of
    torch's eager cast and comes back as it was."""
    from lowprec.formats.quantize import COMPILE_MIN_NUMEL

    fmt = parse_format(name)
    dtype = storage_of(fmt).dtype
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float32)
    q = values.repeat(COMPILE_MIN_NUMEL // 256 + 1)
    packed = pack(q, fmt, verify=False)
    assert isinstance(packed, Cast) and packed.data.dtype == dtype
    nan = q.isnan()
    stored, eager = packed.data.view(torch.uint8), q.to(dtype).view(torch.uint8)
    assert torch.equal(stored[~nan], eager[~nan]) and bool(packed.data[nan].to(torch.float32).isnan().all())
    _assert_round_trip(q, fmt, integer_codes=False)


def test_dfx_rounding_leaves_its_fixed_point_grid():
    """quantize(x, dfx<b>) marks its result with the fixed<b, frac> it rounded to, and a later dfx<b> mark keeps
    it: packing reads the codes at that exponent (no second max pass), the same codes as finding it again."""
    from lowprec.formats.packing import mark, marked_format

    x = torch.randn(3000, generator=torch.Generator().manual_seed(2)) * 5
    fmt = parse_format("dfx<8>")
    q = mark(quantize(x, fmt), fmt)
    assert marked_format(q) == FixedPoint(8, 8 - 1 - int(math.floor(math.log2(x.abs().max().item())) + 1))
    via_grid, via_range = pack(q, marked_format(q)), pack(q, fmt)
    assert via_grid.frac == via_range.frac and torch.equal(via_grid.data, via_range.data)
    q.add_(0)  # changed in place: the marks are gone
    assert marked_format(mark(q, fmt)) == fmt


@pytest.mark.parametrize("spec, dtypes", [
    ("fixed<4,2>", (torch.float32, torch.float64, torch.float16, torch.bfloat16)),
    ("fixed<2,0>", (torch.float32, torch.float16, torch.bfloat16)),
    ("fixed<4,-3>", (torch.float32, torch.float64)),
    ("uniform<4>", (torch.float32, torch.float64)), ("uniform<3,unsigned>", (torch.float32,)),
    ("uniform<2>", (torch.float32,))])
def test_sub_byte_codes_unpack_bit_exact_in_every_container(spec, dtypes):
    """2- and 4-bit codes unpack on a CPU by one table gather a byte (``packing._lookup``): the bits of the
    value-by-value arithmetic (the codes cast to the container, then divided by the levels or scaled), and the
    rounded tensor's values, in each float container, odd lengths included."""
    fmt = parse_format(spec)
    for dtype in dtypes:
        for n in (1, 37, 4099):
            x = torch.linspace(-20, 20, n, dtype=torch.float64).to(dtype)
            q = quantize(x, fmt)
            packed = pack(q, fmt)
            assert isinstance(packed, Codes) and packed.data.dtype == torch.uint8
            back = packed.unpack()
            slow = packed._values(packed.codes().to(dtype))
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[back.element_size()]
            assert back.dtype == dtype and back.shape == q.shape
            assert torch.equal(back.view(ints), slow.view(ints)) and torch.equal(back, q)
