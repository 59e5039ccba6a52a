"""Training-data augmentation: volume-level contrast, skull-stripped look, resampling and thick-slice
acquisition before the simulation (:func:`_augment_volume`), and the slice-level contrast variant of the 2D path.

Volume augmentation before the simulation (:func:`_augment_volume`): skull-stripped look, contrast (random
per-tissue intensity remapping, :func:`_tissue_remap`, for T2w/FLAIR/PD-like images; or gamma/inversion),
resampling of *every* volume to a random 1.0–1.7 mm grid (interpolation smoothing is not an artifact), and
optionally a label-map synthesis of a new anatomy and contrast (:func:`synthesize_volume`) and a thick-slice
(2D) acquisition on its own grid (:func:`thick_acquisition`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..encoder.slices import scale_for_simulation, subsample_step
from .tissues import TissueRenderer
from .volumes import _CleanVolume


def _contrast_augment(x: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """Random per-sample gamma (0.5–2) and, for a quarter of those, foreground inversion (T1 <-> T2-like).

    Slice-level variant (used only with ``slice_sim_fraction`` > 0).
    """
    b = x.shape[0]
    sel = torch.rand(b, generator=gen) < prob
    gamma = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * math.log(2.0))
    inv = (torch.rand(b, generator=gen) < 0.25) & sel
    return sel, gamma, inv


def _apply_contrast(x, sel, gamma, inv):
    if not bool(sel.any()):
        return x
    y = x.clone()
    xs = y[sel].clamp(0, 1.5) / 1.5
    g = gamma[sel].view(-1, 1, 1, 1)
    out = xs.pow(g) * 1.5
    fg = (x[sel] > 0.08).float()
    i = inv[sel].view(-1, 1, 1, 1).float()
    out = i * fg * (1.5 - out) * 0.8 + (1 - i) * out
    y[sel] = out
    return y


def _tissue_remap(data: np.ndarray, rng: np.random.Generator, max_slope: float = 3.0) -> tuple[np.ndarray, str]:
    """Random piecewise-linear intensity remapping with knots at the foreground intensity quantiles.

    Real T2w, FLAIR and PD images differ from T1w mainly by *which tissue is bright*: a map through knots at
    the 5/25/50/75/95th percentiles of the head intensities (roughly CSF / GM / WM levels of a T1w) with random
    new levels covers T2w-like inversions (CSF bright, WM dark), FLAIR-like tents (CSF dark, GM > WM) and PD-like
    flat contrasts. The background (below the foreground threshold 0.08) keeps its own scale, and the slope of
    the map is limited to ``max_slope`` (relative to the identity on a ~[0, 1] volume) so the map cannot
    amplify the volume's own noise into a noise artifact. Returns ``(data, description)``.
    """
    step = subsample_step(data.size, 200_000)
    sub = data[::step, ::step, ::step]
    fgv = sub[sub > 0.08]
    if fgv.size < 100:
        return data, "remap-skip"
    q = np.percentile(fgv, [5, 25, 50, 75, 95]).astype(np.float64)
    q = np.maximum.accumulate(np.maximum(q, 0.09))
    q = q + np.arange(5) * 1e-3  # strictly increasing knots
    xs = np.concatenate([[0.0, 0.08], q, [max(1.5, q[-1] + 0.05)]])
    ys = np.empty_like(xs)
    ys[0] = 0.0
    ys[1] = 0.08 * rng.uniform(0.6, 1.4)
    ys[2:] = rng.uniform(0.15, 1.0, size=len(xs) - 2)
    for i in range(2, len(xs)):  # limit the slope (no noise amplification)
        lim = max_slope * (xs[i] - xs[i - 1])
        ys[i] = ys[i - 1] + np.clip(ys[i] - ys[i - 1], -lim, lim)
    ys = np.maximum(ys, 0.0)
    out = np.interp(data.ravel(), xs, ys).astype(np.float32).reshape(data.shape)
    return out, "remap" + "-".join(f"{y:.2f}" for y in ys[2:7])


def thick_acquisition(data: np.ndarray, spacing, rng: np.random.Generator, thickness_mm=(3.0, 6.0)):
    """A 2D multi-slice (thick-slice) acquisition of a clean volume: contiguous slices of a random thickness
    (``thickness_mm``, uniform) along a random axis, each the volume integrated against a Gaussian slice
    profile (FWHM = thickness, of which the native voxel's own FWHM is removed, as in
    :func:`artifactqc.simulate.anisotropy.thick_slices_lastdim`), kept on the thick grid (not interpolated
    back): the slice spacing becomes the new voxel size along that axis. In-plane the volume is unchanged.

    This is how a clinical 2D protocol's volume looks *as stored*; the scorer grades such a volume on its
    acquisition planes when its slices are at least 1.9 × its in-plane voxel size
    (:func:`artifactqc.io.acquisition_axis`; all but the items whose in-plane grid the resampling
    augmentation coarsened to more than 1.6 mm), and training keeps the same planes
    (:func:`artifactqc.training.pool.make_pool_entry`). Returns ``(data, spacing, description)``; a volume
    whose voxel along the drawn axis is already at least half the drawn thickness is returned unchanged
    (``description`` ``""``).
    """
    from scipy import ndimage as ndi

    from ..simulate.anisotropy import _fwhm_to_sigma

    axis = int(rng.integers(0, 3))
    t_mm = float(rng.uniform(*thickness_mm))
    u = float(rng.random())
    step = t_mm / float(spacing[axis])  # slice thickness = spacing, in voxels
    if step < 2.0:
        return data, tuple(spacing), ""
    sigma = math.sqrt(max(_fwhm_to_sigma(step) ** 2 - _fwhm_to_sigma(1.0) ** 2, 0.0))
    slab = ndi.gaussian_filter1d(data, sigma, axis=axis, mode="nearest", truncate=3.0)
    n = data.shape[axis]
    centres = u * step + step * np.arange(max(1, int(np.floor((n - 1 - u * step) / step)) + 1))
    i0 = np.clip(np.floor(centres).astype(int), 0, n - 1)
    i1 = np.clip(i0 + 1, 0, n - 1)
    w = (centres - np.floor(centres)).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w.reshape(shape)
    out = (1.0 - w) * np.take(slab, i0, axis=axis) + w * np.take(slab, i1, axis=axis)
    new_spacing = list(spacing)
    new_spacing[axis] = t_mm
    return np.ascontiguousarray(out, dtype=np.float32), tuple(float(x) for x in new_spacing), f"thick{axis}:{t_mm:.1f}mm"


#: Spatial deformation of ``synth_augment`` items (:func:`deform_anatomy`): rotation (degrees, each axis),
#: overall scale, per-axis scale and the sd (mm) of the smooth displacement's control points.
DEFORM = {"rotation_deg": 12.0, "scale": (0.88, 1.12), "axis_scale": (0.95, 1.05), "elastic_mm": 2.5, "grid": 5,
          "order": 3}


def deform_anatomy(data: np.ndarray, spacing, rng: np.random.Generator, rotation_deg: float = DEFORM["rotation_deg"],
                   scale=DEFORM["scale"], axis_scale=DEFORM["axis_scale"], elastic_mm: float = DEFORM["elastic_mm"],
                   grid: int = DEFORM["grid"], order: int = DEFORM["order"]) -> tuple[np.ndarray, str]:
    """A new anatomy from a training volume: a random rotation (up to ``rotation_deg`` about each axis), scale
    (overall ``scale`` times per axis ``axis_scale``) and smooth elastic displacement (a ``grid``³ lattice of
    N(0, ``elastic_mm``) mm displacements, upsampled trilinearly), about the volume's centre, in millimetres
    (anisotropic voxels stay right), on the volume's own grid, zeros outside, sampled with
    ``scipy.ndimage.map_coordinates`` of spline ``order`` (the sampling grid built with ``torch``'s
    ``affine_grid``). ``order`` 3, cubic B-spline (negative overshoot clipped), keeps the volume's sharpness
    (mean absolute gradient 0.97-1.06 of the original under sub-voxel shifts); ``order`` 1, trilinear, blurs
    by up to half a voxel (gradient 0.82), which would teach that a blurred volume is clean. The parameters come from ``rng``, so an
    item is reproducible. Returns ``(data, description)``.
    """
    import torch.nn.functional as F

    shape = data.shape
    sp = np.asarray(spacing, dtype=np.float64)
    half = (np.asarray(shape) - 1) / 2.0 * sp  # half extent (mm) per axis, array order
    ang = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, size=3))
    rot = np.eye(3)
    for ax, a in enumerate(ang):
        i, j = [k for k in range(3) if k != ax]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = r @ rot
    s = rng.uniform(*scale) * rng.uniform(*axis_scale, size=3)
    inv = np.linalg.inv(rot @ np.diag(s))  # output point -> source point (mm)
    coarse = rng.normal(0.0, elastic_mm, size=(3, grid, grid, grid))
    # affine_grid's last dimension is ordered (W, H, D) = array axes (2, 1, 0); normalised = mm / half
    rev = [2, 1, 0]
    theta = np.diag(1.0 / half[rev]) @ inv[np.ix_(rev, rev)] @ np.diag(half[rev])
    with torch.no_grad():
        t = torch.zeros(1, 3, 4, dtype=torch.float32)
        t[0, :, :3] = torch.from_numpy(theta.astype(np.float32))
        g = F.affine_grid(t, [1, 1, *shape], align_corners=True)
        disp = torch.from_numpy((coarse[rev] / half[rev][:, None, None, None]).astype(np.float32))[None]
        disp = F.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
        g = g + disp[0].permute(1, 2, 3, 0)[None]
        del disp
        coords = np.stack([((g[0, ..., 2 - a] + 1.0) * (0.5 * (shape[a] - 1))).numpy() for a in range(3)])
        del g
    from scipy import ndimage as ndi

    out = np.maximum(ndi.map_coordinates(np.ascontiguousarray(data, dtype=np.float32), coords, order=order,
                                         mode="constant", cval=0.0, prefilter=True, output=np.float32), 0.0)
    desc = "deform-rot" + ",".join(f"{np.rad2deg(a):.0f}" for a in ang) + "-scale" + ",".join(f"{x:.2f}" for x in s)
    return np.ascontiguousarray(out, dtype=np.float32), desc


def synthesize_volume(data: np.ndarray, spacing, rng: np.random.Generator, k: int = 4) -> tuple[np.ndarray, str]:
    """Label-map synthesis of a new clean training volume: the anatomy deformed (:func:`deform_anatomy`), then
    every intensity class re-rendered with a random new intensity
    (:class:`artifactqc.training.tissues.TissueRenderer`: k-means classes of the deformed volume as a soft label
    map, each class's own texture kept).

    This is the label-map synthesis of SynthSeg (TorchIO ``RandomLabelsToImage``) adapted to a quality model:
    ``RandomLabelsToImage`` draws each label's texture as Gaussian noise of a random sd, which is the noise
    artifact itself, so here a class keeps the volume's texture (scaled) and the clean synthetic volume stays
    as clean as the real one. A volume with too few foreground voxels for classes keeps its intensities.
    Returns ``(data, description)`` (the volume rescaled like every training volume).
    """
    data, desc = deform_anatomy(data, spacing, rng)
    try:
        data, d = TissueRenderer(data, k).render(rng)
    except ValueError:
        return scale_for_simulation(data), desc
    return data, f"{desc}+{d}"


def _augment_volume(v: _CleanVolume, rng: np.random.Generator, contrast: float, mask: float, resample: float,
                    thick: float = 0.0, synth: float = 0.0):
    """Volume-level augmentation *before* simulation (so the scorer's normalisation comes after both).

    * skull-stripping look (prob ``mask``): voxels outside :func:`_brain_mask` set to 0;
    * contrast (prob ``contrast``): half of those a random tissue remapping (:func:`_tissue_remap`: T2w-,
      FLAIR-, PD-like contrasts), the other half gamma 0.5–2 and, for a third of those, foreground inversion
      (T1w <-> T2w-like);
    * resampling (prob ``resample``): trilinear resampling to a random isotropic grid of 1.0–1.7 mm (at least
      0.65 × the coarsest voxel size, so a 2 mm volume is *upsampled* to 1.3–1.7 mm), skipped when the new
      grid is within 5 % of the old one, and for volumes coarser than 2.6 mm (thick slices, which have no
      1.0–1.7 mm grid at 0.65 × their voxel size). A resampled clean scan is clean: interpolation smoothing of a
      clean volume (either direction) must not read as an artifact. (Session 2 resampled only volumes finer
      than 1.4 mm, never the 2 mm IXI majority, and the benchmark's 1.5 mm resampling raised clean scores of
      2 mm IXI volumes by 0.3–0.6.)
    * label-map synthesis (prob ``synth``, instead of the contrast step): :func:`synthesize_volume`, a
      deformed anatomy with a random intensity per tissue class. No draw is made when ``synth`` is 0.
    * thick-slice acquisition (prob ``thick``, last): :func:`thick_acquisition`, a 2D protocol's 3–6 mm
      slices on their own grid. No random draw is made when ``thick`` is 0, so runs without it keep their
      random streams.

    Returns ``(data, spacing, description)``.
    """
    from scipy import ndimage as ndi

    data = v.data
    spacing = v.spacing
    desc = []
    if v.brain is not None and rng.random() < mask:
        data = data * v.brain
        desc.append("brainmask")
    if synth > 0 and rng.random() < synth:
        data, d = synthesize_volume(data, spacing, rng)
        desc.append(d)
    elif rng.random() < contrast:
        if rng.random() < 0.5:
            data, d = _tissue_remap(data, rng)
            data = scale_for_simulation(data)
            desc.append(d)
        else:
            gamma = float(np.exp(rng.uniform(-1, 1) * math.log(2.0)))
            fg = data > 0.08
            x = np.clip(data, 0, 1.5) / 1.5
            data = (x ** gamma * 1.5).astype(np.float32)
            desc.append(f"gamma{gamma:.2f}")
            if rng.random() < 1 / 3:
                data = np.where(fg, (1.5 - data) * 0.8, 0.0).astype(np.float32)
                desc.append("invert")
    lowest = max(1.0, 0.65 * max(spacing))
    if rng.random() < resample and lowest < 1.7:
        t = float(rng.uniform(lowest, 1.7))
        if max(abs(t / s - 1.0) for s in spacing) > 0.05:
            zoom = [s / t for s in spacing]
            data = ndi.zoom(data, zoom, order=1, prefilter=False, grid_mode=False).astype(np.float32)
            spacing = tuple(float(s * (n0 - 1) / max(n1 - 1, 1))
                            for s, n0, n1 in zip(spacing, v.data.shape, data.shape))
            desc.append(f"resample{t:.2f}mm")
    if thick > 0 and rng.random() < thick:
        data, spacing, d = thick_acquisition(data, spacing, rng)
        if d:
            desc.append(d)
    return np.ascontiguousarray(data, dtype=np.float32), tuple(spacing), "+".join(desc) or "none"
