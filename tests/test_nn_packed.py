"""Packed saved tensors (lowprec.nn.packed): a converted model's training steps give the same gradients and
weights with and without packing, for every preset, and packing really happens."""

import pytest
import torch
from torch import nn

import lowprec as lp
from lowprec.formats.packing import Packed
from lowprec.nn import packed as packed_mod
from lowprec.policy.presets import PRESETS
from lowprec.train import cross_entropy

EMULATED_PRESETS = [p for p in PRESETS if not p.startswith("native")] + ["wrpn-4-4", "wrpn-2-2", "dfx-8-12"]


class Tiny(nn.Module):
    """conv-BN-ReLU(in place)-pool, conv-ReLU, linear-ReLU, linear: every kind of saved tensor, and a ReLU whose
    output an unquantized layer (WRPN's @last) saves too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.fc1, self.fc2 = nn.Conv2d(4, 8, 3), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu_(self.bn(self.conv1(x))), 2)
        x = torch.relu(self.conv2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class TinyAttention(nn.Module):
    """Layer norm, a fused-attention call and a hand-written attention (matmuls of two activations around a
    softmax), under the op-level emulation: its rounded operands are saved by QOpFunction itself."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(12, 32), nn.LayerNorm(32)
        self.qkv, self.head = nn.Linear(32, 96), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(self.embed(x))).chunk(3, dim=-1)
        fused = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        written = torch.softmax(q @ k.transpose(-2, -1) / 32 ** 0.5, dim=-1) @ v
        return self.head((fused + written).mean(1))


_NO_NARROWER_ACTIVATIONS = {"fixed-20", "fp8-current", "fp8-delayed", "mxfp8", "mxfp6", "mxfp4", "nvfp4"}
MODELS = {"cnn": (Tiny, (16, 1, 12, 12)), "attention": (TinyAttention, (16, 16, 12))}


def _train(recipe: str, packed: bool, monkeypatch, steps: int = 3, model_name: str = "cnn"):
    monkeypatch.setenv("LOWPREC_PACKED", "1" if packed else "0")
    torch.manual_seed(0)
    build, shape = MODELS[model_name]
    model = lp.convert(build(), recipe)
    policy = lp.Policy.preset(recipe)
    lazy = policy.get("accumulator") is not None
    opt = (lp.train.SGD if lazy else torch.optim.SGD)(model.parameters(), lr=0.05, momentum=0.9)
    trainer = lp.Trainer(model, opt, recipe)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 10, (16,), generator=g)
    grads = []
    for _ in range(steps):
        trainer.backward(cross_entropy(model(x), y))
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
        trainer.apply_update()
    return grads, [p.detach().clone() for p in model.parameters()]


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("recipe", EMULATED_PRESETS)
def test_steps_identical_with_and_without_packing(recipe, model_name, monkeypatch):
    packs: list[str] = []
    inner = packed_mod.pack_saved

    def counting(t):
        out = inner(t)
        if isinstance(out, Packed):
            packs.append(type(out).__name__)
        return out

    monkeypatch.setattr(packed_mod, "pack_saved", counting)
    grads_on, weights_on = _train(recipe, True, monkeypatch, model_name=model_name)
    # packing happened (fp32 quantizes nothing: no hooks at all; the attention model saves no ReLU or mask, and
    # scaled activations or fixed<20> ones have no narrower stored form)
    assert packs or recipe == "fp32" or (model_name == "attention" and recipe in _NO_NARROWER_ACTIVATIONS)
    n_on = len(packs)
    grads_off, weights_off = _train(recipe, False, monkeypatch, model_name=model_name)
    assert len(packs) == n_on  # off: nothing packed
    for step_on, step_off in zip(grads_on, grads_off):
        assert all(_same(a, b) for a, b in zip(step_on, step_off))
    assert all(torch.equal(a, b) for a, b in zip(weights_on, weights_off))


def test_op_level_operands_are_saved_packed(monkeypatch):
    """int8: the operands the op-level emulation rounds (layer norm's input, the attention products' Q, K, V and
    P) are saved by QOpFunction as int8 codes, and their unrounded float32 results are not saved at all."""
    saved: list[tuple[torch.Tensor, Packed | torch.Tensor]] = []
    inner = packed_mod.pack_saved
    monkeypatch.setattr(packed_mod, "pack_saved", lambda t: saved.append((t, inner(t))) or saved[-1][1])
    model = lp.convert(TinyAttention(), "int8")
    model(torch.randn(16, 16, 12))
    # a transposed operand (K^T) is packed in its memory order: its codes inside a _Permuted
    big = [(t, s.inner if isinstance(s, packed_mod._Permuted) else s) for t, s in saved
           if t.numel() >= packed_mod.MIN_NUMEL]
    codes = [s for t, s in big if type(s).__name__ == "Codes"]
    assert all(s.nbytes == t.numel() for t, s in big if type(s).__name__ == "Codes")  # one byte a value
    # the input, the norm's input, qkv's input and weight, Q, K^T, P and V of each of the two attentions
    assert len(codes) == 12
    unpacked = [t for t, s in big if s is t and t.dtype == torch.float32]
    assert len(unpacked) == 2  # the two softmax results (float32: their backward reads them)


def test_policy_setting_turns_packing_off_and_unconvert_removes_it():
    assert lp.Policy.preset("int8").packed
    assert not lp.Policy.parse("weight=int8,packed=off").packed
    assert "packed=False" in lp.Policy.parse("weight=int8,packed=off").spec()
    on = lp.convert(Tiny(), "int8")
    assert packed_mod.is_packing(on)
    assert not packed_mod.is_packing(lp.convert(Tiny(), "int8+packed=off"))
    assert not packed_mod.is_packing(lp.unconvert(on))
    assert packed_mod.is_packing(on)


def test_saved_activations_are_stored_narrow(monkeypatch):
    """int8: the conv's quantized input is saved as int8 codes, the ReLU's result as one bit a value."""
    saved: list[Packed | torch.Tensor] = []
    inner = packed_mod.pack_saved
    monkeypatch.setattr(packed_mod, "pack_saved", lambda t: saved.append(inner(t)) or saved[-1])
    model = lp.convert(Tiny(), "int8")
    model(torch.randn(16, 1, 12, 12))
    kinds = {type(s).__name__ for s in saved if isinstance(s, Packed)}
    assert {"Codes", "_Positive"} <= kinds
    codes = [s for s in saved if type(s).__name__ == "Codes"]
    assert all(c.data.dtype == torch.int8 for c in codes)


def test_forward_error_closes_the_hooks():
    model = lp.convert(Tiny(), "int8")
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 12, 12))  # wrong channel count
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # no hook left open


def test_a_tensor_saved_twice_is_packed_once(monkeypatch):
    """A recurrent layer saves its rounded weight at every time step: one packed form, shared."""
    from lowprec.formats import parse_format, quantize
    from lowprec.formats.packing import mark

    stored = []
    inner = packed_mod.pack_saved
    monkeypatch.setattr(packed_mod, "pack_saved", lambda t: stored.append(inner(t)) or stored[-1])
    fmt = parse_format("int8")
    w = torch.randn(64, 64, requires_grad=True)
    with packed_mod.PackedSavedTensors():
        q = mark(quantize(w.detach(), fmt), fmt)
        loss = (q * w).sum() + (q * w * 2).sum()
    assert len(stored) >= 2 and all(isinstance(s, Packed) for s in stored[:2]) and stored[0] is stored[1]
    unpacks = []
    inner_unpack = type(stored[0]).unpack
    monkeypatch.setattr(type(stored[0]), "unpack", lambda self: unpacks.append(self) or inner_unpack(self))
    loss.backward()
    assert torch.equal(w.grad, 3 * q)
    # unpacked once for both readers, and not held after the last one read it
    assert unpacks == [stored[0]] and packed_mod._SHARED[stored[0]].value is None


class ConvBN(nn.Module):
    """conv-BN-ReLU three times, then a linear layer: under WRPN the first conv is full precision and the
    others quantized with no output role, so every batch-norm saves an unrounded convolution output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*(m for c_in in (1, 4, 4) for m in (nn.Conv2d(c_in, 4, 3, padding=1),
                                                                       nn.BatchNorm2d(4), nn.ReLU())))
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _conv_bn_step(packed: bool, monkeypatch, saved: list):
    monkeypatch.setenv("LOWPREC_PACKED", "1" if packed else "0")
    torch.manual_seed(0)
    model = lp.convert(ConvBN(), "wrpn-4-4")
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    inner = packed_mod.pack_saved
    monkeypatch.setattr(packed_mod, "pack_saved", lambda t: saved.append(inner(t)) or saved[-1])
    cross_entropy(model(x), torch.arange(16) % 10).backward()
    return [p.grad for p in model.parameters()]


def test_unrounded_conv_outputs_are_computed_again_in_backward(monkeypatch):
    """WRPN: each batch-norm's input (a convolution output no role rounds) is stored as nothing but the conv
    and its packed arguments, and backward computes it again bit for bit: the same gradients as unpacked."""
    from torch.utils.weak import WeakTensorKeyDictionary

    for table in ("_RECOMPUTE", "_WAITING"):  # this step's entries only (other tests' tensors may still live)
        monkeypatch.setattr(packed_mod, table, WeakTensorKeyDictionary())
    saved: list = []
    on = _conv_bn_step(True, monkeypatch, saved)
    again = [s for s in saved if type(s).__name__ == "_Recomputed"]
    assert len(again) == 3 and all(s.nbytes == 0 for s in again)
    assert any(isinstance(a, Packed) for s in again for a in s.args)  # the quantized convs' 4-bit inputs
    off = _conv_bn_step(False, monkeypatch, [])
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    import gc

    del saved[:], again
    gc.collect()
    assert len(packed_mod._RECOMPUTE) == 0 and len(packed_mod._WAITING) == 0  # nothing outlives the step


def test_an_output_changed_in_place_is_not_recomputed(monkeypatch):
    """A conv output that an in-place ReLU changed before it is saved is the ReLU's result, not the conv's:
    stored as the ReLU's one bit a value, never recomputed."""
    saved: list = []
    inner = packed_mod.pack_saved
    monkeypatch.setattr(packed_mod, "pack_saved", lambda t: saved.append(inner(t)) or saved[-1])
    model = lp.convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3),
                                     nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(256, 10)), "wrpn-4-4")
    model(torch.randn(8, 1, 12, 12)).sum().backward()
    kinds = {type(s).__name__ for s in saved}
    assert "_Recomputed" not in kinds and "_Positive" in kinds


# -- values already on a role's grid are not copied (Quantizer.keeps, QuantizeFunction's share) --------------------

_SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-6, -3e-8, 7e4, -1e5, 0.3, -0.7, 1.0, 2.5e-39]


@pytest.mark.parametrize("spec", ["fp16", "bf16", "e4m3", "e5m2", "fixed<8,4>", "uniform<4>", "uniform<3,unsigned>",
                                  "fp16/toward_zero", "fixed<6,2>/toward_zero"])
def test_a_tensor_already_on_the_grid_is_returned_as_it_is(spec):
    """Rounding the marked output of a rounding onto the same format is the identity: the quantizer returns the
    tensor itself, and a second rounding by ``quantize`` (which does not look at marks) gives the same bits:
    -0, inf, NaN, subnormals and saturated values included."""
    from lowprec.formats import quantize
    from lowprec.formats.packing import marked_format

    q = lp.Quantizer(lp.policy.Quant.parse(spec))
    x = torch.cat([torch.tensor(_SPECIALS), torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3])
    y = q(x)
    assert y is not x and marked_format(y) == q.quant.format and q.keeps(y) and not q.keeps(x)
    assert q(y) is y
    again = quantize(y, q.quant.format, q.quant.rounding)
    assert again is not y and torch.equal(again.view(torch.int32), y.view(torch.int32))


def test_only_a_same_format_deterministic_stateless_rounding_keeps_a_tensor():
    from lowprec.policy import Quant

    x = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    y = lp.Quantizer(Quant.parse("fp16"))(x)
    assert not lp.Quantizer(Quant.parse("bf16")).keeps(y)  # another grid
    assert not lp.Quantizer(Quant.parse("fp16/stochastic")).keeps(y)  # would draw random bits
    observing = lp.Quantizer(Quant.parse("fp16"))
    observing.observe_only = True
    assert not observing.keeps(y)
    dfx = lp.Quantizer(Quant.parse("dfx<8>"))
    assert not dfx.keeps(dfx(x))  # its grid follows the data (and its exponent records every tensor)
    y.mul_(1.0)  # changed in place since it was rounded: no longer known to be on the grid
    assert not lp.Quantizer(Quant.parse("fp16")).keeps(y)


@pytest.mark.parametrize("share", [False, True])
def test_a_boundary_shares_an_input_already_on_its_grid_only_when_asked(share):
    """QuantizeFunction with share=True returns an fp16-marked input's own storage (marked, so that what saves it
    stores it packed), with share=False a copy; an input not on the grid is rounded into a new tensor either way.
    The gradient is the same in both (rounded by the backward role)."""
    from lowprec.formats.packing import marked_format
    from lowprec.nn.functions import quantize_boundary

    quantizers = lp.convert(nn.Sequential(nn.BatchNorm1d(4)), "mixed-fp16")[0].quantizers
    base = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    on_grid = quantizers["output"](base * 1.0)
    grad = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    out = quantize_boundary(on_grid, quantizers, "activation", "activation_grad", share=share)
    assert (out.data_ptr() == on_grid.data_ptr()) == share and out is not on_grid
    assert torch.equal(out, on_grid) and marked_format(out) == quantizers["activation"].quant.format
    (g,) = torch.autograd.grad(out, base, grad)
    assert torch.equal(g, grad.half().float())
    off_grid = base * 1.0
    assert quantize_boundary(off_grid, quantizers, "activation", "activation_grad", share=share).data_ptr() \
        != off_grid.data_ptr()


def test_a_batch_norm_after_a_convolution_reads_its_rounded_output_in_place(monkeypatch):
    """mixed-fp16: the fp16 convolution output is the batch-norm's input as it is (no rounded copy in flight),
    the batch-norm's saved input is packed as before, and the forward's peak falls by that copy's bytes;
    gradients are the same bits as with the copy."""
    from lowprec.diagnostics import measure_peak_memory
    from lowprec.policy import Quantizer

    def step(keeps: bool):
        monkeypatch.setattr(Quantizer, "keeps", Quantizer.keeps if keeps else lambda self, x: False)
        torch.manual_seed(0)
        model = lp.convert(nn.Sequential(nn.Conv2d(4, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                         nn.ReLU()), "mixed-fp16")
        x = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # the steady state: the first step learns which roundings' packed forms are taken
            model(x).square().sum().backward()
        peak = measure_peak_memory(lambda: model(x), held=(model,))  # forward: the saved tensors and the flight
        return peak, [p.grad.clone() for p in model.parameters()]

    inner = packed_mod.pack_saved
    saved: list = []
    monkeypatch.setattr(packed_mod, "pack_saved", lambda t: saved.append(inner(t)) or saved[-1])
    peak_shared, grads_shared = step(True)
    n_packed = sum(isinstance(s, Packed) for s in saved)
    peak_copied, grads_copied = step(False)
    assert sum(isinstance(s, Packed) for s in saved) == 2 * n_packed  # the same tensors packed both times
    assert peak_copied - peak_shared >= 8 * 16 * 32 * 32 * 4  # the float32 copy of the conv output
    assert all(torch.equal(a, b) for a, b in zip(grads_shared, grads_copied))

def test_recompute_off_keeps_unrounded_outputs_and_gives_the_same_steps(monkeypatch):
    """The policy setting recompute=off: each batch-norm's input (an unrounded WRPN convolution output) is saved
    as the float32 tensor it is, nothing is computed again in backward, and three training steps give the same
    gradients and weights, bit for bit, as recompute on (the default) and as no packing at all."""
    policy = lp.Policy.parse("wrpn-4-4+recompute=off")
    assert lp.Policy.preset("wrpn-4-4").recompute and not policy.recompute
    assert lp.Policy.parse(policy.spec()) == policy
    with pytest.raises(ValueError, match="recompute must be on or off"):
        lp.Policy.parse("wrpn-4-4+recompute=maybe")
    saved: list = []
    inner = packed_mod.pack_saved
    monkeypatch.setattr(packed_mod, "pack_saved", lambda t: saved.append((t, inner(t))) or saved[-1][1])

    def run(recipe: str, packed: bool = True):
        monkeypatch.setenv("LOWPREC_PACKED", "1" if packed else "0")
        torch.manual_seed(0)
        model = lp.convert(ConvBN(), recipe)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
        grads = []
        for _ in range(3):
            opt.zero_grad()
            cross_entropy(model(x), torch.arange(16) % 10).backward()
            grads += [p.grad.clone() for p in model.parameters()]
            opt.step()
        return grads + [p.detach().clone() for p in model.parameters()]

    off = run("wrpn-4-4+recompute=off")
    kinds = [type(s).__name__ for _, s in saved]
    assert "_Recomputed" not in kinds and "Codes" in kinds
    unrounded = [t for t, s in saved if s is t and t.dtype == torch.float32 and type(t.grad_fn).__name__ ==
                 "QConvFunctionBackward"]
    assert len(unrounded) >= 2 * 3  # the two quantized convs' outputs, saved by their batch-norms, each step
    del saved[:]
    on = run("wrpn-4-4")
    assert "_Recomputed" in [type(s).__name__ for _, s in saved]
    unpacked = run("wrpn-4-4", packed=False)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(off, on, unpacked))
