"""The batched 2D path used for training on slices (torch, CPU, thousands of slices/s):
:func:`simulate_slices`, :func:`apply_slices` and the per-head targets (:func:`slice_targets`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .anisotropy import _anisotropy_2d
from .bias import _bias_2d
from .calibration import (
    _ART_OF_HEAD,
    APPLY_ORDER,
    ARTIFACTS,
    HEAD_ORDER,
    TARGET_SSIM_DROP,
    _check_artifact,
    severity_to_param,
)
from .ghosting import _ghosting_2d
from .motion import _motion_2d
from .noise import _noise_2d

_APPLY_2D = {
    "noise": _noise_2d,
    "ghosting": _ghosting_2d,
    "bias": _bias_2d,
    "anisotropy": _anisotropy_2d,
    "motion": _motion_2d,
}


def apply_slices(x: torch.Tensor, values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply artifacts with explicit physical parameters to a batch of slices.

    ``values`` is [B, 5] in :data:`ARTIFACTS` order (physical parameter per type; 0 — or 1 for anisotropy's
    thickness factor — means "not applied"). Types are applied in :data:`APPLY_ORDER`. Random draws of a
    type are made for the samples that carry it, in batch order.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    out = x.clone()
    for a in APPLY_ORDER:
        col = values[:, ARTIFACTS.index(a)].to(torch.float64)
        active = col > (1.0 if a == "anisotropy" else 0.0)
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            continue
        out[idx] = _APPLY_2D[a](out[idx], col[idx], generator).to(out.dtype)
    return out


def slice_targets(
    artifacts: Sequence[str], severities: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-type component severities [B, 5] (:data:`ARTIFACTS` order) for a batch of artifact names.

    Mixtures draw 2-3 distinct types and split the combined severity with :func:`split_severity`.
    """
    b = len(artifacts)
    sev = torch.zeros(b, len(ARTIFACTS), dtype=torch.float64)
    sv = severities.detach().to(torch.float64).clamp(0, 1)
    d = TARGET_SSIM_DROP
    for i, a in enumerate(artifacts):
        s = float(sv[i])
        if a == "none" or s == 0.0:
            continue
        if a == "mix":
            k = int(torch.randint(2, 4, (1,), generator=generator))
            perm = torch.randperm(len(ARTIFACTS), generator=generator)[:k]
            gam = torch._standard_gamma(torch.full((k,), 1.5, dtype=torch.float64), generator=generator)
            w = gam / gam.sum()
            comps = (1.0 - torch.exp(w * math.log(1.0 - d * s))) / d
            sev[i, perm] = comps
        else:
            _check_artifact(a, allow_mix=False)
            sev[i, ARTIFACTS.index(a)] = s
    return sev


def simulate_slices(
    x: torch.Tensor,
    artifacts: Sequence[str],
    severities: torch.Tensor,
    generator: torch.Generator | None = None,
    return_targets: bool = False,
):
    """Fast batched corruption of 2D slices for training.

    ``x`` [B,1,H,W] float in ~[0,1]; ``artifacts[i]`` in :data:`ARTIFACTS`, ``"mix"`` or ``"none"``;
    ``severities`` [B] in [0, 1] (for ``"mix"`` the combined severity). Returns the corrupted [B,1,H,W] batch,
    and with ``return_targets=True`` also a [B, 5] tensor of per-head severities in :data:`HEAD_ORDER`
    (``noise, ghosting, motion, bias, resolution``). Deterministic for a seeded ``generator`` (CPU).
    For 2D, ``anisotropy`` is thick-slice blurring + resampling along one in-plane axis (the slice is a
    through-plane view) and ``motion`` an in-plane rigid k-space segment model with the RMS displacement in
    pixels. Samples with severity 0 or ``"none"`` are returned unchanged.
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected [B,1,H,W], got {tuple(x.shape)}")
    if len(artifacts) != x.shape[0] or severities.shape[0] != x.shape[0]:
        raise ValueError("artifacts and severities must have one entry per slice")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    comp = slice_targets(artifacts, severities, generator)
    values = torch.zeros_like(comp)
    for j, a in enumerate(ARTIFACTS):
        values[:, j] = torch.from_numpy(np.asarray(severity_to_param(a, comp[:, j].numpy(), dim=2), dtype=np.float64))
        if a == "anisotropy":
            values[comp[:, j] == 0, j] = 1.0
        else:
            values[comp[:, j] == 0, j] = 0.0
    out = apply_slices(x, values, generator)
    if not return_targets:
        return out
    heads = torch.stack([comp[:, ARTIFACTS.index(_ART_OF_HEAD[h])] for h in HEAD_ORDER], dim=1).to(x.dtype)
    return out, heads
