"""The fused optimizer step of native models (lowprec.train.fused) against the unfused step it replaces."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp
from lowprec.nn.native import native_dtype
from lowprec.train import fused

pytestmark = pytest.mark.skipif(not lp.formats.compile_enabled(), reason="the fused step needs torch.compile")


def _model(recipe):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # native fp16 on a CPU computes in fp32 (warned and tested elsewhere)
        return lp.convert(plain, recipe)


def _pair(recipe, optimizer, **kw):
    """(fused trainer, unfused trainer) on identical copies of one model."""
    model = _model(recipe)
    twin = copy.deepcopy(model)
    a = lp.Trainer(model, optimizer(model.parameters(), **kw), recipe)
    b = lp.Trainer(twin, optimizer(twin.parameters(), **kw), recipe)
    b.fused = None
    assert a.fused is not None
    return a, b


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen) * 4, torch.randint(0, 5, (16,), generator=gen)) for _ in range(n)]


def _loss(trainer, x, y):
    return F.cross_entropy(trainer.model(x), y)


def _state(trainer):
    opt = trainer.optimizer
    masters = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    buffers = [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
               if "momentum_buffer" in opt.state[p]]
    return masters, buffers, [p.detach().clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("recipe", ["native-bf16", "native-fp16"])
def test_bit_identical_to_the_unfused_step_with_lowprec_sgd(recipe):
    a, b = _pair(recipe, lp.train.SGD, lr=0.05, momentum=0.9)
    for x, y in _batches(6):
        ra, rb = a.step(_loss(a, x, y)), b.step(_loss(b, x, y))
        assert (ra.skipped, ra.scale) == (rb.skipped, rb.scale)
        for ta, tb in zip(_state(a), _state(b)):
            assert len(ta) == len(tb) and all(torch.equal(u, v) for u, v in zip(ta, tb))
    # the parameter is its master rounded to nearest (even), after every step
    for p, w in zip(a.model.parameters(), _state(a)[0]):
        assert torch.equal(p, w.to(p.dtype))
    assert {p.dtype for p in a.model.parameters()} == {native_dtype(lp.Policy.preset(recipe)), torch.float32}


@pytest.mark.parametrize("kw", [dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
                                dict(momentum=0.5, dampening=0.3), dict(momentum=0.0, weight_decay=1e-3)])
def test_torch_sgd_within_its_multiply_adds(kw):
    """torch's eager kernels fuse w + a*d into one rounding, the compiled kernel rounds twice: masters within a
    few fp32 ulps after five steps, the hyperparameters' algorithm otherwise the same."""
    a, b = _pair("native-bf16", torch.optim.SGD, lr=0.05, **kw)
    for x, y in _batches(5):
        a.step(_loss(a, x, y))
        b.step(_loss(b, x, y))
    for ta, tb in zip(_state(a), _state(b)):
        for u, v in zip(ta, tb):
            assert torch.allclose(u.float(), v.float(), rtol=2.0**-20, atol=1e-7)


@pytest.mark.parametrize("optimizer, kw", [
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3, betas=(0.8, 0.99))),
    (lp.train.AdamW, dict(lr=1e-2, weight_decay=0.1)),
])
@pytest.mark.parametrize("recipe", ["native-bf16", "native-fp16"])
def test_adam_family_agrees_with_the_unfused_step(optimizer, kw, recipe):
    """The same algorithm and state: fed the same gradients for six steps, masters, moments and step counts
    agree with the unfused path up to the multiply-adds torch fuses (and lowprec.train.AdamW's rounding of the
    whole update). Gradients are set directly: through a forward pass Adam would amplify a one-ulp difference."""
    a, b = _pair(recipe, optimizer, **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        for pa, pb in zip(a.model.parameters(), b.model.parameters()):
            g = torch.randn(pa.shape, generator=gen) * 2.0 ** torch.randint(-12, 4, pa.shape, generator=gen)
            pa.grad, pb.grad = g.to(pa.dtype), g.to(pb.dtype)
        ra, rb = a.apply_update(), b.apply_update()
        assert not ra.skipped and not rb.skipped
    sa, sb = a.optimizer.state, b.optimizer.state

    def ulps(u, v):  # in float32 ulps of the tensor's largest magnitude
        return ((u - v).abs().max() / (v.abs().max() * 2.0**-23)).item()

    for wa, wb in zip(a.optimizer.param_groups[0]["params"], b.optimizer.param_groups[0]["params"]):
        assert sa[wa]["step"].item() == sb[wb]["step"].item() == 6.0
        assert ulps(wa, wb) <= 4 and ulps(sa[wa]["exp_avg"], sb[wb]["exp_avg"]) <= 4
        assert torch.allclose(sa[wa]["exp_avg_sq"], sb[wb]["exp_avg_sq"], rtol=2.0**-21, atol=0)
    for p, w in zip(a.model.parameters(), a.optimizer.param_groups[0]["params"]):
        assert torch.equal(p, w.to(p.dtype))


def test_learning_rate_and_scale_changes_take_effect():
    a, b = _pair("native-fp16", lp.train.SGD, lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(_batches(4)):
        for t in (a, b):
            t.optimizer.param_groups[0]["lr"] = 0.05 / (i + 1)
        a.step(_loss(a, x, y))
        b.step(_loss(b, x, y))
    assert all(torch.equal(u, v) for u, v in zip(_state(a)[0], _state(b)[0]))


def test_non_finite_gradient_skips_and_changes_nothing():
    a, _ = _pair("native-bf16", torch.optim.SGD, lr=0.05, momentum=0.9)
    before = _state(a)
    x, y = _batches(1)[0]
    x[3, 2] = float("inf")
    result = a.step(_loss(a, x, y))
    assert result.skipped
    after = _state(a)
    assert after[1] == [] and all(torch.equal(u, v) for u, v in zip(before[0] + before[2], after[0] + after[2]))
    assert all(p.grad is None for p in a.model.parameters())


def test_gradient_accumulation_sums_in_float32_like_the_unfused_step():
    a, b = _pair("native-bf16", lp.train.SGD, lr=0.05, momentum=0.9)
    batches = _batches(4)
    for t in (a, b):
        for x, y in batches[:3]:
            t.backward(_loss(t, x, y))
        t.apply_update()
        t.step(_loss(t, *batches[3]))
    for ta, tb in zip(_state(a), _state(b)):
        assert all(torch.equal(u, v) for u, v in zip(ta, tb))


@pytest.mark.parametrize("optimizer, kw", [(lp.train.SGD, dict(lr=0.05, momentum=0.9)),
                                           (torch.optim.AdamW, dict(lr=1e-2))])
def test_a_compiler_failure_falls_back_with_one_warning(optimizer, kw, monkeypatch):
    """The failed step leaves no state behind: the run is bit-identical to one that never tried."""
    a, b = _pair("native-fp16", optimizer, **kw)

    def broken(kernel):
        def compiled(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(fused, "_compiled", broken)
    batches = _batches(3)
    with pytest.warns(RuntimeWarning, match="fused optimizer step could not be compiled"):
        a.step(_loss(a, *batches[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches[1:]:
            a.step(_loss(a, x, y))
    for x, y in batches:
        b.step(_loss(b, x, y))
    assert a.fused.failed
    for ta, tb in zip(_state(a), _state(b)):
        assert all(torch.equal(u, v) for u, v in zip(ta, tb))


def test_the_fused_step_is_taken_only_where_it_is_exact(monkeypatch):
    model = _model("native-bf16")
    assert lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "native-bf16").fused is not None
    model = _model("native-bf16")
    clipped = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "native-bf16", clip_grad_norm=1.0)
    assert clipped.fused is None
    model = _model("native-bf16")
    assert lp.Trainer(model, torch.optim.AdamW(model.parameters(), amsgrad=True), "native-bf16").fused is None
    model = _model("native-bf16")
    assert lp.Trainer(model, torch.optim.RMSprop(model.parameters()), "native-bf16").fused is None
    model = _model("mixed-bf16")  # emulated: nothing native to fuse
    assert lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mixed-bf16").fused is None
    monkeypatch.setenv("LOWPREC_COMPILE", "0")
    model = _model("native-bf16")
    assert lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "native-bf16").fused is None


def test_checkpoints_cross_between_the_paths():
    a, b = _pair("native-bf16", torch.optim.SGD, lr=0.05, momentum=0.9)
    batches = _batches(3)
    for x, y in batches[:2]:
        a.step(_loss(a, x, y))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert all(torch.equal(u, v) for ta, tb in zip(_state(a), _state(b)) for u, v in zip(ta, tb))
    a.step(_loss(a, *batches[2]))
    b.step(_loss(b, *batches[2]))
    for ta, tb in zip(_state(a), _state(b)):
        for u, v in zip(ta, tb):
            assert torch.allclose(u.float(), v.float(), rtol=2.0**-21, atol=1e-8)
