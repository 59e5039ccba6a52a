"""Intensity clipping (saturation) check on the scorer's own slices: a measured, not learned, severity.

Why: the scorer maps each volume's foreground 0.5/99.5 percentiles to 0/1 (:mod:`artifactqc.encoder.slices`).
When a volume's bright tissue was clipped (a windowed or 8-bit export, a saturated receiver), the 99.5th
percentile *is* the clip value, so every saturated voxel lands on a plateau of exactly 1.0 in the slices and
nothing lies above it. A normal volume's top 0.5 % spreads over 1.0–1.5 instead. The learned encoder never
saw clipping in training and scores clipped volumes *lower* than clean ones (leave-site-out benchmark, issue 16:
AUROC 0.00–0.10), so the check is a rule, not a head:

* :func:`saturation_fraction`: the fraction of head pixels (slice value > :data:`HEAD_THRESHOLD`, the head
  threshold of the slice geometry) within :data:`PLATEAU_TOL` of 1.0. Trilinear sampling puts a pixel exactly
  on the plateau only where all its neighbouring voxels are clipped, so the fraction counts the *interior*
  of saturated regions (scattered single bright voxels barely count).
* :func:`clipping_severity`: that fraction mapped to a severity in [0, 1], log-linear between
  :data:`SAT_CLEAN_MAX` (severity 0 at and below) and :data:`SAT_FULL` (severity 1 at and above).
* :func:`combined_score`: the row's ``score`` = max(learned score, ``SCORE_SCALE`` × severity_clipping), so
  severity_clipping 0.5 reaches the review threshold 1 like a learned head's severity 0.5; the learned score
  stays in ``score_learned``.

Calibration (``benchmarks/saturation/run.py``, results in ``benchmarks/saturation/results.md``): on every
template and real brain volume of the development data (69 volumes; as stored, int16 ×1000, resampled to
1.5 mm, reoriented, re-saved), the largest clean fraction is 0.0013 (an 8-bit template average, ch2better;
real single subjects ≤ 0.0007), so :data:`SAT_CLEAN_MAX` = 0.0025 leaves a factor ~2 (templates) and ~3.6
(subjects). Clipping a volume's head intensities at its 77.5th percentile gives fractions 0.018–0.24 (median
~0.11), hence :data:`SAT_FULL` = 0.1: severity 1 for a typical volume clipped at the 77.5th percentile, > 0.5
for every one measured (at the 95th: median severity 0.5).
The values hold for float32 slices and for the same slices stored as float16 (the leave-site-out cache):
1.0 is exact in float16 and the tolerance is one float16 step near 1.

Low-end saturation is not checked: 0 is every volume's background value, so a plateau at 0 says nothing.
"""

from __future__ import annotations

import numpy as np

from .network import SCORE_SCALE

#: a pixel is on the plateau when |value - 1| < PLATEAU_TOL (about one float16 step at 1.0, ~0.1 % of the
#: scaled intensity range; a clipped voxel maps to 1.0 up to float rounding, ~1e-7)
PLATEAU_TOL = 1e-3
#: head pixels: slice value above this (10 % of the robust intensity range: the scorer's own head threshold)
HEAD_THRESHOLD = 0.1
#: severity 0 at and below this plateau fraction (2× the largest clean fraction measured)
SAT_CLEAN_MAX = 0.0025
#: severity 1 at and above this plateau fraction (the median fraction of a volume clipped at its 77.5th percentile)
SAT_FULL = 0.1


def saturation_fraction(slices: np.ndarray) -> float:
    """Fraction of head pixels (> :data:`HEAD_THRESHOLD`) on the upper plateau (|x - 1| < :data:`PLATEAU_TOL`)
    of a slice stack ``[N, S, S]`` as :func:`artifactqc.encoder.slices.extract_from_array` returns it (float32,
    or float16 as cached; any shape works). 0.0 when there are no head pixels."""
    x = np.asarray(slices)
    head = x > HEAD_THRESHOLD
    n = int(np.count_nonzero(head))
    if n == 0:
        return 0.0
    on = np.abs(x.astype(np.float32, copy=False) - np.float32(1.0)) < np.float32(PLATEAU_TOL)
    return float(np.count_nonzero(on & head)) / n


def clipping_severity(fraction: float) -> float:
    """Severity in [0, 1] of a plateau fraction: 0 at and below :data:`SAT_CLEAN_MAX`, 1 at and above
    :data:`SAT_FULL`, linear in log(fraction) between. NaN in, NaN out."""
    f = float(fraction)
    if not np.isfinite(f):
        return float("nan")
    if f <= SAT_CLEAN_MAX:
        return 0.0
    return float(min(1.0, np.log(f / SAT_CLEAN_MAX) / np.log(SAT_FULL / SAT_CLEAN_MAX)))


def saturation_columns(slices: np.ndarray) -> dict:
    """``{"saturation": fraction, "severity_clipping": severity}`` of a slice stack."""
    f = saturation_fraction(slices)
    return {"saturation": f, "severity_clipping": clipping_severity(f)}


def combined_score(learned: float, severity_clipping: float) -> float:
    """The reported score: max(learned score, ``SCORE_SCALE`` × severity_clipping); a NaN severity leaves the
    learned score."""
    s = float(severity_clipping)
    if not np.isfinite(s):
        return float(learned)
    return float(max(float(learned), SCORE_SCALE * s))
