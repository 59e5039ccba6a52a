"""Ghosting: periodic k-space line modulation along the phase-encode axis (TorchIO's deterministic
``tio.Ghosting`` with explicitly drawn parameters, 3D), and the batched 2D variant.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .calibration import PARAM_NAMES
from .common import _by_axis, _encoding_axis, _rand

_GHOST_MAX_INTENSITY = 1.5  # cap of TorchIO's ghosting intensity (every n-th line scaled by 1 - intensity)
_GHOST_MAX_N = 4  # number of ghosts drawn from 2.._GHOST_MAX_N
_GHOST_RESTORE = None  # TorchIO restore: None = only the central k-space plane is kept


def _ghosting_3d(data, amp, rng, spacing):
    import torchio as tio

    n = int(rng.integers(2, _GHOST_MAX_N + 1))
    axis = _encoding_axis(rng, spacing)
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
