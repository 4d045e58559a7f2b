"""A skipped step does not leave batch-norm running statistics NaN: its forward (a batch holding NaN or inf)
had made them non-finite, and every later evaluation of the model normalised by them gave NaN, although the
step was reported skipped and training went on. Finite statistics a skipped step's forward moved stay as they
are (as under torch.amp)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _statistics(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for n, t in model.named_buffers() if "running" in n or "num_batches" in n]


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(2))


#: (policy, bad value); dynamic fixed point saturates an inf input (docs/reliability.md): that batch trains
CASES = [(p, float("nan")) for p in ("fp32", "mixed-fp16", "int8-lazy", "native-bf16")] + [
    (p, float("inf")) for p in ("fp32", "mixed-fp16", "native-bf16")]


@pytest.mark.parametrize("policy, bad", CASES)
def test_a_batch_with_nan_or_inf_leaves_the_running_statistics_as_the_last_step_left_them(policy, bad):
    model = lp.convert(_model(), policy)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), policy)
    trainer.step(F.cross_entropy(model(X), Y))
    kept = _statistics(model)
    model.eval()
    with torch.no_grad():
        evaluated = model(X)
    model.train()
    poisoned = X.clone()
    poisoned[0, 0, 0, 0] = bad
    assert trainer.step(F.cross_entropy(model(poisoned), Y)).skipped
    assert all(torch.equal(a, b) for a, b in zip(_statistics(model), kept))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), evaluated)  # finite, and what it was before the bad batch
    model.train()
    assert not trainer.step(F.cross_entropy(model(X), Y)).skipped  # the next clean batch trains
    assert not all(torch.equal(a, b) for a, b in zip(_statistics(model), kept))


def test_finite_statistics_of_a_skipped_step_stay_as_its_forward_left_them():
    """A gradient overflow under a loss scale (the forward was finite): the running statistics keep the
    batch, as torch.amp's GradScaler leaves them."""
    model = lp.convert(_model(), "mixed-fp16")
    scaler = lp.LossScaler.static(2.0**40)  # dE/dz overflows fp16's range in backward
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), "mixed-fp16", scaler=scaler)
    before = _statistics(model)
    result = trainer.step(F.cross_entropy(model(X), Y))
    after = _statistics(model)
    assert result.skipped and all(torch.isfinite(t.float()).all() for t in after)
    assert not torch.equal(after[0], before[0]) and after[2] == before[2] + 1
