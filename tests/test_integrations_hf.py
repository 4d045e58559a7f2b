"""Hugging Face transformers models (tiny GPT-2 and Llama from configs, nothing downloaded) under lowprec."""

import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import lowprec as lp  # noqa: E402
from gemm_grid import GemmLog, grids_of, log_forward_backward, off_grid, on_grid  # noqa: E402
from lowprec.policy.presets import PRESETS  # noqa: E402

hf_logging.set_verbosity_error()

def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0))


FAMILIES = {"gpt2": gpt2, "llama": llama}
TOKENS = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("LOWPREC_COMPILE", "0")  # no compile time for the fused native update in tests


def lm_loss(model):
    return model(input_ids=TOKENS, labels=TOKENS).loss


def unquantized_types(caught) -> set[str]:
    """The module types lowprec's 'run unquantized' warnings name."""
    named = set()
    for w in caught:
        text = str(w.message)
        if text.startswith("lowprec") and "unquantized" in text:
            named |= set(re.findall(r"\((\w+)\)", text))
    return named


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_converts_and_trains_under_every_preset(family, preset):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lp.convert(FAMILIES[family](), preset)
        trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), preset)
        losses = []
        for _ in range(20):
            loss = lm_loss(model)
            losses.append(loss.item())
            assert not trainer.step(loss).skipped
    assert unquantized_types(caught) == set()  # op-level emulation covers Conv1D, LayerNorm and RMSNorm
    model.eval()
    with torch.no_grad():
        evaluated = lm_loss(model).item()
    assert torch.isfinite(torch.tensor(losses)).all()
    assert max(losses[-3:]) < 0.85 * losses[0] and evaluated < 0.85 * losses[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_reaches_a_quantized_op(family):
    """No parameter of the model runs unquantized on the emulated path (the first forward checks each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm_loss(lp.convert(FAMILIES[family](), "mixed-bf16")).backward()
    assert [str(w.message) for w in caught if "reach no quantized op" in str(w.message)] == []


@pytest.mark.parametrize("policy, formats", [
    ("mixed-bf16", "bf16"),
    ("fp8-e4m3", "e4m3"),
    ("params=int8,activations=int8,grads=int8,exponent_rule=maxabs", "int8"),  # Park's dfx<8>
])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_gemm_operand_lies_on_its_roles_grid(family, policy, formats):
    """Every operand of every aten mm/bmm/addmm/baddbmm/convolution call of the LM loss's forward and backward
    is exactly on the policy's grid, and no fused attention kernel runs (SDPA is emulated with bmm)."""
    plain = FAMILIES[family]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log = log_forward_backward(lambda: lm_loss(lp.convert(plain, policy)))
    assert {phase for phase, _, _ in log.calls} == {"forward", "backward"}
    assert {op for _, op, _ in log.calls} >= {"aten.mm.default", "aten.bmm.default"}  # projections, attention
    assert not [op for _, op, _ in log.calls if "attention" in op]
    assert off_grid(log, formats, formats) == []
    # the harness sees what it checks: the plain model multiplies fp32 operands (Llama through a fused kernel)
    plain_log = log_forward_backward(lambda: lm_loss(FAMILIES[family]()))
    assert off_grid(plain_log, formats, formats) != []
    if family == "llama":
        assert any("attention" in op for _, op, _ in plain_log.calls)


def llama_with_random_norms():
    """The tiny Llama with its RMSNorm weights drawn off every grid (they start at 1, which is on all of them)."""
    model = llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("policy, formats", [
    ("mixed-bf16", "bf16"),
    ("params=int8,activations=int8,grads=int8,exponent_rule=maxabs", "int8"),
])
def test_llama_rmsnorm_weights_and_their_gradients_lie_on_the_grid(policy, formats):
    """LlamaRMSNorm computes ``self.weight * x`` by hand: the weight enters that product rounded to the weight
    role and its gradient leaves rounded to weight_grad (the plain model's are off the grid); lp.plan shows it."""
    grids = grids_of(formats)

    def norm_factors(model):  # the forward's products of a norm-weight-shaped vector and the hidden states
        with GemmLog(also=(torch.ops.aten.mul.Tensor,)) as log:
            loss = lm_loss(model)
        loss.backward()
        factors = [t for _, op, ts in log.calls if op == "aten.mul.Tensor" and len(ts) == 2
                   and ts[1].shape == (8, 16, 32) for t in ts if t.shape == (32,)]
        grads = [p.grad for n, p in model.named_parameters() if n.endswith("norm.weight")]
        return factors, grads

    factors, grads = norm_factors(lp.convert(llama_with_random_norms(), policy))
    assert len(factors) == len(grads) == 5  # 2 layers x 2 norms + the final norm
    assert all(on_grid(t, grids) for t in factors + grads)
    factors, grads = norm_factors(llama_with_random_norms())
    assert not any(on_grid(t, grids) for t in factors + grads)
    plan = lp.plan(llama_with_random_norms(), policy, (TOKENS,))
    rows = [r for r in plan.ops if r.module.endswith("norm")]
    assert len(rows) == 5 and not [r for r in plan.unquantized if r.module.endswith("norm")]
    for r in rows:
        assert r.op == "mul" and r.path == "op emulation" and r.backward
        assert [(o.role, o.quantized) for o in r.operands if o.quantized] == [("weight", True), ("weight_grad", True)]


@pytest.mark.parametrize("export", ["as-stored", "unconverted"])
@pytest.mark.parametrize("preset", ["mixed-fp16", "int8-lazy", "native-bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_pretrained_round_trips_a_converted_model(family, preset, export, tmp_path):
    """save_pretrained of the converted model (weights as stored) or of lp.unconvert's export (weights as the
    layers round them): from_pretrained gives the same weights bit for bit, and converting the loaded model
    again gives the same logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lp.convert(FAMILIES[family](), preset)
        trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), preset)
        for _ in range(3):
            trainer.step(lm_loss(model))
        model.eval()
        saved = model if export == "as-stored" else lp.unconvert(model)
        saved.save_pretrained(tmp_path)
        # float32: a native model's save mixes bf16 weights with fp32 norms; in the config's dtype (bf16)
        # from_pretrained would round the norms
        loaded = type(saved).from_pretrained(tmp_path, dtype=torch.float32)
        again = lp.convert(loaded, preset)
    before, back = saved.state_dict(), loaded.state_dict()
    assert before.keys() == back.keys()
    for k in before:
        assert back[k].dtype == torch.float32 and torch.equal(before[k].float(), back[k]), k
    if family == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tying survives
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits)


def test_native_output_keeps_the_model_output_type():
    model = lp.convert(gpt2(), "native-bf16")
    out = model(input_ids=TOKENS, labels=TOKENS)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
