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


# -- a ReLU's result saved by another op first: stored with its values, not as where it is > 0 -----------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: ``nn.ReLU(inplace=True)`` and ``out += identity``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class CheckpointedBlocks(nn.Module):
    """Two BasicBlocks under non-reentrant activation checkpointing: the second checkpoint saves its input (the
    first block's ReLU result, which the ReLU itself saved through the checkpoint's hooks) through lowprec's."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, c, 3, padding=1), nn.Linear(c, 10)
        self.blocks = nn.ModuleList([BasicBlock(c), BasicBlock(c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.fc(x.mean([2, 3]))


class ReluBeforeHead(nn.Module):
    """A plain backbone and ReLU outside the converted head, whose first layer (full precision under WRPN)
    saves the ReLU's result as it is: the first save of it the hooks see is the layer's, which reads values."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Linear(16, 64), nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _grads(model: nn.Module, loss: torch.Tensor) -> list:
    loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("recipe", ["mixed-fp16", "int8", "wrpn-4-4"])
def test_checkpointed_blocks_same_gradients_packed_and_unpacked(recipe, monkeypatch):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for packed in (True, False):
        model = _converted(CheckpointedBlocks, recipe, packed, monkeypatch)
        runs.append(_grads(model, model(x).square().sum()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_relu_result_from_outside_the_model_is_saved_with_its_values(monkeypatch):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    runs = []
    for packed in (True, False):
        monkeypatch.setenv("LOWPREC_PACKED", "1" if packed else "0")
        torch.manual_seed(0)
        model = ReluBeforeHead()
        lp.convert(model.head, "wrpn-4-4", inplace=True)
        runs.append(_grads(model, model.head(F.relu(model.backbone(x))).square().sum()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


class AttentionBlock(nn.Module):
    """Pre-norm attention written by hand (``softmax(q k^T) v``) and fused (``F.scaled_dot_product_attention``):
    op-level ops (QOpFunction), which save differently while packing."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        written = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v
        fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(written + fused)


class CheckpointedAttention(nn.Module):
    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(8, 16), AttentionBlock(), nn.Linear(16, 4)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False) if self.checkpointed else self.block(h)
        return self.head(h)


@pytest.mark.parametrize("recipe", ["mixed-bf16", "int8", "mxfp8"])
def test_checkpointed_op_level_ops_same_gradients_as_without_checkpoint(recipe, monkeypatch):
    """Before, QOpFunction saved its rounded operands in the checkpointed forward (packing context open) and its
    graph in the recomputation (none open): torch.utils.checkpoint raised CheckpointError."""
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for packed, checkpointed in ((True, True), (False, True), (True, False)):
        model = _converted(lambda: CheckpointedAttention(checkpointed), recipe, packed, monkeypatch)
        runs.append(_grads(model, model(x).square().sum()))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*runs))
