"""Quantized LSTM/GRU and cells: torch's results when nothing rounds, the papers' roundings otherwise."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

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
    "lstm-bidirectional-2layer-unbatched-no-bias": (
        lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, bias=False), (5, 3)),
    "gru-bidirectional-batch-first": (lambda: nn.GRU(3, 5, bidirectional=True, batch_first=True), (2, 6, 3)),
    "lstm-cell": (lambda: nn.LSTMCell(3, 5), (2, 3)),
    "gru-cell-unbatched": (lambda: nn.GRUCell(3, 5), (3,)),
    "rnn": (lambda: nn.RNN(3, 5), (6, 2, 3)),
    "rnn-relu-2layer-bidirectional-batch-first": (
        lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=True), (2, 6, 3)),
    "rnn-no-bias-unbatched": (lambda: nn.RNN(3, 4, bias=False), (5, 3)),
    "rnn-cell-relu": (lambda: nn.RNNCell(3, 5, nonlinearity="relu"), (2, 3)),
    "rnn-cell-unbatched": (lambda: nn.RNNCell(3, 5), (3,)),
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


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_mixed_fp16_rnn_rounds_inputs_weights_and_preactivations(nonlinearity):
    """An Elman RNN under mixed-fp16 against the recurrence written here: each matmul's input, weights and result
    on fp16, the nonlinearity in float32; gradients on fp16; convert warns of nothing."""
    rnn = nn.RNN(3, 4, num_layers=2, nonlinearity=nonlinearity)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = lp.convert(rnn, "mixed-fp16")
    x = torch.randn(5, 2, 3) * 3
    out, h_n = q(x)
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    inputs, finals = x, []
    for layer in range(2):
        w_ih, w_hh, b_ih, b_hh = (_half(getattr(rnn, f"{n}_l{layer}").detach())
                                  for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        zx = _half(F.linear(_half(inputs), w_ih, b_ih))
        h, hs = torch.zeros(2, 4), []
        for t in range(5):
            h = act(zx[t] + _half(F.linear(_half(h), w_hh, b_hh)))
            hs.append(h)
        inputs = torch.stack(hs)
        finals.append(h)
    torch.testing.assert_close(out, inputs, rtol=0, atol=0)
    torch.testing.assert_close(h_n, torch.stack(finals), rtol=0, atol=0)
    assert not torch.equal(out, rnn(x)[0])
    out.sum().backward()
    for p in q.parameters():
        assert torch.equal(p.grad, _half(p.grad))


def test_widen_keeps_an_rnns_nonlinearity():
    wide = lp.nn.widen(nn.Sequential(nn.RNN(3, 4, nonlinearity="relu"), nn.RNNCell(4, 2, nonlinearity="relu")), 2)
    assert (wide[0].hidden_size, wide[1].input_size) == (8, 8)
    assert wide[0].nonlinearity == wide[1].nonlinearity == "relu"


def _packed_batch(batch_first, lengths=(4, 7, 2), features=3):
    """A padded batch with padding that must never be read (NaN), packed out of order (enforce_sorted=False)."""
    x = torch.randn(max(lengths), len(lengths), features, generator=torch.Generator().manual_seed(0))
    for b, n in enumerate(lengths):
        x[n:, b] = float("nan")
    x = x.transpose(0, 1).contiguous() if batch_first else x
    x.requires_grad_()
    return x, pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)


RNN_CASES = [  # (class, num_layers, bidirectional, batch_first, with h0)
    (nn.LSTM, 1, True, False, False), (nn.LSTM, 2, True, True, True), (nn.LSTM, 2, False, False, True),
    (nn.GRU, 1, True, True, False), (nn.GRU, 2, True, False, True), (nn.GRU, 2, False, True, False),
    (nn.RNN, 2, True, True, True), (nn.RNN, 1, False, False, False),
]


def _h0(cls, layers, bidirectional, batch):
    shape = (layers * (2 if bidirectional else 1), batch, 5)
    return (torch.randn(shape), torch.randn(shape)) if cls is nn.LSTM else torch.randn(shape)


@pytest.mark.parametrize("cls, layers, bidirectional, batch_first, with_h0", RNN_CASES)
def test_packed_sequences_and_bidirectional_layers_match_torch_to_float_rounding(cls, layers, bidirectional,
                                                                                  batch_first, with_h0):
    torch.manual_seed(0)
    plain = cls(3, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    q = lp.convert(plain, IDENTITY_FORMATS)
    hx = _h0(cls, layers, bidirectional, 3) if with_h0 else None
    results = []
    for module in (plain, q):
        x, packed = _packed_batch(batch_first)
        out, state = module(packed, hx)
        assert isinstance(out, PackedSequence)
        (out.data.square().sum() + sum(t.sum() for t in _tensors(state))).backward()
        results.append((out, _tensors(state), torch.nan_to_num(x.grad), [p.grad for p in module.parameters()]))
    (out0, s0, gx0, gp0), (out1, s1, gx1, gp1) = results
    assert torch.equal(out1.batch_sizes, out0.batch_sizes) and torch.equal(out1.sorted_indices, out0.sorted_indices)
    assert torch.equal(out1.unsorted_indices, out0.unsorted_indices)
    for a, b in zip([out0.data, *s0, gx0, *gp0], [out1.data, *s1, gx1, *gp1]):
        torch.testing.assert_close(b, a)  # float32 tolerances: torch fuses the gate sums differently
    # padded tensors (no packing), bidirectional: the same agreement
    x = torch.randn(6, 3, 3)
    x = x.transpose(0, 1).contiguous() if batch_first else x
    plain.zero_grad(set_to_none=True)
    _compare(plain, IDENTITY_FORMATS, x, hx)
    wrong = _h0(cls, layers + 1, bidirectional, 3)  # one layer too many: torch's error, from both
    for module in (plain, q):
        with pytest.raises(RuntimeError, match=r"Expected hidden(\[0\])? size"):
            module(x, wrong)


@pytest.mark.parametrize("policy, fmt", [("mixed-fp16", "fp16"), ("int8", "dfx<8>")])
def test_quantized_packed_bidirectional_layers_round_every_matmul_operand_and_never_read_padding(
        monkeypatch, policy, fmt):
    from lowprec.nn import recurrent

    seen = []
    apply = recurrent.QLinearFunction.apply

    def recording(x, w, b, roles, acc):
        z = apply(x, w, b, roles, acc)
        seen.append((x.detach(), w.detach(), b.detach(), z.detach()))
        return z

    monkeypatch.setattr(recurrent.QLinearFunction, "apply", recording)
    torch.manual_seed(0)
    q = lp.convert(nn.LSTM(3, 5, num_layers=2, bidirectional=True), policy)
    lengths = (4, 7, 2)
    x, packed = _packed_batch(False, lengths)
    out, (h_n, c_n) = q(packed)
    rows = sum(lengths)
    assert torch.isfinite(out.data).all() and torch.isfinite(h_n).all()  # NaN padding never reached a matmul
    for inp, w, b, z in seen:  # weights and gate pre-activations (output role) on the grid, from rounded inputs
        assert torch.equal(lp.quantize(w, fmt), w) and torch.equal(lp.quantize(b, fmt), b)
        assert torch.equal(z, lp.quantize(F.linear(lp.quantize(inp, fmt), w, b), fmt))
    # per layer and direction: one input projection over the packed rows, then one hidden matmul per step on
    # the sequences still running, so the hidden matmuls together cover exactly the real time steps
    assert len(seen) == 2 * 2 * (1 + max(lengths))
    for k in range(4):
        chunk = seen[k * (1 + max(lengths)):(k + 1) * (1 + max(lengths))]
        assert chunk[0][0].shape[0] == rows and sum(inp.shape[0] for inp, *_ in chunk[1:]) == rows
    out.data.sum().backward()
    assert all(torch.equal(lp.quantize(p.grad, fmt), p.grad) for p in q.parameters())


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
