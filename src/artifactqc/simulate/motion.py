"""Motion: rigid movements between k-space segments along the phase-encode axis, scaled to a given RMS
displacement (``tio.Motion`` with explicit segments and transforms, 3D), and the batched 2D model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import PARAM_NAMES
from .common import _by_axis, _encoding_axis, _fg, _fg_2d, _rand, _randn

_MOTION_MAX_DEG = 20.0  # safety caps on a single movement
_MOTION_MAX_MM = 20.0


def _euler_matrix(deg) -> np.ndarray:
    import SimpleITK as sitk

    t = sitk.Euler3DTransform()
    t.SetRotation(*np.radians(np.asarray(deg, dtype=np.float64)).tolist())
    return np.array(t.GetMatrix()).reshape(3, 3)


def _motion_segments(times: np.ndarray, n_lines: int) -> tuple[np.ndarray, int]:
    """Fraction of k-space lines per segment and the index of the segment holding the k-space centre.

    Mirrors ``tio.Motion``: segment j spans ``[times[j-1], times[j])``; the identity (reference) position is
    moved to the segment with the first time > 0.5, whose old position goes to segment 0.
    """
    idx = [int(v) for v in (n_lines * times).astype(int).tolist()] + [n_lines]
    bounds = [0] + idx
    frac = np.diff(bounds) / float(n_lines)
    centre = int(np.where(times > 0.5)[0].min()) if np.any(times > 0.5) else len(times)
    return frac, centre


def _motion_times(n_moves: int, u: np.ndarray) -> np.ndarray:
    """Segment boundaries: a central reference band of 4-20 % of k-space (the position at the time the
    k-space centre is acquired) and ``n_moves`` other positions filling the rest, as in a sequential
    phase-encode ordering with the subject moving before and after the centre lines."""
    w = 0.04 + 0.16 * u[0]
    lo, hi = 0.5 - w * (0.3 + 0.4 * u[1]), 0.5 + w * (0.7 - 0.4 * u[1])
    times = [lo, hi]
    if n_moves == 3:  # one more boundary, in the lower or the upper outer part
        times.append(0.05 + (lo - 0.05) * u[2] * 2 if u[2] < 0.5 else hi + (0.95 - hi) * (u[2] - 0.5) * 2)
    return np.sort(np.asarray(times, dtype=np.float64))


def _motion_3d(data, rms, rng, spacing):
    import torchio as tio

    n_moves = int(rng.integers(2, 4))
    pe_axis = _encoding_axis(rng, spacing)
    times = _motion_times(n_moves, rng.random(3))
    deg_dir = rng.standard_normal((n_moves, 3))
    mm_dir = rng.standard_normal((n_moves, 3))
    # transpose so that the phase-encode (segment) axis is last, as tio.Motion expects
    perm = [a for a in range(3) if a != pe_axis] + [pe_axis]
    vol = np.ascontiguousarray(np.transpose(data, perm))
    sp = np.asarray(spacing, dtype=np.float64)[perm]
    mask = _fg(vol)
    ijk = np.argwhere(mask)
    if len(ijk) > 20000:
        ijk = ijk[:: len(ijk) // 20000]
    q = (ijk - np.asarray(vol.shape) / 2.0) * sp
    q = q * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS, the frame of SimpleITK's Euler transform
    frac, centre = _motion_segments(times, vol.shape[2])
    # spectra order after tio's swap: segment 0 <- move (centre-1) if centre > 0; segment centre <- identity
    seg_of_move = {}
    for m in range(n_moves):  # move m is spectrum m+1, i.e. segment m+1 before the swap
        seg = m + 1
        if seg == centre:
            seg = 0
        seg_of_move[m] = seg

    def rms_of(alpha):
        tot = 0.0
        for m in range(n_moves):
            A = _euler_matrix(alpha * deg_dir[m]) - np.eye(3)
            d = q @ A.T + alpha * mm_dir[m]
            tot += frac[seg_of_move[m]] * float(np.mean(np.sum(d * d, axis=1)))
        return math.sqrt(tot)

    alpha = 1.0
    for _ in range(6):
        r = rms_of(alpha)
        if r <= 0:
            break
        alpha *= float(rms) / r
    cap = min(_MOTION_MAX_DEG / max(np.abs(deg_dir).max(), 1e-8), _MOTION_MAX_MM / max(np.abs(mm_dir).max(), 1e-8))
    alpha = min(alpha, cap)
    degrees = alpha * deg_dir
    translation = alpha * mm_dir
    affine = np.diag(list(sp) + [1.0])
    img = tio.ScalarImage(tensor=torch.from_numpy(vol)[None], affine=affine)
    tr = tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation="linear")
    out = tr(img).data.numpy()[0]
    out = np.ascontiguousarray(np.transpose(out, np.argsort(perm)), dtype=np.float32)
    params = {
        PARAM_NAMES["motion"]: float(rms),
        "achieved_rms_mm": rms_of(alpha),
        "phase_encode_axis": pe_axis,
        "num_moves": n_moves,
        "times": [float(t) for t in times],
        "degrees": degrees.round(6).tolist(),
        "translation_mm": translation.round(6).tolist(),
        "transform": "torchio.Motion (segments along the phase-encode axis, reference position at k-space centre)",
    }
    return out, params


_N_SEG = 4  # k-space segments per slice in the 2D motion model (one holds the reference position)


def _motion_lastdim(x, rms, times, theta_dir, t_dir):
    """k-space segment motion along the last (phase-encode) axis; segment containing the centre is reference."""
    b = x.shape[0]
    H, W = x.shape[-2:]
    L = W
    # segment index of every PE line (centred k-space order, as after fftshift)
    lines = (torch.arange(L, dtype=torch.float64) + 0.5) / L
    seg = (lines[None, :, None] >= times[:, None, :]).sum(-1)  # [B, L] in 0.._N_SEG-1
    bounds = torch.cat([torch.zeros(b, 1, dtype=torch.float64), times, torch.ones(b, 1, dtype=torch.float64)], 1)
    frac = bounds.diff(dim=1)  # [B, _N_SEG]
    centre_seg = seg[:, L // 2]
    moving = torch.ones(b, _N_SEG, dtype=torch.float64)
    moving[torch.arange(b), centre_seg] = 0.0
    # mask moments (pixel coordinates about the slice centre)
    m = _fg_2d(x)[:, 0].to(torch.float64)
    cy = torch.arange(H, dtype=torch.float64) - (H - 1) / 2.0
    cx = torch.arange(W, dtype=torch.float64) - (W - 1) / 2.0
    cnt = m.sum(dim=(1, 2))
    ey = (m * cy[:, None]).sum((1, 2)) / cnt
    ex = (m * cx[None, :]).sum((1, 2)) / cnt
    eyy = (m * (cy[:, None] ** 2)).sum((1, 2)) / cnt
    exx = (m * (cx[None, :] ** 2)).sum((1, 2)) / cnt
    exy = (m * (cy[:, None] * cx[None, :])).sum((1, 2)) / cnt

    def msd(alpha):  # [B] time-weighted mean squared displacement for scale alpha
        th = torch.deg2rad(alpha[:, None] * theta_dir) * moving  # [B, S]
        tx = alpha[:, None] * t_dir[..., 0] * moving
        ty = alpha[:, None] * t_dir[..., 1] * moving
        c, s = torch.cos(th) - 1.0, torch.sin(th)
        # displacement d = A q + t, A = [[c, -s], [s, c]] acting on q = (x, y)
        # E|Aq|^2 = (c^2 + s^2) E|q|^2 ; cross term 2 t.(A E[q])
        eq2 = (exx + eyy)[:, None]
        aqx = c * ex[:, None] - s * ey[:, None]
        aqy = s * ex[:, None] + c * ey[:, None]
        d2 = (c**2 + s**2) * eq2 + 2 * (tx * aqx + ty * aqy) + tx**2 + ty**2
        return (frac * d2).sum(1)

    alpha = torch.ones(b, dtype=torch.float64)
    for _ in range(6):
        r = msd(alpha).clamp_min(1e-12).sqrt()
        alpha = alpha * rms / r
    cap = torch.minimum(
        _MOTION_MAX_DEG / theta_dir.abs().amax(1).clamp_min(1e-8), _MOTION_MAX_MM / t_dir.abs().amax((1, 2)).clamp_min(1e-8)
    )
    alpha = torch.minimum(alpha, cap)
    th = torch.deg2rad(alpha[:, None] * theta_dir) * moving
    tx = alpha[:, None] * t_dir[..., 0] * moving
    ty = alpha[:, None] * t_dir[..., 1] * moving
    # affine_grid maps output normalised coords to input ones: theta = S^-1 [R | t] S, S = diag(W/2, H/2)
    c, s = torch.cos(th), torch.sin(th)
    theta = torch.zeros(b, _N_SEG, 2, 3, dtype=torch.float64)
    theta[..., 0, 0] = c
    theta[..., 0, 1] = -s * H / W
    theta[..., 1, 0] = s * W / H
    theta[..., 1, 1] = c
    theta[..., 0, 2] = tx * 2.0 / W
    theta[..., 1, 2] = ty * 2.0 / H
    # resample only the (sample, segment) pairs that moved and own k-space lines; the rest is x itself
    need = (moving > 0) & (frac > 0)
    bi, si = need.nonzero(as_tuple=True)
    moved = x.expand(b, _N_SEG, H, W).clone()
    if len(bi):
        grid = _affine_grid(theta[bi, si].to(x.dtype), H, W)
        moved[bi, si] = F.grid_sample(x[bi], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    # the segment masks depend only on the PE coordinate, so the readout FFT cancels: 1D FFTs along PE suffice;
    # segments are defined in centred k-space order, so shift the line labels instead of the spectra
    k = torch.fft.fft(moved, dim=-1)  # [B, S, H, L]
    seg_u = torch.fft.ifftshift(seg, dim=-1)  # segment of each line in FFT order
    kk = torch.gather(torch.view_as_real(k), 1, seg_u[:, None, None, :, None].expand(b, 1, H, L, 2))
    return torch.fft.ifft(torch.view_as_complex(kk.contiguous()), dim=-1).abs().to(x.dtype)


_BASE_GRIDS: dict = {}


def _affine_grid(theta: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Same as ``F.affine_grid(theta, [N, 1, H, W], align_corners=False)`` via one batched matmul."""
    key = (H, W, theta.dtype)
    if key not in _BASE_GRIDS:
        xs = (torch.arange(W, dtype=theta.dtype) * 2 + 1) / W - 1
        ys = (torch.arange(H, dtype=theta.dtype) * 2 + 1) / H - 1
        base = torch.stack([xs[None, :].expand(H, W), ys[:, None].expand(H, W), torch.ones(H, W, dtype=theta.dtype)], -1)
        _BASE_GRIDS[key] = base.reshape(1, H * W, 3)
    base = _BASE_GRIDS[key]
    return torch.matmul(base, theta.transpose(1, 2)).reshape(-1, H, W, 2)


def _motion_2d(x, rms, g):
    b = x.shape[0]
    n_moves = torch.randint(2, _N_SEG, (b,), generator=g)
    u = _rand(b, g, 3)
    # same timing model as 3D (_motion_times): central reference band of 4-20 % of k-space
    w = 0.04 + 0.16 * u[:, 0]
    lo = 0.5 - w * (0.3 + 0.4 * u[:, 1])
    hi = 0.5 + w * (0.7 - 0.4 * u[:, 1])
    extra = torch.where(u[:, 2] < 0.5, 0.05 + (lo - 0.05) * u[:, 2] * 2, hi + (0.95 - hi) * (u[:, 2] - 0.5) * 2)
    extra = torch.where(n_moves == 3, extra, torch.ones_like(extra))  # unused: empty last segment
    times = torch.stack([lo, hi, extra], 1).sort(dim=1).values
    theta_dir = _randn(b, g, _N_SEG)
    t_dir = _randn(b, g, _N_SEG, 2)
    axis_last = _rand(b, g) < 0.5
    return _by_axis(_motion_lastdim, x, axis_last, rms, times, theta_dir, t_dir)
