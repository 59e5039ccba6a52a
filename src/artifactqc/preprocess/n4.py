"""N4 bias-field correction of training volumes: ANTs N4 (``ants.n4_bias_field_correction``) inside a head
mask, on an ANTs image whose spacing, origin and direction come from the NIfTI affine (converted RAS → LPS as
ITK does), so the B-spline control-point distance is in millimetres (:func:`n4`, :func:`n4_file`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .. import io as aq_io

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _spacing_from(affine_or_spacing) -> tuple[np.ndarray, np.ndarray]:
    """(spacing, 4x4 affine) from either an affine or a 3-vector of spacings."""
    a = np.asarray(affine_or_spacing, dtype=np.float64)
    if a.shape == (4, 4):
        return aq_io.voxel_sizes(a), a
    if a.shape == (3,):
        return a.copy(), np.diag([*a, 1.0])
    raise ValueError(f"expected a 4x4 affine or 3 spacings, got shape {a.shape}")


def _ants_image(data: np.ndarray, affine: np.ndarray):
    """An ANTs image with the spacing, origin and direction of a NIfTI affine (RAS → LPS)."""
    import ants

    spacing = aq_io.voxel_sizes(affine)
    direction_ras = affine[:3, :3] / spacing[None, :]
    direction = _RAS_TO_LPS @ direction_ras
    origin = _RAS_TO_LPS @ affine[:3, 3]
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(v) for v in origin),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (maximises the between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def head_mask(data: np.ndarray, method: str = "foreground") -> np.ndarray:
    """A filled head mask: ``io.foreground_mask`` (default) or an Otsu threshold, then hole filling
    and the largest connected component."""
    data = np.asarray(data, dtype=np.float32)
    if method == "otsu":
        pos = data[data > 0]
        mask = data > otsu_threshold(pos) if pos.size else np.zeros(data.shape, bool)
    elif method == "foreground":
        mask = aq_io.foreground_mask(data)
    else:
        raise ValueError(f"unknown mask method {method!r} (foreground or otsu)")
    if not mask.any():
        return mask
    mask = ndimage.binary_closing(mask, iterations=2)
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)




@dataclass
class N4Params:
    """N4 settings (the ``preprocess.n4`` block of the workflow config)."""

    shrink_factor: int = 4
    iters: tuple[int, ...] = (50, 50, 50, 50)
    tol: float = 1e-7
    spline_distance_mm: float = 200.0
    mask: str = "foreground"  # foreground | otsu | none


def n4(
    data: np.ndarray,
    affine_or_spacing,
    mask: np.ndarray | None = None,
    shrink_factor: int = 4,
    iters=(50, 50, 50, 50),
    tol: float = 1e-7,
    spline_distance_mm: float = 200.0,
    mask_method: str = "foreground",
) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction. Returns ``(corrected, bias_field)`` (float32, same shape).

    ``corrected = data / bias_field`` inside and outside the mask (the field is smooth everywhere).
    ``mask`` defaults to :func:`head_mask` with ``mask_method`` (``"none"`` = whole volume).
    ``spline_distance_mm`` is the B-spline control-point spacing in millimetres.
    """
    import ants

    data = np.asarray(data, dtype=np.float32)
    _, affine = _spacing_from(affine_or_spacing)
    if mask is None and mask_method != "none":
        mask = head_mask(data, method=mask_method)
    # N4 works on log intensities: keep the data positive where it is estimated
    floor = float(np.percentile(data[data > 0], 1)) * 1e-3 if np.any(data > 0) else 1e-3
    work = np.maximum(data, floor)
    img = _ants_image(work, affine)
    kw = dict(
        shrink_factor=int(shrink_factor),
        convergence={"iters": [int(i) for i in iters], "tol": float(tol)},
        spline_param=float(spline_distance_mm),
        return_bias_field=True,
    )
    if mask is not None:
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
        if not mask.any():
            raise ValueError("head mask is empty")
        kw["mask"] = _ants_image(mask.astype(np.float32), affine)
    bias = ants.n4_bias_field_correction(img, **kw).numpy().astype(np.float32)
    bias = np.where(np.isfinite(bias) & (bias > 0), bias, 1.0).astype(np.float32)
    corrected = (data / bias).astype(np.float32)
    return corrected, bias


def n4_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    bias_path: str | os.PathLike | None = None,
    max_mem_mb: float = 4096.0,
    **params,
) -> dict:
    """N4-correct one NIfTI file, keeping its header, affine and intensity units; optionally write the
    bias field.

    N4's field has an arbitrary global scale; it is divided by its geometric mean inside the head mask
    (``bias_scale`` in the summary), so the corrected image stays in the input's units. The output is
    float32 (``scl_slope`` 1). Returns a summary of every parameter, the bias range and the time.
    """
    import nibabel as nib

    t0 = time.perf_counter()
    vol = aq_io.load_volume(in_path, max_mem_mb=max_mem_mb)
    header = nib.load(str(in_path)).header.copy()
    header.set_data_dtype(np.float32)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    corrected, bias = n4(vol.data, vol.affine, **params)
    mask = head_mask(vol.data, method=params.get("mask_method", "foreground")) \
        if params.get("mask_method", "foreground") != "none" else np.ones(bias.shape, bool)
    g = float(np.exp(np.mean(np.log(bias[mask])))) if mask.any() else 1.0
    bias, corrected = (bias / g).astype(np.float32), (corrected * g).astype(np.float32)
    aq_io.save_like(corrected, vol.affine, out_path, header=header)
    if bias_path:
        aq_io.save_like(bias, vol.affine, bias_path, header=header)
    return {
        "input": str(in_path),
        "output": str(out_path),
        "bias_path": str(bias_path) if bias_path else None,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "bias_scale": g,
        "bias_min": float(bias.min()),
        "bias_max": float(bias.max()),
        "input_range": [float(vol.data.min()), float(vol.data.max())],
        "output_range": [float(corrected.min()), float(corrected.max())],
        "seconds": round(time.perf_counter() - t0, 2),
    }
