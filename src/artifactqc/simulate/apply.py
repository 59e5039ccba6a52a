"""The 3D artifact registry: :func:`apply_artifact` applies one artifact type to a volume with an explicit
physical parameter (no severity map), through the type's own module (:data:`_APPLY_3D`).
"""

from __future__ import annotations

import numpy as np

from .anisotropy import _anisotropy_3d
from .bias import _bias_3d
from .calibration import _check_artifact
from .ghosting import _ghosting_3d
from .motion import _motion_3d
from .noise import _noise_3d

_APPLY_3D = {
    "noise": _noise_3d,
    "ghosting": _ghosting_3d,
    "bias": _bias_3d,
    "anisotropy": _anisotropy_3d,
    "motion": _motion_3d,
}


def apply_artifact(
    data: np.ndarray,
    artifact: str,
    value: float,
    rng: np.random.Generator,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    noise_variant: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Apply one artifact type to a 3D volume with an explicit physical parameter ``value`` (no severity map).

    Used by :func:`simulate_volume` and by the calibration benchmark. ``noise_variant`` (noise only) fixes
    the variant instead of drawing it (:data:`~.noise.NOISE_VARIANTS`; the draw is still taken from ``rng``).
    """
    _check_artifact(artifact, allow_mix=False)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    if artifact == "noise":
        return _noise_3d(data, value, rng, spacing, variant=noise_variant)
    return _APPLY_3D[artifact](data, value, rng, spacing)
