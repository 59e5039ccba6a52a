"""Clean training volumes: loaded, reoriented, scaled and cropped to the head once per run
(:func:`_load_clean_volume`), with a crude brain mask for the skull-stripped look; unusable files raise
:class:`TrainingVolumeError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..encoder.slices import SliceConfig, extract_from_array, scale_for_simulation


class TrainingVolumeError(ValueError):
    """A training volume that cannot be used (unreadable, or too small for the slice sampler)."""


@dataclass
class _CleanVolume:
    """A training volume in canonical (RAS+) order, intensities scaled (:func:`scale_for_simulation`), plus a
    crude brain mask."""

    path: str
    data: np.ndarray
    spacing: tuple[float, float, float]
    brain: np.ndarray | None = None


def _min_slices_ok(s: np.ndarray, axes: np.ndarray) -> bool:
    keep = _usable(s)
    return keep.sum() >= 2 and len(np.unique(axes[keep])) >= 2


def _usable(s: np.ndarray) -> np.ndarray:
    """Slices with enough foreground to be worth training on (> 3 % of pixels above 0.1)."""
    return (s > 0.1).mean(axis=(1, 2)) > 0.03


def _load_clean_volume(path: str, cfg: SliceConfig, with_brain: bool) -> _CleanVolume:
    """Load, reorient and scale (:func:`scale_for_simulation`) a training volume; raise :class:`TrainingVolumeError` naming the file
    if it is unreadable or too small for the slice sampler."""
    from .. import io

    try:
        vol = io.load_volume(path)
    except Exception as exc:
        raise TrainingVolumeError(f"{path}: unreadable ({_err(exc)})") from exc
    data, aff = io.to_canonical(vol.data, vol.affine)
    spacing = tuple(float(z) for z in io.voxel_sizes(aff))
    if min(data.shape) < 4:
        raise TrainingVolumeError(f"{path}: too small for the slice sampler (shape {tuple(data.shape)}, need >= 4 "
                                  "voxels along every axis)")
    data = _crop_to_head(scale_for_simulation(data))
    s, _ = extract_from_array(data, np.diag([*spacing, 1.0]), cfg)
    axes = np.repeat(np.arange(3), cfg.slices_per_axis)
    if not _min_slices_ok(s, axes):
        raise TrainingVolumeError(
            f"{path}: too small or too empty for the slice sampler ({int(_usable(s).sum())} usable slices of "
            f"{len(s)}; need >= 2 in two orientations with > 3 % foreground at {cfg.pixel_mm} mm pixels)")
    brain = _brain_mask(data, spacing) if with_brain else None
    return _CleanVolume(str(path), np.ascontiguousarray(data, dtype=np.float32), spacing, brain)


def _crop_to_head(data: np.ndarray, margin: int = 8) -> np.ndarray:
    """Drop empty borders (air) beyond ``margin`` voxels around the head: the 3D simulator's cost scales with
    the number of voxels. (The field of view still varies between training volumes, as in real cohorts.)"""
    from ..io import mask_box

    fg = data > 0.05
    return data[mask_box(fg, margin)] if fg.any() else data


def _err(exc: BaseException) -> str:
    from .. import io

    if isinstance(exc, io.VolumeError):
        return f"{exc.error_type}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _brain_mask(data: np.ndarray, spacing, depth_mm: float = 9.0) -> np.ndarray | None:
    """Crude brain mask for skull-stripping augmentation: the filled head mask eroded by ``depth_mm``
    (scalp + skull), largest component, slightly smoothed. Not a segmentation: it only has to make a
    training volume *look* skull-stripped (zero background right at a brain-like boundary)."""
    from scipy import ndimage as ndi

    step = max(1, int(round(2.0 / min(spacing))))  # work at ~2 mm
    sub = data[::step, ::step, ::step] > 0.1
    if sub.sum() < 100:
        return None
    sub = ndi.binary_fill_holes(ndi.binary_closing(sub, iterations=2))
    dist = ndi.distance_transform_edt(sub, sampling=[s * step for s in spacing])
    core = dist > depth_mm
    lab, n = ndi.label(core)
    if n == 0:
        return None
    sizes = ndi.sum(core, lab, index=np.arange(1, n + 1))
    core = lab == (1 + int(np.argmax(sizes)))
    core = ndi.binary_opening(core, iterations=1)
    if core.sum() < 50:
        return None
    # back to the full grid (nearest)
    idx = [np.minimum(np.arange(n_) // step, core.shape[a] - 1) for a, n_ in enumerate(data.shape)]
    return core[np.ix_(*idx)]
