"""Slice extraction shared by training and scoring: one code path from a file to model input.

Every volume goes through exactly the same steps, whether it is a training volume (whose clean slices
are cached once and then corrupted on the fly) or a volume being scored:

1. :func:`artifactqc.io.load_volume` (guarded reading, float32) and :func:`artifactqc.io.to_canonical`
   (closest RAS+ axis order; no resampling), so any orientation gives the same slices.
2. Robust intensity scaling with the definition of :func:`artifactqc.io.normalize_intensity`
   (foreground 0.5/99.5 percentiles -> 0/1, clipped to [0, 1.5]). The percentiles are computed on a
   regular subsample of the volume (at most ~``max_stats_voxels`` voxels) because sorting a full 1 mm
   volume costs as much as loading it; on real volumes the percentiles agree to well under 1 %.
   Integer-valued volumes (uint8/int16 files without scaling) count values instead of sorting them,
   with identical results.
   Percentile scaling (not min-max, not uint8) makes ×1000 rescaling, int16 storage and any contrast
   (T1w, T2w, FLAIR, PD, unknown) look alike to the network.
3. The head extent is the robust (1st–99th percentile) bounding box of the foreground voxels in mm.
   Along each of the three canonical axes, ``slices_per_axis`` planes are placed evenly over the middle
   60 % of that extent (sagittal, coronal and axial slices).
4. Each plane is sampled with trilinear interpolation (``torch.nn.functional.grid_sample``) on a fixed
   physical grid: ``image_size`` × ``image_size`` pixels of ``pixel_mm`` mm, centred on the head.
   No anti-aliasing filter is applied, so noise texture survives the resampling of ~1 mm voxels and
   thick slices show as blur along the through-plane axis. Outside the field of view is 0.

Default geometry: 128 × 128 pixels of 1.5 mm (a 192 mm field of view that holds an adult brain).
128 px was chosen from the measured speeds in issue 5 (the published 224 px network infers ~20 slices/s
on 2 CPU cores; 128 px with a downsampling encoder is >50× faster), and 1.5 mm keeps the blur of
2–4× thick slices and the texture of noise visible (at 2 mm pixels the blur of 2 mm slices would vanish).
With ``thick_pixel_ratio`` > 0, a thick-slice (2D) volume (:func:`artifactqc.io.acquisition_axis`) is sampled
finer: pixels of ``thick_pixel_ratio`` × its in-plane voxel size (clipped to [``min_pixel_mm``, ``pixel_mm``])
over the same field of view, so ``image_size`` grows accordingly (:func:`volume_geometry`). Clinical 2D scans
have 0.5–0.9 mm in-plane voxels: at 1.5 mm pixels the in-plane blur and motion of their own grid vanish.

The output is a float32 array ``[n_slices, image_size, image_size]`` plus a dict with the geometry used.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch

from .. import io

#: Fraction of the head extent (centred) from which slices are taken along each axis.
MIDDLE_FRACTION = 0.6


@dataclass(frozen=True)
class SliceConfig:
    """Geometry of the 2D model input; stored in ``model.json`` so scoring uses what training used."""

    image_size: int = 128
    pixel_mm: float = 1.5
    slices_per_axis: int = 8
    middle_fraction: float = MIDDLE_FRACTION
    max_stats_voxels: int = 400_000
    #: > 0: thick-slice volumes sampled at this multiple of their in-plane voxel size (0 = the fixed grid)
    thick_pixel_ratio: float = 0.0
    #: the finest pixel of that rule (mm): finer grids of 2D scans are mostly interpolated (zero-filled)
    min_pixel_mm: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SliceConfig":
        keys = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in keys})


def volume_geometry(cfg: SliceConfig, voxel_mm) -> tuple[float, int]:
    """``(pixel_mm, image_size)`` of a volume with canonical voxel sizes ``voxel_mm``: ``cfg``'s fixed grid,
    or for a thick-slice volume with ``cfg.thick_pixel_ratio`` > 0, pixels of that multiple of its finest
    in-plane voxel side (clipped to [``min_pixel_mm``, ``pixel_mm``]) over the same field of view
    (``image_size`` × ``pixel_mm``, rounded to a multiple of 8 pixels)."""
    if cfg.thick_pixel_ratio <= 0:
        return cfg.pixel_mm, cfg.image_size
    axis = io.acquisition_axis(voxel_mm)
    if axis is None:
        return cfg.pixel_mm, cfg.image_size
    inplane = min(float(v) for a, v in enumerate(voxel_mm) if a != axis)
    pixel = float(np.clip(cfg.thick_pixel_ratio * inplane, cfg.min_pixel_mm, cfg.pixel_mm))
    if pixel >= cfg.pixel_mm:
        return cfg.pixel_mm, cfg.image_size
    return fov_grid(cfg, pixel)


def fov_grid(cfg: SliceConfig, pixel_mm: float) -> tuple[float, int]:
    """``(pixel, size)``: ``cfg``'s field of view (``image_size`` × ``pixel_mm``) in pixels of about
    ``pixel_mm``, the size rounded to a multiple of 8 and the pixel adjusted to keep the field of view."""
    size = max(8, int(8 * round(cfg.image_size * cfg.pixel_mm / pixel_mm / 8)))
    return cfg.image_size * cfg.pixel_mm / size, size


def subsample_step(size: int, max_voxels: int) -> int:
    """Stride along every axis so that ``data[::step, ::step, ::step]`` holds at most ~``max_voxels`` voxels."""
    return max(1, int(np.ceil((size / max(1, max_voxels)) ** (1 / 3))))


#: Widest range of integer values for which :func:`robust_range` counts values instead of sorting them.
MAX_INTEGER_BINS = 1 << 20


def _integer_counts(sub: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(counts, offset)`` with ``counts[i]`` = number of voxels of value ``offset + i`` if every value of
    ``sub`` is an integer and their range is below :data:`MAX_INTEGER_BINS` (MR volumes stored as uint8 or
    int16 without scaling), else ``None``."""
    flat = sub.ravel()
    head = flat[:4096]
    if flat.size == 0 or not np.array_equal(head, np.floor(head)):  # cheap exit for float volumes
        return None
    vmin, vmax = float(flat.min()), float(flat.max())
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmax - vmin >= MAX_INTEGER_BINS:
        return None
    off = int(vmin)
    iv = flat.astype(np.intp)  # bincount's own index type: no further copy
    if not np.array_equal(iv.astype(flat.dtype), flat):
        return None
    if off:
        iv -= off
    return np.bincount(iv), off


def _range_from_counts(counts: np.ndarray, off: int, p_low: float, p_high: float) -> tuple[float, float]:
    """:func:`robust_range`'s ``(lo, hi)`` from value counts: the same foreground rule as
    :func:`io.foreground_mask` (values above 10 % of the 98th percentile of the positive values) and the same
    percentiles (linear interpolation), without sorting."""
    values = np.arange(off, off + len(counts))
    pos = values > 0
    cand = counts
    if counts[pos].sum() > 0:
        first = int(np.argmax(pos))
        thr = 0.1 * (off + first + _percentile_from_counts(counts[first:], 98))
        # compared in float32 like ``sub > thr`` on the float32 volume
        fg = values.astype(np.float32) > np.float32(thr)
        if counts[fg].sum() > 0:
            cand = np.where(fg, counts, 0)
    nz = np.flatnonzero(cand)
    first = int(nz[0])
    sl = cand[first:int(nz[-1]) + 1]
    return tuple(float(off + first + _percentile_from_counts(sl, q)) for q in (p_low, p_high))  # type: ignore


def _subsample(data: np.ndarray, max_voxels: int) -> tuple[np.ndarray, int]:
    """Contiguous copy of the regular subsample ``data[::step, ::step, ::step]`` (at most ~``max_voxels``)."""
    step = subsample_step(data.size, max_voxels)
    return np.ascontiguousarray(data[::step, ::step, ::step]), step


def _range_of(sub: np.ndarray, p_low: float, p_high: float):
    """``(lo, hi, counted)``: :func:`robust_range` of an already subsampled volume, and the value counts of
    the counting path (``None`` for volumes that are not integer-valued)."""
    counted = _integer_counts(sub)
    if counted is not None:
        lo, hi = _range_from_counts(*counted, p_low, p_high)
    else:
        mask = io.foreground_mask(sub)
        vals = sub[mask] if mask.any() else sub.ravel()
        lo, hi = (float(v) for v in np.percentile(vals, [p_low, p_high]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, counted


def robust_range(data: np.ndarray, max_voxels: int = 400_000, p_low: float = 0.5, p_high: float = 99.5):
    """``(lo, hi, step)``: the ``(lo, hi)`` of :func:`io.normalize_intensity` computed on a regular subsample
    of ``data`` (stride ``step``).

    Integer-valued volumes (most MR files) take an exact counting path (:func:`_range_from_counts`, faster
    than sorting: it is most of the fixed cost of scoring a small volume); other volumes use percentiles."""
    sub, step = _subsample(data, max_voxels)
    lo, hi, _ = _range_of(sub, p_low, p_high)
    return lo, hi, step


def normalize(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Apply the :func:`io.normalize_intensity` mapping for a given ``(lo, hi)``."""
    out = (np.asarray(data, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.5, out=out)


def _percentile_from_counts(counts: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) of the integer values ``i`` repeated ``counts[i]``
    times, without materialising them."""
    cs = np.cumsum(counts)
    n = int(cs[-1])
    pos = q / 100.0 * (n - 1)
    k0 = int(np.floor(pos))
    v0 = float(np.searchsorted(cs, k0, side="right"))
    v1 = float(np.searchsorted(cs, min(k0 + 1, n - 1), side="right"))
    return v0 + (pos - k0) * (v1 - v0)


def _head_mask(sub: np.ndarray, lo: float, hi: float, counted=None) -> np.ndarray:
    """``normalize(sub, lo, hi) > 0.1`` (the head), exactly. With the value counts of an integer-valued
    volume (:func:`_integer_counts`) the raw values are compared with the smallest value that passes (the
    mapping is monotone), which skips normalising the volume."""
    if counted is None:
        return normalize(sub, lo, hi) > 0.1
    counts, off = counted
    values = np.arange(off, off + len(counts), dtype=np.float32)
    ok = normalize(values, lo, hi) > 0.1
    if not ok.any():
        return np.zeros(sub.shape, dtype=bool)
    return sub >= values[int(np.argmax(ok))]


def _box_from_mask(fg: np.ndarray, zooms: np.ndarray, step: int = 1, shape=None):
    """Robust bounding box (mm, voxel-centre coordinates of the canonical grid) of the head: the 1st–99th
    percentile of the coordinates of the voxels of ``fg`` (a mask of ``data[::step]×3``, see
    :func:`_head_mask`); the whole grid of ``shape`` (default ``fg.shape``) if fewer than 10 voxels are set."""
    p01 = fg.sum(axis=2)  # projections from two passes over the mask instead of three
    counts = (p01.sum(axis=1), p01.sum(axis=0), fg.sum(axis=(0, 1)))
    if int(counts[0].sum()) < 10:
        shape = np.asarray(fg.shape if shape is None else shape, dtype=np.float64)
        return np.zeros(3), (shape - 1) * zooms
    lo = np.empty(3)
    hi = np.empty(3)
    for a in range(3):
        lo[a], hi[a] = (_percentile_from_counts(counts[a], q) * step for q in (1, 99))
    return lo * zooms, hi * zooms


def _plane_positions(box_lo, box_hi, cfg: SliceConfig) -> list[np.ndarray]:
    """Plane positions (mm) along each canonical axis over the middle fraction of the head extent."""
    out = []
    mf = cfg.middle_fraction
    for axis in range(3):
        ext = box_hi[axis] - box_lo[axis]
        a0 = box_lo[axis] + ext * (1 - mf) / 2
        a1 = box_hi[axis] - ext * (1 - mf) / 2
        n = cfg.slices_per_axis
        out.append(np.linspace(a0, a1, n) if n > 1 else np.array([(a0 + a1) / 2]))
    return out


def extract_from_array(
    data: np.ndarray, affine: np.ndarray, cfg: SliceConfig | None = None
) -> tuple[np.ndarray, dict]:
    """Slices ``[N, S, S]`` (float32) from a 3D array and its affine (any orientation, any voxel size).

    Sampling is separable: linear interpolation between the two voxel planes around each slice position,
    then bilinear resampling of the plane onto the fixed in-plane grid (``grid_sample``, zeros outside).
    The intensity mapping is applied to the sampled pixels (it is affine before the clip, so this equals
    sampling the normalised volume except at the clip boundary), which avoids touching every voxel twice.
    """
    cfg = cfg or SliceConfig()
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    data = np.asarray(data, dtype=np.float32)
    # Canonical (RAS+) axis order as a *view*: transpose only, no copy. Axes that must be flipped to reach
    # RAS+ are handled on the small outputs (slice order, image rows/columns), not on the volume, which
    # makes the result identical to sampling ``io.to_canonical(data)`` without copying the volume.
    ornt = nib.orientations.io_orientation(affine)
    order = [int(np.nonzero(ornt[:, 0] == c)[0][0]) for c in range(3)]
    flips = [bool(ornt[order[c], 1] < 0) for c in range(3)]
    data = data.transpose(order)
    zooms = io.voxel_sizes(affine)[order]
    sub, step = _subsample(data, cfg.max_stats_voxels)
    lo, hi, counted = _range_of(sub, 0.5, 99.5)
    box_lo, box_hi = _box_from_mask(_head_mask(sub, lo, hi, counted), zooms * step)
    positions = _plane_positions(box_lo, box_hi, cfg)
    centre = (box_lo + box_hi) / 2.0
    pixel_mm, size = volume_geometry(cfg, zooms)
    offs = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    outs = []
    planes = []
    for axis in range(3):
        u, v = [b for b in range(3) if b != axis]
        nax = data.shape[axis]
        idx = np.clip(positions[axis] / zooms[axis], 0, nax - 1)
        i0 = np.minimum(np.floor(idx).astype(np.int64), max(nax - 2, 0))
        w = torch.from_numpy((idx - i0).astype(np.float32))[:, None, None]
        i1 = np.minimum(i0 + 1, nax - 1)
        # numpy gathers the few planes directly from any memory layout (torch.index_select and np.take are
        # ~50x slower on the transposed, Fortran-ordered arrays nibabel returns: they copy the volume)
        sel0 = [slice(None)] * 3
        sel1 = [slice(None)] * 3
        sel0[axis], sel1[axis] = i0, i1
        p0 = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data[tuple(sel0)], axis, 0)))
        p1 = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data[tuple(sel1)], axis, 0)))
        pl = (p0 * (1 - w) + p1 * w - lo)[:, None]  # [n,1,Du,Dv], shifted so padding = lo
        # rows run along v (superior/anterior up), columns along u
        cu = (centre[u] + offs) / zooms[u]
        cv = (centre[v] - offs) / zooms[v]
        gx = torch.from_numpy((2.0 * cv / max(data.shape[v] - 1, 1) - 1.0).astype(np.float32))  # along Dv
        gy = torch.from_numpy((2.0 * cu / max(data.shape[u] - 1, 1) - 1.0).astype(np.float32))  # along Du
        # output [row r, col c]: v from row, u from col -> x (Dv index) varies with r, y (Du) with c
        grid = torch.stack(torch.broadcast_tensors(gx[:, None], gy[None, :]), dim=-1)
        with torch.no_grad():
            img = torch.nn.functional.grid_sample(
                pl, grid[None].expand(pl.shape[0], size, size, 2), mode="bilinear",
                padding_mode="zeros", align_corners=True,
            )[:, 0]
        pos = positions[axis]
        if flips[axis]:  # canonical order of the slices and their canonical positions
            img = img.flip(0)
            pos = (nax - 1) * zooms[axis] - pos[::-1]
        dims = [d for d, f in ((1, flips[v]), (2, flips[u])) if f]
        if dims:
            img = img.flip(dims)
        outs.append(img)
        planes += [(axis, float(p)) for p in pos]
    out = torch.cat(outs, 0)
    out = (out * (1.0 / (hi - lo))).clamp_(0.0, 1.5)
    if any(flips):
        box_lo, box_hi = (
            np.where(flips, (np.asarray(data.shape) - 1) * zooms - box_hi, box_lo),
            np.where(flips, (np.asarray(data.shape) - 1) * zooms - box_lo, box_hi),
        )
    info = {
        "n_slices": int(out.shape[0]),
        "planes": planes,
        "intensity_lo": lo,
        "intensity_hi": hi,
        "head_box_mm": [box_lo.tolist(), box_hi.tolist()],
        "voxel_mm": [float(z) for z in zooms],
        "shape": [int(s) for s in data.shape],
        "pixel_mm": pixel_mm,
        "image_size": size,
    }
    return out.numpy().astype(np.float32, copy=False), info


def extract_slices(path: str | os.PathLike, cfg: SliceConfig | None = None, max_mem_mb: float = 4096.0):
    """Load a NIfTI file (guarded, :func:`io.load_volume`) and return ``(slices [N,S,S], info)``."""
    vol = io.load_volume(path, max_mem_mb=max_mem_mb)
    slices, info = extract_from_array(vol.data, vol.affine, cfg)
    info["path"] = str(path)
    info["dtype"] = vol.dtype
    return slices, info


def scale_for_simulation(data: np.ndarray) -> np.ndarray:
    """Bring a raw volume to the simulator's ~[0, 1] range by a *pure scale* (divide by the scorer's robust
    upper percentile), without offset or clipping.

    The scorer's percentile normalisation is invariant to a positive scale factor, so the clean slices of the
    scaled volume are exactly those of the raw file. ``io.normalize_intensity`` (offset + clip) is not: applying
    the scorer's normalisation a second time moves the low percentile from 0 to ~0.09 (the foreground threshold
    of ``io.foreground_mask`` is 10 % of the 98th percentile) and clips dark tissue to 0 — measured here, a
    mean absolute slice difference of 0.08 on IXI316 and clean scores that differed by up to 0.6 between the
    raw file and its normalised copy.
    """
    data = np.asarray(data, dtype=np.float32)
    _, hi, _ = robust_range(data)
    scale = np.float32(1.0 / hi) if hi > 0 else np.float32(1.0)
    return np.nan_to_num(data * scale, nan=0.0, posinf=0.0, neginf=0.0)
