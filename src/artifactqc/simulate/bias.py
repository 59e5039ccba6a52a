"""Bias field: a smooth polynomial multiplicative field scaled to a given std of its log inside the head
(the field of ``tio.BiasField``, 3D), and the batched 2D variant.
"""

from __future__ import annotations

import numpy as np
import torch

from .calibration import PARAM_NAMES
from .common import _fg, _fg_2d, _randn

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


_BIAS_TERMS_2D = _bias_terms(3, 2)


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
