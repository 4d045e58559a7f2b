"""Activation checkpointing (``torch.utils.checkpoint``, reentrant and not) of a converted model is numerically
transparent: the recomputation in backward rounds at the exponents of the first forward and adds nothing to
the exponent statistics (Courbariaux's overflow rule counts each batch once), and a non-reentrant checkpoint
recomputes its block once per backward, not once per op-level op. Differential checks against the same model
without checkpointing, packed and unpacked."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lowprec as lp


class Block(nn.Module):
    """Pre-norm attention written by hand and fused, then an MLP: swapped Linear layers and op-level ops
    (layer_norm, matmul, attention) under one checkpoint."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        written = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v
        x = x + self.proj(written + F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.fc2(F.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(8, 16), Block(), nn.Linear(16, 4)
        self.mode = mode  # None, "reentrant" or "non-reentrant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.mode is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h.mean(1))


def _statistics(model: nn.Module) -> dict:
    """Every overflow-rule exponent's state: (int_bits, batches counted, summed rates) per quantizer."""
    return {(name, role): (q.exponent.int_bits, q.exponent.batches, list(q.exponent._host_sum))
            for name, role, q in lp.nn.quantizers(model) if q.exponent is not None}


def _train(mode: str | None, recipe: str, packed: bool, monkeypatch, steps: int):
    monkeypatch.setenv("LOWPREC_PACKED", "1" if packed else "0")
    torch.manual_seed(0)
    model = lp.convert(Net(mode), recipe)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), recipe)
    g = torch.Generator().manual_seed(1)
    stats = []
    for _ in range(steps):
        x, y = torch.randn(4, 6, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        trainer.backward(F.cross_entropy(model(x), y))
        stats.append(_statistics(model))
        trainer.apply_update()
    return stats, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_a_checkpointed_block_counts_each_batch_once_in_the_exponent_statistics(mode, packed, monkeypatch):
    """dfx-10-12 with its exponents moved every 2 batches: the statistics after each backward and the weights
    after 5 steps are those of the model without checkpointing, bit for bit. Before, the recomputation observed
    every forward tensor again (reentrant: each batch counted twice; non-reentrant: once more per op-level op
    of the block), so the exponents moved early and the weights differed."""
    recipe = "dfx-10-12+exponent_interval=2"
    plain_stats, plain_weights = _train(None, recipe, packed, monkeypatch, steps=5)
    stats, weights = _train(mode, recipe, packed, monkeypatch, steps=5)
    assert len(plain_stats[0]) > 30 and any(s[1] == 1 for s in plain_stats[0].values())
    assert stats == plain_stats
    assert any(a != b for a, b in zip(plain_stats[0].values(), plain_stats[-1].values()))  # exponents moved
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_a_non_reentrant_checkpoint_recomputes_its_block_once(packed, monkeypatch):
    """Before, each op-level op of the block kept its graph under the checkpoint's hooks and differentiated it
    in a backward of its own, for which torch recomputed the whole block again: 6 forwards of the block in one
    backward (the checkpoint's own, then one per op: layer_norm, the two written-out matmuls, the fused
    attention's two products)."""
    monkeypatch.setenv("LOWPREC_PACKED", "1" if packed else "0")
    torch.manual_seed(0)
    model = lp.convert(Net("non-reentrant"), "mixed-bf16")
    calls = []
    model.block.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    loss = model(torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))).square().sum()
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2


def test_a_forward_rounding_in_backward_records_nothing_and_gives_the_same_values():
    """Quantizer(forward=True) called while autograd runs a backward (a checkpoint's recomputation) rounds at
    the current exponent, as ``DynamicExponent.round`` does, and leaves the statistics as they were; a gradient
    role's quantizer (forward=False) records there as always."""
    policy = lp.Policy.parse("dfx-10-12")
    x = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 3
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            for forward in (True, False):
                q = lp.Quantizer(policy.get("activation"), policy, forward=forward)
                q.exponent.int_bits = 1
                seen[forward] = (q(x), q.exponent.batches)
            return g

    Probe.apply(torch.ones(1, requires_grad=True)).sum().backward()
    expected = lp.quantize(x, "fixed<10,8>")  # dfx<10> with 1 integer bit: 9 bits below the sign, 8 of fraction
    assert torch.equal(seen[True][0], expected) and seen[True][1] == 0
    assert torch.equal(seen[False][0], expected) and seen[False][1] == 1
