"""Quantized LSTM/GRU and cells: torch's results when nothing rounds, the papers' roundings otherwise."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lowprec as lp

IDENTITY_FORMATS = "params=fp32, activations=fp32, grads=fp32"  # the explicit recurrence, nothing rounded


def _tensors(out):
    """Every tensor of a recurrent result: (output, (h, c)), (output, h), (h, c) or h."""
    return [out] if torch.is_tensor(out) else [t for part in out for t in _tensors(part)]


def _same(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b)


def _compare(plain, policy, x, hx=None, exact=False):
    """Convert ``plain``; outputs, input and parameter gradients of both must agree."""
    q = lp.convert(plain, policy)
    results = []
    for module in (plain, q):
        xr = x.clone().requires_grad_()
        outs = _tensors(module(xr, hx))
        sum(t.square().sum() for t in outs).backward()
        results.append((outs, xr.grad, [p.grad for p in module.parameters()]))
    (outs0, gx0, gp0), (outs1, gx1, gp1) = results
    assert len(outs0) == len(outs1) and len(gp0) == len(gp1)
    for a, b in zip([*outs0, gx0, *gp0], [*outs1, gx1, *gp1]):
        _same(b, a, exact)
    return q


CASES = {
    "lstm": (lambda: nn.LSTM(3, 5), (6, 2, 3)),
    "lstm-2layer-batch-first": (lambda: nn.LSTM(3, 5, num_layers=2, batch_first=True), (2, 6, 3)),
    "lstm-no-bias-unbatched": (lambda: nn.LSTM(3, 4, bias=False), (5, 3)),
    "gru": (lambda: nn.GRU(3, 5), (6, 2, 3)),
    "gru-2layer-batch-first": (lambda: nn.GRU(3, 5, num_layers=2, batch_first=True), (2, 6, 3)),
    "lstm-cell": (lambda: nn.LSTMCell(3, 5), (2, 3)),
    "gru-cell-unbatched": (lambda: nn.GRUCell(3, 5), (3,)),
}


@pytest.mark.parametrize("case", CASES)
def test_fp32_policy_runs_torchs_own_layer(case):
    factory, shape = CASES[case]
    q = _compare(factory(), "fp32", torch.randn(shape), exact=True)
    assert not q.quantizing


@pytest.mark.parametrize("case", CASES)
def test_explicit_recurrence_matches_torch(case):
    factory, shape = CASES[case]
    q = _compare(factory(), IDENTITY_FORMATS, torch.randn(shape))
    assert q.quantizing


def test_explicit_recurrence_takes_an_initial_state():
    lstm, gru = nn.LSTM(3, 4, num_layers=2), nn.GRU(3, 4, num_layers=2)
    h0, c0 = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    _compare(lstm, IDENTITY_FORMATS, torch.randn(5, 2, 3), (h0, c0))
    _compare(gru, IDENTITY_FORMATS, torch.randn(5, 2, 3), h0)
    _compare(nn.LSTMCell(3, 4), IDENTITY_FORMATS, torch.randn(2, 3), (h0[0], c0[0]))


def _half(t):
    return t.half().float()


def test_mixed_fp16_lstm_rounds_inputs_weights_and_gate_preactivations():
    lstm = nn.LSTM(3, 4)
    q = lp.convert(lstm, "mixed-fp16")
    x = torch.randn(5, 2, 3) * 3
    out, (h_n, c_n) = q(x)
    w_ih, w_hh, b_ih, b_hh = (_half(p.detach()) for p in lstm.parameters())
    zx = _half(F.linear(_half(x), w_ih, b_ih))
    h = c = torch.zeros(2, 4)
    hs = []
    for t in range(5):
        i, f, g, o = (zx[t] + _half(F.linear(_half(h), w_hh, b_hh))).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    torch.testing.assert_close(out, torch.stack(hs), rtol=0, atol=0)
    torch.testing.assert_close((h_n[0], c_n[0]), (h, c), rtol=0, atol=0)
    assert not torch.equal(out, lstm(x)[0])
    out.sum().backward()
    for p in q.parameters():
        assert torch.equal(p.grad, _half(p.grad))


def test_mixed_fp16_gru_weight_gradients_are_fp16_over_the_whole_sequence():
    gru = lp.convert(nn.GRU(3, 4, num_layers=2, batch_first=True), "mixed-fp16")
    x = torch.randn(2, 7, 3, requires_grad=True)
    out, h_n = gru(x)
    (out.square().sum() + h_n.sum()).backward()
    for name, p in gru.named_parameters():
        assert torch.equal(p.grad, _half(p.grad)), name
    assert torch.equal(x.grad, _half(x.grad))


def test_packed_sequences_are_refused_with_the_alternative():
    q = lp.convert(nn.LSTM(3, 4), "mixed-fp16")
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    with pytest.raises(TypeError, match="padded"):
        q(packed)


def test_dropout_between_layers_applies_in_training_only():
    q = lp.convert(nn.LSTM(3, 4, num_layers=2, dropout=0.5), IDENTITY_FORMATS)
    x = torch.randn(4, 2, 3)
    torch.manual_seed(3)
    a = q(x)[0]
    torch.manual_seed(4)
    b = q(x)[0]
    assert not torch.equal(a, b)
    q.eval()
    assert torch.equal(q(x)[0], q(x)[0])
