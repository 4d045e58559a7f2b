"""A native model returns its outputs in the containers its forward built (cast to float32 inside)."""

from collections import OrderedDict, namedtuple

import torch
from torch import nn

import lowprec as lp

Pair = namedtuple("Pair", "logits hidden")


class Structured(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "namedtuple":
            return Pair(y, x)
        return OrderedDict(logits=y, hidden=x)


def test_namedtuple_and_dict_subclass_outputs_keep_their_type():
    x = torch.randn(2, 4)
    for kind, cls in (("namedtuple", Pair), ("ordereddict", OrderedDict)):
        out = lp.convert(Structured(kind), "native-bf16")(x)
        assert type(out) is cls
        logits = out.logits if kind == "namedtuple" else out["logits"]
        assert logits.dtype == torch.float32 and torch.equal(logits, logits.bfloat16().float())
