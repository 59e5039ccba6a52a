"""MRIQC-defined image-quality metrics (IQMs) for anatomical MR volumes, without FSL/AFNI/BIDS.

Size: one module of ~750 lines on purpose. It mirrors MRIQC's ``qc/anatomical.py`` and the masking steps
before it, so that every definition can be compared with MRIQC's side by side (``benchmarks/iqm_vs_mriqc``);
its three parts are marked below: formulas, masks and segmentation, whole-volume IQMs.

The formulas follow the published MRIQC definitions (Esteban O. et al., "MRIQC: Advancing the
automatic prediction of image quality in MRI from unseen sites", PLoS ONE 12(9):e0184661, 2017, and
the MRIQC documentation of ``mriqc.qc.anatomical``). Every formula here is our own code and is
tested on hand-computed inputs (``tests/test_iqm.py``) and once against MRIQC's own functions on
identical inputs (``benchmarks/iqm_vs_mriqc/``).

Pipeline of :func:`compute_iqms`:

1. load (guarded, :func:`artifactqc.io.load_volume`) and reorient to RAS+ (no resampling);
2. **head mask** (:func:`head_mask`): threshold at a fraction of the robust maximum, closing, hole
   filling, largest connected component;
3. **N4** bias-field correction (antspyx) inside the head mask; the bias field gives INU;
4. **brain mask** (:func:`brain_mask`): a crude, template-free skull strip (bright-enough voxels,
   erosion to cut the bridges through the skull, largest component, dilation back, hole filling);
5. **three-class tissue model** (:func:`segment_tissues`): a 1-D Gaussian mixture (k-means
   initialised, scikit-learn) on N4-corrected intensities inside the brain mask, whose components
   are assigned to CSF/GM/WM by the contrast's intensity order:

   ========  ====================  ===========================================================
   contrast  order (dark → bright)  why
   ========  ====================  ===========================================================
   T1w       CSF < GM < WM          T1 weighting
   T2w       WM < GM < CSF          T2 weighting
   PD        WM < GM < CSF          proton density: CSF has the highest water content
   FLAIR     CSF < WM < GM          T2 weighting with the CSF signal nulled: CSF is darkest,
                                    GM stays brighter than WM (MRIQC has no FLAIR mapping)
   ========  ====================  ===========================================================

   The posteriors are the partial-volume maps (``pvms``) used for ``icvs_*``/``rpve_*`` and as the
   weights of the tissue summary statistics, as MRIQC does with FSL FAST's PVE maps;
6. **harmonisation**: the N4-corrected image is scaled so that the WM median is 1000, as MRIQC's
   ``Harmonize`` step does, so that scale-dependent values (summary statistics, the ``mad_air > 1``
   branch of SNRd) are comparable to MRIQC tables;
7. **air mask** (:func:`air_mask`) and **artifact mask** (:func:`artifact_mask`), then the IQMs.

Where our numbers can differ from MRIQC's, and why
--------------------------------------------------
* **No spatial normalisation, no template priors.** MRIQC registers to MNI space to build the
  "hat" air mask (air above the nasion-cerebellum plane) and the TPM overlaps. We work in native
  space: the air mask is everything at least ``air_margin_mm`` outside the head mask and at or
  above the lowest axial slice of the brain mask (RAS+ orientation, so the neck/shoulder region,
  where MRIQC's hat also ends, is excluded). ``tpm_overlap_*`` and FWHM (AFNI) are not computed.
* **Own head mask** (intensity threshold + morphology) instead of MRIQC's FSL-BET/`afni` based one;
  FBER and EFC are only as good as this mask. EFC uses no rotation/frame mask (``framemask`` is
  all zeros) unless the volume has zero-padded frame voxels, which we exclude like MRIQC's
  ``rotmask``.
* **Own brain mask and segmentation.** MRIQC uses SynthStrip and FSL FAST (with a Markov random
  field and bias modelling); we use a morphological skull strip and a 1-D Gaussian mixture. On
  thick-slice or low-contrast scans the classes can differ, which moves CJV, CNR, SNR per tissue,
  WM2MAX and the summary statistics. The rPVE is computed from the mixture posteriors, which are
  sharper than FAST's partial-volume estimates.
* **Artifact mask for QI1**: same recipe as MRIQC (air voxels with a robust z-score > 10, more than
  10 mm from the head, cleaned by a morphological opening), but on our air mask.
* **QI2** (χ fit of the air distribution) is not computed.
* MRIQC rounds the image to integers and the probability maps to 3 decimals before the weighted
  statistics; we do not (differences well below 1 unit on the harmonised scale).
* **N4 settings** (antspyx defaults, shrink factor 4) differ from MRIQC's, so INU median/range
  differ somewhat.

All functions take plain numpy arrays; only :func:`compute_iqms` and :func:`iqm_table` touch files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import kurtosis

log = logging.getLogger(__name__)

TISSUES = ("csf", "gm", "wm")

#: Dark → bright order of the three tissue classes per contrast (see module docstring).
TISSUE_ORDER = {
    "T1w": ("csf", "gm", "wm"),
    "T2w": ("wm", "gm", "csf"),
    "PD": ("wm", "gm", "csf"),
    "PDw": ("wm", "gm", "csf"),
    "FLAIR": ("csf", "wm", "gm"),
}

#: Rician-to-Gaussian correction used by Dietrich et al. (2007) for SNR from the air MAD:
#: sqrt(2 / (4 - pi)) ≈ 1.526; MRIQC multiplies by its inverse.
DIETRICH_FACTOR = 1.0 / math.sqrt(2.0 / (4.0 - math.pi))

#: Normal-consistency constant of the median absolute deviation.
MAD_NORMAL = 1.4826



#: Column descriptions of IQM tables (Parquet field metadata); IQMs follow MRIQC's names and definitions.
COLUMN_DOCS = {
    "volume_id": "volume identifier from the cohort sheet",
    "path": "input file",
    "contrast": "contrast used for the tissue order of the segmentation",
    "status": "ok, or failed (see error_type / error)",
    "error_type": "kind of failure (empty when ok)",
    "error": "failure message (empty when ok)",
    "seconds": "wall seconds for this volume's IQMs",
    "cjv": "coefficient of joint variation of WM and GM (lower = better)",
    "cnr": "contrast-to-noise ratio of WM vs GM (higher = better)",
    "efc": "entropy focus criterion (lower = sharper, less ghosting/blur)",
    "fber": "foreground-background energy ratio (higher = better)",
    "wm2max": "WM median / 99.95th percentile of the image",
    "qi_1": "fraction of artifactual air voxels (Mortamet QI1; lower = better)",
    "inu_med": "median of the N4 bias field in the brain (NaN without N4)",
    "inu_range": "95th - 5th percentile of the N4 bias field in the brain (NaN without N4)",
    "snr_total": "SNR, mean over CSF, GM, WM (higher = better)",
    "snrd_total": "Dietrich SNR (noise from the air), mean over tissues (higher = better)",
}


def _canonical_contrast(contrast: str) -> str:
    c = str(contrast).strip()
    for key in TISSUE_ORDER:
        if c.lower() == key.lower():
            return key
    aliases = {"t1": "T1w", "t2": "T2w", "pd": "PD", "pdw": "PD", "flair": "FLAIR", "t2flair": "FLAIR"}
    if c.lower() in aliases:
        return aliases[c.lower()]
    raise ValueError(f"unsupported contrast {contrast!r}: expected one of {sorted(TISSUE_ORDER)}")


# ---------------------------------------------------------------------------------------------
# Formulas (MRIQC definitions). Each takes summary numbers or arrays and returns a float.
# ---------------------------------------------------------------------------------------------


def snr(mu_fg: float, sigma_fg: float, n: float) -> float:
    r"""Tissue SNR (MRIQC ``snr``): :math:`\mu_F / (\sigma_F \sqrt{n/(n-1)})`.

    ``mu_fg`` is the tissue median, ``sigma_fg`` its standard deviation and ``n`` the number of
    voxels (the sum of the tissue's partial-volume map); the :math:`\sqrt{n/(n-1)}` term turns the
    population standard deviation into the sample one. Higher is better.
    """
    if n <= 1 or sigma_fg <= 0:
        return float("nan")
    return float(mu_fg / (sigma_fg * math.sqrt(n / (n - 1.0))))


def snr_dietrich(mu_fg: float, mad_air: float = 0.0, sigma_air: float = 1.0) -> float:
    r"""SNR with the noise taken from the air (Dietrich et al., JMRI 26:375, 2007; MRIQC ``snrd``).

    :math:`\mathrm{SNR_d} = \mu_F / (\sqrt{2/(4-\pi)}\,\sigma_\text{air})`, where the air noise is the
    air MAD when it exceeds 1 (harmonised units, WM median = 1000) and the air standard deviation
    otherwise. Returns -1 when neither is usable (σ_air ≤ 1e-3), as MRIQC does, instead of failing.
    """
    if mad_air > 1.0:
        return float(DIETRICH_FACTOR * mu_fg / mad_air)
    if sigma_air > 1e-3:
        return float(DIETRICH_FACTOR * mu_fg / sigma_air)
    return -1.0


def cnr(mu_wm: float, mu_gm: float, sigma_air: float, sigma_wm: float, sigma_gm: float) -> float:
    r"""Contrast-to-noise ratio (Magnotta & Friedman 2006; MRIQC ``cnr``).

    :math:`|\mu_\text{WM} - \mu_\text{GM}| / \sqrt{\sigma_\text{air}^2 + \sigma_\text{WM}^2 +
    \sigma_\text{GM}^2}`. Higher is better.
    """
    return float(abs(mu_wm - mu_gm) / math.sqrt(sigma_air**2 + sigma_wm**2 + sigma_gm**2))


def cjv(mu_wm: float, mu_gm: float, sigma_wm: float, sigma_gm: float) -> float:
    r"""Coefficient of joint variation of GM and WM (Ganzetti et al. 2016; MRIQC ``cjv``).

    :math:`(\sigma_\text{WM} + \sigma_\text{GM}) / |\mu_\text{WM} - \mu_\text{GM}|`; MRIQC passes
    the medians as μ and the MADs as σ. Lower is better (noise, INU and motion raise it).
    """
    return float((sigma_wm + sigma_gm) / abs(mu_wm - mu_gm))


def efc(img: np.ndarray, framemask: np.ndarray | None = None) -> float:
    r"""Entropy focus criterion (Atkinson et al. 1997; MRIQC ``efc``), normalised to [0, 1].

    With :math:`B_\max = \sqrt{\sum_j x_j^2}` over the ``N`` voxels not in ``framemask``,
    :math:`E = \sum_j (x_j/B_\max)\ln((x_j + 10^{-16})/B_\max)`, divided by its value for a constant
    image, :math:`E_\max = N \cdot N^{-1/2} \ln N^{-1/2}`. Lower means sharper (ghosting and blurring
    raise it). Negative intensities are clipped to 0 (the log needs non-negative input).
    """
    x = np.asarray(img, dtype=np.float64)
    if framemask is not None:
        x = x[np.asarray(framemask) == 0]
    else:
        x = x.ravel()
    x = np.clip(x, 0.0, None)
    n_vox = x.size
    efc_max = n_vox * (1.0 / math.sqrt(n_vox)) * math.log(1.0 / math.sqrt(n_vox))
    b_max = math.sqrt(float((x**2).sum()))
    return float((1.0 / efc_max) * np.sum((x / b_max) * np.log((x + 1e-16) / b_max)))


def fber(img: np.ndarray, headmask: np.ndarray, rotmask: np.ndarray | None = None) -> float:
    r"""Foreground-background energy ratio (Shehzad et al. 2015; MRIQC ``fber``).

    :math:`\mathrm{median}(|x|^2 \text{ in head}) / \mathrm{median}(|x|^2 \text{ outside head})`,
    frame voxels in ``rotmask`` excluded from the background. Returns -1 when the background median
    energy is below 1e-3 (e.g. zero-filled air), as MRIQC does. Higher is better.
    """
    x = np.asarray(img, dtype=np.float64)
    head = np.asarray(headmask) > 0
    air = ~head
    if rotmask is not None:
        air &= ~(np.asarray(rotmask) > 0)
    fg_mu = float(np.median(np.abs(x[head]) ** 2))
    if not air.any():
        return -1.0
    bg_mu = float(np.median(np.abs(x[air]) ** 2))
    if bg_mu < 1.0e-3:
        return -1.0
    return float(fg_mu / bg_mu)


def wm2max(img: np.ndarray, mu_wm: float) -> float:
    r"""White-matter-to-maximum ratio (MRIQC ``wm2max``): :math:`\mu_\text{WM} / P_{99.95}(x)`.

    Values far below ~0.6 or near 1 suggest a long tail of bright voxels (e.g. vessels, fat) or a
    compressed dynamic range.
    """
    return float(mu_wm / np.percentile(np.asarray(img).reshape(-1), 99.95))


def art_qi1(airmask: np.ndarray, artmask: np.ndarray) -> float:
    r"""Mortamet et al. (2009) QI1 (MRIQC ``art_qi1``): artifact voxels / (air + artifact voxels).

    ``airmask`` is the artifact-free air, ``artmask`` the artifact voxels found in the air (see
    :func:`artifact_mask`). Returns -1 when the air mask is empty (e.g. skull-stripped or
    zero-filled background), as MRIQC does. Lower is better.
    """
    a = float(np.count_nonzero(airmask))
    b = float(np.count_nonzero(artmask))
    if a < 1:
        return -1.0
    return b / (a + b)


def volume_fraction(pvms: Sequence[np.ndarray]) -> dict[str, float]:
    r"""Intracranial volume fractions (MRIQC ``volume_fraction``, ``icvs_*``).

    ``pvms`` is a list ``[csf, gm, wm]`` of partial-volume maps; returns
    :math:`\mathrm{ICV}_k = \sum_i p^k_i / \sum_{k'} \sum_i p^{k'}_i`.
    """
    sums = {k: float(np.sum(p)) for k, p in zip(TISSUES, pvms)}
    total = sum(sums.values())
    return {k: v / total for k, v in sums.items()}


def rpve(pvms: Sequence[np.ndarray], seg: np.ndarray | None = None) -> dict[str, float]:
    r"""Residual partial-volume error per tissue (MRIQC ``rpve``, as implemented in MRIQC 24.0).

    ``pvms`` is ``[csf, gm, wm]`` (``seg`` is accepted for signature compatibility and unused, as in
    MRIQC). For each map: clip to [0, 1]; ``N`` = number of voxels with p > 0; zero the values below
    the 2nd and above the 98th percentile of the positive values; then
    :math:`\mathrm{rPVE} = [\sum_{p > 0.5} p + \sum_{p \le 0.5} (1 - p)] / N`.
    Note (reproduced for comparability): the second sum runs over *every* voxel with p ≤ 0.5,
    including the zeros outside the tissue, so the value grows with the field of view; compare
    rPVE only between volumes of similar matrix size. Lower is better.
    """
    out: dict[str, float] = {}
    for k, pvm in zip(TISSUES, pvms):
        p = np.clip(np.asarray(pvm, dtype=np.float64), 0.0, 1.0)
        pos = p[p > 0]
        if pos.size == 0:
            out[k] = float("nan")
            continue
        total = float(pos.size)
        upth = np.percentile(pos, 98)
        loth = np.percentile(pos, 2)
        p = np.where((p < loth) | (p > upth), 0.0, p)
        out[k] = float((p[p > 0.5].sum() + (1.0 - p[p <= 0.5]).sum()) / total)
    return out


def _weighted_quantiles(x: np.ndarray, w: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Weighted quantiles, SAS definition (as statsmodels' ``DescrStatsW.quantile`` used by MRIQC).

    Tied values are merged (weights summed); the q-quantile is the first value whose cumulative
    weight reaches q·W, and the midpoint with the next value when the cumulative weight hits q·W
    exactly.
    """
    values, inv = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True)
    weights = np.bincount(inv.ravel(), weights=np.asarray(w, dtype=np.float64).ravel(), minlength=values.size)
    cw = np.cumsum(weights)
    targets = np.asarray(qs, dtype=np.float64) * cw[-1]
    ii = np.minimum(np.searchsorted(cw, targets), values.size - 1)
    out = values[ii].copy()
    exact = (np.abs(targets - cw[ii]) < 1e-10) & (ii < values.size - 1)
    out[exact] = 0.5 * (values[ii[exact]] + values[ii[exact] + 1])
    return out


def tissue_stats(img: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    r"""Summary statistics of one tissue (MRIQC ``summary_stats``), weighted by its probability map.

    ``mean``, ``stdv`` (population), ``median``, ``p05``, ``p95`` are weighted by ``weights``
    (a partial-volume map in [0, 1], or a binary mask); ``k`` (Fisher excess kurtosis) and ``mad``
    (median absolute deviation about the weighted median, × 1.4826) use the voxels whose weight
    exceeds half the maximum weight; ``n`` is the sum of the weights.
    """
    x = np.asarray(img, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    if not (w > 0).any():
        return {k: float("nan") for k in ("mean", "stdv", "median", "p05", "p95", "k", "mad", "n")}
    wsum = w.sum()
    mean = float((w * x).sum() / wsum)
    stdv = float(math.sqrt(max((w * (x - mean) ** 2).sum() / wsum, 0.0)))
    # Quantiles over all voxels (zero-weight ones included, as DescrStatsW does).
    p05, median, p95 = _weighted_quantiles(x, w, (0.05, 0.5, 0.95))
    thr = x[w > 0.5 * w.max()]
    return {
        "mean": mean,
        "stdv": stdv,
        "median": float(median),
        "p05": float(p05),
        "p95": float(p95),
        "k": float(kurtosis(thr)) if thr.size > 3 else float("nan"),
        "mad": float(MAD_NORMAL * np.median(np.abs(thr - median))),
        "n": float(wsum),
    }


def summary_stats(img: np.ndarray, pvms: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """:func:`tissue_stats` for every entry of ``pvms`` (e.g. ``{"bg": air, "csf": ..., ...}``)."""
    return {k: tissue_stats(img, p) for k, p in pvms.items()}


# ---------------------------------------------------------------------------------------------
# Masks and segmentation
# ---------------------------------------------------------------------------------------------


def _ball_sampling(radius_mm: float, zooms: Sequence[float]) -> tuple[float, ...]:
    """Distance-transform sampling for which the ball of ``radius_mm`` is the unit ball: per axis the radius
    is rounded to whole voxels (an ellipsoid on anisotropic grids; an axis with radius 0 is not touched)."""
    r = [int(round(float(radius_mm) / float(z))) for z in zooms]
    return tuple(1.0 / v if v > 0 else 1e9 for v in r)


def _dilate_mm(mask: np.ndarray, radius_mm: float, zooms: Sequence[float]) -> np.ndarray:
    """Binary dilation by a ball of ``radius_mm`` (rounded to voxels per axis), computed with the Euclidean
    distance transform: O(N) instead of O(N × ball size) for a structuring element."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask, sampling=_ball_sampling(radius_mm, zooms)) <= 1.0


def _erode_mm(mask: np.ndarray, radius_mm: float, zooms: Sequence[float]) -> np.ndarray:
    """Binary erosion by the same ball; outside the array counts as background, as in
    :func:`scipy.ndimage.binary_erosion`."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    d = ndi.distance_transform_edt(padded, sampling=_ball_sampling(radius_mm, zooms))
    return d[1:-1, 1:-1, 1:-1] > 1.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """3D hole filling, then 2D filling of every axial slice (closes holes open at one end)."""
    out = ndi.binary_fill_holes(mask)
    filled = [ndi.binary_fill_holes(out[:, :, k]) if out[:, :, k].any() else out[:, :, k] for k in range(out.shape[2])]
    return np.stack(filled, axis=2)


def head_mask(data: np.ndarray, zooms: Sequence[float] = (1.0, 1.0, 1.0), frac: float = 0.05) -> np.ndarray:
    """Head (signal) mask: voxels above ``frac`` × the 98th percentile of the positive intensities.

    A closing (~4 mm) bridges gaps in the scalp, holes are filled in 3D and slice by slice, and the
    largest connected component is kept. Contrast-agnostic; works for skull-stripped input too.
    """
    data = np.asarray(data, dtype=np.float32)
    pos = data[data > 0]
    if pos.size == 0:
        return np.zeros(data.shape, dtype=bool)
    thr = frac * float(np.percentile(pos, 98))
    m = data > thr
    m = _largest_component(m)
    m = _erode_mm(_dilate_mm(m, 4.0, zooms), 4.0, zooms)  # closing
    m = _fill_holes(m)
    return _largest_component(m)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (between-class variance maximised over a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between))])


def brain_mask(
    data: np.ndarray, head: np.ndarray, zooms: Sequence[float] = (1.0, 1.0, 1.0), erode_mm: float = 7.0
) -> np.ndarray:
    """Crude template-free skull strip on a bias-corrected image.

    Bone is dark in T1w, T2w, PD and FLAIR. Keep head voxels brighter than a low threshold (the smaller of 0.35 ×
    the head's median intensity and Otsu's threshold), erode by
    ``erode_mm`` to cut the thin bridges through the skull to the scalp, keep the largest component,
    dilate back by the same radius (within the head), and fill holes (ventricles, dark CSF).
    Falls back to the head mask when this leaves too little (e.g. already skull-stripped data).
    """
    data = np.asarray(data, dtype=np.float32)
    head = np.asarray(head, dtype=bool)
    vals = data[head]
    if vals.size == 0:
        return head.copy()
    thr = min(0.35 * float(np.median(vals)), _otsu(vals))
    cand = head & (data > thr)
    core = _erode_mm(cand, erode_mm, zooms)
    if core.sum() < 0.01 * head.sum():
        return head.copy()
    core = _largest_component(core)
    m = _dilate_mm(core, erode_mm, zooms) & cand
    m = _fill_holes(m) & head
    if m.sum() < 0.1 * head.sum():
        return head.copy()
    return m


def air_mask(
    head: np.ndarray,
    brain: np.ndarray | None = None,
    zooms: Sequence[float] = (1.0, 1.0, 1.0),
    margin_mm: float = 2.0,
    frame: np.ndarray | None = None,
) -> np.ndarray:
    """Air: outside the head mask dilated by ``margin_mm``, not in ``frame`` (zero-padded border).

    MRIQC uses a template-derived "hat" that excludes the air below the nasion-cerebellum plane.
    Instead (volume must be in RAS+ orientation) we drop every axial slice below the lowest slice
    of ``brain`` (or of the head, if no brain mask is given): the neck/shoulder region, where
    breathing and swallowing artifacts land, is excluded the same way.
    """
    head = np.asarray(head, dtype=bool)
    m = ~_dilate_mm(head, margin_mm, zooms)
    ref = head if brain is None else np.asarray(brain, dtype=bool)
    zs = np.nonzero(ref.any(axis=(0, 1)))[0]
    if zs.size:
        m[:, :, : int(zs[0])] = False
    if frame is not None:
        m &= ~np.asarray(frame, dtype=bool)
    return m


def frame_mask(data: np.ndarray) -> np.ndarray:
    """Exactly-zero voxels connected to the volume border (padding after rotation/reslicing).

    Plays the role of MRIQC's ``rotmask``. Empty when the background holds real noise.
    """
    zero = np.asarray(data) == 0
    if not zero.any():
        return zero
    lab, _ = ndi.label(zero)
    border = np.unique(
        np.concatenate(
            [lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]
        )
    )
    border = border[border > 0]
    return np.isin(lab, border)


def artifact_mask(
    data: np.ndarray,
    air: np.ndarray,
    head: np.ndarray,
    zooms: Sequence[float] = (1.0, 1.0, 1.0),
    zscore: float = 10.0,
    min_dist_mm: float = 10.0,
) -> np.ndarray:
    """Artifact voxels in the air (Mortamet et al. 2009, as in MRIQC's ``artifact_mask``).

    Standardise the positive air intensities robustly (median, MAD × 1.4826), mark those with
    z > ``zscore`` that lie more than ``min_dist_mm`` from the head, and clean with a 3D opening
    (6-connected structuring element). Empty when there are fewer than 100 positive air voxels.
    """
    data = np.asarray(data, dtype=np.float64)
    air = np.asarray(air, dtype=bool)
    vals = data[air & (data > 0)]
    if vals.size < 100:
        return np.zeros(data.shape, dtype=bool)
    loc = float(np.median(vals))
    spread = float(MAD_NORMAL * np.median(np.abs(vals - loc)))
    if spread <= 0:
        spread = float(vals.std()) or 1.0
    z = np.zeros(data.shape, dtype=np.float64)
    sel = air & (data > 0)
    z[sel] = (data[sel] - loc) / spread
    art = z > zscore
    dist = ndi.distance_transform_edt(~np.asarray(head, dtype=bool), sampling=zooms)
    art &= dist >= min_dist_mm
    return ndi.binary_opening(art, structure=ndi.generate_binary_structure(3, 1))


def segment_tissues(
    data: np.ndarray,
    brain: np.ndarray,
    contrast: str,
    max_fit_voxels: int = 50_000,
    seed: int = 0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Three-class tissue segmentation inside ``brain``: 1-D Gaussian mixture, k-means initialised.

    Components are sorted by mean intensity and named by :data:`TISSUE_ORDER` for ``contrast``.
    Returns ``(seg, [pv_csf, pv_gm, pv_wm])`` with ``seg`` in {0 = outside, 1 = CSF, 2 = GM, 3 = WM}
    and the posteriors (zero outside the brain) as partial-volume maps.
    """
    from sklearn.mixture import GaussianMixture

    order = TISSUE_ORDER[_canonical_contrast(contrast)]
    brain = np.asarray(brain, dtype=bool)
    x = np.asarray(data, dtype=np.float64)[brain]
    if x.size < 30:
        raise ValueError(f"brain mask has only {x.size} voxels: cannot segment")
    rng = np.random.default_rng(seed)
    fit = x if x.size <= max_fit_voxels else rng.choice(x, size=max_fit_voxels, replace=False)
    scale = float(np.std(fit)) or 1.0
    gmm = GaussianMixture(n_components=3, init_params="kmeans", random_state=seed, max_iter=100, tol=1e-4)
    gmm.fit((fit / scale)[:, None])
    post = gmm.predict_proba((x / scale)[:, None])
    rank = np.argsort(gmm.means_.ravel())  # dark → bright component indices
    pvms = []
    for tissue in TISSUES:
        comp = rank[order.index(tissue)]
        pv = np.zeros(brain.shape, dtype=np.float32)
        pv[brain] = post[:, comp]
        pvms.append(pv)
    stack = np.stack(pvms)
    seg = np.zeros(brain.shape, dtype=np.uint8)
    seg[brain] = (np.argmax(stack[:, brain], axis=0) + 1).astype(np.uint8)
    return seg, pvms


def n4(data: np.ndarray, mask: np.ndarray, zooms: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction (antspyx) inside ``mask``; returns ``(corrected, bias_field)``.

    The bias field is normalised to a median of 1 inside the mask, so INU median ≈ 1 for a flat
    field (MRIQC reports the field as written by N4, which is also close to 1).
    """
    import ants

    data = np.asarray(data, dtype=np.float32)
    img = ants.from_numpy(np.clip(data, 0, None), spacing=tuple(float(z) for z in zooms))
    msk = ants.from_numpy(np.asarray(mask, dtype=np.float32), spacing=tuple(float(z) for z in zooms))
    # Shrink so that N4 works on ~8 mm voxels: the field is smooth, and full resolution costs minutes.
    shrink = int(np.clip(round(8.0 / float(np.mean(zooms))), 2, 6))
    bias = ants.n4_bias_field_correction(
        img, mask=msk, shrink_factor=shrink, convergence={"iters": [30, 20, 10], "tol": 1e-6}, return_bias_field=True
    ).numpy().astype(np.float32)
    bias = np.where(bias > 1e-6, bias, 1e-6)
    med = float(np.median(bias[np.asarray(mask, dtype=bool)]))
    bias = bias / med
    corrected = np.clip(data, 0, None) / bias
    return corrected.astype(np.float32), bias


# ---------------------------------------------------------------------------------------------
# Whole-volume IQMs
# ---------------------------------------------------------------------------------------------

#: Columns of the IQM table (besides the identifiers), in MRIQC's naming.
IQM_COLUMNS = (
    ["cjv", "cnr", "efc", "fber", "wm2max", "qi_1", "inu_med", "inu_range"]
    + [f"snr_{t}" for t in (*TISSUES, "total")]
    + [f"snrd_{t}" for t in (*TISSUES, "total")]
    + [f"icvs_{t}" for t in TISSUES]
    + [f"rpve_{t}" for t in TISSUES]
    + [f"summary_{t}_{s}" for t in ("bg", *TISSUES) for s in ("mean", "stdv", "median", "mad", "p05", "p95", "k", "n")]
)


def iqms_from_maps(
    data: np.ndarray,
    head: np.ndarray,
    air: np.ndarray,
    art: np.ndarray,
    seg: np.ndarray,
    pvms: Sequence[np.ndarray],
    bias: np.ndarray | None = None,
    frame: np.ndarray | None = None,
) -> dict[str, float]:
    """All IQMs from an (N4-corrected, harmonised) image and precomputed masks/maps.

    Mirrors how MRIQC's ``StructuralQC`` combines the formulas: tissue statistics weighted by the
    partial-volume maps, the air mask as the ``bg`` class; CJV from medians and MADs; CNR from
    medians and standard deviations; SNR from medians, standard deviations and ``n``; SNRd from
    medians and the air MAD/SD; WM2MAX from the WM median; EFC and FBER on the whole image with the
    frame mask excluded; INU from the bias field inside the tissue segmentation.
    """
    stats = summary_stats(data, {"bg": np.asarray(air, dtype=np.float32), "csf": pvms[0], "gm": pvms[1], "wm": pvms[2]})
    wm, gm, bg = stats["wm"], stats["gm"], stats["bg"]
    out: dict[str, float] = {
        "cjv": cjv(wm["median"], gm["median"], wm["mad"], gm["mad"]),
        "cnr": cnr(wm["median"], gm["median"], bg["stdv"], wm["stdv"], gm["stdv"]),
        "efc": efc(data, frame),
        "fber": fber(data, head, frame),
        "wm2max": wm2max(data, wm["median"]),
        "qi_1": art_qi1(air, art),
    }
    snrs = {t: snr(stats[t]["median"], stats[t]["stdv"], stats[t]["n"]) for t in TISSUES}
    snrs["total"] = float(np.mean([snrs[t] for t in TISSUES]))
    snrds = {t: snr_dietrich(stats[t]["median"], mad_air=bg["mad"], sigma_air=bg["stdv"]) for t in TISSUES}
    snrds["total"] = float(np.mean([snrds[t] for t in TISSUES]))
    out.update({f"snr_{k}": v for k, v in snrs.items()})
    out.update({f"snrd_{k}": v for k, v in snrds.items()})
    if bias is not None:
        b = np.asarray(bias)[np.asarray(seg) > 0]
        out["inu_med"] = float(np.median(b))
        out["inu_range"] = float(abs(np.percentile(b, 95) - np.percentile(b, 5)))
    else:
        out["inu_med"] = out["inu_range"] = float("nan")
    out.update({f"icvs_{k}": v for k, v in volume_fraction(pvms).items()})
    out.update({f"rpve_{k}": v for k, v in rpve(pvms).items()})
    for t, s in stats.items():
        for name, v in s.items():
            out[f"summary_{t}_{name}"] = v
    return out


def compute_iqms(
    path_or_volume,
    contrast: str,
    *,
    affine: np.ndarray | None = None,
    zooms: Sequence[float] | None = None,
    use_n4: bool = True,
    seed: int = 0,
    return_maps: bool = False,
):
    """IQMs of one volume: a path, an :class:`artifactqc.io.Volume`, or a 3D array (+ ``zooms``).

    Returns a dict of the :data:`IQM_COLUMNS` (``return_maps=True``: ``(iqms, maps)`` with the
    masks, segmentation, bias field and harmonised image, for figures and the MRIQC benchmark).
    Raises :class:`artifactqc.io.VolumeError` for unreadable files and ``ValueError`` for an
    unsupported contrast or an empty mask; :func:`iqm_table` turns these into failed rows.
    """
    from .. import io as aio

    if isinstance(path_or_volume, (str, os.PathLike)):
        vol = aio.load_volume(path_or_volume)
        data, aff = aio.to_canonical(vol.data, vol.affine)
        zz = aio.voxel_sizes(aff)
    elif isinstance(path_or_volume, aio.Volume):
        data, aff = aio.to_canonical(path_or_volume.data, path_or_volume.affine)
        zz = aio.voxel_sizes(aff)
    else:
        data = np.asarray(path_or_volume, dtype=np.float32)
        if affine is not None:
            data, aff = aio.to_canonical(data, np.asarray(affine, dtype=np.float64))
            zz = aio.voxel_sizes(aff)
        else:
            zz = np.asarray(zooms if zooms is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    contrast = _canonical_contrast(contrast)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    zz = tuple(float(z) for z in zz)

    frame = frame_mask(data)
    head = head_mask(data, zz)
    if head.sum() < 100:
        raise ValueError("head mask is (nearly) empty: no signal above the background")
    if use_n4:
        corrected, bias = n4(data, head, zz)
    else:
        corrected, bias = np.clip(data, 0, None).astype(np.float32), None
    brain = brain_mask(corrected, head, zz)
    seg, pvms = segment_tissues(corrected, brain, contrast, seed=seed)
    wm_core = pvms[2] > 0.9
    if wm_core.sum() < 10:
        wm_core = seg == 3
    wm_med = float(np.median(corrected[wm_core])) if wm_core.any() else float(np.median(corrected[brain]))
    harmonised = corrected * (1000.0 / wm_med) if wm_med > 0 else corrected
    # Raw intensities outside the head (air) are scaled by the same global factor, without the
    # bias field: N4 only models the field inside the head.
    outside = ~head
    harmonised = np.where(outside, np.clip(data, 0, None) * (1000.0 / wm_med if wm_med > 0 else 1.0), harmonised)
    harmonised = harmonised.astype(np.float32)
    air = air_mask(head, brain, zz, frame=frame)
    art = artifact_mask(harmonised, air, head, zz)
    air_clean = air & ~art
    iqms = iqms_from_maps(harmonised, head, air_clean, art, seg, pvms, bias=bias, frame=frame if frame.any() else None)
    if return_maps:
        maps = dict(
            data=harmonised, head=head, brain=brain, air=air_clean, artifact=art, seg=seg, pvms=pvms,
            bias=bias, frame=frame, zooms=zz,
        )
        return iqms, maps
    return iqms


def iqm_table(
    paths: Iterable,
    contrasts: Iterable[str] | str,
    ids: Iterable[str] | None = None,
    use_n4: bool = True,
):
    """IQMs of many volumes as a DataFrame; a bad file gives a ``status='failed'`` row, never a crash.

    Columns: ``volume_id, path, contrast, status, error_type, error, seconds`` then
    :data:`IQM_COLUMNS`. ``contrasts`` may be one string for all volumes. ``ids`` defaults to the
    paths.
    """
    import pandas as pd

    from ..io import VolumeError
    from ..progress import track

    paths = [str(p) for p in paths]
    if isinstance(contrasts, str):
        contrasts = [contrasts] * len(paths)
    contrasts = list(contrasts)
    ids = list(ids) if ids is not None else list(paths)
    if not (len(paths) == len(contrasts) == len(ids)):
        raise ValueError("paths, contrasts and ids must have the same length")
    rows = []
    for vid, p, c in track(list(zip(ids, paths, contrasts)), desc="iqm", unit="volume"):
        row: dict = {"volume_id": vid, "path": p, "contrast": c, "status": "ok", "error_type": "", "error": ""}
        t0 = time.perf_counter()
        try:
            row.update(compute_iqms(p, c, use_n4=use_n4))
        except VolumeError as exc:
            row.update(status="failed", error_type=exc.error_type, error=exc.message)
        except Exception as exc:  # noqa: BLE001 - a table of many volumes must not stop on one
            log.warning("IQMs failed for %s: %s", p, exc)
            row.update(status="failed", error_type=type(exc).__name__, error=str(exc))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in IQM_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    return df[["volume_id", "path", "contrast", "status", "error_type", "error", "seconds", *IQM_COLUMNS]]
