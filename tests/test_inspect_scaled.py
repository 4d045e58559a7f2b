"""``lowprec inspect`` for scaled formats: block scales, blocks that clip or flush, SQNR, on constructed tensors
whose answers are worked out by hand, then through ``lp.inspect`` (table, JSON, picture)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.diagnostics.blocks import rounding_of
from lowprec.diagnostics.census import census
from lowprec.formats import parse_format
from lowprec.formats.scaled_blocks import scaled_blocks


def mx_tensor() -> torch.Tensor:
    """Two blocks of 32. Block 0: amax 31 (floor rule, e4m3: e = 4 - 8 = -4, scale 2**-4, scaled 31*16 = 496, 30*16 = 480
    beyond the midpoint 464 past 448: they clip; 29*16 = 464 is the tie, 28*16 = 448 fits). Block 1: amax
    1.0625 (e = -8): 1.0625*256 = 272, a tie between 256 and 288 -> 256 (even); 1.0 exact; 2**-18 * 256 =
    2**-10, below half of e4m3's smallest subnormal 2**-9: flushed."""
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([31.0, 30.0, 29.0, -28.0])
    x[1, :3] = torch.tensor([1.0625, 1.0, 2.0**-18])
    return x


def test_mx_blocks_clip_and_flush_exactly():
    sb = scaled_blocks(mx_tensor(), parse_format("mxfp8_e4m3"))
    assert sb.scale.tolist() == [2.0**-4, 2.0**-8]
    assert sb.clipped.sum(dim=1).tolist() == [2, 0] and sb.flushed.sum(dim=1).tolist() == [0, 1]
    r = rounding_of(mx_tensor(), parse_format("mxfp8_e4m3"))
    b = r.blocks
    assert (b.blocks, b.clipped, b.flushed, b.share("clipped"), b.share("flushed")) == (2, 1, 1, 0.5, 0.5)
    assert b.scale_log2 == ((-8, 1), (-4, 1)) and (b.zero_scale, b.nan_scale, b.empty) == (0, 0, 0)
    # the errors: 31 -> 448/16 = 28, 30 -> 28, 29 -> 28 (464 ties to 448), 1.0625 -> 1, 2**-18 -> 0
    signal = 31.0**2 + 30.0**2 + 29.0**2 + 28.0**2 + 1.0625**2 + 1.0 + 2.0**-36
    noise = 3.0**2 + 2.0**2 + 1.0 + 0.0625**2 + 2.0**-36
    assert (r.signal, r.noise) == (signal, noise)
    assert r.sqnr_db == 10 * math.log10(signal / noise)
    assert (r.flushed, r.clipped) == (1, 2)


def test_rceil_scales_clip_nothing():
    """RCEIL rounds the scale up: block 0 gets 2**-3 (31/448 < 2**-3), 31*8 = 248 fits."""
    b = rounding_of(mx_tensor(), parse_format("mxfp8_e4m3<scale=rceil>")).blocks
    assert b.clipped == 0 and b.scale_log2 == ((-8, 1), (-3, 1))


def test_mxfp4_clips_beyond_seven_and_counts_subnormals():
    """e2m1 (largest 6, top step 2): a block with amax 7.5 has e = 2 - 2 = 0; 7.5 clips, 7.0 (the tie) and 6.9
    do not (they round to 6 without saturation); 0.4 rounds to the subnormal 0.5; 0.2 flushes."""
    x = torch.tensor([7.5, 7.0, 6.9, 0.4, 0.2] + [0.0] * 27)
    sb = scaled_blocks(x, parse_format("mxfp4"))
    assert sb.clipped[0, :5].tolist() == [True, False, False, False, False]
    assert sb.quantized[0, :5].tolist() == [6.0, 6.0, 6.0, 0.5, 0.0]
    r = rounding_of(x, parse_format("mxfp4"))
    assert (r.clipped, r.subnormal, r.flushed) == (1, 1, 1)


def test_nvfp4_block_scales_clip_flush_and_zero_scale():
    """Tensor amax 2688 makes s_enc = 1. Block 0: d = 448. Block 1: amax 0.0174, amax/6 = 0.0029 rounds onto
    e4m3's subnormal 2**-9 (1.49 steps -> 1): 0.0174 * 2**9 = 8.9 > 7 clips. Block 2: amax 3 (d = 0.5, exact)
    holds 3 * 2**-12, scaled 6 * 2**-12, which flushes. Block 3: amax 1e-30, its e4m3 scale rounds to 0: the
    block flushes (and does not count as clipping)."""
    x = torch.zeros(4, 16)
    x[0, 0], x[1, 0], x[2, 0], x[2, 1], x[3, 5] = 2688.0, 0.0174, 3.0, 3.0 * 2.0**-12, 1e-30
    sb = scaled_blocks(x, parse_format("nvfp4"))
    assert sb.scale.tolist() == [448.0, 2.0**-9, 0.5, 0.0]
    r = rounding_of(x, parse_format("nvfp4"))
    b = r.blocks
    assert (b.blocks, b.clipped, b.flushed, b.zero_scale, b.nan_scale, b.empty) == (4, 1, 2, 1, 0, 0)
    assert b.scale_log2 == ((-9, 1), (-1, 1), (8, 1))
    assert (r.clipped, r.flushed) == (1, 2)


def test_nan_block_has_a_nan_scale_and_counts_nothing():
    x = torch.ones(2, 32)
    x[1, 3] = float("nan")
    r = rounding_of(x, parse_format("mxfp8_e4m3"))
    assert (r.blocks.nan_scale, r.blocks.clipped, r.blocks.flushed, r.flushed) == (1, 0, 0, 0)
    assert r.signal == 63.0  # the finite elements only; the NaN block's other ones count as rounded to NaN
    assert math.isnan(r.noise)


def test_per_tensor_scaled_float_is_one_block_and_delayed_reads_its_own_amax():
    x = torch.tensor([[448.0, 1.0], [2.0**-20, -3.0]])  # amax 448: s = 1, 2**-20 is below e4m3's 2**-10
    for f in ("scaled<e4m3>", "scaled<e4m3,delayed>"):
        r = rounding_of(x, parse_format(f))
        assert (r.blocks.blocks, r.blocks.scale_log2, r.flushed, r.clipped) == (1, ((0, 1),), 1, 0)
    rows = rounding_of(x, parse_format("scaled<e4m3,rowwise>")).blocks
    assert rows.blocks == 2 and rows.scale_log2 == ((-8, 1), (0, 1))  # row 1: s = 448/3, 1/s = 3/448 ~ 2**-7.2


def test_grid_formats_get_an_sqnr_and_no_blocks():
    x = torch.tensor([1.0, 1.0 + 2.0**-12, 70000.0])
    r = rounding_of(x, parse_format("fp16"))
    assert r.blocks is None and r.noise == math.inf and r.sqnr_db == -math.inf  # 70000 -> inf in fp16
    r = rounding_of(x[:2], parse_format("fp16"))  # 1 + 2**-12 ties to 1 in fp16 (step 2**-10)
    assert r.noise == 2.0**-24 and r.signal == 1.0 + (1.0 + 2.0**-12) ** 2


def test_census_counts_scaled_formats_in_the_tensors_shape_along_the_block_axis():
    """A convolution's 4-D tensor blocks along channels (block_axis=1): the census equals the one of the tensor
    with channels moved last; the counts are the same at every loss scale (lost = flushed, overflow =
    clipped)."""
    x = mx_tensor().reshape(2, 32, 1, 1)  # channels = 32
    fmt = parse_format("mxfp8_e4m3")
    c = census(x, [fmt], block_axis=1).counts(fmt)
    assert c.rounding.blocks.clipped == 1 and c.at(1.0) == (1, 0, 2) == c.at(2.0**20)
    assert c.rounding == census(mx_tensor(), [fmt]).counts(fmt).rounding
    flat = census(x, [fmt]).counts(fmt)  # along the last axis (length 1): 64 blocks of one element, where
    assert flat.rounding.blocks.blocks == 64 and flat.rounding.blocks.clipped == 2  # 31 and 30 still clip
    assert flat.rounding.blocks.scale_log2 == ((-26, 1), (-8, 2), (-4, 4)) and flat.rounding.blocks.empty == 57


def test_inspect_reports_block_scales_clip_flush_and_sqnr(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    batch = (torch.randn(16, 32), torch.arange(16) % 4)
    report = lp.inspect(model, batch, "mxfp8", steps=2)
    e = report.entry("0", "weight")
    blocks = e.census.counts(e.format).rounding.blocks
    assert blocks.blocks == 2 * 32 and sum(n for _, n in blocks.scale_log2) == blocks.blocks  # 2 steps, 32 rows
    row = next(r for r in report.rows(per_module=True) if (r["module"], r["role"]) == ("0", "weight"))
    assert row["clip blocks %"] == f"{100 * blocks.clipped / blocks.blocks:.3f}"
    assert float(row["SQNR dB"]) == pytest.approx(e.census.counts(e.format).rounding.sqnr_db, abs=0.01)
    doc = json.loads(report.to_json(tmp_path / "r.json").read_text())
    j = next(x for x in doc["entries"] if (x["module"], x["role"]) == ("0", "weight"))["formats"][e.format]
    lo, counts = j["blocks"]["scale_log2_histogram"]["log2_min"], j["blocks"]["scale_log2_histogram"]["counts"]
    assert {lo + i: n for i, n in enumerate(counts) if n} == dict(blocks.scale_log2)
    assert j["blocks"]["empty"] == 0 and j["blocks"]["clipped"] == blocks.clipped and j["sqnr_db"] == e.census.counts(e.format).rounding.sqnr_db
    paths = report.plot(tmp_path / "png")
    assert tmp_path / "png" / "block_scales.png" in paths
    assert all("blocks" not in f for x in lp.inspect(model, batch, "mixed-bf16", steps=1).to_json(
        tmp_path / "b.json").read_text() and json.loads((tmp_path / "b.json").read_text())["entries"]
        for f in x["formats"].values())


def test_loss_scale_advice_leaves_scaled_formats_out():
    """A scale does not move a scaled format (its scale follows the tensor): no advice from them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    batch = (torch.randn(16, 32), torch.arange(16) % 4)
    assert lp.inspect(model, batch, "params=mxfp8_e4m3,activations=mxfp8_e4m3,grads=mxfp8_e4m3", steps=1).advice.formats == ()
    assert lp.inspect(model, batch, "nvfp4", steps=1).advice.formats == ("bf16",)  # the head (@last) only


def test_inspect_runs_the_op_level_emulation_in_float32_too():
    """The GPT's attention products run through the op-level emulation, outside the converted layers: while
    inspecting they must not round either, so every recorded tensor is the same under any policy (before, e4m3
    attention gradients without a loss scale turned most of the recorded output gradients into zeros)."""
    from lowprec.models import GPT

    def recorded(policy: str) -> dict:
        torch.manual_seed(0)
        gpt = GPT(vocab_size=20, block_size=16, n_layer=1, n_embd=32, n_head=2)
        tokens = torch.randint(0, 20, (4, 17))
        seen: dict = {}
        lp.inspect(gpt, (tokens[:, :-1], tokens[:, 1:]), policy, steps=1,
                   observe=lambda m, r, x: seen.setdefault((m, r), x.clone()))
        return seen

    a, b = recorded("fp8-e4m3"), recorded("mxfp8")
    assert a.keys() == b.keys() and ("blocks.0.attn.qkv", "output_grad") in a
    assert all(torch.equal(a[k], b[k]) for k in a)


class FunctionalProduct(nn.Module):
    """x @ W through torch.matmul, W a parameter: an op the op-level emulation quantizes, outside any layer. W's
    rows span 16 binades down each column and one binade along each row."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 32, generator=g) * 2.0 ** (torch.arange(64) % 16 - 8.0)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_inspect_censuses_op_level_operands_blocked_as_the_op_rounds_them():
    """An op outside the converted layers is censused under its call site (``module:op[index]``), each operand
    blocked where the op's quantizer blocks it, along the product's reduction dimension: W's MX blocks run down
    its columns (dim -2, 16 binades a block: most of it flushes), x's along its rows."""
    model = FunctionalProduct()
    w0 = model.w.detach().clone()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    report = lp.inspect(model, (x, torch.arange(16) % 32), "mxfp4", steps=1)
    mxfp4 = parse_format("mxfp4")
    weight = report.entry(":matmul[0]", "weight")
    assert weight.format == "mxfp4" and report.entry(":matmul[0]", "output").format == "bf16"
    down, along = census(w0, [mxfp4], axis=-2), census(w0, [mxfp4], axis=-1)
    assert weight.census == down != along
    assert down.formats[0].rounding.blocks.flushed > along.formats[0].rounding.blocks.flushed
    assert report.entry(":matmul[0]", "activation").census == census(x, [mxfp4], axis=-1)
    assert [(e.role, e.format) for e in report.entries] == [
        ("weight", "mxfp4"), ("activation", "mxfp4"), ("output", "bf16"), ("output_grad", "mxfp4"),
        ("weight_grad", "bf16")]
