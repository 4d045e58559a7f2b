"""Scores of a generator's images, computed with a small classifier trained here (no downloaded Inception net).

* ``frechet_distance(a, b)``: the Fréchet distance between Gaussians fitted to two feature sets (FID's formula,
  Heusel et al. 2017): ``|m1 - m2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, in float64, with the
  sample covariances (divisor n - 1). The matrix square roots come from symmetric eigendecompositions
  (``torch.linalg.eigh``; eigenvalues below 0, round-off of a singular covariance, are taken as 0), so no scipy
  is needed. Features here are the classifier's penultimate layer (LeNet's 500 ReLU units): an "FID-like"
  number, comparable between recipes of one run, not with published FIDs.
* ``class_scores(logits)``: the classifier's mean max-softmax probability ("confidence": how digit-like each
  image is), the entropy of the mean class distribution in nats (ln 10 = 2.303 when all ten digits appear
  equally often: mode coverage) and the Inception-score formula ``exp(E_x KL(p(y|x) || p(y)))`` (1 to 10).
* ``train_classifier``: the fp32 LeNet those features come from, trained deterministically from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import LeNet
from ..train import cross_entropy

__all__ = ["frechet_distance", "class_scores", "ClassScores", "train_classifier", "features_and_logits", "accuracy"]

#: Images per forward when scoring (memory only: results do not depend on it).
SCORE_BATCH = 500


def _sqrt_psd(m: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues
    taken as 0)."""
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to the rows of ``a`` (n, d) and ``b`` (m, d); see the
    module docstring. ValueError for fewer than 2 rows, different widths or non-finite features (a generator
    that produced NaN: the caller reports it as such)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance takes two (n, d) feature sets of one width d, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs at least 2 rows in each set (a covariance), got {len(a)} and "
                         f"{len(b)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("frechet_distance: the features hold NaN or inf")
    a, b = a.double(), b.double()
    m1, m2 = a.mean(0), b.mean(0)
    d = a.shape[1]
    s1, s2 = torch.cov(a.T, correction=1).reshape(d, d), torch.cov(b.T, correction=1).reshape(d, d)
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * cross)


@dataclass(frozen=True)
class ClassScores:
    """See the module docstring: mean max-softmax probability, entropy of the mean class distribution (nats),
    Inception-score formula."""

    confidence: float
    class_entropy: float
    inception_score: float


def class_scores(logits: Tensor) -> ClassScores:
    """``ClassScores`` of classifier logits (n, classes), computed in float64."""
    p = torch.softmax(logits.double(), dim=1)
    marginal = p.mean(0)
    entropy = -(marginal * marginal.clamp(min=1e-300).log()).sum()
    kl = (p * (p.clamp(min=1e-300).log() - marginal.clamp(min=1e-300).log())).sum(1).mean()
    return ClassScores(float(p.max(1).values.mean()), float(entropy), float(math.exp(kl)))


def features_and_logits(classifier: LeNet, images: Tensor) -> tuple[Tensor, Tensor]:
    """The classifier's penultimate features (the ReLU after its hidden FC layer) and logits of ``images``
    (normalised as the classifier was trained), in eval mode without gradients."""
    head = classifier.classifier
    feats, logits = [], []
    classifier.eval()
    with torch.no_grad():
        for i in range(0, len(images), SCORE_BATCH):
            h = head[:3](classifier.features(images[i : i + SCORE_BATCH]))  # Flatten, Linear, ReLU
            feats.append(h)
            logits.append(head[3:](h))
    return torch.cat(feats), torch.cat(logits)


def train_classifier(images: Tensor, labels: Tensor, *, seed: int, epochs: int = 2, batch_size: int = 64) -> LeNet:
    """An fp32 LeNet trained on ``images`` (normalised MNIST) with Park's LeNet solver (SGD, lr 0.01, momentum
    0.9, weight decay 5e-4), ``epochs`` epochs of shuffled batches; deterministic for a seed (the global RNG is
    left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        order_rng = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=order_rng)
            for i in range(0, len(labels), batch_size):
                idx = order[i : i + batch_size]
                optimizer.zero_grad()
                cross_entropy(model(images[idx]), labels[idx]).backward()
                optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Test accuracy in % of a classifier."""
    _, logits = features_and_logits(model, images)
    return float((logits.argmax(1) == labels).double().mean() * 100)
