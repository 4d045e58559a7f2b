"""lp.inspect on the MNIST LeNet: its counts equal direct counts on the same tensors; the advised loss scale does
what it predicts; the pictures and the JSON are written."""

import json
from collections import defaultdict

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn.functional as F

import lowprec as lp
from lowprec.data import load_mnist
from lowprec.diagnostics import GRADIENT_ROLES, set_start_exponents
from lowprec.formats import max_abs_int_bits
from lowprec.models import build_model

FP16 = lp.parse_format("fp16")


@pytest.fixture(scope="module")
def mnist_batch():
    return load_mnist(limit=64)


def _inspect(batch, policy, loss_multiplier=1.0, **kwargs):
    """lp.inspect on a fresh LeNet, keeping every recorded tensor per (module, role)."""
    seen = defaultdict(list)
    torch.manual_seed(0)
    report = lp.inspect(
        build_model("lenet"), batch, policy, steps=2,
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]) * loss_multiplier,
        observe=lambda module, role, x: seen[module, role].append(x.clone()), **kwargs,
    )
    return report, {key: torch.cat([t.reshape(-1) for t in ts]) for key, ts in seen.items()}


def _lost_fp16(x: torch.Tensor, scale: float) -> int:
    return int(((x != 0) & (lp.quantize(x * scale, FP16) == 0)).sum())


def test_fp16_counts_equal_direct_counts_on_the_same_tensors(mnist_batch):
    report, tensors = _inspect(mnist_batch, "mixed-fp16")
    assert {(e.module, e.role) for e in report.entries} == set(tensors)
    for e in report.entries:
        x = tensors[e.module, e.role]
        assert e.census.total == x.numel()
        assert e.census.zeros == int((x == 0).sum())
        if e.format is None:  # optimizer state: fp32 under mixed-fp16
            continue
        assert e.format == "fp16"
        lost, sub, over = e.census.counts(FP16).at(1.0)
        assert lost == _lost_fp16(x, 1.0), (e.module, e.role)
        q = lp.quantize(x, FP16)
        assert sub == int(((q != 0) & (q.abs() < FP16.min_normal)).sum())
        assert over == int(torch.isinf(q).sum())
    weights = report.entry("features.0", "weight").census
    assert weights.total == 2 * 20 * 25  # conv1's weight, once per step


def test_underflow_case_advised_scale_recovers_the_gradients(mnist_batch):
    # the loss times 2**-12 pushes the gradients 12 binades down: unscaled fp16 loses a large share
    report, tensors = _inspect(mnist_batch, "mixed-fp16", loss_multiplier=2.0**-12, max_lost=1e-3)
    grads = torch.cat([tensors[e.module, e.role] for e in report.entries if e.role in GRADIENT_ROLES])
    nonzero = int((grads != 0).sum())
    advice = report.advice
    assert advice.nonzero == nonzero and advice.satisfied
    assert advice.lost_unscaled == _lost_fp16(grads, 1.0) / nonzero > 0.1
    s = advice.scale
    assert s > 1 and advice.lost == _lost_fp16(grads, s) / nonzero <= 1e-3  # exactly as predicted
    assert int(torch.isinf(lp.quantize(grads * s, FP16)).sum()) == 0
    assert _lost_fp16(grads, s / 2) / nonzero > 1e-3  # and it is the smallest such power of two
    rows = {r["role"]: r for r in report.rows()}
    assert float(rows["output_grad"]["lost % at S"]) < float(rows["output_grad"]["lost %"])


def test_advice_stops_below_overflow(mnist_batch):
    # float<e=4,m=3> (IEEE-style, overflows to inf) spans 2**-9 .. 240, fewer binades than LeNet's gradients:
    # no scale keeps them all, and the advice is the largest scale that does not overflow
    report, tensors = _inspect(mnist_batch, "grads=float<e=4,m=3>", max_lost=0.0)
    grads = torch.cat([tensors[e.module, e.role] for e in report.entries if e.role in GRADIENT_ROLES])
    fp8 = lp.parse_format("float<e=4,m=3>")
    s = report.advice.scale
    assert not report.advice.satisfied and report.advice.overflow == 0
    assert int(torch.isinf(lp.quantize(grads * s, fp8)).sum()) == 0
    assert int(torch.isinf(lp.quantize(grads * (2 * s), fp8)).sum()) > 0  # the largest scale without overflow
    assert "no scale" in report.advice.summary()


def test_dfx_start_exponents_are_the_groups_max_abs_exponents(mnist_batch):
    report, tensors = _inspect(mnist_batch, "dfx-10-12")
    exponents = dict(report.exponents)
    assert exponents
    for (module, role), r in exponents.items():
        assert r == int(max_abs_int_bits(tensors[module, role]))
    model = lp.convert(build_model("lenet"), "dfx-10-12")
    assert set_start_exponents(model, exponents) > 0
    assert model.features[0].quantizers["weight"].exponent.int_bits == exponents["features.0", "weight"]


def test_pictures_and_json(mnist_batch, tmp_path):
    report, _ = _inspect(mnist_batch, "mixed-fp16", loss_multiplier=2.0**-12)
    paths = report.plot(tmp_path / "png")
    assert {p.stem for p in paths} >= {"activation_grad", "output_grad", "weight", "weight_grad"}
    for p in paths:
        assert p.stat().st_size > 15_000
        pixels = mpimg.imread(p)
        assert pixels.std() > 0.05  # not a blank picture
    doc = json.loads(report.to_json(tmp_path / "report.json").read_text())
    assert doc["advice"]["loss_scale"]["scale"] == report.advice.scale
    entry = doc["entries"][0]
    assert sum(entry["log2_histogram"]["counts"]) + entry["zeros"] + entry["nonfinite"] == entry["values"]
    text = report.table(per_module=True)
    assert "features.0" in text and "loss scale S = 2^" in text


def test_inspect_leaves_the_model_alone(mnist_batch):
    model = build_model("lenet")
    before = [p.detach().clone() for p in model.parameters()]
    lp.inspect(model, mnist_batch, "int8", steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_pictures_appear_in_the_docs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "diagnostics.md").read_text()
    for name in ("diagnostics-lenet-activation-grad.png", "diagnostics-underflow-output-grad.png",
                 "diagnostics-memory-lenet.png"):
        assert f"](img/{name})" in doc
        path = root / "docs" / "img" / name
        assert path.stat().st_size > 15_000 and mpimg.imread(path).std() > 0.05
    assert "docs/diagnostics.md" in (root / "README.md").read_text()


class _Tagger(torch.nn.Module):
    """A sequence model: (batch, time) token ids -> (batch, time, vocab) logits."""

    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.head = torch.nn.Embedding(11, 6), torch.nn.GRU(6, 8, batch_first=True), \
            torch.nn.Linear(8, 11)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def test_inspect_default_loss_scores_a_sequence_model_and_says_to_pass_loss_fn_when_it_cannot():
    torch.manual_seed(0)
    x, y = torch.randint(0, 11, (4, 7)), torch.randint(0, 11, (4, 7))
    with pytest.raises(ValueError, match=r"output \(shape \(4, 7, 11\)\) against labels \(4,\).*Pass loss_fn="):
        lp.inspect(_Tagger(), (x, y[:, 0]), "mixed-bf16", steps=1)
    with pytest.raises(ValueError, match="Pass loss_fn="):  # a tuple output
        lp.inspect(torch.nn.GRU(3, 4), (torch.randn(5, 2, 3), torch.tensor([0, 1])), "mixed-bf16", steps=1)

    def per_step(model, batch):
        return F.cross_entropy(model(batch[0]).flatten(0, 1).float(), batch[1].flatten())

    report = lp.inspect(_Tagger(), (x, y), "mixed-bf16+grads=fp16", steps=1, loss_fn=per_step)
    default = lp.inspect(_Tagger(), (x, y), "mixed-bf16+grads=fp16", steps=1)  # classes last: one label a position
    assert [e.census.total for e in default.entries] == [e.census.total for e in report.entries]
    got = {(e.module, e.role): e for e in report.entries}
    assert got["head", "output_grad"].census.total == 4 * 7 * 11 and got["head", "output_grad"].format == "fp16"
    assert got["rnn", "weight"].format == "bf16"
