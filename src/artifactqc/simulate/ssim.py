"""SSIM (Gaussian window, Wang et al. 2004 constants) of volumes inside a head mask, and of slice batches:
the fidelity measure the severity scale is calibrated on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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

    from ..io import foreground_mask

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
