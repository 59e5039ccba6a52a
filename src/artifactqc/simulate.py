"""Artifact simulation with calibrated severities: noise, ghosting, bias field, anisotropy, motion, mixtures.

Two paths share one severity scale:

* :func:`simulate_volume` corrupts a 3D volume (numpy, intensities normalised to about [0, 1] with
  :func:`artifactqc.io.normalize_intensity`) and returns every applied parameter. Ghosting, bias field and
  motion use TorchIO's *deterministic* transforms (``tio.Ghosting``, ``tio.BiasField``, ``tio.Motion``)
  with explicitly drawn parameters; noise (Rician / coloured k-space noise) and anisotropy are implemented
  here because TorchIO has no Rician noise and its ``RandomAnisotropy`` has no slice profile or
  anti-aliasing. Anisotropy (:func:`thick_slices_lastdim`) acquires contiguous thick slices along one axis:
  slice thickness = slice spacing = ``thickness_factor`` voxels (fractional), slice centres anchored on a
  random voxel, each slice integrating the linearly interpolated image against a Gaussian slice profile,
  then linear interpolation back to the grid. The result is continuous in the thickness (no steps at
  integer factors) and a factor of 1 is the identity.
* :func:`simulate_slices` is the batched 2D path used for training (torch, CPU, thousands of slices/s).

Severity
--------
Every artifact type has one *physical* parameter (:data:`PARAM_NAMES`) driven by the severity ``s`` in
[0, 1] through a monotone piecewise-linear map (:data:`CALIBRATION_3D`, :data:`CALIBRATION_2D`, knots at
:data:`SEVERITY_KNOTS`). The maps were fitted by ``benchmarks/simulate/run.py calibrate`` on real volumes
so that, for every type, the mean SSIM to the clean image inside the head/brain mask follows the common
target curve :func:`target_ssim` ``= 1 - TARGET_SSIM_DROP * s``: the same severity means about the same
loss of fidelity whatever the artifact. Severity 0 is the exact identity. Other random draws (axis, number
of ghosts, field shape, motion timing and direction, noise variant) do not change the severity; they are
normalised away where possible (e.g. the bias field is scaled to a given std of its log inside the mask,
motion to a given RMS displacement). What is not normalised away makes one sample's SSIM scatter about the
target (on the encoder benchmark's 7 held-out volumes, r(SS, 1 - SSIM) = 0.85 over all rows); with
``simulate_volume(match_ssim=True)`` the parameter is searched per sample (:func:`apply_matched`) so that the
sample's own masked SSIM is ``target_ssim(s)`` within 5 % of the loss (r 0.999), at 2-3 simulations per sample.

Mixtures
--------
``artifact="mix"`` applies 2-3 distinct types in acquisition order (:data:`APPLY_ORDER`: bias, motion,
ghosting, anisotropy, noise). The combined severity assumes that SSIM losses compose multiplicatively:
``1 - D*S = prod_i (1 - D*s_i)`` with ``D = TARGET_SSIM_DROP`` (see :func:`combine_severities`), i.e. the
mixture has the severity of a single artifact with the same expected SSIM. Given a requested combined
``S``, the component severities are a random (Dirichlet) split of that SSIM budget, so the params record
``severity == S`` exactly and ``component_severities`` for the per-artifact heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

_GHOST_MAX_INTENSITY = 1.5  # cap of TorchIO's ghosting intensity (every n-th line scaled by 1 - intensity)
_GHOST_MAX_N = 4  # number of ghosts drawn from 2.._GHOST_MAX_N
_GHOST_RESTORE = None  # TorchIO restore: None = only the central k-space plane is kept
_MOTION_MAX_DEG = 20.0  # safety caps on a single movement
_MOTION_MAX_MM = 20.0


# ----------------------------------------------------------------------------------------------------------
# severity <-> parameter
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# SSIM (gaussian window, Wang et al. 2004 constants), masked mean
# ----------------------------------------------------------------------------------------------------------
def _gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, sigma, truncate=3.5, mode="reflect")


def _ssim_from_moments(mx, sxx, x, y, sigma: float, data_range: float) -> np.ndarray:
    """SSIM map of ``y`` against ``x`` given ``x``'s local mean ``mx`` and variance ``sxx``."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    my = _gauss(y, sigma)
    syy = _gauss(y * y, sigma) - my * my
    sxy = _gauss(x * y, sigma) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim_map(x: np.ndarray, y: np.ndarray, sigma: float = 1.5, data_range: float = 1.0) -> np.ndarray:
    """SSIM map of two arrays of any dimension (gaussian window of ``sigma`` voxels, truncated at 3.5 sd)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    mx = _gauss(x, sigma)
    return _ssim_from_moments(mx, _gauss(x * x, sigma) - mx * mx, x, y, sigma, data_range)


def head_mask(clean: np.ndarray) -> np.ndarray:
    """Foreground (head or brain) mask of a clean normalised volume, holes filled."""
    from scipy.ndimage import binary_fill_holes

    from .io import foreground_mask

    m = foreground_mask(np.asarray(clean, dtype=np.float32))
    return binary_fill_holes(m)


def ssim_masked(
    clean: np.ndarray, corrupted: np.ndarray, mask: np.ndarray | None = None, sigma: float = 1.5
) -> float:
    """Mean SSIM inside ``mask`` (default :func:`head_mask` of ``clean``), data range 1 (normalised data)."""
    if mask is None:
        mask = head_mask(clean)
    smap = ssim_map(clean, corrupted, sigma=sigma)
    return float(smap[mask].mean()) if mask.any() else float(smap.mean())


def ssim_slices(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, sigma: float = 1.5) -> torch.Tensor:
    """Per-slice masked SSIM of two batches [B,1,H,W] (torch, gaussian window), returns [B]."""
    r = int(math.ceil(3.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()

    def g(a):
        a = F.pad(a, (r, r, r, r), mode="reflect")
        a = F.conv2d(a, k.view(1, 1, 1, -1))
        return F.conv2d(a, k.view(1, 1, -1, 1))

    c1, c2 = 0.01**2, 0.03**2
    mx, my = g(x), g(y)
    sxx = g(x * x) - mx * mx
    syy = g(y * y) - my * my
    sxy = g(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    if mask is None:
        return smap.mean(dim=(1, 2, 3))
    m = mask.to(smap.dtype)
    return (smap * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# shared torch helper: thick slices with a Gaussian slice profile along the last axis
# ----------------------------------------------------------------------------------------------------------
def _fwhm_to_sigma(fwhm):
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _ramp_smoothed(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``E[max(x - Z, 0)]`` for ``Z ~ N(0, s^2)`` (the ramp convolved with a Gaussian; ``max(x, 0)`` at s = 0)."""
    safe = s.clamp_min(1e-12)
    z = x / safe
    phi = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return torch.where(s > 0, x * cdf + safe * phi, x.clamp_min(0.0))


def _slice_weights(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Weight of a voxel at distance ``d`` from a slice centre: hat (linear interpolation) * Gaussian(s).

    The image between voxel centres is the linear interpolant; the slice integrates it against the Gaussian
    profile, so the weight is the triangle function convolved with the Gaussian (closed form through the
    smoothed ramp: tri = r(d+1) - 2 r(d) + r(d-1)). At s = 0 it is linear interpolation at the (fractional)
    slice centre, exactly the voxel itself at integer centres; it is continuous in ``d`` and ``s``.
    """
    return _ramp_smoothed(d + 1.0, s) - 2.0 * _ramp_smoothed(d, s) + _ramp_smoothed(d - 1.0, s)


def thick_slices_lastdim(
    x: torch.Tensor, factor: torch.Tensor, offset: torch.Tensor, spacing: torch.Tensor | None = None
) -> torch.Tensor:
    """Thick-slice acquisition along the last axis, then linear interpolation back to the grid.

    ``x`` is [B, ..., L]; ``factor`` [B] (>= 1) is the slice thickness in voxels; ``spacing`` [B] the distance
    between slice centres (default ``factor``: contiguous slices, as in a standard 2D multi-slice
    acquisition); ``offset`` [B] the position of the slice centre nearest to voxel 0 (fractional, in
    ``[0, spacing)``). Slice centres ``p_k = offset + k * spacing`` continue past both ends of the axis so
    that every grid point lies between two slices. Each slice integrates the linearly interpolated image
    against a Gaussian slice profile with FWHM = ``factor`` voxels, of which the native voxel's own FWHM
    (1 voxel) is removed (``sigma_eff^2 = sigma(f)^2 - sigma(1)^2``); voxels beyond the ends replicate the
    edge voxels. The slices are then linearly interpolated back to ``y = 0 .. L-1``. The whole operator is
    one [L, L] matrix per sample, continuous in ``factor`` and ``offset``; ``factor == 1`` with
    ``offset == 0`` is the identity.
    """
    b = x.shape[0]
    L = x.shape[-1]
    shape = x.shape
    if b == 0:
        return x.clone()
    f = factor.to(torch.float64).clamp_min(1.0)
    step = f if spacing is None else spacing.to(torch.float64).clamp_min(1.0)
    sig = torch.sqrt((_fwhm_to_sigma(f) ** 2 - _fwhm_to_sigma(1.0) ** 2).clamp_min(0.0))  # [B]
    o = offset.to(torch.float64)[:, None]
    y = torch.arange(L, dtype=torch.float64)[None, :]
    u = (y - o) / step[:, None]
    i0 = torch.floor(u)
    w = (u - i0)[:, :, None]  # [B, L, 1]
    p0 = (o + i0 * step[:, None])[:, :, None]  # slice centre at or before y
    p1 = p0 + step[:, None, None]  # next slice centre
    # band of voxels each output point depends on: [p0 - 1 - 6 sigma, p1 + 1 + 6 sigma]
    r = int(math.ceil(1.0 + 6.0 * float(sig.max())))
    T = int(math.ceil(float(step.max()))) + 2 * r + 2
    j = torch.floor(p0) - r + torch.arange(T, dtype=torch.float64)[None, None, :]  # [B, L, T]
    s3 = sig[:, None, None]
    a = (1.0 - w) * _slice_weights(j - p0, s3) + w * _slice_weights(j - p1, s3)
    # replicate padding: voxels beyond the ends are the edge voxels, so their weights add up there
    A = torch.zeros(b, L, L, dtype=torch.float64)
    A.scatter_add_(2, j.clamp(0, L - 1).long(), a)
    x2 = x.reshape(b, -1, L)
    out = torch.bmm(x2, A.transpose(1, 2).to(x.dtype))
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# 3D implementations: apply one artifact with an explicit physical parameter value
# ----------------------------------------------------------------------------------------------------------
def _fg(data: np.ndarray) -> np.ndarray:
    from .io import foreground_mask

    m = foreground_mask(data)
    return m if m.sum() >= 10 else np.ones_like(m, dtype=bool)


def _noise_3d(data, sigma, rng, spacing):
    variant = str(rng.choice(["rician", "kspace", "gaussian"]))
    n1 = rng.standard_normal(data.shape, dtype=np.float32)
    n2 = rng.standard_normal(data.shape, dtype=np.float32)
    params = {"variant": variant, PARAM_NAMES["noise"]: float(sigma)}
    if variant == "gaussian":
        out = data + sigma * n1
    elif variant == "rician":
        out = np.sqrt((data + sigma * n1) ** 2 + (sigma * n2) ** 2)
    else:  # complex Gaussian noise added in k-space, seen through a Hamming reconstruction filter
        k = np.fft.fftn(n1 + 1j * n2)
        win = np.ones(data.shape)
        for ax, n in enumerate(data.shape):
            fr = np.fft.fftfreq(n)  # -0.5..0.5
            w1 = 0.54 + 0.46 * np.cos(2 * np.pi * fr)
            shp = [1] * data.ndim
            shp[ax] = n
            win = win * w1.reshape(shp)
        c = np.fft.ifftn(k * win)
        c = c / np.sqrt(np.mean(np.abs(c) ** 2) / 2.0) * sigma
        out = np.abs(data + c)
        params["filter"] = "hamming"
    return out.astype(np.float32), params


def _ghosting_3d(data, amp, rng, spacing):
    import torchio as tio

    n = int(rng.integers(2, _GHOST_MAX_N + 1))
    axis = int(rng.integers(0, 3))
    intensity = min(float(amp) * n / math.sqrt(n - 1), _GHOST_MAX_INTENSITY)
    tr = tio.Ghosting(num_ghosts=n, axis=axis, intensity=intensity, restore=_GHOST_RESTORE)
    out = tr(torch.from_numpy(np.ascontiguousarray(data))[None]).numpy()[0]
    params = {
        PARAM_NAMES["ghosting"]: float(amp),
        "num_ghosts": n,
        "axis": axis,
        "intensity": intensity,
        "restore": _GHOST_RESTORE,
        "transform": "torchio.Ghosting",
    }
    return out.astype(np.float32), params


_BIAS_DECAY = (0.0, 1.0, 0.6, 0.35)


def _bias_terms(order: int, ndim: int):
    """(exponent tuple) of each polynomial term, in TorchIO's coefficient order."""
    terms = []
    if ndim == 3:
        for i in range(order + 1):
            for j in range(order + 1 - i):
                for k in range(order + 1 - (i + j)):
                    terms.append((i, j, k))
    else:
        for i in range(order + 1):
            for j in range(order + 1 - i):
                terms.append((i, j))
    return terms


def _bias_log_field(shape, order: int, coefs) -> np.ndarray:
    """log of ``tio.BiasField.generate_bias_field(data, order, coefs)`` (same coordinates: voxel centres
    about the middle, each axis divided by its maximum; same term order), evaluated separably: the
    polynomial is a sum of products of 1D powers, so it is three small tensor contractions instead of one
    full-volume pass per term (~20x faster on a 1 mm head)."""
    C = np.zeros((order + 1,) * 3)
    for c, (i, j, k) in zip(coefs, _bias_terms(order, 3)):
        C[i, j, k] = c
    P = []
    for n in shape:
        r = np.arange(-n / 2.0, n / 2.0) + 0.5
        if r.max() > 0:
            r = r / r.max()
        P.append(np.stack([r**p for p in range(order + 1)], axis=1))  # [n, order+1]
    t = np.tensordot(C, P[2], axes=([2], [1]))  # [i, j, c]
    t = np.tensordot(t, P[1], axes=([1], [1]))  # [i, c, b]
    out = np.tensordot(P[0], t, axes=([1], [0]))  # [a, c, b]
    return np.ascontiguousarray(out.transpose(0, 2, 1))


def _bias_3d(data, lstd, rng, spacing):
    order = 3
    terms = _bias_terms(order, 3)
    coefs = rng.standard_normal(len(terms)) * np.array([_BIAS_DECAY[sum(t)] for t in terms])
    logf = _bias_log_field(data.shape, order, coefs)
    mask = _fg(data)
    m, s = float(logf[mask].mean()), float(logf[mask].std())
    scale = float(lstd) / max(s, 1e-8)
    coefs = coefs * scale
    coefs[0] -= m * scale  # zero mean of log-field in the mask: no global intensity change
    # identical to tio.BiasField(coefficients=coefs, order=order)(data) (tested), without re-evaluating
    # the polynomial a second time
    out = data * np.exp(((logf - m) * scale).astype(np.float32))
    params = {
        PARAM_NAMES["bias"]: float(lstd),
        "order": order,
        "coefficients": [float(c) for c in coefs],
        "transform": "torchio.BiasField(coefficients, order) field (TorchIO polynomial basis)",
    }
    return out.astype(np.float32), params


def _anisotropy_3d(data, factor, rng, spacing):
    axis = int(rng.integers(0, 3))
    u = float(rng.random())
    step = float(factor)  # contiguous slices: spacing = thickness (fractional)
    anchor = math.floor(u * data.shape[axis])  # a slice centre falls on this voxel
    offset = anchor - math.floor(anchor / step) * step  # slice centre nearest to voxel 0, in [0, step)
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, axis, -1)))[None]
    out = thick_slices_lastdim(t, torch.tensor([float(factor)]), torch.tensor([offset]))[0].numpy()
    out = np.moveaxis(out, -1, axis)
    params = {
        PARAM_NAMES["anisotropy"]: float(factor),
        "axis": axis,
        "anchor_voxel": anchor,
        "offset_voxels": offset,
        "slice_spacing_voxels": step,
        "slice_thickness_mm": float(factor) * float(spacing[axis]),
        "slice_spacing_mm": step * float(spacing[axis]),
        "slice_profile": "gaussian, FWHM = thickness, on the linearly interpolated image",
        "interpolation": "linear",
    }
    return np.ascontiguousarray(out, dtype=np.float32), params


def _euler_matrix(deg) -> np.ndarray:
    import SimpleITK as sitk

    t = sitk.Euler3DTransform()
    t.SetRotation(*np.radians(np.asarray(deg, dtype=np.float64)).tolist())
    return np.array(t.GetMatrix()).reshape(3, 3)


def _motion_segments(times: np.ndarray, n_lines: int) -> tuple[np.ndarray, int]:
    """Fraction of k-space lines per segment and the index of the segment holding the k-space centre.

    Mirrors ``tio.Motion``: segment j spans ``[times[j-1], times[j])``; the identity (reference) position is
    moved to the segment with the first time > 0.5, whose old position goes to segment 0.
    """
    idx = [int(v) for v in (n_lines * times).astype(int).tolist()] + [n_lines]
    bounds = [0] + idx
    frac = np.diff(bounds) / float(n_lines)
    centre = int(np.where(times > 0.5)[0].min()) if np.any(times > 0.5) else len(times)
    return frac, centre


def _motion_times(n_moves: int, u: np.ndarray) -> np.ndarray:
    """Segment boundaries: a central reference band of 4-20 % of k-space (the position at the time the
    k-space centre is acquired) and ``n_moves`` other positions filling the rest, as in a sequential
    phase-encode ordering with the subject moving before and after the centre lines."""
    w = 0.04 + 0.16 * u[0]
    lo, hi = 0.5 - w * (0.3 + 0.4 * u[1]), 0.5 + w * (0.7 - 0.4 * u[1])
    times = [lo, hi]
    if n_moves == 3:  # one more boundary, in the lower or the upper outer part
        times.append(0.05 + (lo - 0.05) * u[2] * 2 if u[2] < 0.5 else hi + (0.95 - hi) * (u[2] - 0.5) * 2)
    return np.sort(np.asarray(times, dtype=np.float64))


def _motion_3d(data, rms, rng, spacing):
    import torchio as tio

    n_moves = int(rng.integers(2, 4))
    pe_axis = int(rng.integers(0, 3))
    times = _motion_times(n_moves, rng.random(3))
    deg_dir = rng.standard_normal((n_moves, 3))
    mm_dir = rng.standard_normal((n_moves, 3))
    # transpose so that the phase-encode (segment) axis is last, as tio.Motion expects
    perm = [a for a in range(3) if a != pe_axis] + [pe_axis]
    vol = np.ascontiguousarray(np.transpose(data, perm))
    sp = np.asarray(spacing, dtype=np.float64)[perm]
    mask = _fg(vol)
    ijk = np.argwhere(mask)
    if len(ijk) > 20000:
        ijk = ijk[:: len(ijk) // 20000]
    q = (ijk - np.asarray(vol.shape) / 2.0) * sp
    q = q * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS, the frame of SimpleITK's Euler transform
    frac, centre = _motion_segments(times, vol.shape[2])
    # spectra order after tio's swap: segment 0 <- move (centre-1) if centre > 0; segment centre <- identity
    seg_of_move = {}
    for m in range(n_moves):  # move m is spectrum m+1, i.e. segment m+1 before the swap
        seg = m + 1
        if seg == centre:
            seg = 0
        seg_of_move[m] = seg

    def rms_of(alpha):
        tot = 0.0
        for m in range(n_moves):
            A = _euler_matrix(alpha * deg_dir[m]) - np.eye(3)
            d = q @ A.T + alpha * mm_dir[m]
            tot += frac[seg_of_move[m]] * float(np.mean(np.sum(d * d, axis=1)))
        return math.sqrt(tot)

    alpha = 1.0
    for _ in range(6):
        r = rms_of(alpha)
        if r <= 0:
            break
        alpha *= float(rms) / r
    cap = min(_MOTION_MAX_DEG / max(np.abs(deg_dir).max(), 1e-8), _MOTION_MAX_MM / max(np.abs(mm_dir).max(), 1e-8))
    alpha = min(alpha, cap)
    degrees = alpha * deg_dir
    translation = alpha * mm_dir
    affine = np.diag(list(sp) + [1.0])
    img = tio.ScalarImage(tensor=torch.from_numpy(vol)[None], affine=affine)
    tr = tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation="linear")
    out = tr(img).data.numpy()[0]
    out = np.ascontiguousarray(np.transpose(out, np.argsort(perm)), dtype=np.float32)
    params = {
        PARAM_NAMES["motion"]: float(rms),
        "achieved_rms_mm": rms_of(alpha),
        "phase_encode_axis": pe_axis,
        "num_moves": n_moves,
        "times": [float(t) for t in times],
        "degrees": degrees.round(6).tolist(),
        "translation_mm": translation.round(6).tolist(),
        "transform": "torchio.Motion (segments along the phase-encode axis, reference position at k-space centre)",
    }
    return out, params


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
) -> tuple[np.ndarray, dict]:
    """Apply one artifact type to a 3D volume with an explicit physical parameter ``value`` (no severity map).

    Used by :func:`simulate_volume` and by the calibration benchmark.
    """
    _check_artifact(artifact, allow_mix=False)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    return _APPLY_3D[artifact](data, value, rng, spacing)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


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
        from .io import mask_box

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
        out, p = apply_artifact(data, artifact, base + value, rng, spacing)
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


def simulate_volume(
    data: np.ndarray,
    artifact: str,
    severity: float,
    seed: int | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rng: np.random.Generator | None = None,
    match_ssim: bool = False,
) -> tuple[np.ndarray, dict]:
    """Corrupt a 3D volume (intensities normalised to ~[0, 1]) with one artifact type or a mixture.

    Returns ``(corrupted float32 array of the same shape, params)``; ``params`` is JSON-serialisable and holds
    ``artifact``, ``severity``, ``component_severities`` (per artifact type), ``head_severities`` (per encoder
    head, :data:`HEAD_ORDER`), the physical parameter and every random draw. Severity 0 returns an exact copy.
    With ``artifact="mix"``, 2-3 distinct types are applied in :data:`APPLY_ORDER` with component severities
    whose :func:`combine_severities` is ``severity``; ``params["components"]`` lists each one's params.
    The same ``seed`` gives the same random draws (shape, axis, timing, noise) at every severity.

    ``match_ssim=False`` maps the severity to the physical parameter with the type-mean calibration
    (:data:`CALIBRATION_3D`): the *expected* SSIM is ``target_ssim(severity)``, but one sample's SSIM varies
    with its random draws and its anatomy (e.g. ghosting at SS 0.8: 1 - SSIM 0.14-0.33 over 7 volumes).
    ``match_ssim=True`` searches the parameter per sample (:func:`apply_matched`, 2-3 simulations on
    average) so that this sample's masked SSIM to ``data`` is ``target_ssim(severity)`` within
    :data:`MATCH_TOLERANCE`; a mixture matches each component against its own input. ``params`` then
    records ``ssim`` (achieved, overall) and ``severity_definition``.
    """
    _check_artifact(artifact)
    severity = float(severity)
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    if rng is None:
        rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in spacing)
    params: dict = {"artifact": artifact, "severity": severity, "seed": seed, "spacing": list(spacing)}
    mask = head_mask(data) if match_ssim and severity > 0 else None
    loss = _SSIMLoss(data, mask) if mask is not None else None
    comp_sev = {a: 0.0 for a in ARTIFACTS}
    if severity == 0.0:
        params.update(components=[], component_severities=comp_sev, head_severities=_heads(comp_sev))
        return data.copy(), params
    if artifact == "mix":
        k = int(rng.integers(2, 4))
        chosen = [str(a) for a in rng.choice(ARTIFACTS, size=k, replace=False)]
        sevs = split_severity(severity, k, rng)
        child_seeds = rng.integers(0, 2**31 - 1, size=k)
        order = sorted(range(k), key=lambda i: APPLY_ORDER.index(chosen[i]))
        out = data
        comps = []
        for i in order:
            a = chosen[i]
            comp_sev[a] = sevs[i]
            child = np.random.default_rng(int(child_seeds[i]))
            if match_ssim:
                ref_loss = loss if out is data else _SSIMLoss(out, mask)  # each component vs its own input
                out, p = apply_matched(out, a, sevs[i], child, spacing, loss=ref_loss)
            else:
                out, p = apply_artifact(out, a, severity_to_param(a, sevs[i], dim=3), child, spacing)
            comps.append({"artifact": a, "severity": sevs[i], "seed": int(child_seeds[i]), **p})
        params["components"] = comps
        params["combined_severity_rule"] = "1 - D*S = prod(1 - D*s_i), D = TARGET_SSIM_DROP"
    elif match_ssim:
        out, p = apply_matched(data, artifact, severity, rng, spacing, loss=loss)
        comp_sev[artifact] = severity
        params.update(p)
        params["components"] = [{"artifact": artifact, "severity": severity, **p}]
    else:
        out, p = apply_artifact(data, artifact, severity_to_param(artifact, severity, dim=3), rng, spacing)
        comp_sev[artifact] = severity
        params.update(p)
        params["components"] = [{"artifact": artifact, "severity": severity, **p}]
    params["component_severities"] = comp_sev
    params["head_severities"] = _heads(comp_sev)
    params["calibration"] = CALIBRATION_SOURCE
    out = np.nan_to_num(np.asarray(out, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if match_ssim:
        params["severity_definition"] = "per-sample masked SSIM = 1 - TARGET_SSIM_DROP * severity (apply_matched)"
        if artifact == "mix":  # a single artifact's achieved SSIM is already in params
            params["ssim"] = 1.0 - loss(out)
    else:
        params["severity_definition"] = "type-mean calibrated parameter (CALIBRATION_3D)"
    return out, _jsonable(params)


def _heads(comp_sev: dict) -> dict:
    return {HEAD_NAMES[a]: float(s) for a, s in comp_sev.items()}


# ----------------------------------------------------------------------------------------------------------
# 2D batched path (torch)
# ----------------------------------------------------------------------------------------------------------
def _rand(n, g, *shape):
    return torch.rand((n, *shape), generator=g, dtype=torch.float64)


def _randn(n, g, *shape):
    return torch.randn((n, *shape), generator=g, dtype=torch.float64)


def _noise_2d(x, sigma, g):
    b = x.shape[0]
    variant = _rand(b, g) < 0.5  # True: white complex (Rician); False: Hamming-filtered k-space noise
    n1 = torch.randn(x.shape, generator=g, dtype=x.dtype)
    n2 = torch.randn(x.shape, generator=g, dtype=x.dtype)
    c = torch.complex(n1, n2)
    if (~variant).any():
        H, W = x.shape[-2:]
        wy = 0.54 + 0.46 * torch.cos(2 * math.pi * torch.fft.fftfreq(H, dtype=x.dtype))
        wx = 0.54 + 0.46 * torch.cos(2 * math.pi * torch.fft.fftfreq(W, dtype=x.dtype))
        idx = (~variant).nonzero().flatten()
        cc = torch.fft.ifft2(torch.fft.fft2(c[idx]) * (wy[:, None] * wx[None, :]))
        cc = cc / torch.sqrt((cc.abs() ** 2).mean(dim=(-2, -1), keepdim=True) / 2.0)
        c[idx] = cc
    s = sigma.to(x.dtype)[:, None, None, None]
    return torch.sqrt((x + s * c.real) ** 2 + (s * c.imag) ** 2)


def _transpose_some(x, flag):
    """Swap H and W of the samples where ``flag`` (requires square slices for the mixed case)."""
    if not flag.any():
        return x
    if flag.all():
        return x.transpose(-1, -2)
    out = x.clone()
    out[flag] = x[flag].transpose(-1, -2)
    return out


def _by_axis(fn, x, axis_last, *args):
    """Run ``fn`` with the chosen axis moved last; works for non-square slices by splitting the batch."""
    H, W = x.shape[-2:]
    if H == W:
        xt = _transpose_some(x, ~axis_last)
        return _transpose_some(fn(xt, *args), ~axis_last)
    out = torch.empty_like(x)
    for flag in (True, False):
        idx = (axis_last == flag).nonzero().flatten()
        if len(idx) == 0:
            continue
        sub = x[idx] if flag else x[idx].transpose(-1, -2)
        a = tuple(v[idx] for v in args)
        r = fn(sub, *a)
        out[idx] = r if flag else r.transpose(-1, -2)
    return out


def _ghost_lastdim(x, amp, n):
    L = x.shape[-1]
    intensity = (amp * n / torch.sqrt(n - 1.0)).clamp_max(_GHOST_MAX_INTENSITY)
    lines = torch.arange(L, dtype=torch.float64)[None, :]
    hit = (torch.remainder(lines, n[:, None]) == 0).to(torch.float64)
    mult = 1.0 - intensity[:, None] * hit
    mult[:, L // 2] = 1.0  # keep the central line (TorchIO restore=None)
    # line masks along PE only: a 1D FFT suffices; the mask (centred order) is shifted instead of the spectrum
    k = torch.fft.fft(x, dim=-1) * torch.fft.ifftshift(mult, dim=-1).to(x.dtype)[:, None, None, :]
    return torch.fft.ifft(k, dim=-1).abs()


def _ghosting_2d(x, amp, g):
    b = x.shape[0]
    n = torch.randint(2, _GHOST_MAX_N + 1, (b,), generator=g).to(torch.float64)
    axis_last = _rand(b, g) < 0.5
    return _by_axis(_ghost_lastdim, x, axis_last, amp, n)


_BIAS_TERMS_2D = _bias_terms(3, 2)


def _fg_2d(x):
    m = x > 0.1
    few = m.sum(dim=(-2, -1), keepdim=True) < 10
    return m | few


def _bias_2d(x, lstd, g):
    b = x.shape[0]
    H, W = x.shape[-2:]
    yy = torch.linspace(-1, 1, H, dtype=torch.float64)[:, None].expand(H, W)
    xx = torch.linspace(-1, 1, W, dtype=torch.float64)[None, :].expand(H, W)
    basis = torch.stack([yy**i * xx**j for i, j in _BIAS_TERMS_2D]).reshape(len(_BIAS_TERMS_2D), -1)
    decay = torch.tensor([_BIAS_DECAY[i + j] for i, j in _BIAS_TERMS_2D], dtype=torch.float64)
    coefs = _randn(b, g, len(_BIAS_TERMS_2D)) * decay
    logf = (coefs @ basis).reshape(b, 1, H, W)
    m = _fg_2d(x).to(torch.float64)
    cnt = m.sum(dim=(1, 2, 3))
    mean = (logf * m).sum(dim=(1, 2, 3)) / cnt
    var = (((logf - mean[:, None, None, None]) ** 2) * m).sum(dim=(1, 2, 3)) / cnt
    scale = lstd / var.sqrt().clamp_min(1e-8)
    logf = (logf - mean[:, None, None, None]) * scale[:, None, None, None]
    return x * torch.exp(logf).to(x.dtype)


def _anisotropy_2d(x, factor, g):
    b = x.shape[0]
    axis_last = _rand(b, g) < 0.5
    L = torch.where(axis_last, x.shape[-1], x.shape[-2]).to(torch.float64)
    anchor = torch.floor(_rand(b, g) * L)  # a slice centre falls on this pixel: identity as factor -> 1
    offset = anchor - torch.floor(anchor / factor) * factor  # slice spacing = thickness (fractional)
    return _by_axis(thick_slices_lastdim, x, axis_last, factor, offset)


_N_SEG = 4  # k-space segments per slice in the 2D motion model (one holds the reference position)


def _motion_lastdim(x, rms, times, theta_dir, t_dir):
    """k-space segment motion along the last (phase-encode) axis; segment containing the centre is reference."""
    b = x.shape[0]
    H, W = x.shape[-2:]
    L = W
    # segment index of every PE line (centred k-space order, as after fftshift)
    lines = (torch.arange(L, dtype=torch.float64) + 0.5) / L
    seg = (lines[None, :, None] >= times[:, None, :]).sum(-1)  # [B, L] in 0.._N_SEG-1
    bounds = torch.cat([torch.zeros(b, 1, dtype=torch.float64), times, torch.ones(b, 1, dtype=torch.float64)], 1)
    frac = bounds.diff(dim=1)  # [B, _N_SEG]
    centre_seg = seg[:, L // 2]
    moving = torch.ones(b, _N_SEG, dtype=torch.float64)
    moving[torch.arange(b), centre_seg] = 0.0
    # mask moments (pixel coordinates about the slice centre)
    m = _fg_2d(x)[:, 0].to(torch.float64)
    cy = torch.arange(H, dtype=torch.float64) - (H - 1) / 2.0
    cx = torch.arange(W, dtype=torch.float64) - (W - 1) / 2.0
    cnt = m.sum(dim=(1, 2))
    ey = (m * cy[:, None]).sum((1, 2)) / cnt
    ex = (m * cx[None, :]).sum((1, 2)) / cnt
    eyy = (m * (cy[:, None] ** 2)).sum((1, 2)) / cnt
    exx = (m * (cx[None, :] ** 2)).sum((1, 2)) / cnt
    exy = (m * (cy[:, None] * cx[None, :])).sum((1, 2)) / cnt

    def msd(alpha):  # [B] time-weighted mean squared displacement for scale alpha
        th = torch.deg2rad(alpha[:, None] * theta_dir) * moving  # [B, S]
        tx = alpha[:, None] * t_dir[..., 0] * moving
        ty = alpha[:, None] * t_dir[..., 1] * moving
        c, s = torch.cos(th) - 1.0, torch.sin(th)
        # displacement d = A q + t, A = [[c, -s], [s, c]] acting on q = (x, y)
        # E|Aq|^2 = (c^2 + s^2) E|q|^2 ; cross term 2 t.(A E[q])
        eq2 = (exx + eyy)[:, None]
        aqx = c * ex[:, None] - s * ey[:, None]
        aqy = s * ex[:, None] + c * ey[:, None]
        d2 = (c**2 + s**2) * eq2 + 2 * (tx * aqx + ty * aqy) + tx**2 + ty**2
        return (frac * d2).sum(1)

    alpha = torch.ones(b, dtype=torch.float64)
    for _ in range(6):
        r = msd(alpha).clamp_min(1e-12).sqrt()
        alpha = alpha * rms / r
    cap = torch.minimum(
        _MOTION_MAX_DEG / theta_dir.abs().amax(1).clamp_min(1e-8), _MOTION_MAX_MM / t_dir.abs().amax((1, 2)).clamp_min(1e-8)
    )
    alpha = torch.minimum(alpha, cap)
    th = torch.deg2rad(alpha[:, None] * theta_dir) * moving
    tx = alpha[:, None] * t_dir[..., 0] * moving
    ty = alpha[:, None] * t_dir[..., 1] * moving
    # affine_grid maps output normalised coords to input ones: theta = S^-1 [R | t] S, S = diag(W/2, H/2)
    c, s = torch.cos(th), torch.sin(th)
    theta = torch.zeros(b, _N_SEG, 2, 3, dtype=torch.float64)
    theta[..., 0, 0] = c
    theta[..., 0, 1] = -s * H / W
    theta[..., 1, 0] = s * W / H
    theta[..., 1, 1] = c
    theta[..., 0, 2] = tx * 2.0 / W
    theta[..., 1, 2] = ty * 2.0 / H
    # resample only the (sample, segment) pairs that moved and own k-space lines; the rest is x itself
    need = (moving > 0) & (frac > 0)
    bi, si = need.nonzero(as_tuple=True)
    moved = x.expand(b, _N_SEG, H, W).clone()
    if len(bi):
        grid = _affine_grid(theta[bi, si].to(x.dtype), H, W)
        moved[bi, si] = F.grid_sample(x[bi], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    # the segment masks depend only on the PE coordinate, so the readout FFT cancels: 1D FFTs along PE suffice;
    # segments are defined in centred k-space order, so shift the line labels instead of the spectra
    k = torch.fft.fft(moved, dim=-1)  # [B, S, H, L]
    seg_u = torch.fft.ifftshift(seg, dim=-1)  # segment of each line in FFT order
    kk = torch.gather(torch.view_as_real(k), 1, seg_u[:, None, None, :, None].expand(b, 1, H, L, 2))
    return torch.fft.ifft(torch.view_as_complex(kk.contiguous()), dim=-1).abs().to(x.dtype)


_BASE_GRIDS: dict = {}


def _affine_grid(theta: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Same as ``F.affine_grid(theta, [N, 1, H, W], align_corners=False)`` via one batched matmul."""
    key = (H, W, theta.dtype)
    if key not in _BASE_GRIDS:
        xs = (torch.arange(W, dtype=theta.dtype) * 2 + 1) / W - 1
        ys = (torch.arange(H, dtype=theta.dtype) * 2 + 1) / H - 1
        base = torch.stack([xs[None, :].expand(H, W), ys[:, None].expand(H, W), torch.ones(H, W, dtype=theta.dtype)], -1)
        _BASE_GRIDS[key] = base.reshape(1, H * W, 3)
    base = _BASE_GRIDS[key]
    return torch.matmul(base, theta.transpose(1, 2)).reshape(-1, H, W, 2)


def _motion_2d(x, rms, g):
    b = x.shape[0]
    n_moves = torch.randint(2, _N_SEG, (b,), generator=g)
    u = _rand(b, g, 3)
    # same timing model as 3D (_motion_times): central reference band of 4-20 % of k-space
    w = 0.04 + 0.16 * u[:, 0]
    lo = 0.5 - w * (0.3 + 0.4 * u[:, 1])
    hi = 0.5 + w * (0.7 - 0.4 * u[:, 1])
    extra = torch.where(u[:, 2] < 0.5, 0.05 + (lo - 0.05) * u[:, 2] * 2, hi + (0.95 - hi) * (u[:, 2] - 0.5) * 2)
    extra = torch.where(n_moves == 3, extra, torch.ones_like(extra))  # unused: empty last segment
    times = torch.stack([lo, hi, extra], 1).sort(dim=1).values
    theta_dir = _randn(b, g, _N_SEG)
    t_dir = _randn(b, g, _N_SEG, 2)
    axis_last = _rand(b, g) < 0.5
    return _by_axis(_motion_lastdim, x, axis_last, rms, times, theta_dir, t_dir)


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


# ----------------------------------------------------------------------------------------------------------
# rulers
# ----------------------------------------------------------------------------------------------------------
def severity_ladder(
    data,
    artifact: str,
    severities: Sequence[float] = SEVERITY_KNOTS,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> list[tuple[float, np.ndarray]]:
    """The same image at increasing severity with fixed random draws (for image rulers).

    ``data`` is a 3D volume (uses :func:`simulate_volume`) or a 2D slice (uses :func:`simulate_slices`);
    every rung uses the same ``seed``, so only the severity changes (for ``"mix"``, the component types and
    their proportions stay fixed too).
    """
    arr = np.asarray(data, dtype=np.float32)
    out = []
    for s in severities:
        if arr.ndim == 3:
            img, _ = simulate_volume(arr, artifact, float(s), seed=seed, spacing=spacing)
        elif arr.ndim == 2:
            g = torch.Generator().manual_seed(int(seed))
            t = torch.from_numpy(arr)[None, None]
            img = simulate_slices(t, [artifact], torch.tensor([float(s)]), generator=g)[0, 0].numpy()
        else:
            raise ValueError(f"expected a 2D slice or 3D volume, got shape {arr.shape}")
        out.append((float(s), img))
    return out


# ----------------------------------------------------------------------------------------------------------
# file-level entry point (used by the CLI)
# ----------------------------------------------------------------------------------------------------------
def simulate_file(in_path, out_path, artifact: str, severity: float, seed: int = 0, sidecar=None) -> dict:
    """Read a NIfTI, normalise it, corrupt it and write NIfTI (same header/affine) + JSON sidecar.

    The output holds the corrupted *normalised* intensities (float32), in the input's voxel order and
    affine. Returns the params dict written to the sidecar (``<out>.json`` unless ``sidecar`` is given).
    """
    import json
    from pathlib import Path

    import nibabel as nib

    from .io import load_volume, normalize_intensity, save_like

    vol = load_volume(in_path)
    data = normalize_intensity(vol.data)
    out, params = simulate_volume(data, artifact, severity, seed=seed, spacing=vol.zooms)
    hdr = nib.load(str(in_path)).header.copy()
    hdr.set_data_dtype(np.float32)
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    save_like(out.astype(np.float32), vol.affine, out_path, header=hdr)
    params = {"input": str(in_path), "output": str(out_path), "normalisation": "io.normalize_intensity", **params}
    if sidecar is None:
        name = Path(out_path).name
        for ext in (".nii.gz", ".nii"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        sidecar = Path(out_path).with_name(name + ".json")
    Path(sidecar).write_text(json.dumps(params, indent=2))
    return params
