"""The text-gpt task: its data (offline, windows, held-out tail), the per-token loss, and the compare table with
validation loss and perplexity (other tasks' table unchanged)."""

from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lowprec.cli import main
from lowprec.data import char_windows
from lowprec.data.text import default_corpus
from lowprec.experiments import get_task, load_task_data
from lowprec.experiments.compare import format_table
from lowprec.experiments.runner import RunResult, evaluate, evaluate_loss
from lowprec.models import GPT
from lowprec.train import cross_entropy

TASK = get_task("text-gpt")


def test_text_task_loads_offline_windows_of_the_default_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWPREC_DATA", str(tmp_path))  # nothing there: the pydoc_data corpus
    data = load_task_data(TASK)
    text = default_corpus()
    vocab = sorted(set(text))
    t = TASK.model_kwargs["block_size"]
    assert data.model_kwargs == {"vocab_size": len(vocab)}
    (x,), y, (xt,), yt = data.train_inputs, data.train_labels, data.test_inputs, data.test_labels
    assert x.shape == y.shape == (TASK.train_limit, t) and xt.shape == yt.shape == (TASK.test_limit, t)
    assert x.dtype == torch.int64

    def decode(ids):
        return "".join(vocab[i] for i in ids.tolist())

    assert decode(x.flatten()) == text[: x.numel()]  # consecutive windows from the start
    assert decode(y.flatten()) == text[1 : x.numel() + 1]  # each label: the next character
    cut = int(len(text) * 0.9)
    assert decode(xt.flatten()) == text[cut : cut + xt.numel()]  # validation: the held-out tail
    assert decode(yt[:, -1]) == "".join(text[cut + (i + 1) * t] for i in range(len(yt)))


def test_text_task_reads_a_corpus_file_when_present(tmp_path):
    (tmp_path / "text").mkdir()
    text = "abcab" * 200
    (tmp_path / "text" / "corpus.txt").write_text(text)
    data = load_task_data(replace(TASK, train_limit=None, test_limit=None), tmp_path)
    assert data.model_kwargs == {"vocab_size": 3} and "corpus.txt" in data.source
    assert len(data.train_labels) == (900 - 1) // 32 and len(data.test_labels) == (100 - 1) // 32


def test_char_windows_exact_and_refusals():
    x, y = char_windows(torch.arange(11), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, y = char_windows(torch.arange(9), 3)  # [6, 7, 8] would need a 9th character: only two windows fit
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]] and y[-1].tolist() == [4, 5, 6]
    assert char_windows(torch.arange(11), 3, limit=1)[0].tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="too short"):
        char_windows(torch.arange(3), 3)
    with pytest.raises(ValueError, match=">= 1"):
        char_windows(torch.arange(30), 0)


def test_cross_entropy_per_example_and_per_token():
    logits = torch.randn(6, 5, dtype=torch.bfloat16)
    labels = torch.randint(0, 5, (6,))
    assert torch.equal(cross_entropy(logits, labels), F.cross_entropy(logits.float(), labels))
    seq = torch.randn(2, 4, 5)
    tokens = torch.randint(0, 5, (2, 4))
    per_token = [-torch.log_softmax(seq[n, t].double(), 0)[tokens[n, t]] for n in range(2) for t in range(4)]
    torch.testing.assert_close(cross_entropy(seq, tokens).double(), torch.stack(per_token).mean())
    torch.testing.assert_close(cross_entropy(seq, tokens, reduction="sum").double(), torch.stack(per_token).sum())
    with pytest.raises(ValueError, match="without the last"):
        cross_entropy(seq, tokens[:, :3])


def test_evaluate_loss_is_the_mean_over_every_token_in_any_batching():
    torch.manual_seed(0)
    model = GPT(7, block_size=8, n_layer=1, n_embd=16, n_head=2)
    x, y = torch.randint(0, 7, (10, 8)), torch.randint(0, 7, (10, 8))
    accuracy, loss = evaluate_loss(model, (x,), y, batch_size=3)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(loss, cross_entropy(logits, y).item())
    assert accuracy == pytest.approx(100 * (logits.argmax(-1) == y).float().mean().item())
    assert evaluate(model, (x,), y, batch_size=4) == pytest.approx(accuracy)


@pytest.mark.usefixtures("eager_update")
def test_compare_text_gpt_reports_validation_loss_and_perplexity(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the whole table on one line per row
    out = tmp_path / "cmp"
    code = main(["compare", "--task", "text-gpt", "--epochs", "1", "--train-limit", "32", "--test-limit", "8",
                 "--recipes", "fp32", "native-bf16", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "perplexity" in printed and "test acc" not in printed
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["recipe", "val loss", "perplexity", "best ppl", "token acc %", "train loss", "skipped",
                             "seconds", "vs fp32"]
    assert [r["recipe"] for r in rows] == ["fp32", "native-bf16"]
    for r in rows:
        loss = float(r["val loss"])
        assert 2.0 < loss < math.log(120)  # learning has begun; at most a uniform guess over the vocabulary
        assert float(r["perplexity"]) == pytest.approx(math.exp(loss), rel=1e-3)
    with (out / "fp32" / "metrics.csv").open() as f:
        metrics = list(csv.DictReader(f))
    assert {"val_loss", "perplexity", "test_accuracy"} <= set(metrics[0])


def test_classification_table_keeps_its_columns():
    def result(recipe, acc):
        return RunResult("mnist-lenet", recipe, 0, history=[{"epoch": 1, "train_loss": 0.5, "test_accuracy": acc}])

    rows = format_table([result("fp32", 98.0), result("int8", 97.5)])
    assert list(rows[0]) == ["recipe", "test acc %", "best %", "train loss", "skipped", "seconds", "vs fp32"]
    assert rows[1]["vs fp32"] == "-0.50"
