"""Shared benchmark code: what more than one ``benchmarks/*/run.py`` needs and the package itself does not.

* :class:`PublishedEncoder` — the published artifact encoder (Hays et al.) re-implemented for the encoder
  benchmark's speed comparison only (no workflow path uses it, so it lives here, not in ``artifactqc``).

A benchmark imports this module after putting ``benchmarks/`` on ``sys.path``
(``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))``).
"""

from __future__ import annotations

import torch.nn as nn


class PublishedEncoder(nn.Module):
    """Re-implementation of the published architecture (Hays et al.) for speed comparison only.

    Two conv blocks without downsampling (3×3 conv, InstanceNorm, LeakyReLU, twice each; channels rising),
    a 1×1 conv reducing features, adaptive average pooling and ``abs`` for a non-negative score.
    """

    def __init__(self, c1: int = 16, c2: int = 32):
        super().__init__()

        def block(cin, cout):
            return [
                nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01),
                nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01),
            ]

        self.net = nn.Sequential(*block(1, c1), *block(c1, c2), nn.Conv2d(c2, 1, 1), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.net(x).flatten(1)[:, 0].abs()
