"""Volume-adversarial training (``TrainConfig.volume_adversary``, off by default): the encoder's hidden
features are made uninformative of *which training volume* a slice comes from, clean or corrupted.

A QC score should not depend on the anatomy, contrast or site of a scan, only on its artifacts; on sites the
encoder never saw, per-volume score offsets of other-site anatomy are its main error
(``benchmarks/crosssite``). Domain-adversarial training (Ganin & Lempitsky 2015; Dinsdale et al. 2021 for
site "unlearning" in MR) adds a classifier that predicts the domain from the features through a *gradient
reversal* layer: the classifier learns to name the domain, the encoder learns to defeat it. Here the domain
is the training volume itself (each one anatomy of one site and contrast), so site, subject and contrast
are all unlearned; the artifacts are drawn independently of the volume, so what the score needs is not
what the adversary can use.

The adversary is training-only: it is not part of the saved model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``-coefficient`` backward."""

    @staticmethod
    def forward(ctx, x, coefficient: float):
        ctx.coefficient = float(coefficient)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient reversed and scaled by ``coefficient`` on the way back."""
    return _Reverse.apply(x, coefficient)


def ramp(progress: float, weight: float) -> float:
    """The reversal coefficient at a run's ``progress`` in [0, 1]: ``weight (2 / (1 + exp(-10 p)) - 1)``, the
    DANN schedule (0 at the start, when the features are still random, ``weight`` towards the end)."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


#: The adversary's learning rate as a multiple of the encoder's: at the encoder's rate a classifier of ~30
#: training volumes stayed near chance (cross-entropy 3.29 of log 29 = 3.37, 8 % named) while a linear probe
#: on the finished encoder's features named 40 % of the clean slices: a weak adversary exerts no pressure.
LR_SCALE = 10.0


class VolumeAdversary(nn.Module):
    """A two-layer classifier from the encoder's hidden vector to one logit per training volume."""

    def __init__(self, hidden: int, n_volumes: int, width: int = 64):
        super().__init__()
        if n_volumes < 2:
            raise ValueError(f"volume_adversary needs at least 2 training volumes, got {n_volumes}")
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.LeakyReLU(0.1), nn.Linear(width, n_volumes))

    def loss(self, hidden: torch.Tensor, volume: torch.Tensor, coefficient: float) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the volume labels [N] from ``hidden`` [N, H] through the gradient reversal, and
        its parts for the log: ``adversary`` (the cross-entropy; ``log(n_volumes)`` = chance) and
        ``adversary_acc`` (the share of slices whose volume it names)."""
        logits = self.net(reverse_gradient(hidden, coefficient))
        ce = F.cross_entropy(logits, volume)
        acc = (logits.argmax(1) == volume).float().mean()
        return ce, {"adversary": float(ce.detach()), "adversary_acc": float(acc)}
