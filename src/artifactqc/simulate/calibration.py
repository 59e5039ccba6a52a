"""Severity scale of the simulator: artifact names, per-head names, the calibrated maps severity <->
physical parameter (:data:`CALIBRATION_3D`, :data:`CALIBRATION_2D`), the common SSIM target curve and the
mixture rule (:func:`combine_severities`, :func:`split_severity`).

Every artifact type has one *physical* parameter (:data:`PARAM_NAMES`) driven by the severity ``s`` in
[0, 1] through a monotone piecewise-linear map (knots at :data:`SEVERITY_KNOTS`). The maps were fitted by
``benchmarks/simulate/run.py calibrate`` on real volumes so that, for every type, the mean SSIM to the clean
image inside the head/brain mask follows the common target curve :func:`target_ssim`
``= 1 - TARGET_SSIM_DROP * s``: the same severity means about the same loss of fidelity whatever the
artifact. ``benchmarks/simulate/run.py calibrate`` rewrites the generated calibration block below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Single artifact types; ``"mix"`` is a mixture of 2-3 of them, ``"none"`` (slices only) is the identity.
ARTIFACTS = ("noise", "ghosting", "bias", "anisotropy", "motion")
#: Name of the severity head the encoder predicts for each artifact type.
HEAD_NAMES = {
    "noise": "noise",
    "ghosting": "ghosting",
    "bias": "bias",
    "anisotropy": "resolution",
    "motion": "motion",
}
#: Column order of the per-head target tensor (same order as the ``severity_*`` score columns).
HEAD_ORDER = ("noise", "ghosting", "motion", "bias", "resolution")
_ART_OF_HEAD = {h: a for a, h in HEAD_NAMES.items()}
#: The physical parameter each severity is mapped to.
PARAM_NAMES = {
    "noise": "sigma",  # std of each complex noise channel, normalised intensity units
    "ghosting": "ghost_amplitude",  # intensity * sqrt(n-1)/n: rms amplitude of the ghost comb, k-space units
    "bias": "log_field_std",  # std of log(bias field) inside the foreground mask
    "anisotropy": "thickness_factor",  # slice thickness = slice spacing, in voxels of the original grid
    "motion": "rms_displacement",  # k-space-time-weighted RMS displacement over the mask (3D: mm, 2D: pixels)
}
#: Order in which mixture components are applied (acquisition physics: field, motion, ghosts, sampling, noise).
APPLY_ORDER = ("bias", "motion", "ghosting", "anisotropy", "noise")

#: Target SSIM loss at severity 1: target_ssim(s) = 1 - TARGET_SSIM_DROP * s.
TARGET_SSIM_DROP = 0.25
SEVERITY_KNOTS = tuple(round(0.1 * i, 1) for i in range(11))

# --- calibrated maps: severity knots -> physical parameter (written by benchmarks/simulate/run.py) ---------
# BEGIN CALIBRATION (generated; do not edit by hand)
CALIBRATION_3D = {
    "noise": [0.0, 0.01976, 0.02905, 0.03675, 0.04429, 0.05124, 0.05813, 0.06495, 0.07176, 0.07857, 0.08559],
    "ghosting": [0.0, 0.15386, 0.21847, 0.27115, 0.31841, 0.35911, 0.3998, 0.43419, 0.46855, 0.5026, 0.53335],
    "bias": [0.0, 0.15784, 0.2265, 0.28557, 0.33731, 0.38667, 0.43359, 0.47959, 0.52543, 0.57113, 0.6179],
    "anisotropy": [1.0, 1.02283, 1.33507, 1.63311, 1.98748, 2.23967, 2.48659, 2.81294, 3.12663, 3.41794, 3.76761],
    "motion": [0.0, 0.21514, 0.32286, 0.41806, 0.51259, 0.60296, 0.69334, 0.7875, 0.88802, 0.98854, 1.11864],
}
CALIBRATION_2D = {
    "noise": [0.0, 0.01548, 0.02335, 0.02992, 0.03561, 0.04129, 0.04691, 0.05243, 0.05795, 0.06364, 0.06943],
    "ghosting": [0.0, 0.14576, 0.20881, 0.25771, 0.30521, 0.34376, 0.38231, 0.41794, 0.45109, 0.48425, 0.51583],
    "bias": [0.0, 0.15619, 0.2237, 0.28111, 0.33202, 0.37975, 0.42548, 0.46974, 0.51386, 0.55767, 0.60158],
    "anisotropy": [1.0, 1.1348, 1.50025, 1.77275, 2.09527, 2.3177, 2.55033, 2.82929, 3.09758, 3.34903, 3.62662],
    "motion": [0.0, 0.33918, 0.51221, 0.63866, 0.76442, 0.8851, 1.00592, 1.12965, 1.25338, 1.37711, 1.50105],
}
CALIBRATION_SOURCE = "benchmarks/simulate/run.py calibrate (2026-11-23)"
# END CALIBRATION

#: Per-sample SSIM matching (``simulate_volume(match_ssim=True)``): relative and absolute tolerance on the
#: SSIM loss, most simulations per artifact, and the largest parameter excess (over the identity value) as
#: a multiple of the type-mean calibrated one at severity 1.
MATCH_TOLERANCE = 0.05
MATCH_ABS_TOLERANCE = 0.002
MATCH_MAX_EVALS = 6
MATCH_MAX_FACTOR = 3.0


def _check_artifact(artifact: str, allow_mix: bool = True) -> None:
    ok = ARTIFACTS + (("mix",) if allow_mix else ())
    if artifact not in ok:
        raise ValueError(f"unknown artifact {artifact!r}; expected one of {ok}")


def severity_to_param(artifact: str, severity, dim: int = 3):
    """Physical parameter (see :data:`PARAM_NAMES`) for a severity, from the calibrated map (``dim`` 2 or 3)."""
    _check_artifact(artifact, allow_mix=False)
    table = (CALIBRATION_3D if dim == 3 else CALIBRATION_2D)[artifact]
    s = np.clip(np.asarray(severity, dtype=np.float64), 0.0, 1.0)
    out = np.interp(s, SEVERITY_KNOTS, table)
    return float(out) if out.ndim == 0 else out


def param_to_severity(artifact: str, value, dim: int = 3):
    """Inverse of :func:`severity_to_param` (clipped to [0, 1])."""
    _check_artifact(artifact, allow_mix=False)
    table = (CALIBRATION_3D if dim == 3 else CALIBRATION_2D)[artifact]
    out = np.interp(np.asarray(value, dtype=np.float64), table, SEVERITY_KNOTS)
    return float(out) if out.ndim == 0 else out


def target_ssim(severity):
    """The common calibration target: expected masked SSIM to the clean image at a severity."""
    return 1.0 - TARGET_SSIM_DROP * np.asarray(severity, dtype=np.float64)


def combine_severities(severities: Sequence[float]) -> float:
    """Combined severity of simultaneous artifacts: ``1 - D*S = prod(1 - D*s_i)``, ``D = TARGET_SSIM_DROP``.

    Equals the largest component when there is one, grows with each added component and is capped at 1.
    """
    d = TARGET_SSIM_DROP
    prod = float(np.prod([1.0 - d * float(np.clip(s, 0, 1)) for s in severities])) if len(severities) else 1.0
    return float(min(1.0, (1.0 - prod) / d))


def split_severity(severity: float, k: int, rng: np.random.Generator) -> list[float]:
    """Random component severities (k of them) whose :func:`combine_severities` equals ``severity``."""
    d = TARGET_SSIM_DROP
    w = rng.dirichlet(np.full(k, 1.5))
    log_total = math.log(1.0 - d * float(severity))
    return [float((1.0 - math.exp(wi * log_total)) / d) for wi in w]
