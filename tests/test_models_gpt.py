"""The zoo's char-level GPT: causality, fused vs hand-written attention, weight tying through every conversion,
pickling of the native model, and training (the loss falls) under fp32, native-bf16 and mixed-bf16."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import lowprec as lp
from lowprec.data import load_text
from lowprec.models import GPT, build_model
from lowprec.nn import native

pytestmark = pytest.mark.usefixtures("eager_update")
VOCAB = 13


def tiny(**kwargs) -> GPT:
    return GPT(**{"vocab_size": VOCAB, "block_size": 16, "n_layer": 2, "n_embd": 32, "n_head": 4, **kwargs})


def _convert(model, recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated presets name the LayerNorms they leave unquantized
        return lp.convert(model, recipe)


def test_build_model_and_config():
    model = build_model("gpt", vocab_size=VOCAB, n_layer=3, n_embd=24, n_head=3, block_size=10)
    assert len(model.blocks) == 3 and model.wte.weight.shape == (VOCAB, 24) and model.wpe.weight.shape == (10, 24)
    assert model.blocks[0].attn.n_head == 3
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names  # listed once, under its first owner
    assert tiny(width=2).wte.weight.shape == (VOCAB, 64)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_embd": 30, "n_head": 4}, "multiple of n_head"),
    ({"n_layer": 0}, ">= 1"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("fused", [False, True])
def test_causal_the_logits_at_t_ignore_later_tokens(fused):
    model = tiny(fused_attention=fused).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % VOCAB
    a, b = model(x), model(y)
    assert torch.equal(a[:, :7], b[:, :7])  # exactly: nothing of a later position enters
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_fused_and_hand_written_attention_agree_in_fp32():
    hand = tiny()
    fused = tiny(fused_attention=True)
    fused.load_state_dict(hand.state_dict())
    x = torch.randint(0, VOCAB, (3, 16))
    a, b = hand(x), fused(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(hand.wte.weight.grad, fused.wte.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recipe", ["fp32", "mixed-bf16", "mixed-fp16", "int8-lazy", "wrpn-4-4", "native-bf16"])
def test_weight_tying_survives_convert_and_the_trainer(recipe):
    model = _convert(tiny(), recipe)
    assert model.lm_head.weight is model.wte.weight
    trainer = lp.Trainer(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), recipe)
    params = list(model.parameters())
    assert len(trainer.slots) == len(params) == len({id(p) for p in params})
    if recipe == "native-bf16":
        assert model.wte.weight.dtype == torch.bfloat16
        tied = [s for s in trainer.slots if s.param is model.wte.weight]
        assert len(tied) == 1 and tied[0].master_copy.dtype == torch.float32  # ONE fp32 master
    x = torch.randint(0, VOCAB, (2, 16))
    trainer.step(F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()))
    assert model.lm_head.weight is model.wte.weight  # after an update, too


def test_native_gpt_pickles_whole_and_loads_equal():
    torch.manual_seed(3)
    model = _convert(tiny(), "native-bf16")
    x = torch.randint(0, VOCAB, (2, 9))
    buf = io.BytesIO()
    torch.save(model, buf)
    native._with_mixin.cache_clear()  # as in a fresh process: the Native* classes are rebuilt on load
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.lm_head).__name__ == "NativeLinear" and isinstance(loaded.lm_head, torch.nn.Linear)
    assert loaded.lm_head.weight is loaded.wte.weight and loaded.wte.weight.dtype == torch.bfloat16
    out = loaded(x)
    assert out.dtype == torch.float32 and torch.equal(out, model(x))
    twin = copy.deepcopy(model)
    assert twin.lm_head.weight is twin.wte.weight and torch.equal(twin(x), out)


def _corpus_batch(batch: int = 8, t: int = 16) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first batch * t + 1 characters of the offline corpus as (inputs, next characters), ids renumbered
    over the characters that occur, and that vocabulary's size."""
    encoded, _ = load_text()
    used, text = torch.unique(encoded[: batch * t + 1], return_inverse=True)
    return text[:-1].view(batch, t), text[1:].view(batch, t), len(used)


@pytest.mark.parametrize("recipe", ["fp32", "native-bf16", "mixed-bf16"])
def test_gpt_learns_text_loss_falls(recipe):
    """30 AdamW steps on one batch of text: from the uniform guess (ln V) to well under half of it."""
    torch.manual_seed(0)
    x, y, vocab = _corpus_batch()
    model = _convert(GPT(vocab, block_size=16, n_layer=2, n_embd=32, n_head=4), recipe)
    trainer = lp.Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        assert not trainer.step(loss).skipped
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), rel=0.05)  # uniform start
    assert sum(losses[-4:]) / 4 < 0.4 * losses[0]
