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
    """torchvision's ResNet BasicBlock: ``nn.ReLU(inplace=True)`` and ``out += identity`` (``inplace=False``:
    the same model written out of place)."""

    def __init__(self, c: int, inplace: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu, self.inplace = nn.ReLU(inplace=inplace), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += identity
        else:
            out = out + identity
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
        if not self.checkpointed:
            return self.head(self.block(h))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False))


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


# -- user-style models: packed == unpacked, in place == out of place -----------------------------------------


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (1x1, 3x3, 1x1 convolutions, ReLU in place, ``out += identity``)."""

    def __init__(self, c: int, inplace: bool = True) -> None:
        super().__init__()
        m = c // 2
        self.convs = nn.ModuleList([nn.Conv2d(c, m, 1, bias=False), nn.Conv2d(m, m, 3, padding=1, bias=False),
                                    nn.Conv2d(m, c, 1, bias=False)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(m), nn.BatchNorm2d(m), nn.BatchNorm2d(c)])
        self.relu, self.inplace = nn.ReLU(inplace=inplace), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bns[0](self.convs[0](x)))
        out = self.relu(self.bns[1](self.convs[1](out)))
        out = self.bns[2](self.convs[2](out))
        out = out.add_(x) if self.inplace else out + x
        return self.relu(out)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, depthwise 3x3, 1x1 projection, ReLU6 in place, residual."""

    def __init__(self, c: int, inplace: bool = True, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=inplace),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=inplace),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FunctionalCNN(nn.Module):
    """A functional forward: ``F.relu_``, ``y.add_(x)`` on a batch-norm's output, ``y.mul_`` after pooling."""

    def __init__(self, c: int, inplace: bool = True) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            x = F.relu_(self.c1(x))
            y = self.bn(self.c2(x))
            y.add_(x)
            y = F.max_pool2d(F.relu_(y), 2)
            return y.mul_(0.5)
        x = F.relu(self.c1(x))
        y = F.max_pool2d(F.relu(self.bn(self.c2(x)) + x), 2)
        return y * 0.5


class Net(nn.Module):
    """A stem convolution, one ``block`` and a linear classifier (weight layers before and after: the block's
    layers are neither @first nor @last)."""

    def __init__(self, block, c: int = 8, inplace: bool = True) -> None:
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, c, 3, padding=1), block(c, inplace), nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(F.relu(self.stem(x))).mean([2, 3]))


class TiedTransformer(nn.Module):
    """A decoder block by hand: embedding tied to the output layer, pre-norm attention (fused or written out,
    causal mask, dropout), GELU MLP, residual adds."""

    def __init__(self, written: bool, vocab: int = 32, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed, self.block = nn.Embedding(vocab, d), AttentionBlock(d)
        self.norm, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.out, self.drop, self.heads, self.written = nn.Linear(d, vocab, bias=False), nn.Dropout(0.1), heads, written
        self.out.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(idx))
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.block.qkv(self.block.norm(x)).chunk(3, dim=-1))
        if self.written:
            a = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5
            a = a.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            y = self.drop(torch.softmax(a, dim=-1)) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
        x = x + self.drop(self.block.proj(y.transpose(1, 2).reshape(b, t, d)))
        x = x + self.drop(self.mlp(self.norm(x)))
        return self.out(x)


CNNS = {"basic": BasicBlock, "bottleneck": Bottleneck, "inverted-residual": InvertedResidual,
        "functional": FunctionalCNN}
#: One recipe of each storage family: fp16 casts, fp8 casts, int8 codes with a moving exponent, 4-bit uniform
#: codes and masks, block-scaled fp4 (kept as is).
RECIPES = ["mixed-fp16", "fp8-hybrid", "int8-lazy", "wrpn-4-4", "nvfp4"]


def _cnn_grads(block, recipe: str, packed: bool, inplace: bool, monkeypatch, shape=(2, 3, 8, 8)) -> list:
    model = _converted(lambda: Net(block, inplace=inplace), recipe, packed, monkeypatch)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return _grads(model, F.cross_entropy(model(x), torch.arange(shape[0])))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(CNNS))
def test_user_cnn_blocks_same_gradients_packed_unpacked_and_out_of_place(name, recipe, monkeypatch):
    """The in-place model packed, unpacked, and the same model written out of place (unpacked): one gradient."""
    runs = [_cnn_grads(CNNS[name], recipe, packed, inplace, monkeypatch)
            for packed, inplace in ((True, True), (False, True), (False, False))]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*runs))


@pytest.mark.parametrize("recipe", ["mixed-bf16", "dfx-10-12"])
def test_large_saved_tensors_same_gradients_packed_and_unpacked(recipe, monkeypatch):
    """The inverted residual's expanded activations: 2 x 32 x 36 x 36 = 82944 values a tensor (rounded by the
    eager kernels here: their compiled form, for tensors this large, is tested equal to them elsewhere)."""
    monkeypatch.setenv("LOWPREC_COMPILE", "0")
    runs = [_cnn_grads(InvertedResidual, recipe, packed, True, monkeypatch, shape=(2, 3, 36, 36))
            for packed in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("written", [True, False], ids=["written-attention", "sdpa"])
def test_tied_transformer_same_gradients_packed_and_unpacked(written, recipe, monkeypatch):
    """Dropout draws the same masks in both runs (same seed); the tied weight's gradient sums both uses."""
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    runs = []
    for packed in (True, False):
        model = _converted(lambda: TiedTransformer(written), recipe, packed, monkeypatch)
        torch.manual_seed(5)
        logits = model(idx)
        runs.append(_grads(model, F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())))
    assert model.out.weight is model.embed.weight
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_tiny_hugging_face_gpt2_same_gradients_packed_and_unpacked(checkpointing, monkeypatch):
    """A 2-layer GPT-2 built from its config (random weights, nothing downloaded), int8-lazy; with Hugging
    Face's non-reentrant gradient checkpointing too (before: CheckpointError when packing), whose gradients are
    those of the model without it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    runs = []
    for packed, checkpointed in ((True, checkpointing), (False, checkpointing), (False, False)):
        def build():
            model = transformers.GPT2LMHeadModel(config)
            if checkpointed:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return model
        model = _converted(build, "int8-lazy", packed, monkeypatch)
        torch.manual_seed(5)
        runs.append(_grads(model, model(idx, labels=idx).loss))
    assert all((a is None and b is None and c is None) or (torch.equal(a, b) and torch.equal(a, c))
               for a, b, c in zip(*runs))


class StatefulNorm(nn.Module):
    """A functional batch-norm with running statistics (an op-level op that keeps its graph even when packing,
    since running it again would move the statistics), then the attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(8, 16), AttentionBlock(), nn.Linear(16, 4)
        self.scale, self.mean, self.var = nn.Parameter(torch.ones(16)), torch.zeros(16), torch.ones(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.batch_norm(self.embed(x).flatten(0, 1), self.mean, self.var, self.scale, training=True)
        return self.head(self.block(h.view(*x.shape[:2], 16)))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("recipe", ["mixed-fp16", "int8"])
def test_backward_twice_with_retain_graph(recipe, packed, monkeypatch):
    """``loss.backward(retain_graph=True); loss.backward()`` sums two equal gradients, as in plain PyTorch.
    Before, an op-level op that kept its graph (packing off, or a stateful op) freed it in the first backward
    and failed in the second with an AttributeError."""
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _converted(StatefulNorm, recipe, packed, monkeypatch)
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(model.parameters(), once))


# -- a layer output computed again in backward (packed.recomputable) from arguments changed since ------------


class WideConvBN(nn.Module):
    """Under WRPN no role rounds a convolution's output, so each batch-norm's saved input is computed again in
    backward from the convolution's arguments: the rounded input and weight it saved, and its bias, which it
    does not save. The first convolution is full precision: its weight (2304 values) is an argument as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.c0(x)))
        return self.fc(torch.relu(self.bn1(self.c1(h))).mean([2, 3]))


def _step_changing(param: str, packed: bool, monkeypatch) -> list:
    model = _converted(WideConvBN, "wrpn-4-4", packed, monkeypatch)
    loss = model(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))).square().sum()
    with torch.no_grad():
        model.get_parameter(param).add_(0.5)
    return _grads(model, loss)


def test_bias_changed_before_backward_same_gradients_packed_and_unpacked(monkeypatch):
    """The bias changed in place between forward and backward: plain torch (and packing off) differentiate the
    forward's values; before, packed storage computed the batch-norm's input again with the new bias (a silent
    wrong gradient). The recorded op now holds a copy of a small argument it does not save."""
    on, off = (_step_changing("c1.bias", packed, monkeypatch) for packed in (True, False))
    assert all(torch.equal(a, b) for a, b in zip(on, off))


@pytest.mark.parametrize("packed", [True, False])
def test_weight_changed_before_backward_raises(packed, monkeypatch):
    """The full-precision first convolution's weight, saved as it is: torch's error unpacked, and packed the
    error of the recomputed batch-norm input (which backward reads first), not values from the new weight."""
    with pytest.raises(RuntimeError, match="changed in place|modified by an inplace operation"):
        _step_changing("c0.weight", packed, monkeypatch)


# -- an in-place op on an op-level op's output -----------------------------------------------------------------


class FunctionalLinearThenInPlace(nn.Module):
    """``F.linear`` of a 3-d input with a bias (torch's result is a view of a 2-d product), then ``relu_``."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(32, 16) / 4), nn.Parameter(torch.randn(32) / 4)
        self.fc, self.inplace = nn.Linear(32, 4), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self.fc(y.relu_() if self.inplace else y.relu())


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("recipe", ["mxfp8", "int8"])
def test_in_place_op_on_an_op_level_output(recipe, packed, monkeypatch):
    """Before, with no output role (mxfp8) QOpFunction returned torch's view and ``relu_`` on it raised
    autograd's "Output 0 of QOpFunction is a view and is being modified inplace"; now the in-place model gives
    the gradients of the same model written out of place."""
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    runs = []
    for inplace in (True, False):
        model = _converted(lambda: FunctionalLinearThenInPlace(inplace), recipe, packed, monkeypatch)
        runs.append(_grads(model, model(x).square().sum()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -- a non-contiguous saved tensor comes back in its own layout ------------------------------------------------


class TransposedBatchNorm(nn.Module):
    """A sequence model's batch-norm over channels: ``bn(h.transpose(1, 2))`` saves a transposed input, whose
    weight gradient is a reduction whose summation order follows the input's layout."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.bn, self.fc = nn.Embedding(20, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.embed(idx).transpose(1, 2)).relu().transpose(1, 2))


@pytest.mark.parametrize("recipe", ["int8", "int16", "dfx-10-12", "wrpn-4-4"])
def test_transposed_saved_input_same_gradients_packed_and_unpacked(recipe, monkeypatch):
    """Integer codes are stored flat: before, the batch-norm's transposed input came back contiguous and its
    weight gradient differed from the unpacked run's in the last bits (int8, int16, dfx). Now a saved tensor laid
    out as a permutation of a contiguous one is packed in its memory order and unpacked with its own strides."""
    idx = torch.randint(0, 20, (4, 40), generator=torch.Generator().manual_seed(1))
    runs = []
    for packed in (True, False):
        model = _converted(TransposedBatchNorm, recipe, packed, monkeypatch)
        runs.append(_grads(model, model(idx).square().sum()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_a_relus_result_in_any_layout_gives_torchs_gradient(layout):
    """A ReLU's saved result as one bit a value in a permuted layout (channels_last, a transpose) or a strided slice:
    the same gradient as torch's, bit for bit, NaN results included."""
    from lowprec.nn import packed as packed_mod

    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 8, 16, 16, generator=g)
    base[0, 0, 0, :3] = torch.tensor([float("nan"), 0.0, -0.0])
    grad_out = torch.randn(4, 8, 16, 16, generator=g)
    view = {"transposed": lambda t: t.transpose(1, 3), "sliced": lambda t: t[:, ::2],
            "channels_last": lambda t: t.to(memory_format=torch.channels_last)}[layout]

    def grad(hooks) -> torch.Tensor:
        x = base.clone().requires_grad_()
        with hooks:
            y = torch.relu(view(x * 1.0))
        y.backward(view(grad_out))
        return x.grad

    got = grad(packed_mod.PackedSavedTensors())
    want = grad(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("fmt", ["int8", "fp16", "uniform<2,unsigned>"])
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_unpacked_saved_tensor_keeps_values_and_layout(fmt, layout, monkeypatch):
    """pack_saved then unpack: the same bits, and the same strides wherever the layout is a permutation of a
    contiguous one (a strided slice comes back contiguous)."""
    from lowprec.formats import parse_format, quantize
    from lowprec.formats.packing import mark
    from lowprec.nn import packed as packed_mod

    f = parse_format(fmt)
    base = quantize(torch.rand(4, 8, 16, 16, generator=torch.Generator().manual_seed(2)), f)
    t = {"transposed": lambda: base.transpose(1, 3), "sliced": lambda: base[:, ::2],
         "channels_last": lambda: base.to(memory_format=torch.channels_last)}[layout]()
    t = mark(t, f)
    stored = packed_mod.pack_saved(t)
    back = stored.unpack()
    assert torch.equal(back, t) and back.shape == t.shape
    assert back.stride() == t.stride() or layout == "sliced"
