"""Op-level emulation: every GEMM, convolution and attention product of any model runs on its roles' grids."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lowprec as lp
from lowprec.experiments import parse_recipe
from lowprec.train.stored import load

from gemm_grid import FUSED, GRIDS, GemmLog, log_forward_backward, off_grid, on_grid


class HandAttention(nn.Module):
    """A pre-norm attention block written with matmul (GPT style); ``sdpa=True`` calls SDPA instead."""

    def __init__(self, d: int = 32, heads: int = 2, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln(x)).split(d, -1))
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.softmax(s, -1) @ v
        return x + self.proj(o.transpose(1, 2).reshape(b, t, d))


def generator() -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(4, 8, 4, 2, 1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Tanh())


class TinyGPT(nn.Module):
    """Token and position embeddings, one SDPA block, a final LayerNorm and an LM head tied to the token table
    (F.linear on the embedding's weight). Takes a float tensor whose values pick the tokens."""

    def __init__(self, vocab: int = 11, d: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(8, d)
        self.block, self.ln = HandAttention(d, sdpa=True), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x.detach().abs() * 7).long() % self.tok.num_embeddings
        h = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        return F.linear(self.ln(self.block(h)), self.tok.weight)


class HandGPT(nn.Module):
    """A GPT written by hand: a raw positional Parameter added to the tokens, a matmul attention block, a hand-written
    RMSNorm (``x * rsqrt(mean(x^2)) * self.norm``) and an LM head that multiplies by the token table (``@``)."""

    def __init__(self, vocab: int = 11, d: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(8, d) * 0.1)
        self.block, self.norm = HandAttention(d), nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x.detach().abs() * 7).long() % self.tok.num_embeddings
        h = self.block(self.tok(idx) + self.pos[: idx.size(1)])
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm @ self.tok.weight.t()


class Lookups(nn.Module):
    """Embedding, EmbeddingBag and PReLU (parameters, no GEMM) in front of a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.bag = nn.Embedding(10, 8), nn.EmbeddingBag(10, 8, mode="mean")
        self.act, self.out = nn.PReLU(8, init=0.3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x.detach().abs() * 7).long() % 10
        return self.out(self.act(self.emb(idx).mean(1) + self.bag(idx)))


MODELS = {
    "matmul-attention": (lambda: HandAttention(), (2, 5, 32)),
    "sdpa-attention": (lambda: HandAttention(sdpa=True), (2, 5, 32)),
    "transformer-layer": (lambda: nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True), (2, 5, 32)),
    "convtranspose-generator": (generator, (2, 4, 3, 3)),
    "tied-gpt": (TinyGPT, (2, 5)),
    "hand-gpt": (HandGPT, (2, 5)),
    "lookups-prelu": (Lookups, (2, 5)),
}


def run_logged(model: nn.Module, shape: tuple[int, ...]) -> GemmLog:
    torch.manual_seed(1)
    x = (torch.randn(shape) * 0.5).requires_grad_()
    return log_forward_backward(lambda: model(x))


def _repeats(op: str, operands: list[torch.Tensor], calls: list[tuple[str, list[torch.Tensor]]]) -> bool:
    """Whether ``op`` on ``operands`` repeats one of ``calls`` exactly (same op, operands equal bit for bit)."""
    return any(op == o and len(a) == len(operands) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, operands)) for o, a in calls)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy, forward, backward", [
    ("mixed-bf16", "bf16", "bf16"),
    ("fp8-e4m3", "e4m3", "e4m3"),
    ("fp8-hybrid", "e4m3", "e4m3|e5m2"),  # backward GEMMs multiply an e5m2 gradient by an e4m3 operand
    ("params=int8,activations=int8,grads=int8,exponent_rule=maxabs", "int8", "int8"),  # Park's dfx<8>
])
def test_every_gemm_operand_lies_on_its_roles_grid(name, policy, forward, backward):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    plain = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op and parameter of these models is covered
        log = run_logged(lp.convert(plain, policy), shape)
    assert {phase for phase, _, _ in log.calls} == {"forward", "backward"}
    assert not [op for _, op, _ in log.calls if "attention" in op]  # no fused attention kernel
    assert off_grid(log, forward, backward) == []
    if policy == "fp8-hybrid":  # each backward GEMM multiplies an e5m2 gradient
        forward_calls = [(op, operands) for phase, op, operands in log.calls if phase == "forward"]
        for phase, op, operands in log.calls:
            # packed saved tensors: an op-level product runs its forward GEMM again in backward, on the same
            # rounded operands (a repeat of a forward call, bit for bit)
            if phase == "backward" and not _repeats(op, operands, forward_calls):
                assert any(on_grid(t, GRIDS["e5m2"]) for t in operands), op
    # the harness sees what it checks: the plain model has operands off the grid (and SDPA's fused kernel)
    plain_log = run_logged(plain, shape)
    assert off_grid(plain_log, forward, backward) != []
    if name == "sdpa-attention":
        assert any("attention" in op for _, op, _ in plain_log.calls)


FP32_EVERYWHERE = "params=fp32,activations=fp32,grads=fp32"


def grads_of(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}, x.grad


@pytest.mark.parametrize("name", MODELS)
def test_an_all_fp32_policy_is_bit_for_bit_the_plain_model(name):
    # every op runs through the quantized path (fp32 is a format: the quantizers are enabled and exact), the
    # attention as two products around a float32 softmax; torch's math attention kernel is the reference
    build, shape = MODELS[name]
    torch.manual_seed(0)
    plain = build()
    converted = lp.convert(plain, FP32_EVERYWHERE)
    x = torch.randn(shape)
    with sdpa_kernel(SDPBackend.MATH):
        want = grads_of(plain, x)
    p = lp.plan(plain, FP32_EVERYWHERE, x)
    assert all(r.path in ("op emulation", "layer swap") for r in p.ops)
    got = grads_of(converted, x)
    assert torch.equal(got[0], want[0])
    assert got[2] is want[2] is None or torch.equal(got[2], want[2])
    assert got[1].keys() == want[1].keys()
    for n in want[1]:
        assert torch.equal(got[1][n], want[1][n]), n


class SDPA(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.w = nn.Linear(16, 16)
        self.options = options

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(self.w(q), k, v, attn_mask=mask, **self.options)


@pytest.mark.parametrize("options, mask, kv_heads, source", [
    ({"is_causal": True}, None, 4, 3),  # causal with fewer queries than keys: top-left aligned, as torch
    ({}, "bool", 4, 5),                 # a boolean mask with a fully masked row (torch gives that row 0)
    ({}, "float", 4, 5),
    ({"enable_gqa": True}, None, 2, 5),
    ({"scale": 0.25}, None, 4, 5),
])
def test_emulated_attention_follows_torchs_semantics(options, mask, kv_heads, source):
    torch.manual_seed(0)
    q = torch.randn(2, 4, source if options.get("is_causal") is None else 2, 16)
    k, v = torch.randn(2, kv_heads, source, 16), torch.randn(2, kv_heads, source, 16)
    if mask == "bool":
        mask = torch.rand(q.size(-2), source) > 0.4
        mask[0] = False
    elif mask == "float":
        mask = torch.randn(q.size(-2), source)
    model = SDPA(**options)
    with sdpa_kernel(SDPBackend.MATH):
        want = model(q, k, v, mask)
    got = lp.convert(model, FP32_EVERYWHERE)(q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if mask is not None and mask.dtype == torch.bool:
        assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))


def test_attention_with_dropout_drops_and_rescales_like_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 8, 16).unbind(0)
    model = SDPA(dropout_p=0.5)
    converted = lp.convert(model, FP32_EVERYWHERE)
    torch.manual_seed(5)
    got = converted(q, k, v)
    torch.manual_seed(5)
    with sdpa_kernel(SDPBackend.MATH):
        want = model(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_op_overrides_keep_attention_and_norms_in_fp32():
    policy = lp.Policy.parse(lp.Policy.preset("mixed-bf16").spec()
                             + "; op:attention: activations=none,grads=none; op:norm: params=none,activations=none")
    model = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    p = lp.plan(model, policy, torch.randn(2, 5, 32))
    by_op = {(r.module, r.op, r.index): r for r in p.ops}
    assert by_op[("self_attn", "attention", 0)].path == "unquantized"
    assert "fp32" in by_op[("self_attn", "attention", 0)].note
    norm = {o.role: o.format for o in by_op[("norm1", "layer_norm", 0)].operands}
    assert norm["activation"] == norm["weight"] == norm["output"] == "fp32" and norm["output_grad"] == "bf16"
    in_proj = {o.name: (o.role, o.format) for o in by_op[("self_attn", "linear", 0)].operands}
    assert in_proj["weight"] == ("weight", "bf16") and in_proj["input"] == ("activation", "bf16")
    # attention kept in fp32 is torch's own attention again
    log = run_logged(lp.convert(model, policy), (2, 5, 32))
    assert any("attention" in op for _, op, _ in log.calls)


def test_op_overrides_reach_swapped_layers_and_later_overrides_win():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    q = lp.convert(model, "weight=fp16; op:linear: weight=bf16; 1: weight=e4m3")
    assert str(q[0].quantizers["weight"].quant) == "bf16" and str(q[1].quantizers["weight"].quant) == "e4m3"


def test_op_overrides_in_toml_recipes(tmp_path):
    path = tmp_path / "keep.toml"
    path.write_text('preset = "fp8-hybrid"\n[overrides."op:attention"]\nactivations = "bf16"\ngrads = "bf16"\n'
                    '[overrides.head]\nparams = "bf16"\n')
    want = lp.Policy.preset("fp8-hybrid").override("op:attention", activations="bf16", grads="bf16").override(
        "head", params="bf16")
    assert parse_recipe(str(path)).policy == want
    with pytest.raises(ValueError, match=r"'op:atention' selects no op; use an op kind \(attention"):
        lp.Policy.parse("weight=bf16; op:atention: weight=fp16")


def test_the_plan_of_a_transformer_layer_shows_every_op_and_role():
    model = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    p = lp.plan(model, "fp8-hybrid", torch.randn(2, 5, 32))
    sites = [(r.module, r.op, r.index) for r in p.ops]
    assert sites == [("self_attn", "linear", 0), ("self_attn", "attention", 0), ("self_attn", "linear", 1),
                     ("norm1", "layer_norm", 0), ("linear1", "linear", 0), ("linear2", "linear", 0),
                     ("norm2", "layer_norm", 0)]
    assert all(r.quantized and r.backward and r.calls == 1 for r in p.ops) and p.unquantized == []
    attention = {o.name: (o.role, o.format) for o in p.ops[1].operands}
    assert attention["P"] == ("activation", "e4m3") and attention["d P"] == ("activation_grad", "e5m2")
    assert attention["d S"] == ("output_grad", "e5m2") and attention["O"] == ("output", "e4m3")
    data = json.loads(p.to_json())
    assert data["policy"] == "fp8-hybrid" and len(data["ops"]) == 7 and data["ops"][4]["path"] == "layer swap"
    text = str(p)
    assert "self_attn" in text and "attention" in text and "layer swap" in text


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.pos = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return torch.einsum("ij,jk,kl->il", x, self.w, self.w) + (x + self.pos.exp()) @ self.w


def test_what_runs_unquantized_is_named_in_a_warning_and_in_the_plan():
    model = lp.convert(Mixed(), "mixed-bf16")
    with pytest.warns(UserWarning) as record:
        model(torch.randn(3, 4))
    messages = [str(r.message) for r in record]
    assert any("(root): einsum runs unquantized" in m and "3 operands" in m for m in messages)
    assert any("reach no quantized op" in m and ": pos " in m for m in messages)
    p = lp.plan(Mixed(), "mixed-bf16", torch.randn(3, 4))
    assert [(r.op, r.path) for r in p.unquantized] == [("einsum", "unquantized"), ("parameter pos", "unquantized")]
    matmul = next(r for r in p.ops if r.op == "matmul")
    assert {o.name: o.role for o in matmul.operands}["other"] == "weight"  # a Parameter operand: weight role


def test_a_converted_model_pickles_with_its_hooks_and_unconvert_removes_them():
    torch.manual_seed(0)
    model = lp.convert(HandAttention(), "fp8-e4m3")
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    assert all(n >= 1 for n in hooks)  # every module tracks the module path
    x = torch.randn(2, 5, 32)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert [len(m._forward_pre_hooks) for m in loaded.modules()] == hooks
    plain = lp.unconvert(model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in plain.modules()) == 0
    assert lp.nn.emulation_of(plain) is None


def test_dynamic_fixed_point_exponents_of_functional_ops_are_listed_and_advance():
    model = lp.convert(HandAttention(), "dfx-10-12")
    model(torch.randn(2, 5, 32)).sum().backward()
    sites = {name for name, _, q in lp.nn.quantizers(model) if q.exponent is not None}
    assert "ln:layer_norm[0]" in sites and ":matmul[0]" in sites and ":matmul[1]" in sites
    lp.nn.update_exponents(model)


def test_calibrating_covers_op_quantizers_made_inside_the_block():
    torch.manual_seed(0)
    plain = HandAttention()
    model = lp.convert(plain, "dfx-10-12")
    x = torch.randn(2, 5, 32)
    with lp.nn.calibrating(model):
        assert torch.equal(model(x), plain(x))  # observing only: full precision
    assert all(not q.observe_only for _, _, q in lp.nn.quantizers(model))
    assert not torch.equal(model(x), plain(x))


class MHA(nn.Module):
    """nn.MultiheadAttention called directly: need_weights (bmm, baddbmm with the mask) and a padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 2, kdim=16, vdim=16, batch_first=True)

    def forward(self, x):
        mask = torch.randn(x.size(1), 3)
        pad = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]])
        return self.attn(x, x[:, :3, :16], x[:, :3, 16:], attn_mask=mask, key_padding_mask=pad)[0]


def test_multihead_attention_with_weights_and_separate_projections_is_on_the_grid():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = run_logged(lp.convert(MHA(), "mixed-bf16"), (2, 5, 32))
    assert {op for _, op, _ in log.calls} >= {"aten.baddbmm.default", "aten.bmm.default"}
    assert [op for _, op, ops in log.calls if not all(on_grid(t, GRIDS["bf16"]) for t in ops)] == []
    p = lp.plan(MHA(), "mixed-bf16", torch.randn(2, 5, 32))
    ops = [(r.op, r.index) for r in p.ops]
    assert ops == [("linear", 0), ("linear", 1), ("linear", 2), ("baddbmm", 0), ("bmm", 0), ("linear", 3)]
    weights = [{o.name: o.role for o in r.operands}.get("weight") for r in p.ops if r.op == "linear"]
    assert weights == ["weight"] * 4  # q_proj_weight, k_proj_weight, v_proj_weight, out_proj.weight


def test_inspect_plan_prints_the_plan_and_writes_its_json(tmp_path, capsys, monkeypatch):
    from lowprec.cli.main import main

    monkeypatch.setenv("LOWPREC_COMPILE", "0")  # the same bits eagerly, without compiling the kernels

    assert main(["inspect", "conv-maxout", "--recipe", "mixed-bf16", "--plan", "--batch", "1", "--steps", "1",
                 "--out", str(tmp_path)]) == 0  # a model without a task: random inputs, no data to load
    assert "precision plan: mixed-bf16" in capsys.readouterr().out
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["ops"] and {(r["op"], r["path"]) for r in data["ops"]} >= {("conv2d", "layer swap")}
    assert all(r["quantized"] and r["backward"] for r in data["ops"])


def test_op_selectors_parse_and_a_module_named_op_is_still_a_module():
    p = lp.Policy.parse("weight=bf16; op:conv_transpose*: weight=int16; op: weight=fp16")
    assert [pattern for pattern, _ in p.overrides] == ["op:conv_transpose*", "op"]
    assert lp.Policy.parse(p.spec()) == p
    assert str(p.for_module("up", op="conv_transpose2d").get("weight")) == "dfx<16>"
    assert str(p.for_module("up", op="conv2d").get("weight")) == "bf16"
    assert str(p.for_module("op", op="linear").get("weight")) == "fp16"
    assert str(p.for_module("x", op="layer_norm").get("weight")) == "bf16"
    assert str(lp.Policy.parse("weight=bf16; op:norm: weight=fp16").for_module("x", op="rms_norm").get("weight")) \
        == "fp16"


class FunctionalWRPN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(8, 8) * 2 - 1)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        h = torch.relu(x) @ self.w       # a weight layer written functionally: WRPN clips both operands
        return self.ln(h) @ h.t()        # a norm and an activation product: signed, never clipped


def test_wrpn_clip_formats_apply_to_weight_products_only():
    p = lp.plan(FunctionalWRPN(), "weight=uniform<4>,activation=uniform<4,unsigned>", torch.randn(3, 8))
    formats = [(r.op, r.index, {o.name: o.format for o in r.operands if o.quantized}) for r in p.ops]
    assert formats == [("matmul", 0, {"input": "uniform<4,unsigned>", "other": "uniform<4>"}),
                       ("layer_norm", 0, {}), ("matmul", 1, {})]
    assert all("weight layers only" in r.note for r in p.ops[1:]) and p.ops[0].note == ""


@pytest.mark.parametrize("policy, optimizer", [
    ("dfx-10-12+exponent_interval=1", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
    ("int8+exponent_rule=overflow,exponent_interval=1,update_rule=optimizer",
     lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
])
def test_op_exponents_travel_in_the_models_state_dict_and_a_resume_is_bit_exact(policy, optimizer):
    """Functional ops' dynamic-fixed-point exponents ride in the model's own state_dict (its metadata): saved,
    loaded into a fresh converted model and its Trainer, training goes on bit for bit as if uninterrupted, and
    the state_dict still loads into the plain model with strict=True."""
    torch.manual_seed(0)
    plain = HandAttention()
    batches = [torch.randn(2, 5, 32) * 100 for _ in range(6)]  # far from the initial exponents: they move

    def build():
        model = lp.convert(plain, policy)
        return model, lp.Trainer(model, optimizer(model.parameters()))

    def train(model, trainer, xs):  # the losses, and the parameters after the last step
        losses = []
        for x in xs:
            losses.append(model(x).square().mean())
            trainer.step(losses[-1])
        return [loss.detach() for loss in losses] + [p.detach() for p in model.parameters()]

    model, trainer = build()
    uninterrupted = train(model, trainer, batches)
    model, trainer = build()
    train(model, trainer, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "trainer": trainer.state_dict()}, buffer)
    sites = model.state_dict()._metadata[""]["lowprec_ops"]
    assert {"ln:layer_norm[0]", ":matmul[0]", ":matmul[1]"} <= set(sites)
    assert "ops" not in trainer.state_dict()["quantizers"]  # the model carries them
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    HandAttention().load_state_dict(saved["model"], strict=True)
    resumed, resumed_trainer = build()
    resumed.load_state_dict(saved["model"])  # before a forward: the sites are made from it at the first one
    assert resumed.state_dict()._metadata[""]["lowprec_ops"].keys() == sites.keys()  # and saved again as loaded
    fresh, _ = build()
    fresh.load_state_dict(lp.unconvert(model).state_dict())  # the same parameters, fresh exponents
    assert not torch.equal(fresh(batches[0]), model(batches[0]))  # the exponents moved: they matter
    resumed, resumed_trainer = build()
    resumed_trainer.load_state_dict(saved["trainer"])
    continued = train(resumed, resumed_trainer, batches[3:])
    assert len(continued) == len(uninterrupted) - 3
    assert all(torch.equal(a, b) for a, b in zip(continued, uninterrupted[3:]))


def test_a_forward_that_raises_leaves_no_mode_behind():
    from torch.overrides import _get_current_function_mode_stack

    model = lp.convert(HandAttention(), "mixed-bf16")
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 31))  # wrong width: LayerNorm raises inside the forward
    assert _get_current_function_mode_stack() == []
    x = torch.randn(2, 5, 32)
    assert model.qkv(x).shape == (2, 5, 96)  # a submodule called on its own runs under the emulation too
    assert _get_current_function_mode_stack() == []


def test_accumulation_emulation_names_the_functional_ops_it_does_not_cover():
    model = lp.convert(HandAttention(), "weight=fp16,accumulation=fp16")
    with pytest.warns(UserWarning) as record:
        model(torch.randn(2, 5, 32))
    messages = [str(r.message) for r in record]
    assert any("(root): matmul accumulates in fp32" in m for m in messages)
    assert not any("layer_norm accumulates" in m for m in messages)


def test_inference_takes_no_fused_fast_path():
    # in eval mode without grad, TransformerEncoderLayer and MultiheadAttention have fused fast paths; under the
    # emulation they take the decomposed path, whose GEMMs are quantized
    torch.manual_seed(0)
    plain = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    model = lp.convert(plain, "mixed-bf16").eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), GemmLog() as plain_log:
        plain(x)
    assert any(fused in op for _, op, _ in plain_log.calls for fused in FUSED)  # torch's fast path
    with torch.no_grad(), GemmLog() as log:
        model(x)
    ops = {op for _, op, _ in log.calls}
    assert ops and not any(fused in op for op in ops for fused in FUSED)
    assert all(on_grid(t, GRIDS["bf16"]) for _, _, operands in log.calls for t in operands)


class Products(nn.Module):
    """The other products: mv, dot, outer, tensordot, addbmm, addmv, bilinear, a two-matrix multi_dot."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.bil = nn.Bilinear(6, 6, 3)

    def forward(self, x):
        v = torch.mv(self.w, x[0]) + torch.addmv(x[1], self.w, x[2])
        m = torch.outer(v, x[3]) + torch.tensordot(x, self.w, dims=([1], [0]))[:6]
        s = torch.dot(v, x[4]) + torch.linalg.multi_dot([m, self.w]).sum()
        b = torch.addbmm(m, x[:4].view(2, 2, 6).transpose(1, 2), x[4:8].view(2, 2, 6))
        return b * s + self.bil(m, b).sum()


def test_every_other_product_is_quantized_too():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = run_logged(lp.convert(Products(), "mixed-bf16"), (8, 6))
    assert [op for _, op, ops in log.calls if not all(on_grid(t, GRIDS["bf16"]) for t in ops)] == []
    p = lp.plan(Products(), "mixed-bf16", torch.randn(8, 6))
    assert {r.op for r in p.ops} == {"mv", "addmv", "outer", "tensordot", "dot", "multi_dot", "addbmm", "bilinear"}
    assert p.unquantized == []


def test_transposed_convolutions_are_weight_layers_for_first_last_and_the_update():
    model = lp.convert(generator(), "int8")
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "int8")
    masters = {s.name: str(s.policy.get("master")) for s in trainer.slots}
    assert masters["0.weight"] == masters["3.weight"] == "dfx<8>" and masters["1.weight"] == "None"
    wrpn = lp.plan(generator(), "wrpn-4-4", torch.randn(2, 4, 3, 3))
    weights = {(r.module, r.op): {o.name: o.format for o in r.operands}["weight"] for r in wrpn.ops
               if r.op.startswith("conv")}
    assert weights == {("0", "conv_transpose2d"): "fp32", ("3", "conv_transpose2d"): "fp32"}  # @first, @last


def test_functional_embedding_with_max_norm_renormalises_the_table_then_quantizes():
    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4) * 3)

        def forward(self, idx):
            return F.embedding(idx, self.table, None, 1.0)

    torch.manual_seed(0)
    plain = Lookup()
    model = lp.convert(plain, "mixed-bf16")
    idx = torch.tensor([[1, 3], [3, 7]])
    out = model(idx)
    want = F.embedding(idx, plain.table.detach(), None, 1.0)  # renormalises plain's table in place
    assert torch.equal(model.table, plain.table) and plain.table[[1, 3, 7]].norm(dim=1).max() <= 1.0 + 1e-6
    assert torch.equal(out, want.to(torch.bfloat16).float())
    assert not torch.equal(out, want)


class HandNorms(nn.Module):
    """A LayerNorm and an RMSNorm written by hand: statistics by elementwise ops, affine parameters multiplied
    (``g * x``, ``x * r``) and added (``+ b``)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.g, self.b, self.r = (nn.Parameter(torch.randn(d)) for _ in range(3))

    def forward(self, x: torch.Tensor, g=None, b=None, r=None) -> torch.Tensor:
        g, b, r = (self.g if g is None else g), (self.b if b is None else b), (self.r if r is None else r)
        mu = x.mean(-1, keepdim=True)
        h = g * ((x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + 1e-5)) + b
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * r


@pytest.mark.parametrize("policy, fmt", [("mixed-bf16", torch.bfloat16), ("fp8-e4m3", torch.float8_e4m3fn)])
def test_hand_written_norms_quantize_their_own_parameters_and_gradients(policy, fmt):
    """A user's own norm: its parameters enter rounded to the weight (factor) and bias (term) roles, their
    gradients leave rounded to weight_grad / bias_grad; statistics, the normalisation and the input gradient are
    float32. Reference: the plain forward on the parameters rounded by torch's own cast, bit for bit."""
    model = lp.convert(HandNorms(), policy)
    x = torch.randn(6, 8).requires_grad_()
    weights = torch.linspace(-1, 1, 48).view(6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unquantized to report
        (model(x) * weights).sum().backward()
    grad_policy = lp.Policy.parse(policy)
    grad_dtype = {"bf16": torch.bfloat16, "e5m2": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn}[
        str(grad_policy.get("weight_grad"))]
    rounded = [p.detach().to(fmt).float().requires_grad_() for p in (model.g, model.b, model.r)]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = HandNorms()(x_ref, *rounded)
    (y_ref * weights).sum().backward()
    assert torch.equal(model(x), y_ref)
    for p, ref in zip((model.g, model.b, model.r), rounded):
        assert torch.equal(p.grad, ref.grad.to(grad_dtype).float())
        assert not torch.equal(ref.grad, ref.grad.to(grad_dtype).float())  # the rounding is seen
    assert torch.equal(x.grad, x_ref.grad)  # the input gradient: float32 through the normalisation
    plan = lp.plan(HandNorms(), policy, torch.randn(6, 8))
    rows = [(r.op, [(o.role, o.format) for o in r.operands if o.quantized]) for r in plan.ops]
    w, wg = str(lp.Policy.parse(policy).get("weight")), str(grad_policy.get("weight_grad"))
    assert rows == [("mul", [("weight", w), ("weight_grad", wg)]), ("add", [("bias", w), ("bias_grad", wg)]),
                    ("mul", [("weight", w), ("weight_grad", wg)])]
    assert plan.unquantized == [] and plan.warnings == []


class FunctionalWeights(nn.Module):
    """Weights only functional ops use: MultiheadAttention's in-projection (F.linear on in_proj_weight, and its
    out_proj through F.linear), a raw Parameter through F.linear and one through ``@``; a scale multiplied
    elementwise (a norm-like parameter: fp32 master, as batch-norm's); a swapped Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.v = nn.Parameter(torch.randn(8, 4) * 0.3)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(4))
        self.head = nn.Linear(4, 4)  # a swapped layer (a model without any is updated as a plain one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.head((F.linear(h, self.w) @ self.v) * self.scale)


def fixed(x: torch.Tensor, bits: int, frac: int) -> torch.Tensor:
    """fixed<bits,frac>: nearest (ties to even) multiple of 2**-frac, saturated to the two's-complement range."""
    return (x * 2.0**frac).round().clamp(-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) / 2.0**frac


def test_weights_only_functional_ops_use_get_their_master_accumulator_and_state_formats(tmp_path):
    """Park's lazy update on parameters no swapped layer owns: after one step each is exactly
    Q_F(Q_F(θ0) + Q_A(Δ)), its accumulator the residual, its momentum Q_S(g) (Δ = -lr·g, lr a power of two), for
    a trainer built before the first forward, and after a range warm-up whose first forward showed them."""
    policy = ("weight=bf16,activation=bf16,master=fixed<8,4>,accumulator=fixed<16,12>,"
              "optimizer_state=fixed<16,12>")
    weights = ["attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias", "attn.out_proj.weight", "v", "w"]

    def build():
        model = lp.convert(FunctionalWeights(), policy)
        return model, lp.Trainer(model, lp.train.SGD(model.parameters(), lr=4.0, momentum=0.9))

    def one_step(model, trainer, x):
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.backward(model(x).square().mean())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        trainer.apply_update()
        assert lp.nn.emulation_of(model).layer_parameters == weights
        slots, params = {s.name: s for s in trainer.slots}, dict(model.named_parameters())
        moved = 0
        for n in weights:
            theta0, delta = fixed(start[n], 8, 4), -4.0 * grads[n]
            acc = fixed(delta, 16, 12)
            theta1 = fixed(theta0 + acc, 8, 4)
            assert torch.equal(params[n].detach(), theta1), n
            assert torch.equal(slots[n].acc, fixed(acc - (theta1 - theta0), 16, 12)), n
            assert torch.equal(load(trainer.optimizer.state[params[n]]["momentum_buffer"]), fixed(grads[n], 16, 12)), n
            moved += int((theta1 != theta0).sum())
        assert moved > 0
        assert slots["scale"].acc is None and slots["scale"].policy.get("master") is None  # fp32 master
        assert torch.equal(params["scale"].detach(), start["scale"] + -4.0 * grads["scale"])
        return start

    x = torch.randn(3, 5, 8)
    model, trainer = build()  # before the first forward: which parameters ops use is not known yet
    start = one_step(model, trainer, x)
    assert not torch.equal(start["w"], fixed(start["w"], 8, 4))  # the master format is seen
    warmed, warmed_trainer = build()
    warmed_trainer.warmup_exponents([torch.randn(3, 5, 8) for _ in range(2)], lambda m, b: m(b).square().mean())
    assert all(s.acc is None or not s.acc.any() for s in warmed_trainer.slots) and not warmed_trainer.optimizer.state
    assert torch.equal(one_step(warmed, warmed_trainer, x)["w"], fixed(start["w"], 8, 4))  # stored in master
    # a checkpoint carries which parameters ops use: a fresh trainer resumes with the same slots
    torch.save(trainer.state_dict(), tmp_path / "ckpt.pt")
    resumed, resumed_trainer = build()
    resumed_trainer.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    slots = {s.name: s for s in trainer.slots}
    assert {s.name for s in resumed_trainer.slots if s.acc is not None} == {*weights, "head.weight", "head.bias"}
    assert all(torch.equal(s.acc, slots[s.name].acc) for s in resumed_trainer.slots if s.acc is not None)


class BagAndPReLU(nn.Module):
    """An EmbeddingBag (sum with per-sample weights) and a PReLU: torch modules with parameters and no GEMM that
    the swapped layers do not cover."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(10, 8, mode="sum")
        self.act = nn.PReLU(8, init=0.3)
        with torch.no_grad():
            self.act.weight.add_(0.01 * torch.randn(8))

    def forward(self, idx, offsets, per_sample):
        return self.act(self.bag(idx, offsets, per_sample_weights=per_sample))


def test_embedding_bag_and_prelu_are_quantized_not_just_named():
    """EmbeddingBag: the table (weight) and per-sample weights (activation) enter rounded, the bag sum leaves
    rounded to output, the table's gradient to weight_grad after the output gradient to output_grad; PReLU's
    slope enters rounded to weight and its gradient leaves rounded to weight_grad. Reference: torch's own ops on
    operands rounded by torch's cast (bf16), bit for bit; no warning."""
    idx, offsets, per_sample = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 3, 5]), torch.rand(8)
    weights = torch.linspace(-1, 1, 24).view(3, 8)
    model = lp.convert(BagAndPReLU(), "mixed-bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = model(idx, offsets, per_sample)
        (y * weights).sum().backward()

    def bf16(t):
        return t.detach().to(torch.bfloat16).float()

    table, slope = bf16(model.bag.weight).requires_grad_(), bf16(model.act.weight).requires_grad_()
    s = F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=bf16(per_sample))
    s_q = bf16(s).requires_grad_()
    y_ref = F.prelu(s_q, slope)
    (y_ref * weights).sum().backward()
    s.backward(bf16(s_q.grad))
    assert torch.equal(y, y_ref)
    assert torch.equal(model.act.weight.grad, bf16(slope.grad)) and not torch.equal(slope.grad, bf16(slope.grad))
    assert torch.equal(model.bag.weight.grad, bf16(table.grad)) and not torch.equal(table.grad, bf16(table.grad))
    plan = lp.plan(BagAndPReLU(), "mixed-bf16", (idx, offsets, per_sample))
    assert [(r.module, r.op) for r in plan.ops] == [("bag", "embedding_bag"), ("act", "prelu")]
    assert plan.unquantized == [] and plan.warnings == []


class Carried(nn.Module):
    """Parameters whose values reach a quantized op unchanged through a repetition or concatenation:
    MultiheadAttention's bias_k / bias_v (concatenated to K and V) and a token concatenated to a Linear's input;
    and one that does not (``exp`` first: the product with it is float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
        self.token = nn.Parameter(torch.randn(1, 1, 16))
        self.log_scale = nn.Parameter(torch.zeros(16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(x, x, x, need_weights=False)[0] * self.log_scale.exp()
        return self.fc(torch.cat([self.token.expand(x.size(0), -1, -1), h], 1))


def test_parameters_carried_unchanged_into_a_quantized_operand_reach_it():
    p = lp.plan(Carried(), "mixed-bf16", torch.randn(2, 5, 16))
    assert [r.op for r in p.unquantized] == ["parameter log_scale"]
    assert [w for w in p.warnings if "reach no quantized op" in w] == [
        "lowprec: these parameters reach no quantized op and run unquantized, in fp32: log_scale (lp.plan shows "
        "every op and its formats)"]


def test_torch_rmsnorm_quantizes_input_weight_output_and_gradients():
    """nn.RMSNorm (F.rms_norm): input, weight and output rounded to their roles, the statistics float32 inside
    torch's kernel; gradients through output_grad, then activation_grad and weight_grad. Reference: torch's own
    rms_norm on operands rounded by torch's bf16 cast, bit for bit."""
    torch.manual_seed(0)
    plain = nn.RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        plain.weight.copy_(1 + 0.1 * torch.randn(8))
    model = lp.convert(plain, "mixed-bf16")
    x, g = torch.randn(4, 8).requires_grad_(), torch.randn(4, 8)
    model(x).backward(g)

    def bf16(t):
        return t.detach().to(torch.bfloat16).float()

    xq, wq = bf16(x).requires_grad_(), bf16(plain.weight).requires_grad_()
    z = F.rms_norm(xq, (8,), wq, 1e-6)
    z.backward(bf16(g))
    assert torch.equal(model(x), bf16(z))
    assert torch.equal(x.grad, bf16(xq.grad)) and torch.equal(model.weight.grad, bf16(wq.grad))
    assert not torch.equal(wq.grad, bf16(wq.grad))  # the rounding of the gradient is seen
