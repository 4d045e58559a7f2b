"""The native path (lowprec.nn.native + the trainer's fp32 master copies): numerics, not speed."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp
from lowprec.models import build_model
from lowprec.nn.native import compute_dtype, native_dtype

BF16_NATIVE = compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _native(model, recipe="native-bf16"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 on a CPU without fp16 matmul warns (tested below)
        return lp.convert(model, recipe)


def test_parameters_and_activations_are_stored_in_the_format():
    model = _native(build_model("resnet20", in_channels=1))
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ReLU)):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.update({name: out.dtype}))
    out = model(torch.randn(2, 1, 28, 28))
    assert out.dtype == torch.float32  # the loss is computed in fp32
    assert set(seen.values()) == {torch.bfloat16}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".bn" in name or name.startswith("bn") else torch.bfloat16), name
    out.sum().backward()
    assert {p.grad.dtype for n, p in model.named_parameters() if "bn" not in n} == {torch.bfloat16}


def test_batch_norm_and_softmax_compute_in_float32():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Softmax(dim=1))
    model = _native(plain)
    x = torch.randn(256, 8) * 50 + 1000
    h = model[0](x.bfloat16())
    assert h.dtype == torch.bfloat16
    reference = copy.deepcopy(plain[1])  # fp32 batch-norm on the same bf16 values
    expected = reference(h.float())
    got = model[1](h)
    assert got.dtype == torch.bfloat16 and model[1].running_var.dtype == torch.float32
    # statistics accumulated in fp32: the fp32 reference up to fp32 rounding; bf16 statistics are far off
    assert torch.allclose(model[1].running_var, reference.running_var, rtol=1e-5)
    assert torch.allclose(model[1].running_mean, reference.running_mean, rtol=1e-5)
    bf16_bn = copy.deepcopy(plain[1]).bfloat16()
    bf16_bn(h)
    assert not torch.allclose(bf16_bn.running_var.float(), reference.running_var, rtol=1e-3)
    # the output: the fp32 result rounded once to bf16 (one bf16 ulp at most)
    assert ((got.float() - expected).abs() <= expected.abs() * 2.0**-8 + 1e-6).all()
    assert torch.equal(model[2](got), torch.softmax(got.float(), dim=1).bfloat16())


def test_master_weights_keep_updates_below_half_an_ulp():
    """MPT Fig. 4: an update below half a bf16 ulp of the weight is lost without the fp32 master copy."""
    model = _native(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model.weight.fill_(1.0)  # bf16 ulp at 1 is 2**-7
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=2.0**-10), "native-bf16")
    master = trainer.optimizer.param_groups[0]["params"][0]
    assert master.dtype == torch.float32 and master is not model.weight
    x = torch.ones(1, 4)
    for step in range(1, 9):
        trainer.step(-model(x).sum())  # gradient -1 on every weight: +2**-10 per step
        assert torch.equal(master, torch.full_like(master, 1 + step * 2.0**-10))
        assert torch.equal(model.weight, master.bfloat16())
    assert torch.equal(model.weight, torch.full_like(model.weight, 1 + 2.0**-7))  # moved by one ulp


def test_native_close_to_the_emulated_path_of_the_same_format():
    torch.manual_seed(2)
    base = build_model("lenet")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    results = {}
    for recipe in ("native-bf16", "mixed-bf16"):
        model = _native(base, recipe)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        results[recipe] = loss.detach(), model.classifier[-1].weight.grad.float()
    (loss_n, grad_n), (loss_e, grad_e) = results["native-bf16"], results["mixed-bf16"]
    assert abs(loss_n - loss_e) < 2e-2 * abs(loss_e)
    assert (grad_n - grad_e).norm() < 3e-2 * grad_e.norm()


def test_native_bf16_trains_mnist_like_fp32():
    from lowprec.data import load_mnist

    x, y = load_mnist(limit=4096)
    xt, yt = load_mnist("test", limit=1000)
    accuracy = {}
    for recipe in ("fp32", "native-bf16"):
        torch.manual_seed(0)
        model = _native(build_model("lenet"), recipe)
        trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), recipe)
        for i in range(0, len(x), 64):
            trainer.step(F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]))
        with torch.no_grad():
            accuracy[recipe] = (model(xt).argmax(1) == yt).float().mean().item()
    assert accuracy["fp32"] > 0.8
    assert abs(accuracy["native-bf16"] - accuracy["fp32"]) < 0.03


def test_fp16_without_fp16_matmul_stores_fp16_and_computes_fp32(monkeypatch):
    from lowprec.nn import native

    monkeypatch.setattr(native, "_native_on", lambda dtype, device: dtype == torch.bfloat16)
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    native._warn_storage_only.cache_clear()
    model = lp.convert(plain, "native-fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    x = torch.randn(5, 8)
    h = F.linear(x.half().float(), model[0].weight.float(), model[0].bias.float()).half()
    expected = F.linear(torch.relu(h).float(), model[2].weight.float(), model[2].bias.float()).half().float()
    with pytest.warns(UserWarning, match="storing in torch.float16 and computing in float32"):
        out = model(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert model[0].weight.grad.dtype == torch.float16


def test_native_fp16_overflow_skips_the_step_and_keeps_the_masters():
    model = _native(nn.Linear(4, 2), "native-fp16")
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "native-fp16")
    masters = [p.clone() for p in trainer.optimizer.param_groups[0]["params"]]
    result = trainer.step(model(torch.full((1, 4), 1e4)).sum())  # S = 65536: the scaled grads overflow fp16
    assert result.skipped and result.next_scale == result.scale / 2
    assert all(torch.equal(a, b) for a, b in zip(masters, trainer.optimizer.param_groups[0]["params"]))
    result = trainer.step(model(torch.ones(1, 4)).sum())
    assert not result.skipped


def test_native_state_dict_resumes_bit_exactly():
    torch.manual_seed(3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def make():
        torch.manual_seed(4)
        model = _native(build_model("lenet"))
        return lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "native-bf16")

    a = make()
    for _ in range(3):
        a.step(F.cross_entropy(a.model(x), y))
    saved = copy.deepcopy(a.state_dict())
    a.step(F.cross_entropy(a.model(x), y))
    b = make()
    b.load_state_dict(saved)
    b.step(F.cross_entropy(b.model(x), y))
    for (pa, pb) in zip(a.optimizer.param_groups[0]["params"], b.optimizer.param_groups[0]["params"]):
        assert torch.equal(pa, pb)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("spec, match", [
    ("weight=int8,activations=int8,grads=int8,path=native", "one fp16 or bf16 format"),
    ("params=bf16,activations=bf16,path=native", "one fp16 or bf16 format"),
    ("params=e4m3,activations=e4m3,grads=e4m3,path=native", "fp8 has no native path"),
    ("params=bf16/stochastic,activations=bf16/stochastic,grads=bf16/stochastic,path=native", "nearest"),
    ("params=bf16,activations=bf16,grads=bf16,master=bf16,path=native", "master=bf16"),
    ("params=bf16,activations=bf16,grads=bf16,path=native; fc1: weight=fp16", "overrides"),
])
def test_policies_without_a_native_form_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        native_dtype(lp.Policy.parse(spec))


def test_path_setting_round_trips_and_validates():
    policy = lp.Policy.preset("native-bf16")
    assert policy.path == "native" and lp.Policy.parse(policy.spec()) == policy
    with pytest.raises(ValueError, match="path must be"):
        lp.Policy.parse("path=gpu")


@pytest.mark.skipif(not BF16_NATIVE, reason="this CPU has no native bf16 matmul")
def test_bf16_cpu_matmul_is_native():
    assert compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16


@cuda
@pytest.mark.parametrize("recipe", ["native-bf16", "native-fp16"])
def test_native_on_cuda(recipe):
    model = _native(build_model("lenet").cuda(), recipe)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), recipe)
    x, y = torch.randn(32, 1, 28, 28, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    losses = [trainer.step(F.cross_entropy(model(x), y)) for _ in range(5)]
    dtype = native_dtype(lp.Policy.preset(recipe))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not losses[-1].skipped


def test_tied_weights_stay_tied_and_the_original_model_is_untouched():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied, as in language models
    plain = nn.Sequential(embedding, head)
    model = _native(plain)
    assert model[1].weight is model[0].weight and model[0].weight.dtype == torch.bfloat16
    assert plain[0].weight.dtype == torch.float32  # convert() works on a copy
    out = model(torch.tensor([[1, 2, 3]]))
    out.sum().backward()
    assert model[0].weight.grad.dtype == torch.bfloat16
