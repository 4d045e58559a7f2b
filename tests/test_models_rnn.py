"""The TIDIGITS LSTM classifier (Park Table 4) takes the state of each sequence's last real step; CharLSTM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowprec.models import CharLSTM, LSTMClassifier


def test_padding_beyond_a_sequence_does_not_change_its_output():
    model = LSTMClassifier().eval()
    x = torch.randn(3, 10, 13)
    lengths = torch.tensor([10, 4, 7])
    before = model(x, lengths)
    changed = x.clone()
    changed[1, 4:] = 100.0 * torch.randn(6, 13)
    changed[2, 7:] = 0.0
    after = model(changed, lengths)
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=1e-6)
    # a real frame does change it
    changed[1, 3] += 1.0
    assert not torch.allclose(model(changed, lengths)[1], before[1])


def test_uses_the_last_real_step_not_the_last_step():
    model = LSTMClassifier(input_size=2, hidden=5, fc=4, num_classes=3).eval()
    x = torch.randn(2, 6, 2)
    short = model(x[:, :4])  # sequences truncated to 4 frames: their last step is step 3
    torch.testing.assert_close(model(x, torch.tensor([4, 4])), short)
    torch.testing.assert_close(model(x, torch.tensor([6, 6])), model(x))  # lengths None = all T steps
    torch.testing.assert_close(model(x, [6, 4]), torch.stack([model(x)[0], short[1]]))  # list lengths


@pytest.mark.parametrize("lengths", [[0, 3], [3, 7], [3]])
def test_bad_lengths_are_errors(lengths):
    with pytest.raises(ValueError, match="lengths"):
        LSTMClassifier()(torch.randn(2, 6, 13), torch.tensor(lengths))


class LSTMLike(nn.Module):
    """nn.LSTM's interface (batch first, returns (output, (h, c))), with h and c that are useless."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.inner = lstm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        output, (h, c) = self.inner(x)
        return output, (torch.full_like(h, float("nan")), torch.full_like(c, float("nan")))


def test_works_with_a_replacement_lstm_module():
    model = LSTMClassifier(hidden=16, fc=8)
    x, lengths = torch.randn(3, 5, 13), torch.tensor([5, 2, 3])
    expected = model(x, lengths)
    model.lstm = LSTMLike(model.lstm)
    out = model(x, lengths)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_char_lstm_shapes():
    model = CharLSTM(vocab_size=30, embed=8, hidden=16, layers=2)
    tokens = torch.randint(0, 30, (4, 9))
    assert model(tokens).shape == (4, 9, 30)
    assert model.lstm.num_layers == 2 and model.head.out_features == 30
    # causal: changing a later token does not change earlier logits
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 30
    torch.testing.assert_close(model(changed)[:, :5], model(tokens)[:, :5])
