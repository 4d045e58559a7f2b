"""Packed saved tensors (lowprec.nn.packed) on models written the way users write them, not lowprec's own:
torchvision-style residual blocks (``nn.ReLU(inplace=True)``, ``out += identity``), a MobileNetV2-style block
(ReLU6 in place, depthwise convolution), a functional CNN (``F.relu_``, ``x.add_``), a hand-written
transformer block (fused and written-out attention, dropout, tied embedding) and a tiny Hugging Face GPT-2
built from a config. Each check is differential: packed against ``LOWPREC_PACKED=0``, in-place against the
same model written out of place, and an in-place change of a saved tensor against torch's own error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec as lp


def _converted(build, recipe: str, packed: bool, monkeypatch) -> nn.Module:
    monkeypatch.setenv("LOWPREC_PACKED", "1" if packed else "0")
    torch.manual_seed(0)
    return lp.convert(build(), recipe)


# -- an in-place change of a saved tensor: torch's error, packed or not --------------------------------------


class SigmoidThenInPlace(nn.Module):
    """sigmoid saves its result for backward; ``mul_`` then changes it: plain torch raises in backward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.fc1(x))
        a.mul_(2)
        return self.fc2(a)


class ConvBNThenAdd(nn.Module):
    """The batch-norm saves its input (the convolution's fp16 output, shared: QuantizeFunction's ``share``);
    ``add_`` (``inplace``) then changes the convolution's output, and so the batch-norm's saved input."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.conv, self.bn, self.inplace = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        y = self.bn(z)
        z = z.add_(1) if self.inplace else z + 1
        return y + z


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("case", ["small-unpacked", "large-packed", "small-shared-bn-input"])
def test_saved_tensor_changed_in_place_raises_torchs_error(case, packed, monkeypatch):
    """Without packing torch's version check raises; a saved-tensor hook turns that check off, so before the
    fix the packed run used the changed values (a silent wrong gradient) or the stale packed copy."""
    build, x = {
        "small-unpacked": (lambda: SigmoidThenInPlace(8), torch.randn(4, 8)),  # under MIN_NUMEL: kept as is
        "large-packed": (lambda: SigmoidThenInPlace(64), torch.randn(64, 64)),
        "small-shared-bn-input": (ConvBNThenAdd, torch.randn(1, 3, 8, 8)),  # 512 values: kept as is
    }[case]
    model = _converted(build, "mixed-fp16", packed, monkeypatch)
    loss = model(x).square().sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("packed", [True, False])
def test_shared_bn_input_changed_in_place_raises_or_uses_the_saved_values(packed, monkeypatch):
    """The batch-norm's packed input (2048 fp16 values) no longer exists when backward runs (only the packed
    copy, taken when forward saved it): the change cannot be seen, and backward uses the values forward used,
    the gradients of the model written out of place. Unpacked: torch's error."""
    x = torch.randn(2, 3, 16, 16)
    model = _converted(ConvBNThenAdd, "mixed-fp16", packed, monkeypatch)
    loss = model(x).square().sum()
    if not packed:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        return
    loss.backward()
    twin = _converted(lambda: ConvBNThenAdd(inplace=False), "mixed-fp16", packed, monkeypatch)
    twin(x).square().sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
