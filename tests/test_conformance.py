"""quantize(x, preset, "nearest") equals torch's own cast x.to(dtype).to(x.dtype), bit for bit.

Non-NaN results must match bit for bit (sign of zero included); NaN must stay NaN (torch's casts canonicalise
NaN payloads differently per dtype, lowprec keeps the input's NaN).
"""

import numpy as np
import pytest
import torch

import lowprec as lp
from lowprec.formats import TORCH_DTYPES

pytestmark = pytest.mark.usefixtures("both_paths")

PRESETS = ["fp16", "bf16", "e4m3", "e5m2"]


def _f32(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint32).view(np.int32).copy()).view(torch.float32)


def _assert_same(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), "NaN positions differ"
    iy = y.view(torch.int32 if y.dtype == torch.float32 else torch.int64)[~nan]
    ir = ref.view(torch.int32 if ref.dtype == torch.float32 else torch.int64)[~nan]
    bad = (iy != ir).nonzero()
    if bad.numel():
        i = bad[0, 0]
        x_bad = y[~nan][i]
        raise AssertionError(f"{bad.numel()} mismatches, first: got {x_bad.item()!r} want {ref[~nan][i].item()!r}")


def _grid_probe(dtype: torch.dtype) -> torch.Tensor:
    """Every value of a 16-bit (or 8-bit) type, the midpoints to its neighbours and one float32 ulp either side."""
    nbits = torch.finfo(dtype).bits
    codes = torch.arange(2**nbits, dtype=torch.int32)
    vals = (codes.to(torch.int16) if nbits == 16 else codes.to(torch.uint8)).view(dtype).float()
    vals = vals[torch.isfinite(vals)]
    pos = torch.unique(vals.abs())
    nxt = torch.cat([pos[1:], pos[-1:] * 2])
    mids = ((pos.double() + nxt.double()) / 2).float()
    probe = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e39))])
    return torch.cat([probe, -probe])


SPECIALS = torch.tensor(
    [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 1.0, -1.0,
     2.0**-149, -(2.0**-149), 2.0**-126, 2.0**-127 * 1.5, 3.4028234663852886e38, -3.4028234663852886e38,
     65504.0, 65519.996, 65520.0, 65536.0, 448.0, 464.0, 464.00003, 480.0, 57344.0, 61439.996, 61440.0,
     2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-9, 2.0**-10, 2.0**-16, 2.0**-17, 1 + 2.0**-11, 1 + 2.0**-12],
    dtype=torch.float32,
)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("probe_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_neighbours_and_midpoints(name, probe_dtype):
    x = _grid_probe(probe_dtype)
    _assert_same(lp.quantize(x, name), x.to(TORCH_DTYPES[lp.parse_format(name)]).float())


@pytest.mark.parametrize("name", PRESETS)
def test_random_bit_patterns(name):
    rng = np.random.default_rng(1234)
    x = _f32(rng.integers(0, 2**32, size=1_000_000, dtype=np.uint64))
    _assert_same(lp.quantize(x, name), x.to(TORCH_DTYPES[lp.parse_format(name)]).float())


@pytest.mark.parametrize("name", PRESETS)
def test_specials(name):
    x = SPECIALS
    _assert_same(lp.quantize(x, name), x.to(TORCH_DTYPES[lp.parse_format(name)]).float())


def test_nan_is_kept_as_is():
    x = _f32(np.array([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=np.uint64))
    for name in PRESETS:
        assert torch.equal(lp.quantize(x, name).view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("name", PRESETS)
def test_float64_input_matches_the_float32_result(name):
    rng = np.random.default_rng(7)
    x = _f32(rng.integers(0, 2**32, size=200_000, dtype=np.uint64))
    want = x.to(TORCH_DTYPES[lp.parse_format(name)]).double()
    y = lp.quantize(x.double(), name)
    _assert_same(y, want)


@pytest.mark.parametrize(
    "src, name", [(torch.float16, "e5m2"), (torch.float16, "e4m3"), (torch.bfloat16, "e4m3"), (torch.bfloat16, "e5m2")]
)
def test_half_inputs(src, name):
    x = _grid_probe(src).to(src)
    y = lp.quantize(x, name)
    assert y.dtype == src
    ref = x.to(TORCH_DTYPES[lp.parse_format(name)]).to(src)
    _assert_same(y.float(), ref.float())


def test_fp32_format_is_identity_on_float32():
    x = torch.randn(100)
    assert lp.quantize(x, "fp32") is x
