"""lowprec.train.SGD / AdamW against torch.optim on fp32 (to within a few ulps), and Δ = what step() adds."""

import pytest
import torch

from lowprec.train import SGD, AdamW

CASES = {
    "sgd": (SGD, torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum-wd": (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgd-dampening": (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.3, weight_decay=1e-3)),
    "adamw": (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-betas": (AdamW, torch.optim.AdamW, dict(lr=3e-3, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0)),
}


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(40, 30, generator=g), torch.randn(30, generator=g), torch.randn(3, 4, 5, generator=g)]


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_optim_on_fp32(case):
    ours_cls, ref_cls, kwargs = CASES[case]
    ours = [t.clone().requires_grad_() for t in tensors(0)]
    ref = [t.clone().requires_grad_() for t in tensors(0)]
    ours_opt = ours_cls([{"params": ours[:2]}, {"params": ours[2:], "lr": kwargs["lr"] / 2}], **kwargs)
    ref_opt = ref_cls([{"params": ref[:2]}, {"params": ref[2:], "lr": kwargs["lr"] / 2}], **kwargs)
    for step in range(6):
        for a, b, g in zip(ours, ref, tensors(step + 1)):
            a.grad, b.grad = g.clone(), g.clone()
        ours[1].grad = None if step == 2 else ours[1].grad  # a parameter without gradient is left alone
        ref[1].grad = None if step == 2 else ref[1].grad
        ours_opt.step()
        ref_opt.step()
    for a, b, start in zip(ours, ref, tensors(0)):
        assert not torch.equal(a, start)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    for a, b in zip(ours, ref):
        for key, value in ref_opt.state[b].items():
            torch.testing.assert_close(ours_opt.state[a][key], value, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["sgd-momentum-wd", "adamw"])
def test_compute_deltas_is_what_step_adds(case):
    cls, _, kwargs = CASES[case]
    a = [t.clone().requires_grad_() for t in tensors(0)]
    b = [t.clone().requires_grad_() for t in tensors(0)]
    opt_a, opt_b = cls(a, **kwargs), cls(b, **kwargs)
    for step in range(3):
        for x, y, g in zip(a, b, tensors(step + 1)):
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        params, deltas = opt_b.compute_deltas()
        assert [id(p) for p in params] == [id(p) for p in b]
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case", ["sgd-momentum-wd", "sgd-nesterov", "adamw", "adamw-betas"])
def test_parameter_delta_one_at_a_time_is_compute_deltas_bit_for_bit(case):
    """The Trainer drives lowprec's optimizers one parameter at a time (only that parameter's float state
    unpacked): the same Δ and state, bit for bit, as the multi-tensor compute_deltas over all of them."""
    cls, _, kwargs = CASES[case]
    a = [t.clone().requires_grad_() for t in tensors(0)]
    b = [t.clone().requires_grad_() for t in tensors(0)]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": kwargs["lr"] / 2}]  # noqa: E731
    opt_a, opt_b = cls(groups(a), **kwargs), cls(groups(b), **kwargs)
    for step in range(4):
        for x, y, g in zip(a, b, tensors(step + 1)):
            x.grad, y.grad = g.clone(), g.clone()
        params, deltas = opt_a.compute_deltas()
        one_by_one = [(p, opt_b.parameter_delta(group, p)) for group in opt_b.param_groups for p in group["params"]]
        assert [id(p) for p, _ in one_by_one] == [id(p) for p in b]
        with torch.no_grad():
            for (p, d), (q, e) in zip(zip(params, deltas), one_by_one):
                assert torch.equal(d, e) and not torch.equal(d, torch.zeros_like(d))
                p.add_(d)
                q.add_(e)
    for x, y in zip(a, b):
        for key, value in opt_a.state[x].items():
            assert torch.equal(opt_b.state[y][key], value)


def test_rejects_invalid_hyperparameters():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        SGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        AdamW(p, betas=(0.9, 1.0))
