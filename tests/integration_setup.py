"""Shared by the integration tests: a tiny classifier, its batches, and the reference run through lp.Trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp

POLICIES = ["int8-lazy", "mixed-fp16", "native-bf16"]
INF_STEP = 2  # the step whose loss is multiplied by inf (skipped by every path)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


def step_loss(model: nn.Module, batch, step: int) -> torch.Tensor:
    """The loss of one batch; at INF_STEP it is inf, so its gradients are not finite and the step is skipped."""
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    return loss * float("inf") if step == INF_STEP else loss


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def trainer_run(policy: str, steps: int | list) -> tuple[nn.Module, lp.Trainer, list[lp.train.TrainStepResult]]:
    """The reference: ``lp.Trainer.step`` on each batch of ``batches(steps)`` (or of the list given)."""
    data = batches(steps) if isinstance(steps, int) else steps
    model = lp.convert(tiny_net(), policy)
    trainer = lp.Trainer(model, sgd(model), policy)
    results = [trainer.step(step_loss(model, b, i)) for i, b in enumerate(data)]
    return model, trainer, results


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two state dicts hold the same tensors bit for bit (same keys, dtypes, values)."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
