"""Helpers shared by the artifact modules: foreground masks (3D and 2D), the 2D path's random draws and
per-sample axis handling, and JSON-safe parameter records.
"""

from __future__ import annotations

import numpy as np
import torch


def _fg(data: np.ndarray) -> np.ndarray:
    from ..io import foreground_mask

    m = foreground_mask(data)
    return m if m.sum() >= 10 else np.ones_like(m, dtype=bool)


def _encoding_axis(rng: np.random.Generator, spacing) -> int:
    """The axis a 3D artifact runs along (ghosting's and motion's phase-encode axis, anisotropy's slice axis),
    drawn with one ``rng.integers`` call: any of the three for a 3D acquisition; for a thick-slice (2D)
    acquisition (``spacing``, :func:`artifactqc.io.acquisition_axis`) one of its two in-plane axes.

    A 2D multi-slice scan has no phase encoding across its slices, so ghosts and motion segments run along an
    in-plane axis of every slice; and thicker slices along its already thick axis would not show on its
    acquisition planes, the planes it is graded on (``score.planes: acquisition``)."""
    from ..io import acquisition_axis

    thick = acquisition_axis(spacing)
    if thick is None:
        return int(rng.integers(0, 3))
    inplane = [a for a in range(3) if a != thick]
    return inplane[int(rng.integers(0, 2))]


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


def _rand(n, g, *shape):
    return torch.rand((n, *shape), generator=g, dtype=torch.float64)


def _randn(n, g, *shape):
    return torch.randn((n, *shape), generator=g, dtype=torch.float64)


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


def _fg_2d(x):
    m = x > 0.1
    few = m.sum(dim=(-2, -1), keepdim=True) < 10
    return m | few
