"""Tasks: a model, a data set and the training schedule of one of the papers' experiments, CPU-sized.

Every schedule here is shortened from the paper's (stated per task); ``epochs`` and the data limits can be
changed per run. Data comes from the folder given by ``data_root`` (or $LOWPREC_DATA), falling back to the MNIST
subset shipped with the package where the task uses MNIST.

Beyond the papers, ``text-gpt`` trains the zoo's char-level GPT on a text corpus available offline (Python's
``pydoc_data`` topics; ``<data>/text/corpus.txt`` instead when that file exists): windows of ``block_size``
characters, the first 90 % of the corpus for training and the last 10 % held out for validation (contiguous,
so no validation text is seen in training), the vocabulary being the corpus's distinct characters. It is a
language-model task: the model predicts every next character, and a run reports the validation loss (mean
cross-entropy in nats per character), its perplexity exp(loss) and the per-character accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..data.mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD

__all__ = ["Task", "TASKS", "get_task", "load_task_data", "TaskData"]


@dataclass(frozen=True)
class TaskData:
    """Inputs (a tuple: the model is called as ``model(*inputs)``) and labels, for train and test.

    Labels are one class index per example, or one per position for a language model ((N, T), the next
    token of each input position). ``model_kwargs``: builder arguments the data decides (a language model's
    ``vocab_size``), added to the task's own."""

    train_inputs: tuple[Tensor, ...]
    train_labels: Tensor
    test_inputs: tuple[Tensor, ...]
    test_labels: Tensor
    source: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    val_inputs: tuple[Tensor, ...] | None = None  # a validation split held out of the training set, if any
    val_labels: Tensor | None = None


@dataclass(frozen=True)
class Task:
    name: str
    paper: str
    model: str
    dataset: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # "sgd" | "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    schedule: str = "constant"  # "constant" | "inv" (Caffe: lr (1 + 1e-4 it)^-0.75) | "linear" (to lr/10)
    # | "courbariaux" (per epoch: lr falls linearly to lr/10 at half the epochs, then stays; momentum rises
    # linearly from ``momentum`` to ``momentum_final`` over the first quarter of the epochs)
    momentum_final: float | None = None
    validation: int = 0  # examples held out from the end of the training set; the test error is then read at
    # the epoch of best validation accuracy (Courbariaux's 50k/10k protocol)
    unit_pixels: bool = False  # images as pixel/255 in [0, 1] (pylearn2's MNIST, Courbariaux's input) rather
    # than standardised by the data set's mean and std
    warmup_epochs: int = 0  # full-precision epochs that warm dynamic fixed point exponents up, then restore
    # the initial parameters (Courbariaux's range_init_epoch; only for policies with such exponents)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    max_norm: float | None = None  # Courbariaux's max column norm, applied after every update
    loss_multiplier: float = 1.0  # scales the loss (and so every gradient) to build underflow cases
    train_limit: int | None = None  # examples (sequences for a language model)
    test_limit: int | None = None
    flatten: bool = False
    language_model: bool = False  # next-token prediction: report validation loss and perplexity too


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("mnist-lenet", "Park et al. Table 1 (MNIST LeNet): paper 99.10 / 95.28 / 99.24 for fp32 / int8 / "
             "int8-lazy after 10k iterations of batch 64 (Caffe solver); here 2 epochs by default",
             "lenet", "mnist", epochs=2, batch_size=64, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="inv"),
        Task("pimnist-maxout", "Courbariaux et al. PI-MNIST maxout MLP: paper test error 1.05 / 1.10 / 1.39 / 1.28 "
             "% for fp32 / fp16 / fixed-20 / dfx-10-12 after 800 epochs; here 10 by default. The authors' "
             "protocol: 50k train / 10k validation, test error at the best validation epoch, lr 0.05 falling "
             "linearly to 0.005 at half the epochs, momentum 0.5 rising to 0.7 over the first quarter, a "
             "2-epoch full-precision exponent warm-up for dynamic fixed point. Their softmax gradient is "
             "(y - t) / 10 summed over the batch of 100: the mean loss times 10",
             "maxout-mlp", "mnist", epochs=10, batch_size=100, lr=0.05, momentum=0.5, momentum_final=0.7,
             schedule="courbariaux", max_norm=1.9365, flatten=True, loss_multiplier=10.0, validation=10000,
             unit_pixels=True, warmup_epochs=2),
        Task("fashion-cnn", "WRPN analog (no paper number): Fashion-MNIST CNN at width 1x/2x and w/a bits",
             "small-cnn", "fashion-mnist", epochs=3, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4),
        Task("mnist-cnn-underflow", "MPT analog of the SSD case: a CNN whose gradients sit 12 binades lower (loss "
             "multiplied by 2**-12, learning rate by 2**12: the same training in fp32), so unscaled fp16 flushes "
             "most activation gradients to zero and a loss scale recovers them",
             "small-cnn", "mnist", epochs=2, batch_size=128, lr=0.05 * 2**12, momentum=0.9,
             loss_multiplier=2.0**-12),
        Task("digits-lstm", "Park et al. Table 4 shape (LSTM 200 -> FC 200 -> classes) on free spoken digits "
             "MFCC (TIDIGITS is not free): paper 97.62 / 75.21 / 97.41 on TIDIGITS. Adam with eps 1e-3 (Park's "
             "setting for Adam in INT16): a second moment rounded to 0 then cannot blow a step up",
             "lstm", "spoken-digits", epochs=15, batch_size=32, lr=1e-3, optimizer="adam", momentum=0.0,
             adam_eps=1e-3),
        Task("text-gpt", "Beyond the papers: a char-level GPT (2 layers, d=64, 4 heads, 32-character context) on "
             "Python's own documentation (pydoc_data topics, offline), AdamW with eps 1e-3 (Park's setting for "
             "Adam in INT16: int8-lazy diverges with 1e-8); validation loss and perplexity per character. "
             "Shortened to 2 epochs of 2048 windows (128 steps of 32 x 32 characters): the model is then past "
             "character frequencies (fp32 perplexity about 18; ln of the vocabulary is about 4.6)",
             "gpt", "text", epochs=2, batch_size=32, lr=3e-3, optimizer="adam", momentum=0.0, adam_eps=1e-3,
             model_kwargs={"block_size": 32, "n_layer": 2, "n_embd": 64, "n_head": 4},
             train_limit=2048, test_limit=256, language_model=True),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


def _mnist_like(loader: Callable, root: Path | None, task: Task, mean: float, std: float) -> TaskData:
    """The training set's first ``train_limit`` images (of those not held out), the last ``task.validation``
    as the validation split, and the test set's first ``test_limit``; ``task.unit_pixels`` undoes the loader's
    standardisation (``mean``, ``std``) back to the exact pixel/255 values."""
    x, y = loader("train", root=root, limit=None if task.validation else task.train_limit)
    xt, yt = loader("test", root=root, limit=task.test_limit)
    if task.unit_pixels:
        x, xt = (torch.round((t * std + mean) * 255) / 255 for t in (x, xt))
    if task.flatten:
        x, xt = x.flatten(1), xt.flatten(1)
    if not task.validation:
        return TaskData((x,), y, (xt,), yt, f"{len(y)} train / {len(yt)} test images")
    if task.validation >= len(y):
        raise ValueError(f"task {task.name}: a validation split of {task.validation} leaves no training examples "
                         f"of {len(y)}; use a smaller one")
    cut = len(y) - task.validation
    xv, yv = x[cut:], y[cut:]
    x, y = x[: min(cut, task.train_limit or cut)], y[: min(cut, task.train_limit or cut)]
    return TaskData((x,), y, (xt,), yt, f"{len(y)} train / {len(yv)} validation / {len(yt)} test images",
                    val_inputs=(xv,), val_labels=yv)


def _dataset_root(task: Task, data_root: str | Path | None) -> Path | None:
    from ..data import data_dir

    base = Path(data_root) if data_root is not None else data_dir()
    candidate = base / task.dataset
    return candidate if candidate.exists() else (base if data_root is not None else None)


def load_task_data(task: Task, data_root: str | Path | None = None) -> TaskData:
    """Load the task's data from ``data_root`` (a folder holding the data set's folder, or the data set's
    folder itself); default $LOWPREC_DATA or ~/.cache/lowprec, then the shipped MNIST subset."""
    from .. import data

    root = _dataset_root(task, data_root)
    if task.dataset == "mnist":
        return _mnist_like(data.load_mnist, root, task, MNIST_MEAN, MNIST_STD)
    if task.dataset == "fashion-mnist":
        return _mnist_like(data.load_fashion_mnist, root, task, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    if task.dataset == "spoken-digits":
        train = data.load_spoken_digits(root=root, split="train")
        test = data.load_spoken_digits(root=root, split="test")
        return TaskData(train[:2], train[2], test[:2], test[2], f"{len(train[2])} train / {len(test[2])} test clips")
    if task.dataset == "text":
        return _text_windows(root, task)
    raise ValueError(f"task {task.name}: unknown data set {task.dataset!r}")


#: The share of a text corpus held out for validation: its last 10 %.
VALIDATION_SHARE = 0.1


def _text_windows(root: Path | None, task: Task) -> TaskData:
    """A language-model task's data: ``root/corpus.txt`` if present, else the offline default corpus, cut into
    windows of the model's ``block_size`` (see the module docstring)."""
    from ..data import char_windows, load_text

    path = root / "corpus.txt" if root is not None and (root / "corpus.txt").is_file() else None
    encoded, vocab = load_text(path)
    seq_len = task.model_kwargs["block_size"]
    cut = int(len(encoded) * (1 - VALIDATION_SHARE))
    x, y = char_windows(encoded[:cut], seq_len, task.train_limit)
    xt, yt = char_windows(encoded[cut:], seq_len, task.test_limit)
    name = str(path) if path is not None else "pydoc_data topics"
    return TaskData((x,), y, (xt,), yt, f"{len(y)} train / {len(yt)} validation windows of {seq_len} characters "
                    f"({name}, {len(vocab)} distinct)", {"vocab_size": len(vocab)})
