"""Volume-adversarial training (``TrainConfig.volume_adversary``, off by default): the encoder's hidden
features are made uninformative of *which training volume* a slice comes from, clean or corrupted.

A QC score should not depend on the anatomy, contrast or site of a scan, only on its artifacts; on sites the
encoder never saw, per-volume score offsets of other-site anatomy are its main error
(``benchmarks/crosssite``). Here the "domain" is the training volume itself (one anatomy of one site and
contrast), so site, subject and contrast are all unlearned; the artifacts are drawn independently of the
volume, so what the score needs is not what the adversary can use.

The scheme is the *confusion* loss of domain unlearning (Tzeng et al. 2015; Alvi et al. 2018; Dinsdale et
al. 2021 for scanner/site unlearning in MR): every step, the adversary (a small classifier of the training
volume from the hidden vector) learns on the detached features with cross-entropy, and the encoder is
pushed towards features on which the adversary's prediction is *uniform* (cross-entropy to the uniform
distribution, through the adversary's weights held fixed). The gradient-reversal form (Ganin & Lempitsky
2015) was tried first and diverged: the encoder maximised the adversary's cross-entropy without bound
(1600 after three epochs) by making it confidently wrong, which hides nothing.

The adversary is training-only: it is not part of the saved model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

#: The adversary's learning rate as a multiple of the encoder's: at the encoder's rate a classifier of ~30
#: training volumes stayed near chance (cross-entropy 3.29 of log 29 = 3.37, 8 % named) while a linear probe
#: on the finished encoder's features named 40 % of the clean slices: a weak adversary exerts no pressure.
LR_SCALE = 10.0


def ramp(progress: float, weight: float) -> float:
    """The confusion weight at a run's ``progress`` in [0, 1]: ``weight (2 / (1 + exp(-10 p)) - 1)``, the DANN
    schedule (0 at the start, when the features are still random, ``weight`` towards the end)."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


class VolumeAdversary(nn.Module):
    """A two-layer classifier from the encoder's hidden vector to one logit per training volume."""

    def __init__(self, hidden: int, n_volumes: int, width: int = 64):
        super().__init__()
        if n_volumes < 2:
            raise ValueError(f"volume_adversary needs at least 2 training volumes, got {n_volumes}")
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.LeakyReLU(0.1), nn.Linear(width, n_volumes))

    def loss(self, hidden: torch.Tensor, volume: torch.Tensor, weight: float) -> tuple[torch.Tensor, dict]:
        """The step's adversarial terms for ``hidden`` [N, H] of slices from the training volumes ``volume`` [N]:
        the adversary's cross-entropy on the *detached* features (only the adversary learns from it) plus
        ``weight`` × the confusion loss, the cross-entropy of its prediction to the uniform distribution
        through its weights held fixed (only the encoder learns from it; minimal, log(n_volumes), when the
        features do not tell the volumes apart). Parts for the log: ``adversary`` (its cross-entropy;
        log(n_volumes) = chance), ``adversary_acc`` (the share of slices whose volume it names) and
        ``confusion``."""
        logits = self.net(hidden.detach())
        ce = F.cross_entropy(logits, volume)
        fixed = {k: v.detach() for k, v in self.net.named_parameters()}
        confusion = -F.log_softmax(functional_call(self.net, fixed, (hidden,)), dim=1).mean()
        acc = (logits.argmax(1) == volume).float().mean()
        return ce + float(weight) * confusion, {"adversary": float(ce.detach()), "adversary_acc": float(acc),
                                                "confusion": float(confusion.detach())}
