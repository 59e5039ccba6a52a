"""Anisotropy: contiguous thick slices along one axis with a Gaussian slice profile
(:func:`thick_slices_lastdim`, continuous in the thickness factor, identity at 1), in 3D and 2D.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .calibration import PARAM_NAMES
from .common import _by_axis, _encoding_axis, _rand


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


def _anisotropy_3d(data, factor, rng, spacing):
    axis = _encoding_axis(rng, spacing)
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


def _anisotropy_2d(x, factor, g):
    b = x.shape[0]
    axis_last = _rand(b, g) < 0.5
    L = torch.where(axis_last, x.shape[-1], x.shape[-2]).to(torch.float64)
    anchor = torch.floor(_rand(b, g) * L)  # a slice centre falls on this pixel: identity as factor -> 1
    offset = anchor - torch.floor(anchor / factor) * factor  # slice spacing = thickness (fractional)
    return _by_axis(thick_slices_lastdim, x, axis_last, factor, offset)
