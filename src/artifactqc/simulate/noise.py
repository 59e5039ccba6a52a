"""Noise: Rician / coloured k-space / Gaussian noise of a given sigma (3D), and the batched 2D variant."""

from __future__ import annotations

import math

import numpy as np
import torch

from .calibration import PARAM_NAMES
from .common import _rand


#: Noise variants of the 3D path: magnitude of complex Gaussian noise (Rician), the same seen through a
#: Hamming reconstruction filter (``kspace``), or additive real Gaussian noise (may go negative).
NOISE_VARIANTS = ("rician", "kspace", "gaussian")


def _noise_3d(data, sigma, rng, spacing, variant: str | None = None):
    drawn = str(rng.choice(list(NOISE_VARIANTS)))  # always drawn: the random stream is the same either way
    if variant is not None and variant not in NOISE_VARIANTS:
        raise ValueError(f"unknown noise variant {variant!r} (one of {NOISE_VARIANTS})")
    variant = variant or drawn
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
