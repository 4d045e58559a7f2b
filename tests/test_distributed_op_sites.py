"""Under torch.distributed, the quantizers the op-level emulation makes at the first forward (attention, norms,
a Conv1D's addmm: every functional op) agree across ranks as the swapped layers' do: the amax a delayed scale
pushes and an ``init_int_bits=auto`` start exponent are the MAX over the ranks. Before, the Trainer set the
cross-process MAX only on the quantizers that existed when it was built, before the first forward made the
functional ops' ones, so each rank kept its own scales and exponents there. One process stands for several: its
``all_max`` is replaced by one that answers as if another rank had seen twice the amax, one binade more."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lowprec as lp
from lowprec.nn import emulation_of
from lowprec.train import distributed
from tiny_attention import TinyAttention


def _other_rank(t: torch.Tensor) -> torch.Tensor:
    """all_max as if another rank had seen twice the amax (a 0-dim float) and one more integer bit (a 0-dim
    integer start exponent); anything else (the loss scaler's flags) as this rank's."""
    if t.dim() == 0 and t.dtype == torch.float32:
        return t * 2
    if t.dim() == 0 and not t.dtype.is_floating_point:
        return t + 1
    return t


def _trained(recipe: str) -> nn.Module:
    torch.manual_seed(0)
    model = lp.convert(TinyAttention(16, fused=True), recipe)
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe)  # before the first forward
    x, y = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    trainer.step(F.cross_entropy(model(x), y))
    return model


def _pushed_amaxes(model: nn.Module) -> dict:
    """The amax each functional op's delayed scale pushed at the step (its history's newest entry)."""
    return {(site, role): q.scale_state.history[0].item()
            for site, role, q in emulation_of(model).all_quantizers() if q.scale_state is not None}


@pytest.fixture
def one_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "all_max", _other_rank)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_functional_ops_delayed_scales_push_the_amax_agreed_across_ranks(request):
    """fp8-delayed: the first step's forward rounds with the initial scales on every rank, so each site's amax is
    this rank's own alone and twice it once agreed."""
    alone = _pushed_amaxes(_trained("fp8-delayed"))
    request.getfixturevalue("one_process_group")
    together = _pushed_amaxes(_trained("fp8-delayed"))
    assert len(alone) >= 4 and together == {key: 2 * amax for key, amax in alone.items()}


def test_functional_ops_start_exponents_agree_across_ranks(one_process_group):
    """dfx-10-12 (init_int_bits=auto): every functional op's exponent starts at the MAX over the ranks."""
    model = _trained("dfx-10-12")
    exponents = [q.exponent for _, _, q in emulation_of(model).all_quantizers() if q.exponent is not None]
    assert len(exponents) >= 8 and all(e.agree is _other_rank for e in exponents)
