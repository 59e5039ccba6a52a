"""Training items on the inference path: one corrupted item of a clean training volume
(:func:`make_pool_entry`) and the refreshed pool of them that batches are drawn from (:class:`_Pool`).

Training data follow the inference path exactly: a training volume (canonical, scaled, optionally augmented:
contrast, skull-stripped look, coarser grid) is corrupted in 3D at its native resolution by
``simulate.simulate_volume`` (random type incl. ``mix``, SS ~ U(0,1)), and the slices of the clean and of the
corrupted volume are extracted with :func:`artifactqc.encoder.slices.extract_from_array` (the scorer's code:
percentile normalisation *after* corruption, 1.5 mm trilinear sampling). A pool of such corrupted volumes is
refreshed every epoch. (Session 1 trained on clean slices corrupted by the 2D simulator and barely responded
to 3D-simulated volumes scored through the real path: mean score ≈ 0.1 at SS 0.5.)
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..encoder.network import HEADS
from ..io import acquisition_axis
from ..encoder.slices import SliceConfig, extract_from_array, fov_grid
from .augment import _augment_volume
from .config import POOL_ARTIFACTS, THICK_ARTIFACTS
from .volumes import _CleanVolume, _usable

#: The finer pixels of ``zoom_augment`` items, as fractions of the model's pixel (1.2, 0.96 and 0.8 mm for
#: 1.5 mm), over the same field of view: a few levels, so that batches (one image size each,
#: :meth:`_Pool.sample`) are drawn from many items.
ZOOM_PIXEL_FRACTIONS = (0.8, 0.64, 0.53)


def _simulate(x, arts, sev, gen):
    from .. import simulate

    return simulate.simulate_slices(x, arts, sev, generator=gen, return_targets=True)


def _simulate_volume(data, artifact, severity, seed, spacing, match_ssim: bool = False):
    from .. import simulate

    return simulate.simulate_volume(data, artifact, severity, seed=seed, spacing=spacing, match_ssim=match_ssim)


def make_pool_entry(
    v: _CleanVolume, artifact: str, severity: float, seed: int, cfg: SliceConfig, sim_fn=None,
    contrast: float = 0.5, mask: float = 0.25, resample: float = 0.3, thick: float = 0.0, zoom: float = 0.0,
    synth: float = 0.0, dtype=torch.float16,
) -> dict:
    """One training item on the inference path: augment the clean volume, corrupt it in 3D at its native
    resolution (``simulate.simulate_volume``), and extract the slices of the clean and of the corrupted
    volume with :func:`artifactqc.encoder.slices.extract_from_array` (the scorer's code: percentile normalisation
    *after* corruption, then 1.5 mm sampling). With probability ``zoom`` the slices are sampled at one of
    :data:`ZOOM_PIXEL_FRACTIONS` of its pixel over the same field of view instead (more, finer pixels). With
    probability ``synth`` the clean volume is a label-map synthesis (:func:`_augment_volume`).

    Returns a dict with ``clean``/``corrupt`` slices ``[N,1,S,S]`` (``dtype``), ``axis`` [N],
    ``severity``, ``targets`` [5] (per-head severities, :data:`HEADS` order) and ``artifact``.
    """
    rng = np.random.default_rng(seed)
    data, spacing, aug = _augment_volume(v, rng, contrast, mask, resample, thick, synth)
    artifact = _graded_artifact(artifact, aug, rng)
    sim = sim_fn or _simulate_volume
    corrupted, params = sim(data, artifact, float(severity), int(rng.integers(0, 2**31 - 1)), spacing)
    if zoom > 0 and rng.random() < zoom:  # no draw without zoom: the other items stay as they were
        pixel, size = fov_grid(cfg, cfg.pixel_mm * float(rng.choice(ZOOM_PIXEL_FRACTIONS)))
        cfg = dataclasses.replace(cfg, pixel_mm=pixel, image_size=size)
        aug += f"+zoom{pixel:.2f}mm"
    aff = np.diag([*spacing, 1.0])
    clean_s, _ = extract_from_array(data, aff, cfg)
    corr_s, _ = extract_from_array(corrupted, aff, cfg)
    axes = np.repeat(np.arange(3), cfg.slices_per_axis)
    keep = _keep_slices(_usable(clean_s), axes, spacing)
    return _entry(clean_s, corr_s, axes, keep, severity, params, artifact, aug, v.path, dtype)


def _graded_artifact(artifact: str, augment: str, rng: np.random.Generator) -> str:
    """The artifact a training item simulates: an item made a thick-slice acquisition by the augmentation
    (``augment``, the description of :func:`_augment_volume`) draws one of :data:`THICK_ARTIFACTS` instead of
    ``anisotropy``: anisotropy along its slice axis does not show on its acquisition planes, which are what it
    is graded on (:func:`_keep_slices`). Any other item keeps ``artifact``."""
    if artifact == "anisotropy" and "thick" in augment:
        return str(rng.choice(THICK_ARTIFACTS))
    return artifact


def _keep_slices(usable: np.ndarray, axes: np.ndarray, spacing=None) -> np.ndarray:
    """The slices an entry keeps: the usable ones, or all when fewer than 2 in two orientations are usable.

    A thick-slice volume (``spacing``, :func:`artifactqc.io.acquisition_axis`) keeps only the
    slices parallel to its acquisition planes, the ones the scorer grades it on (the usable ones, or all of
    them when fewer than 2 are usable): its other orientations show the protocol's slice thickness, which is
    not an artifact and not what its score is made of.
    """
    inplane = None if spacing is None else acquisition_axis(spacing)
    if inplane is not None:
        plane = axes == inplane
        return plane & usable if (plane & usable).sum() >= 2 else plane
    if usable.sum() < 2 or len(np.unique(axes[usable])) < 2:
        return np.ones(len(usable), dtype=bool)
    return usable


def _entry(clean_s, corr_s, axes, keep, severity, params, artifact, aug, path, dtype=torch.float16) -> dict:
    """The pool item of :func:`make_pool_entry` from extracted clean and corrupted slices."""
    hs = params.get("head_severities", {})
    return {
        "clean": torch.from_numpy(clean_s[keep][:, None]).to(dtype),
        "corrupt": torch.from_numpy(corr_s[keep][:, None]).to(dtype),
        "axis": axes[keep],
        "severity": float(severity),
        "targets": torch.tensor([float(hs.get(h, 0.0)) for h in HEADS], dtype=torch.float32),
        "artifact": artifact,
        "augment": aug,
        "volume": path,
    }


class _Pool:
    """Fixed-capacity FIFO of :func:`make_pool_entry` items, refilled round-robin over the training volumes
    with artifact types in rounds of :data:`POOL_ARTIFACTS` and U(0,1) severities; every entry has its own
    deterministic seed."""

    def __init__(self, vols, cfg, capacity, seed, sim_fn, aug):
        self.vols, self.cfg, self.capacity = vols, cfg, max(1, int(capacity))
        self.rng = np.random.default_rng(seed + 104729)
        self.sim_fn, self.aug = sim_fn, aug
        self.entries: list[dict] = []
        self.made = 0
        self.sim_seconds = 0.0
        self._order: list[int] = []
        self._arts: list[str] = []

    def _next_draw(self):
        """The next training volume, artifact type, severity and simulator seed of the round-robin."""
        if not self._order:
            self._order = list(self.rng.permutation(len(self.vols)))
        if not self._arts:
            self._arts = [str(a) for a in self.rng.permutation(list(POOL_ARTIFACTS))]
        v = self.vols[self._order.pop()]
        art = self._arts.pop()
        sev = float(self.rng.uniform(0.0, 1.0))
        seed = int(self.rng.integers(0, 2**31 - 1))
        return v, art, sev, seed

    def _append(self, *entries: dict) -> None:
        """New entries in, the oldest out beyond the capacity."""
        self.entries.extend(entries)
        while len(self.entries) > self.capacity:
            self.entries.pop(0)
        self.made += len(entries)

    def add_one(self) -> int:
        """One new corrupted volume; returns the number of entries added (1)."""
        t0 = time.perf_counter()
        v, art, sev, seed = self._next_draw()
        self._append(make_pool_entry(v, art, sev, seed, self.cfg, self.sim_fn, **self.aug))
        self.sim_seconds += time.perf_counter() - t0
        return 1

    def fill(self, n: int, seconds: float | None = None) -> int:
        """Add at least ``n`` entries (or stop after ``seconds``); returns the number added."""
        t0 = time.perf_counter()
        k = 0
        while k < n and (seconds is None or time.perf_counter() - t0 < seconds):
            k += self.add_one()
        return k

    def _draw_entries(self, n: int, gen: torch.Generator) -> list[int]:
        """``n`` entry indices of one batch, uniform over the pool; when its entries have several image sizes
        (``zoom``), the first is uniform and the others are drawn among the entries of its size."""
        sizes = [e["clean"].shape[-1] for e in self.entries]
        if len(set(sizes)) == 1:
            return torch.randint(0, len(self.entries), (n,), generator=gen).tolist()
        first = int(torch.randint(0, len(self.entries), (1,), generator=gen))
        same = [i for i, s in enumerate(sizes) if s == sizes[first]]
        return [first] + [same[k] for k in torch.randint(0, len(same), (n - 1,), generator=gen).tolist()]

    def sample(self, b: int, gen: torch.Generator, group: int = 1):
        """Triplets: anchor = clean slice j of an entry, negative n = the same plane of the corrupted volume,
        positive p / second negative n2 = clean / corrupted slice of another orientation of the same entry
        (same artifact level, different anatomy).

        ``group`` > 1: ``b // group`` entries, each giving ``group`` consecutive triplets (distinct planes
        ``j`` while the entry has enough), for the group-level loss of :func:`encoder_loss`.
        """
        g = max(1, int(group))
        if g == 1:
            ei = self._draw_entries(b, gen)
            js = [None] * b
        else:
            ng = max(1, b // g)
            eg = self._draw_entries(ng, gen)
            ei, js = [], []
            for e_i in eg:
                n = len(self.entries[e_i]["axis"])
                perm = torch.randperm(n, generator=gen).tolist()
                while len(perm) < g:
                    perm += torch.randperm(n, generator=gen).tolist()
                ei += [e_i] * g
                js += perm[:g]
        xa, xp, xn, xn2, sev, tgt = [], [], [], [], [], []
        for e_i, j in zip(ei, js):
            e = self.entries[e_i]
            n = len(e["axis"])
            if j is None:
                j = int(torch.randint(0, n, (1,), generator=gen))
            others = np.nonzero(e["axis"] != e["axis"][j])[0]
            pool = others if len(others) else np.arange(n)
            j2 = int(pool[int(torch.randint(0, len(pool), (1,), generator=gen))])
            xa.append(e["clean"][j])
            xn.append(e["corrupt"][j])
            xp.append(e["clean"][j2])
            xn2.append(e["corrupt"][j2])
            sev.append(e["severity"])
            tgt.append(e["targets"])
        st = lambda xs: torch.stack(xs).float()  # noqa: E731
        return st(xa), st(xp), st(xn), st(xn2), torch.tensor(sev, dtype=torch.float32), torch.stack(tgt)
