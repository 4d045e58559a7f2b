"""``evaluating``: eval mode and no gradients inside, the training flags restored after, also on an error."""

import pytest
import torch
from torch import nn

from lowprec.train.evaluating import evaluating


def test_eval_inside_and_flags_restored_after_an_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    model[2].eval()  # a submodule frozen in eval: model.train(True) would undo it, as torch's own idiom does
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(model) as m:
            assert m is model and not any(x.training for x in model.modules())
            y = model(torch.ones(2, 3))
            assert not y.requires_grad and torch.equal(y, model(torch.ones(2, 3)))  # dropout off
            raise RuntimeError("boom")
    assert all(x.training for x in model.modules())
    model.eval()
    with evaluating(model):
        pass
    assert not any(x.training for x in model.modules())
