"""The papers' models as plain ``torch.nn`` modules, and a registry of them by name.

Every model is built from standard layers only (``nn.Linear``, ``nn.Conv2d``, ``nn.LSTM``, ``nn.BatchNorm2d``,
``nn.Embedding``, ``nn.LayerNorm``, pooling, activations; the GPT's attention is functional matmul/softmax or SDPA) plus parameter-free helpers (:class:`Maxout`, :class:`MaskDropout`,
:class:`PadShortcut`), so ``lowprec.convert(model, policy)`` can swap the parameterised layers for quantized ones
by type. Layers are registered in the order the data flows through them, so the first and last quantizable
layers in module order (``@first`` / ``@last`` in a policy) are the network's input and classifier layers.

=============  ================================  ===================================================
name           builder                           reproduces
=============  ================================  ===================================================
lenet          :class:`LeNet`                    Park et al. Table 1, MNIST (Caffe LeNet)
maxout-mlp     :class:`MaxoutMLP`                Courbariaux et al., PI-MNIST maxout MLP
conv-maxout    :class:`ConvMaxoutMNIST`          Courbariaux et al., MNIST conv maxout network
small-cnn      :class:`SmallCNN`                 CPU analog for WRPN / MPT (no paper counterpart)
resnet20       :func:`resnet20`                  He et al. ResNet-20; Park Table 1; WRPN widening
lstm           :class:`LSTMClassifier`           Park et al. Table 4, TIDIGITS LSTM
char-lstm      :class:`CharLSTM`                 CPU analog of MPT's LSTM language models
dcgan          :class:`DCGAN`                    MPT / Park DCGAN, small
gpt            :class:`GPT`                      beyond the papers: a small char-level GPT (nanoGPT-style)
=============  ================================  ===================================================
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cnn import SmallCNN
from .gan import DCGAN, Discriminator, Generator
from .gpt import GPT
from .lenet import LeNet
from .maxout import (
    MAX_COL_NORM,
    ConvMaxoutMNIST,
    MaskDropout,
    Maxout,
    MaxoutMLP,
    apply_max_norm,
)
from .resnet import BasicBlock, PadShortcut, ResNet, resnet20
from .rnn import CharLSTM, LSTMClassifier

__all__ = [
    "DCGAN",
    "MAX_COL_NORM",
    "MODELS",
    "BasicBlock",
    "CharLSTM",
    "ConvMaxoutMNIST",
    "Discriminator",
    "GPT",
    "Generator",
    "LSTMClassifier",
    "LeNet",
    "MaskDropout",
    "Maxout",
    "MaxoutMLP",
    "PadShortcut",
    "ResNet",
    "SmallCNN",
    "apply_max_norm",
    "build_model",
    "resnet20",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "maxout-mlp": MaxoutMLP,
    "conv-maxout": ConvMaxoutMNIST,
    "small-cnn": SmallCNN,
    "resnet20": resnet20,
    "lstm": LSTMClassifier,
    "char-lstm": CharLSTM,
    "dcgan": DCGAN,
    "gpt": GPT,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """``MODELS[name](**kwargs)``; ValueError listing the known names for any other name."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(MODELS)}") from None
    return builder(**kwargs)
