"""Self-supervised super-resolution of a thick-slice (2D-acquired) training volume, in the spirit of SMORE /
ECLARE (Zhao et al. 2020; Remedios et al. 2023) but written from scratch here:

1. the *through-plane* axis is the one with the largest spacing; the output grid is isotropic at
   the smallest in-plane spacing;
2. training pairs come from the volume's own in-plane slices, which are high-resolution in both
   directions: each is blurred along one in-plane direction with the slice profile (Gaussian with
   FWHM = slice thickness, or a rect of that width), decimated to the through-plane spacing and
   brought back with cubic B-spline interpolation; a small 2D residual CNN learns to undo that;
3. the volume is cubic-interpolated along the through-plane axis to the fine grid and the network
   is applied to both orthogonal through-plane views; the two predictions are averaged.

Everything is deterministic for a given ``seed``; ``device="auto"`` picks CUDA when available and
the CPU otherwise. Nothing is pickled: an optional per-volume model is written with safetensors.
Also: the image-quality metrics the super-resolution benchmark reports (:func:`psnr`, :func:`ssim`).
"""

from __future__ import annotations
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
import numpy as np
from scipy import ndimage
from .. import io as aq_io

log = logging.getLogger(__name__)


def needs_superres(zooms, ratio: float = 1.5) -> bool:
    """True when the largest voxel spacing exceeds the smallest by more than ``ratio``."""
    z = np.asarray(zooms, dtype=np.float64)[:3]
    return bool(z.max() > ratio * z.min())


def slice_profile(fwhm: float, kind: str = "gaussian") -> np.ndarray:
    """A normalised 1D slice profile on the fine grid (unit = fine voxels).

    ``gaussian``: FWHM = ``fwhm``; ``rect``: a box of width ``fwhm`` (fractional edges weighted).
    """
    if fwhm <= 1.0:
        return np.ones(1, dtype=np.float64)
    if kind == "gaussian":
        sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        half = int(math.ceil(4 * sigma))
        x = np.arange(-half, half + 1, dtype=np.float64)
        k = np.exp(-0.5 * (x / sigma) ** 2)
    elif kind == "rect":
        half = int(math.ceil(fwhm / 2))
        x = np.arange(-half, half + 1, dtype=np.float64)
        # overlap of [x-0.5, x+0.5] with [-fwhm/2, fwhm/2]
        k = np.clip(np.minimum(x + 0.5, fwhm / 2) - np.maximum(x - 0.5, -fwhm / 2), 0, None)
    else:
        raise ValueError(f"unknown slice profile {kind!r} (gaussian or rect)")
    return k / k.sum()


def blur_axis(data: np.ndarray, fwhm: float, axis: int, kind: str = "gaussian") -> np.ndarray:
    """Convolve ``data`` along ``axis`` with the slice profile (FWHM in voxels)."""
    k = slice_profile(fwhm, kind)
    if k.size == 1:
        return np.asarray(data, dtype=np.float32)
    return ndimage.convolve1d(np.asarray(data, dtype=np.float32), k, axis=axis, mode="nearest")


def resample_axis(data: np.ndarray, positions: np.ndarray, axis: int, order: int = 3) -> np.ndarray:
    """Sample ``data`` at fractional index ``positions`` along ``axis`` (B-spline of ``order``).

    The other axes are untouched. ``order=3`` is the cubic B-spline interpolation of
    ``scipy.ndimage`` (as in ``ndimage.zoom(order=3)``) evaluated at exact positions.
    """
    data = np.asarray(data, dtype=np.float32)
    moved = np.moveaxis(data, axis, 0)
    n = moved.shape[0]
    positions = np.asarray(positions, dtype=np.float64)
    if order > 1:
        coeffs = ndimage.spline_filter1d(moved, order=order, axis=0, mode="mirror", output=np.float64)
    else:
        coeffs = moved.astype(np.float64)
    # 1D B-spline evaluation along axis 0, vectorised over the other axes
    out = np.empty((positions.size,) + moved.shape[1:], dtype=np.float32)
    flat = coeffs.reshape(n, -1)
    for i, p in enumerate(positions):
        out[i] = _spline_weights_apply(flat, p, order, n).reshape(moved.shape[1:])
    return np.moveaxis(out, 0, axis)


def _bspline(x: np.ndarray, order: int) -> np.ndarray:
    ax = np.abs(x)
    if order == 3:
        return np.where(
            ax < 1, 2 / 3 - ax**2 + ax**3 / 2, np.where(ax < 2, (2 - ax) ** 3 / 6, 0.0)
        )
    if order == 1:
        return np.clip(1 - ax, 0, None)
    if order == 0:
        return (ax < 0.5).astype(np.float64)
    raise ValueError("order must be 0, 1 or 3")


def _mirror_index(i: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


def _spline_weights_apply(flat: np.ndarray, p: float, order: int, n: int) -> np.ndarray:
    p = float(np.clip(p, 0, n - 1))
    base = int(math.floor(p))
    half = (order + 1) // 2 + 1
    idx = np.arange(base - half + 1, base + half + 1)
    w = _bspline(p - idx, order)
    keep = w != 0
    idx, w = _mirror_index(idx[keep], n), w[keep]
    return np.tensordot(w, flat[idx], axes=(0, 0))


def degrade_axis(
    data: np.ndarray, factor: float, axis: int, profile: str = "gaussian", offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate thick slices along ``axis``: blur with the slice profile (FWHM = ``factor`` fine
    voxels), then sample at ``offset + k*factor``. Returns ``(low_res, positions)``."""
    n = data.shape[axis]
    blurred = blur_axis(data, factor, axis, profile)
    m = int(math.floor((n - 1 - offset) / factor)) + 1
    pos = offset + factor * np.arange(m)
    return resample_axis(blurred, pos, axis, order=3), pos


def upsample_axis(low: np.ndarray, factor: float, axis: int, n_out: int | None = None) -> np.ndarray:
    """Cubic B-spline interpolation of thick slices (at fine positions ``k*factor``) back onto the
    fine grid ``0..n_out-1``."""
    m = low.shape[axis]
    if n_out is None:
        n_out = int(math.floor((m - 1) * factor + 1e-6)) + 1
    return resample_axis(low, np.arange(n_out) / factor, axis, order=3)




@dataclass
class SRParams:
    """Super-resolution settings (the ``preprocess.superres`` block of the workflow config)."""

    iterations: int = 600
    patch_size: int = 32
    batch_size: int = 16
    channels: int = 32
    n_layers: int = 6
    lr: float = 1e-3
    profile: str = "gaussian"  # gaussian | rect
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    infer_batch: int = 16


def pick_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; other values are passed through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_network(channels: int = 48, n_layers: int = 8):
    """A small 2D residual CNN: conv-ReLU stack whose output is added to its input."""
    import torch
    from torch import nn

    class ResidualCNN(nn.Module):
        def __init__(self, channels: int, n_layers: int):
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(inplace=True)]
            for _ in range(n_layers - 2):
                layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
            layers.append(nn.Conv2d(channels, 1, 3, padding=1))
            self.body = nn.Sequential(*layers)
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    return ResidualCNN(channels, n_layers)


def _training_images(
    vol: np.ndarray, t_axis: int, factor: float, profile: str, min_fg: float = 0.05
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(degraded, target) 2D image pairs from the in-plane slices; the degraded direction is
    always axis 0 of each image."""
    planes = np.moveaxis(vol, t_axis, 0)  # (n_t, a, b): each planes[k] is an in-plane slice
    thr = 0.1 * float(np.percentile(planes[planes > 0], 98)) if np.any(planes > 0) else 0.0
    xs, ys = [], []
    for img in planes:
        if (img > thr).mean() < min_fg:
            continue
        for im in (img, img.T):  # degrade along in-plane axis a, then along b
            low, _ = degrade_axis(im, factor, 0, profile)
            up = upsample_axis(low, factor, 0, n_out=im.shape[0])
            xs.append(up.astype(np.float32))
            ys.append(np.ascontiguousarray(im, dtype=np.float32))
    return xs, ys


def _sample_batch(xs, ys, rng: np.random.Generator, batch: int, patch: int):
    bx = np.zeros((batch, 1, patch, patch), np.float32)
    by = np.zeros_like(bx)
    for i in range(batch):
        j = int(rng.integers(len(xs)))
        x, y = xs[j], ys[j]
        h, w = x.shape
        ph, pw = min(patch, h), min(patch, w)
        for _ in range(10):  # prefer patches with some signal
            r0 = int(rng.integers(h - ph + 1))
            c0 = int(rng.integers(w - pw + 1))
            py = y[r0 : r0 + ph, c0 : c0 + pw]
            if (py > 0.05).mean() > 0.2:
                break
        px = x[r0 : r0 + ph, c0 : c0 + pw]
        if rng.random() < 0.5:  # flips that keep the degraded direction on axis 0
            px, py = px[::-1], py[::-1]
        if rng.random() < 0.5:
            px, py = px[:, ::-1], py[:, ::-1]
        bx[i, 0, :ph, :pw] = px
        by[i, 0, :ph, :pw] = py
    return bx, by


@dataclass
class SRResult:
    """What :func:`superres` did (for logs and the benchmark)."""

    through_axis: int
    factor: float
    spacing_in: tuple[float, float, float]
    spacing_out: float
    train_seconds: float = 0.0
    apply_seconds: float = 0.0
    final_loss: float = float("nan")
    device: str = "cpu"
    params: dict = field(default_factory=dict)


def train_sr_network(
    xs: list[np.ndarray], ys: list[np.ndarray], params: SRParams, device: str
):
    """Train the residual CNN on (degraded, target) pairs; returns ``(model, final_loss)``."""
    import torch

    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    model = build_network(params.channels, params.n_layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=params.lr, total_steps=max(params.iterations, 1), pct_start=0.1
    )
    model.train()
    ema = float("nan")
    for it in range(params.iterations):
        bx, by = _sample_batch(xs, ys, rng, params.batch_size, params.patch_size)
        x = torch.from_numpy(bx).to(device)
        y = torch.from_numpy(by).to(device)
        loss = torch.nn.functional.l1_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        v = float(loss.detach())
        ema = v if not np.isfinite(ema) else 0.98 * ema + 0.02 * v
        if (it + 1) % max(1, params.iterations // 5) == 0:
            log.info("superres: iteration %d/%d, L1 %.5f", it + 1, params.iterations, ema)
    model.eval()
    return model, ema


def _apply_planes(model, vol: np.ndarray, device: str, batch: int) -> np.ndarray:
    """Run the 2D network over ``vol[i]`` for every i (images with the degraded direction on axis 0)."""
    import torch

    out = np.empty_like(vol, dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, vol.shape[0], batch):
            x = torch.from_numpy(np.ascontiguousarray(vol[s : s + batch, None], dtype=np.float32))
            out[s : s + batch] = model(x.to(device)).cpu().numpy()[:, 0]
    return out


def superres(
    data: np.ndarray,
    affine: np.ndarray,
    params: SRParams | None = None,
    model_path: str | os.PathLike | None = None,
    **overrides,
) -> tuple[np.ndarray, np.ndarray, SRResult]:
    """Self-supervised super-resolution of a thick-slice volume.

    Returns ``(data_sr, new_affine, info)``: ``data_sr`` lies on an isotropic grid at the smallest
    in-plane spacing (through-plane axis super-resolved by the network, an anisotropic in-plane
    axis, if any, by cubic interpolation); ``new_affine`` keeps the first voxel centre and
    direction cosines. Intensities keep the input's scale. ``overrides`` set :class:`SRParams`
    fields. With ``model_path`` the trained weights are saved with safetensors.
    """
    import torch

    params = params or SRParams()
    for k, v in overrides.items():
        if not hasattr(params, k):
            raise TypeError(f"unknown superres parameter {k!r}")
        setattr(params, k, v)
    if params.threads:
        torch.set_num_threads(int(params.threads))
    device = pick_device(params.device)
    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    zooms = aq_io.voxel_sizes(affine)
    t = int(np.argmax(zooms))
    inplane = [a for a in range(3) if a != t]
    s_out = float(min(zooms[a] for a in inplane))
    factor = float(zooms[t] / s_out)
    info = SRResult(t, factor, tuple(float(z) for z in zooms), s_out, device=device, params=asdict(params))

    # in-plane axes to s_out first (no-op for the usual square in-plane pixels)
    vol = data
    scale = np.ones(3)
    for a in inplane:
        if abs(zooms[a] - s_out) > 1e-3 * s_out:
            f = zooms[a] / s_out
            vol = upsample_axis(vol, f, a)
            scale[a] = 1.0 / f

    # robust intensity scale so that the network sees values ~[0, 1]
    pos = vol[vol > 0]
    norm = float(np.percentile(pos, 99.5)) if pos.size else 1.0
    norm = norm if norm > 0 else 1.0
    vol_n = vol / norm

    t0 = time.perf_counter()
    xs, ys = _training_images(vol_n, t, factor, params.profile)
    if not xs:
        raise ValueError("superres: no in-plane slice with enough foreground to learn from")
    model, final_loss = train_sr_network(xs, ys, params, device)
    info.train_seconds = time.perf_counter() - t0
    info.final_loss = float(final_loss)
    if model_path:
        from safetensors.torch import save_file

        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {k: str(v) for k, v in asdict(params).items()}
        meta.update(factor=str(factor), through_axis=str(t))
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(model_path), metadata=meta)

    t1 = time.perf_counter()
    up = upsample_axis(vol_n, factor, t)  # cubic to the fine grid along t
    up_t = np.moveaxis(up, t, 0)  # (t, a, b)
    # view 1: planes (t, b) for each a; view 2: planes (t, a) for each b
    v1 = np.transpose(up_t, (1, 0, 2))  # (a, t, b)
    p1 = np.transpose(_apply_planes(model, v1, device, params.infer_batch), (1, 0, 2))
    v2 = np.transpose(up_t, (2, 0, 1))  # (b, t, a)
    p2 = np.transpose(_apply_planes(model, v2, device, params.infer_batch), (1, 2, 0))
    sr = 0.5 * (p1 + p2)
    sr = np.moveaxis(sr, 0, t) * norm
    if data.min() >= 0:
        sr = np.maximum(sr, 0)
    info.apply_seconds = time.perf_counter() - t1
    scale[t] = 1.0 / factor
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale[None, :]
    return sr.astype(np.float32), new_affine, info


def superres_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    ratio: float = 1.5,
    model_path: str | os.PathLike | None = None,
    max_mem_mb: float = 4096.0,
    **params,
) -> dict:
    """Super-resolve one NIfTI file when :func:`needs_superres` says so; otherwise copy its data
    unchanged (same affine), so a rule can run on every training volume. Returns a summary dict."""
    import nibabel as nib

    t0 = time.perf_counter()
    vol = aq_io.load_volume(in_path, max_mem_mb=max_mem_mb)
    header = nib.load(str(in_path)).header.copy()
    zooms = aq_io.voxel_sizes(vol.affine)
    summary = {"in": str(in_path), "out": str(out_path), "zooms_in": [round(float(z), 4) for z in zooms]}
    if not needs_superres(zooms, ratio):
        aq_io.save_like(vol.data, vol.affine, out_path, header=header)
        summary.update(superresolved=False, seconds=round(time.perf_counter() - t0, 2))
        return summary
    header.set_data_dtype(np.float32)
    sr, new_affine, info = superres(vol.data, vol.affine, model_path=model_path, **params)
    header.set_data_shape(sr.shape)
    header.set_zooms(tuple(float(v) for v in aq_io.voxel_sizes(new_affine)))
    aq_io.save_like(sr, new_affine, out_path, header=header)
    summary.update(
        superresolved=True,
        through_axis=info.through_axis,
        factor=round(info.factor, 4),
        shape_out=list(sr.shape),
        train_seconds=round(info.train_seconds, 2),
        apply_seconds=round(info.apply_seconds, 2),
        final_loss=info.final_loss,
        device=info.device,
        seconds=round(time.perf_counter() - t0, 2),
    )
    return summary




def psnr(ref: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None, peak: float | None = None) -> float:
    """PSNR (dB) of ``test`` against ``ref`` inside ``mask``; peak = max of ``ref`` in the mask."""
    ref = np.asarray(ref, np.float64)
    test = np.asarray(test, np.float64)
    m = np.ones(ref.shape, bool) if mask is None else mask
    mse = float(np.mean((ref[m] - test[m]) ** 2))
    peak = float(ref[m].max()) if peak is None else peak
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(
    ref: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None, sigma: float = 1.5,
    data_range: float | None = None,
) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window ``sigma``, K1=0.01, K2=0.03) inside ``mask``."""
    x = np.asarray(ref, np.float64)
    y = np.asarray(test, np.float64)
    m = np.ones(x.shape, bool) if mask is None else mask
    L = float(x[m].max() - x[m].min()) if data_range is None else data_range
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    g = lambda a: ndimage.gaussian_filter(a, sigma, truncate=3.5)  # noqa: E731
    mx, my = g(x), g(y)
    vx = g(x * x) - mx * mx
    vy = g(y * y) - my * my
    cxy = g(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[m].mean())
