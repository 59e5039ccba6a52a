"""Recorded, invertible intensity maps between a user's image units and the units a model works in.

Image tools that write a file a user receives (``simulate``, ``superres``) must return the user's own
intensity units. Where a step needs normalised intensities (the simulator's calibrated severities are
defined on :func:`artifactqc.io.normalize_intensity`'s scale; a network wants values ~[0, 1]), the tool
maps forward with an :class:`IntensityMap`, works, maps back with its exact inverse and records the map in
its sidecar. This module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityMap:
    """``normalised = (x - offset) / scale``; ``x = offset + scale * normalised``."""

    offset: float
    scale: float
    rule: str = ""

    @classmethod
    def calibration_scale(cls, data: np.ndarray, p_low: float = 0.5, p_high: float = 99.5) -> "IntensityMap":
        """The map onto the simulator's calibrated scale: ``scale`` = the foreground's ``p_high - p_low``
        percentile span (the unit of :func:`artifactqc.io.normalize_intensity`, on which the severities
        were calibrated). ``offset`` is 0 for a non-negative (magnitude) image, so its zero stays zero
        and magnitude noise stays Rician; an image with negative values gets ``offset`` = the
        foreground's ``p_low`` percentile (exactly ``normalize_intensity``'s map, without its clipping)."""
        from .io import foreground_mask

        x = np.asarray(data, dtype=np.float32)
        mask = foreground_mask(x)
        vals = x[mask] if mask.any() else x.ravel()
        lo, hi = (float(v) for v in np.percentile(vals, [p_low, p_high]))
        scale = hi - lo if hi > lo else 1.0
        offset = 0.0 if float(x.min()) >= 0 else lo
        rule = (f"foreground percentiles p{p_low:g}/p{p_high:g}: scale = p{p_high:g} - p{p_low:g}; "
                f"offset = {'0 (non-negative image)' if offset == 0 else f'p{p_low:g}'}")
        return cls(offset=offset, scale=float(scale), rule=rule)

    @classmethod
    def robust_max(cls, data: np.ndarray, q: float = 99.5) -> "IntensityMap":
        """``offset`` 0, ``scale`` = the ``q`` percentile of the positive voxels (1 if there are none)."""
        x = np.asarray(data)
        pos = x[x > 0]
        scale = float(np.percentile(pos, q)) if pos.size else 1.0
        return cls(offset=0.0, scale=scale if scale > 0 else 1.0, rule=f"p{q:g} of the positive voxels")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """User units -> normalised (float32)."""
        return ((np.asarray(x, np.float32) - np.float32(self.offset)) / np.float32(self.scale)).astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Normalised -> user units (float32)."""
        return (np.float32(self.offset) + np.float32(self.scale) * np.asarray(y, np.float32)).astype(np.float32)

    def as_dict(self) -> dict:
        return {
            "normalised": "(x - offset) / scale",
            "inverse": "offset + scale * normalised",
            "offset": self.offset,
            "scale": self.scale,
            "rule": self.rule,
        }
