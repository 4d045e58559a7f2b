"""The custom training loop and conversion: stock models train, and every misuse is caught, not absorbed.

In-place ops after converted layers (autograd Functions never return views), clipping after ``unscale_`` on
the native path, ``apply_update`` without ``trainer.backward``, the Trainer's policy against the model's,
optimizers built before ``convert``, converting twice.
"""

import copy
import importlib
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.formats import compile_enabled

quantize_module = importlib.import_module("lowprec.formats.quantize")

# -- in-place ops after a converted layer ----------------------------------------------------------------------

INPLACE_POLICIES = ["mixed-fp16", "mixed-bf16", "fp8-e4m3", "fp8-e5m2", "int8", "dfx-10-12", "wrpn-4-4", "weight=int8"]


def _bn_relu() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(16 * 64, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))


def _linear_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(inplace=True), nn.Linear(2048, 2))


def _not_inplace(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return twin


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model(x).square().sum().backward()
    return [p.grad for p in model.parameters()]


@pytest.fixture(params=["compiled", "eager"])
def kernel_path(request, monkeypatch):
    """lowprec's compiled kernels (fast paths off, so every format reaches them at >= 65,536 elements) or eager."""
    if request.param == "compiled":
        if not compile_enabled():
            pytest.skip("torch.compile unavailable here")
        monkeypatch.setattr(quantize_module, "FAST_PATHS", False)
    else:
        monkeypatch.setenv("LOWPREC_COMPILE", "0")
    return request.param


@pytest.mark.parametrize("policy", INPLACE_POLICIES)
@pytest.mark.parametrize("build, small, large", [
    (_bn_relu, (1, 3, 8, 8), (64, 3, 8, 8)),  # batch-norm output 1,024 / 65,536 elements
    (_linear_relu, (2, 64), (32, 64)),  # Linear(64, 2048) output 4,096 / 65,536 elements
], ids=["batchnorm", "linear-64-2048"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_inplace_relu_after_converted_layer_trains_with_the_same_gradients(policy, build, small, large, size,
                                                                           kernel_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(build(), policy)
    twin = _not_inplace(model)
    x = torch.randn(small if size == "small" else large)
    for got, want in zip(_grads(model, x), _grads(twin, x), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("policy", ["mixed-fp16", "int8", "weight=int8"])
def test_inplace_relu_after_converted_3d_linear_and_boundaries(policy):
    """A 3-d input (F.linear's result is a view) and role boundaries that pass their input through."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq = lp.convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 2)), policy)
        bn = lp.convert(nn.Sequential(nn.BatchNorm1d(8), nn.ReLU(inplace=True)), "output_grad=int8")
    for model, x in ((seq, torch.randn(2, 3, 8)), (bn, torch.randn(4, 8))):
        for got, want in zip(_grads(model, x), _grads(_not_inplace(model), x), strict=True):
            assert torch.equal(got, want)


@pytest.mark.skipif(not compile_enabled(), reason="needs torch.compile")
def test_inplace_relu_after_converted_layer_trains_under_torch_compile():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(_linear_relu(), "mixed-fp16")
    twin = _not_inplace(model)
    x = torch.randn(32, 64)
    got = _grads(torch.compile(model), x)
    for g, w in zip(got, _grads(twin, x), strict=True):
        assert torch.allclose(g, w, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e4m3", "dfx<8>", "fixed<12,5>", "uniform<3>", "bfp<6,32>",
                                 "bfp<6,48>"])
@pytest.mark.parametrize("numel", [1000, 1 << 16, (1 << 16) + 7])
def test_quantize_never_returns_a_view(fmt, numel, both_paths):
    x = torch.randn(numel // 4 + 1, 4)[: numel // 4] if numel % 4 == 0 else torch.randn(numel)
    y = lp.quantize(x, fmt)
    assert not y._is_view() and y.shape == x.shape and y.data_ptr() != x.data_ptr()


# -- apply_update after a backward by hand, or after none --------------------------------------------------------

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _setup(policy: str, opt=torch.optim.SGD, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(_mlp(), policy)
        trainer = lp.Trainer(model, opt(model.parameters(), lr=0.1, **kw))
    return model, trainer


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _loss(model, data=None):
    x, y = data or _data()
    return nn.functional.cross_entropy(model(x).float(), y)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


INT8_LAZY_SCALED = replace(lp.Policy.preset("int8-lazy"), loss_scale="static:256")


@pytest.mark.parametrize("policy", ["mixed-fp16", "native-fp16", INT8_LAZY_SCALED], ids=str)
def test_hand_backward_then_apply_update_under_loss_scaling_is_refused(policy):
    model, trainer = _setup(policy)
    before, scale = _snapshot(model), trainer.scaler.scale
    assert scale != 1.0
    _loss(model).backward()
    for call in (trainer.apply_update, trainer.unscale_):
        with pytest.raises(RuntimeError, match=r"outside trainer.backward\(loss\).*times too small"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(model), before))
    assert trainer.steps == 0 and trainer.scaler.scale == scale
    # mixed with the trainer's own backward: refused too
    trainer.zero_grad()
    trainer.backward(_loss(model))
    _loss(model, _data(1)).backward()
    with pytest.raises(RuntimeError, match="outside trainer.backward"):
        trainer.apply_update()
    # after zero_grad the trainer's own idiom works
    trainer.zero_grad()
    trainer.backward(_loss(model))
    assert not trainer.apply_update().skipped and trainer.steps == 1


def test_hand_backward_without_loss_scaling_updates_like_trainer_backward():
    (a, ta), (b, tb) = _setup("int8-lazy"), _setup("int8-lazy")
    assert ta.scaler.scale == 1.0
    for seed in range(3):
        _loss(a, _data(seed)).backward()
        ta.apply_update()
        tb.step(_loss(b, _data(seed)))
    assert all(torch.equal(u, v) for u, v in zip(_snapshot(a), _snapshot(b)))


@pytest.mark.parametrize("policy", ["fp32", "mixed-fp16", "native-bf16"])
def test_apply_update_without_backward_is_refused(policy):
    model, trainer = _setup(policy, momentum=0.9)
    before = _snapshot(model)
    for call in (trainer.apply_update, trainer.unscale_):
        with pytest.raises(RuntimeError, match="no parameter has a gradient"):
            call()
    trainer.step(_loss(model))  # a real step still works, then a second update without backward is refused
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        trainer.apply_update()
    assert trainer.steps == 1 and not all(torch.equal(a, b) for a, b in zip(_snapshot(model), before))


# -- the Trainer's policy against the model's ---------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["mixed-fp16", "native-bf16", "int8-lazy"])
def test_trainer_without_policy_takes_the_converted_models_policy(policy):
    model, trainer = _setup(policy)
    assert trainer.policy == lp.Policy.preset(policy) == lp.nn.conversion_policy(model)
    assert trainer.scaler.scale == lp.train.scaler_for(lp.Policy.preset(policy)).scale
    if policy == "mixed-fp16":
        assert trainer.scaler.scale == 2.0**16  # not the loss scale 1 of an fp32 default
    plain = _mlp()
    assert lp.Trainer(plain, torch.optim.SGD(plain.parameters(), lr=0.1)).policy == lp.Policy()


@pytest.mark.parametrize("converted, given", [("mixed-fp16", "fp32"), ("mixed-fp16", "int8"),
                                              ("int8", "mixed-bf16"), ("native-bf16", "mixed-bf16")])
def test_trainer_refuses_a_policy_unlike_the_models_conversion(converted, given):
    model, _ = _setup(converted)
    with pytest.raises(ValueError, match="converted under .* the trainer was given"):
        lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), given)


def test_trainer_accepts_the_models_policy_with_its_own_loss_scale():
    model, _ = _setup("mixed-fp16")
    same = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mixed-fp16")
    scaled = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        replace(lp.Policy.preset("mixed-fp16"), loss_scale="static:8"))
    assert same.scaler.scale == 2.0**16 and scaled.scaler.scale == 8.0


def test_trainer_refuses_a_quantizing_policy_on_an_unconverted_model():
    model = _mlp()
    with pytest.raises(ValueError, match=r"quantizes .*activation.* convert it first"):
        lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "int8")
    stored = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), lp.Policy.of(master="fixed<8,4>"))
    assert stored.slots[0].master is not None  # update roles alone: the trainer's own job, allowed


# -- optimizers built before convert, converting twice -------------------------------------------------------------

@pytest.mark.parametrize("policy", ["int8", "native-bf16"])
def test_optimizer_built_before_convert_is_refused(policy):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = lp.convert(model, policy)
    with pytest.raises(ValueError, match="before lowprec.convert.*update nothing"):
        lp.Trainer(converted, optimizer)
    before = _snapshot(converted)
    _loss(converted).backward()
    with pytest.raises(RuntimeError, match="would update nothing"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(converted), before))
    # the original model trained with its own optimizer is not affected
    _loss(model).backward()
    optimizer.step()


@pytest.mark.parametrize("policy", ["int8", "native-bf16"])
def test_convert_inplace_keeps_the_optimizer_valid(policy):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = lp.convert(model, policy, inplace=True)
    assert converted is model and all(p is q for p, q in zip(params, converted.parameters()))
    before = _snapshot(converted)
    _loss(converted).backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(_snapshot(converted), before))


@pytest.mark.parametrize("first, second", [("int8", "native-bf16"), ("native-bf16", "int8"), ("int8", "int8"),
                                           ("mixed-fp16", "fp32"), ("native-fp16", "native-bf16")])
@pytest.mark.parametrize("inplace", [False, True])
def test_converting_a_converted_model_is_refused(first, second, inplace):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once = lp.convert(model, first, inplace=inplace)
        with pytest.raises(ValueError, match="already converted .*Convert the original model"):
            lp.convert(once, second)
        with pytest.raises(ValueError, match="already converted"):
            lp.convert(nn.Sequential(once), second)  # a converted part of a bigger model
        if not inplace:  # the original is as it was and converts under the second policy
            assert all(p.dtype == torch.float32 for p in model.parameters())
            assert lp.nn.conversion_policy(lp.convert(model, second)) == lp.Policy.preset(second)


# -- clipping after unscale_ on the native path -------------------------------------------------------------------

def _native_pair(policy: str, seed: int = 0):
    """A native model with an fp32 batch-norm between two fp16/bf16 linear layers, and its Trainer."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)), policy)
    return model, lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


@pytest.mark.parametrize("policy", ["native-bf16", "native-fp16"])
def test_clip_after_unscale_on_native_path_sees_the_full_unscaled_gradients(policy):
    data = [(torch.randn(8, 6) * 4, torch.randint(0, 3, (8,))) for _ in range(3)]
    model, trainer = _native_pair(policy)
    reference = copy.deepcopy(model)  # the fp32 reference: the same gradients, unscaled, as float64 numbers
    own, own_trainer = _native_pair(policy)
    builtin, builtin_trainer = _native_pair(policy)
    builtin_trainer.clip_grad_norm = 0.5
    for x, y in data:
        _loss(reference, (x, y)).backward()
        want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double())
                                                     for p in reference.parameters()]))
        reference.zero_grad()
        trainer.backward(_loss(model, (x, y)))
        trainer.unscale_()
        with pytest.raises(RuntimeError, match="master copy.*trainer.master_params"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # would miss the fp16/bf16 gradients
        got = trainer.clip_grad_norm_(0.5)
        assert got.item() == pytest.approx(want.item(), rel=1e-6 if policy == "native-bf16" else 1e-3)
        assert got.item() > 0.5  # the clip was active
        own_trainer.backward(_loss(own, (x, y)))
        own_trainer.unscale_()
        assert torch.equal(torch.nn.utils.clip_grad_norm_(own_trainer.master_params(), 0.5), got)
        for t in (trainer, own_trainer):
            assert not t.apply_update().skipped
        builtin_trainer.step(_loss(builtin, (x, y)))
        reference.load_state_dict(model.state_dict())
    for a, b, c in zip(model.parameters(), own.parameters(), builtin.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("policy, opt", [("native-bf16", torch.optim.SGD), ("int8-lazy", lp.train.SGD),
                                         ("mixed-fp16", torch.optim.SGD)])
def test_lr_scheduler_with_the_trainer_sets_each_steps_lr_without_warnings(policy, opt):
    model, trainer = _setup(policy, opt)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler")
        for seed in range(3):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.step(_loss(model, _data(seed)))
            scheduler.step()
    assert lrs == [0.1, 0.05, 0.025]


def test_a_model_converted_in_parts_under_two_policies_needs_the_trainers_policy():
    model = nn.Sequential(_mlp(), _mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lp.convert(model[0], "int8", inplace=True)
        lp.convert(model[1], "mixed-fp16", inplace=True)
    with pytest.raises(ValueError, match="different policies .*int8.*pass the policy"):
        lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "mixed-fp16")
    assert trainer.scaler.scale == 2.0**16
