"""Per-sample SSIM matching (``simulate_volume(match_ssim=True)``): search one artifact's physical parameter
so that this sample's masked SSIM to its clean volume hits the severity's target (:func:`apply_matched`).
"""

from __future__ import annotations

import math

import numpy as np

from .apply import apply_artifact
from .calibration import (
    CALIBRATION_3D,
    MATCH_ABS_TOLERANCE,
    MATCH_MAX_EVALS,
    MATCH_MAX_FACTOR,
    MATCH_TOLERANCE,
    TARGET_SSIM_DROP,
    _check_artifact,
    severity_to_param,
)
from .ssim import _gauss, _ssim_from_moments, head_mask


class _SSIMLoss:
    """``1 - mean SSIM inside a mask`` of a volume against a fixed reference (:func:`ssim_masked`'s value),
    computed on the mask's bounding box grown by the SSIM window's reach, with the reference's local moments
    computed once, so repeated evaluations are cheap. An empty (or < 10 voxel) head mask falls back to the
    whole volume."""

    def __init__(self, ref: np.ndarray, mask: np.ndarray | None = None, sigma: float = 1.5):
        mask = head_mask(ref) if mask is None else np.asarray(mask, dtype=bool)
        if mask.sum() < 10:
            mask = np.ones(ref.shape, dtype=bool)
        self.sigma = sigma
        from ..io import mask_box

        self.box = mask_box(mask, int(math.ceil(3.5 * sigma)) + 1)
        self.ref = np.ascontiguousarray(ref[self.box], dtype=np.float32)
        self.mask = mask[self.box]
        self.mx = _gauss(self.ref, sigma)
        self.sxx = _gauss(self.ref * self.ref, sigma) - self.mx * self.mx

    def __call__(self, out: np.ndarray) -> float:
        y = np.ascontiguousarray(out[self.box], dtype=np.float32)
        return 1.0 - float(_ssim_from_moments(self.mx, self.sxx, self.ref, y, self.sigma, 1.0)[self.mask].mean())


def apply_matched(
    data: np.ndarray,
    artifact: str,
    severity: float,
    rng: np.random.Generator,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    loss: _SSIMLoss | None = None,
    tol: float = MATCH_TOLERANCE,
    max_evals: int = MATCH_MAX_EVALS,
    noise_variant: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Apply one artifact so that *this* sample's masked SSIM to ``data`` is ``target_ssim(severity)``.

    The random draws (axis, ghosts, field shape, motion timing, noise) are taken once from ``rng`` and kept;
    only the physical parameter is searched: it starts at the type-mean calibrated value
    (:func:`severity_to_param`) and is updated by secant steps on log(parameter excess) vs log(SSIM loss)
    (the excess over the identity value: 0, or 1 for the anisotropy factor) until the loss is within
    ``max(tol * target, MATCH_ABS_TOLERANCE)`` of ``TARGET_SSIM_DROP * severity`` or ``max_evals``
    simulations were made (steps of at most 4x, excess at most ``MATCH_MAX_FACTOR`` times the calibrated
    excess at severity 1); the closest one is returned. Its params add ``ssim_target``, ``ssim`` (achieved),
    ``param_mean_calibrated`` and ``match_evaluations``. Where a cap of the simulator (ghost intensity, motion
    amplitude) stops the loss from growing, the target may be missed; ``ssim`` records what was reached.
    """
    _check_artifact(artifact, allow_mix=False)
    loss = loss or _SSIMLoss(data)
    target = TARGET_SSIM_DROP * float(severity)
    base = 1.0 if artifact == "anisotropy" else 0.0
    start = float(severity_to_param(artifact, severity, dim=3))
    cap = MATCH_MAX_FACTOR * (CALIBRATION_3D[artifact][-1] - base)
    state = rng.bit_generator.state
    tried: list[tuple[float, float, np.ndarray, dict]] = []

    def run(value: float) -> float:
        rng.bit_generator.state = state  # the same draws at every trial
        out, p = apply_artifact(data, artifact, base + value, rng, spacing, noise_variant)
        tried.append((value, loss(out), out, p))
        return tried[-1][1]

    x, cur = start - base, run(start - base)
    gamma = 1.0
    while abs(cur - target) > max(tol * target, MATCH_ABS_TOLERANCE) and len(tried) < max_evals and x > 0:
        if len(tried) >= 2:
            (x0, l0), (x1, l1) = sorted((t[0], t[1]) for t in tried[-2:])
            if x1 > x0 * 1.0001 and l0 > 0 and l1 > 0:
                gamma = min(max(math.log(l1 / l0) / math.log(x1 / x0), 0.3), 4.0)
        x = min(max(x * (target / max(cur, 1e-6)) ** (1.0 / gamma), x / 4.0), 4.0 * x, cap)
        cur = run(x)
    _, achieved, out, p = min(tried, key=lambda t: abs(t[1] - target))
    p = dict(p)
    p.update(
        ssim_target=1.0 - target,
        ssim=1.0 - achieved,
        param_mean_calibrated=start,
        match_evaluations=len(tried),
    )
    return out, p
