"""The random Hadamard transform of the weight-gradient GEMM (NVFP4 recipe): the matrix, exactness without
quantization, NVFP4 operands blocked along the reduction dimension, determinism, and the policy wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowprec as lp
from lowprec.models import GPT
from lowprec.nn import QLinearFunction
from lowprec.nn.hadamard import hadamard_matrix, random_hadamard, rht_weight_grad
from lowprec.nn.roles import IDENTITY
from lowprec.policy import LAYER_ROLES, Policy, Quant, Quantizer
from test_scaled_formats import bits


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


def quantizers(**roles: str) -> dict[str, Quantizer]:
    return {r: Quantizer(Quant.parse(roles[r])) if r in roles else IDENTITY for r in LAYER_ROLES}


def test_matrix_is_a_signed_sylvester_hadamard_and_orthogonal_exactly():
    m = hadamard_matrix(0).numpy().astype(np.float64)
    h = sylvester(16)
    signs = m[0] / h[0] * 4  # column j of M is column j of H16 times s_j / 4
    assert set(np.abs(m).ravel()) == {0.25} and set(signs) == {-1.0, 1.0}
    assert np.array_equal(m, h * signs / 4)
    assert np.array_equal(hadamard_matrix(0).t() @ hadamard_matrix(0), torch.eye(16))  # exact: +-1/16 sums
    assert bits(hadamard_matrix(0)) == bits(hadamard_matrix(0)) and bits(hadamard_matrix(0)) != bits(hadamard_matrix(1))


def test_transform_acts_on_blocks_of_16_rows_and_pads_with_zeros():
    torch.manual_seed(0)
    x = torch.randn(21, 5)
    y = random_hadamard(x, 3).double().numpy()
    m = hadamard_matrix(3).double().numpy()
    padded = np.vstack([x.double().numpy(), np.zeros((11, 5))])
    want = np.vstack([m @ padded[:16], m @ padded[16:]])
    assert y.shape == (32, 5) and np.allclose(y, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2-d"):
        random_hadamard(torch.zeros(2, 3, 4), 0)
    with pytest.raises(ValueError, match="seed"):
        hadamard_matrix(-1)


@pytest.mark.parametrize("rows", [(4, 8), (3, 7)])  # 32 rows; 21 rows, padded to 32
def test_unquantized_weight_grad_equals_the_untransformed_one(rows):
    """M is orthogonal: with fp32 (no quantization) the transformed dE/dW is G^T X up to float32 rounding."""
    torch.manual_seed(1)
    x = torch.randn(*rows, 24, requires_grad=True)
    w = torch.randn(10, 24, requires_grad=True)
    g = torch.randn(*rows, 10)
    q = quantizers()
    QLinearFunction.apply(x, w, None, q, None, 7).backward(g)
    transformed = w.grad.clone()
    w.grad = None
    QLinearFunction.apply(x, w, None, q, None, None).backward(g)
    exact = (g.double().reshape(-1, 10).t() @ x.detach().double().reshape(-1, 24)).float()
    assert torch.allclose(w.grad, exact, rtol=1e-5, atol=1e-5)
    assert torch.allclose(transformed, exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(transformed, w.grad)  # it did go through the transform


def test_transformed_operands_are_nvfp4_blocks_along_the_reduction_dimension():
    """Each operand is (M op)^T rounded onto NVFP4 in 1x16 blocks along N (the wgrad GEMM's reduction
    dimension), and the GEMM multiplies exactly those rounded operands. (NVFP4's own rounding is checked
    against the independent reference in test_scaled_formats.)"""
    torch.manual_seed(2)
    g, x = torch.randn(32, 6) * 3, torch.randn(32, 8)
    x[5, 2] = 40.0  # an outlier the transform spreads over its 16-row block
    q = quantizers(activation="nvfp4", output_grad="nvfp4")
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recording(role):
        def round_(t):
            seen[role] = (t, q[role].round(t))
            return seen[role][1]
        return round_

    dw = rht_weight_grad(g, x, 5, recording("output_grad"), recording("activation"))
    for role, op in (("output_grad", g), ("activation", x)):
        before, after = seen[role]
        assert before.shape == (op.shape[1], 32)
        assert torch.allclose(before.double(), (torch.block_diag(*[hadamard_matrix(5).double()] * 2)
                                                @ op.double()).t(), atol=1e-5)
        assert bits(after) == bits(lp.quantize(before, "nvfp4"))  # 1x16 blocks along N, the last dimension
        assert bits(after) != bits(lp.quantize(before.t().contiguous(), "nvfp4").t())  # not along features
    assert torch.equal(dw, seen["output_grad"][1] @ seen["activation"][1].t())
    assert seen["activation"][0].abs().max() < 40.0 / 2  # the outlier spread: |M x| <= 40/4 + the rest


def test_stochastic_transformed_weight_grad_is_deterministic_under_a_seed():
    x, w, g = torch.randn(2, 16, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True), torch.randn(2, 16, 8)
    q = quantizers(activation="nvfp4", output_grad="nvfp4/stochastic", weight_grad="nvfp4/stochastic")

    def grad(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        w.grad = None
        QLinearFunction.apply(x, w, None, q, None, 0).backward(g)
        return w.grad.clone()

    assert bits(grad(11)) == bits(grad(11)) and bits(grad(11)) != bits(grad(12))


def test_policy_setting_round_trips_and_checks():
    p = Policy.parse("weight=nvfp4,wgrad_rht=on,rht_seed=3")
    assert p.wgrad_rht and p.rht_seed == 3 and Policy.parse(p.spec()) == p and "wgrad RHT" in p.table()
    assert Policy.preset("nvfp4").wgrad_rht and not Policy.preset("mxfp4").wgrad_rht
    with pytest.raises(ValueError, match="rht_seed"):
        Policy.of(rht_seed=-1)
    with pytest.raises(ValueError, match="wgrad_rht must be on or off"):
        Policy.parse("wgrad_rht=maybe")


def test_nvfp4_preset_transforms_nvfp4_layers_only_and_keeps_overridden_blocks_in_bf16():
    """The GPT under nvfp4: the transform in every NVFP4 linear layer; the head (@last) and a block an override
    keeps in bf16 ("the last layers") compute their weight gradient plainly, in bf16."""
    gpt = GPT(vocab_size=20, block_size=16, n_layer=2, n_embd=32, n_head=2)
    model = lp.nn.convert(gpt, "nvfp4; blocks.1.*: params=bf16,activations=bf16,grads=bf16")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, lp.nn.QLinear)}
    seeds = {n: m.rht_seed for n, m in linears.items()}
    assert {n for n, s in seeds.items() if s == 0} == {n for n in linears if n.startswith("blocks.0.")}
    assert seeds["lm_head"] is None and all(seeds[n] is None for n in linears if n.startswith("blocks.1."))
    assert str(linears["blocks.1.mlp.0"].quantizers["weight_grad"].quant) == "bf16"
    model(torch.randint(0, 20, (2, 16))).logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
