"""Paired training items: the same anatomy seen twice, so that per-volume offsets cancel in the loss.

Two kinds of pair (both off by default; :class:`~artifactqc.training.config.TrainConfig` ``render_pairs`` /
``rank_pairs``), made in the pool refresh by :class:`_PairPool` and drawn into every batch by
:meth:`_PairPool.sample_pairs`; their losses are :func:`artifactqc.training.losses.consistency_loss` and
:func:`artifactqc.training.losses.ranking_loss`:

* **twins** (:func:`make_twin_entries`): one clean training volume (after the usual skull-stripped-look and
  resampling augmentation, no other contrast change) is re-rendered twice with random intensities per tissue
  class (:func:`render_tissues`: T1w-, T2w-, FLAIR-, PD-like orderings), and the *same* artifact (type,
  severity, simulator seed) is applied to both renderings. The two renderings of one plane must then get the
  same score and head outputs, corrupted and clean alike: what differs between them is only contrast, which
  a site, a scanner or a sequence changes without changing the image's quality. The simulator's physical
  parameters agree between the renderings up to its normalisation over the head mask (bias field std,
  motion rms: < 0.5 % measured); with ``match_ssim`` each rendering is matched to the severity's SSIM
  separately (the same severity label by that definition, the physical parameters may differ more).
* **ranking pairs** (:func:`make_rank_entries`): one augmented clean volume, the same artifact type and
  simulator seed at two severities ``s_lo < s_hi`` (the simulator gives the same random draws at every
  severity). On the same planes the more corrupted one must score higher by a margin proportional to
  ``s_hi - s_lo``: a per-volume offset (an anatomy or a site that scores high when clean) cancels.

Known limits of the rendering (intensity classes, not a segmentation): a tissue whose intensity drifts
across the volume (an uncorrected bias field: N4 first helps) can span two classes and then renders as
patches of two intensities; a volume whose classes all overlap (a broad T2w histogram) merges into one class,
and its renderings differ only in overall contrast and texture scale.

Both members of a pair are ordinary pool entries as well (triplet, calibration and head terms, the volume
head's fit); the pair only adds the paired loss. A pair counts as two entries of ``pool_refresh``, so the
pool refresh makes about as many simulations as without pairs; the pair's extra cost is the rendering and
the lost diversity (two entries share one anatomy), reported in ``model.json`` (``training.pairs``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..encoder.slices import extract_from_array, scale_for_simulation, subsample_step
from .augment import _augment_volume
from .pool import _entry, _graded_artifact, _keep_slices, _Pool, _simulate_volume
from .volumes import _CleanVolume, _usable

#: Foreground threshold of the scaled volumes (as :func:`artifactqc.training.augment._tissue_remap`): below it
#: the background keeps its intensities, above it the tissue is re-rendered.
FOREGROUND = 0.08

#: Neighbouring intensity classes closer than this many (summed) standard deviations are one tissue that
#: k-means cut in two (a lone Gaussian peak split in two halves gives about 1.3): they are merged, otherwise
#: the rendering would give one tissue two different intensities and amplify its noise.
MERGE_RATIO = 1.5

#: Smallest gap between two severities of a ranking pair.
RANK_MIN_GAP = 0.15


def tissue_classes(data: np.ndarray, k: int = 4, max_samples: int = 20_000) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """Intensity classes of the head: 1D k-means (scikit-learn, ``k`` clusters, initialised at foreground
    quantiles so it is deterministic) on a regular subsample of the voxels above :data:`FOREGROUND`.

    Returns ``(means, sds, weights)`` sorted by mean (at most ``k`` classes: neighbours closer than
    :data:`MERGE_RATIO` are merged). On a T1w head the classes are roughly CSF/dark
    background tissue, GM, WM and bright fat/vessels; they need not be anatomical tissues, only groups of
    similar intensity whose ordering the rendering changes.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    step = subsample_step(data.size, 8 * max_samples)
    fgv = data[::step, ::step, ::step]
    fgv = fgv[fgv > FOREGROUND].astype(np.float64)
    if fgv.size > max_samples:
        fgv = fgv[:: int(np.ceil(fgv.size / max_samples))]
    if fgv.size < 10 * k:
        raise ValueError(f"too few foreground voxels ({fgv.size}) for {k} tissue classes")
    init = np.percentile(fgv, (np.arange(k) + 0.5) / k * 100.0)[:, None]
    init = init + np.arange(k)[:, None] * 1e-6  # distinct centres
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=50).fit(fgv[:, None])
    lab = km.labels_
    centres = km.cluster_centers_[:, 0]
    order = np.argsort(centres)
    means = list(centres[order])
    sds = [float(fgv[lab == i].std()) if (lab == i).sum() > 1 else 0.0 for i in order]
    weights = [float((lab == i).mean()) for i in order]
    while len(means) > 1:  # merge neighbours that split one tissue (k-means cuts a lone peak in two)
        ratio = [(means[i + 1] - means[i]) / max(sds[i] + sds[i + 1], 1e-9) for i in range(len(means) - 1)]
        i = int(np.argmin(ratio))
        if ratio[i] >= MERGE_RATIO:
            break
        w = weights[i] + weights[i + 1]
        mu = (weights[i] * means[i] + weights[i + 1] * means[i + 1]) / max(w, 1e-12)
        var = sum(weights[j] * (sds[j] ** 2 + (means[j] - mu) ** 2) for j in (i, i + 1)) / max(w, 1e-12)
        means[i:i + 2], sds[i:i + 2], weights[i:i + 2] = [mu], [float(np.sqrt(var))], [w]
    return np.array(means), np.array(sds), np.array(weights)


def median3(data: np.ndarray) -> np.ndarray:
    """Separable median of 3 along each axis in turn: removes most voxel noise but keeps step edges where they
    are (a median never blurs a step), at a fraction of a 3×3×3 median's cost (min/max only)."""
    out = np.asarray(data, dtype=np.float32)
    for ax in range(out.ndim):
        pad = np.pad(out, [(1, 1) if i == ax else (0, 0) for i in range(out.ndim)], mode="edge")
        sl = lambda a, b: pad[tuple(slice(a, pad.shape[i] - b) if i == ax else slice(None)  # noqa: E731
                                    for i in range(out.ndim))]
        x0, x1, x2 = sl(0, 2), sl(1, 1), sl(2, 0)
        out = np.maximum(np.minimum(x0, x1), np.minimum(np.maximum(x0, x1), x2))
    return out


def render_tissues(data: np.ndarray, rng: np.random.Generator, k: int = 4, texture: tuple[float, float] = (0.6, 1.4),
                   max_slope: float = 3.0) -> tuple[np.ndarray, str]:
    """Re-render a scaled volume with a random intensity per tissue class (:class:`TissueRenderer`; several
    renderings of one volume should share one renderer). Returns ``(data, description)``."""
    return TissueRenderer(data, k).render(rng, texture, max_slope)


class TissueRenderer:
    """Random re-renderings of one scaled volume with a new intensity per tissue class.

    Classes (:func:`tissue_classes`, ``k`` at most) and memberships come from the edge-preserving
    :func:`median3` of the volume, so that voxel noise does not flip a voxel between classes; the texture
    comes from the volume itself. In :meth:`render` every class ``c`` (mean ``mu_c``) gets a random new mean
    ``nu_c``, drawn independently, so any ordering occurs: a T1w's CSF < GM < WM can become T2w-like
    CSF > GM > WM, FLAIR-like GM > WM > CSF or a flat PD-like contrast (the new means are stretched to span a
    random ``[0.1-0.3, 0.8-1.0]`` so the contrast never collapses), and keeps its texture scaled by a random
    ``a_c`` in ``texture``: a voxel of intensity ``x`` in class ``c`` becomes ``nu_c + a_c (x - mu_c)``.
    Memberships are 1 within a class's core (``mu_c ± 2 sd_c`` of the smoothed intensity, at most 30 % of the
    way to a neighbouring class) and blend linearly between two cores: a partial-volume voxel stays the same
    mix of its tissues in the new contrast. Air (voxels at or below :data:`FOREGROUND`) keeps its value and is
    the darkest "class" of that blend (identity map). A blend steeper than ``max_slope`` (per unit of smoothed
    intensity) moves the next class's new mean instead, so that no map amplifies residual noise into a noise
    artifact. Geometry and head mask stay. The result is rescaled like every training volume
    (:func:`scale_for_simulation`).

    Cost: the median, the k-means and the voxels' position between the knots once per volume, then a few
    array passes per rendering.
    """

    def __init__(self, data: np.ndarray, k: int = 4):
        self.data = np.asarray(data, dtype=np.float32)
        sm = median3(self.data)
        self.means, self.sds, _ = tissue_classes(sm, k)
        m, s = self.means, self.sds
        gaps = np.diff(m)
        left = np.minimum(2.0 * s, 0.3 * np.r_[m[0] - FOREGROUND, gaps])
        right = np.minimum(2.0 * s, 0.3 * np.r_[gaps, np.inf])
        top = max(float(sm.max()), float(m[-1] + right[-1]) + 0.05, 1.5)
        # knots in the smoothed intensity: air, then each class's core [mu - left, mu + right], then the top
        kx = np.r_[FOREGROUND, np.ravel(np.c_[m - left, m + right]), top]
        self.kx = np.maximum.accumulate(kx + np.arange(len(kx)) * 1e-6)  # strictly increasing knots
        self.fg = self.data > FOREGROUND
        xs = np.clip(sm[self.fg], self.kx[0], self.kx[-1])
        i = np.clip(np.searchsorted(self.kx, xs, side="right") - 1, 0, len(self.kx) - 2)
        self.i = i.astype(np.int32)
        self.t = ((xs - self.kx[i]) / (self.kx[i + 1] - self.kx[i])).astype(np.float32)
        self.x = self.data[self.fg]

    def _at(self, values: np.ndarray) -> np.ndarray:
        """A knot function (linear between knots) at every foreground voxel's smoothed intensity."""
        v = values.astype(np.float32)
        return v[self.i] + self.t * (v[self.i + 1] - v[self.i])

    def render(self, rng: np.random.Generator, texture: tuple[float, float] = (0.6, 1.4),
               max_slope: float = 3.0) -> tuple[np.ndarray, str]:
        """One random rendering (see the class docstring). Returns ``(data, description)``."""
        k = len(self.means)
        nu = rng.uniform(0.0, 1.0, size=k)
        lo, hi = rng.uniform(0.1, 0.3), rng.uniform(0.8, 1.0)
        nu = lo + (nu - nu.min()) / max(nu.max() - nu.min(), 1e-6) * (hi - lo) if k > 1 else np.array([hi])
        a = rng.uniform(*texture, size=k)
        kn = [FOREGROUND]  # new mean at the knots; a blend steeper than max_slope moves the next class's mean
        for c in range(k):
            lim = max_slope * max(self.kx[1 + 2 * c] - self.kx[2 * c], 1e-6)
            kn += [kn[-1] + float(np.clip(nu[c] - kn[-1], -lim, lim))] * 2
        kn.append(kn[-1])
        ka = np.r_[1.0, np.repeat(a, 2), a[-1]]
        km = np.r_[FOREGROUND, np.repeat(self.means, 2), self.means[-1]]
        y = self._at(np.array(kn)) + self._at(ka) * (self.x - self._at(km))
        out = self.data.copy()
        out[self.fg] = np.maximum(y, FOREGROUND + 1e-3)  # tissue stays tissue: the head mask is kept
        return scale_for_simulation(out), "render" + "-".join(f"{v:.2f}" for v in nu)


def _extract(data, spacing, cfg):
    s, _ = extract_from_array(data, np.diag([*spacing, 1.0]), cfg)
    return s


def make_twin_entries(v: _CleanVolume, artifact: str, severity: float, seed: int, cfg, sim_fn=None,
                      mask: float = 0.25, resample: float = 0.3, k: int = 4, dtype=torch.float16):
    """Two pool entries of one anatomy in two random renderings (:func:`render_tissues`) with the same artifact
    (type, severity and simulator seed) and the same kept planes. Returns ``(entry_a, entry_b, info)``;
    ``info`` holds both simulators' params and the rendering seconds."""
    rng = np.random.default_rng(seed)
    data, spacing, aug = _augment_volume(v, rng, 0.0, mask, resample)  # contrast comes from the renderings
    sim_seed = int(rng.integers(0, 2**31 - 1))
    t0 = time.perf_counter()
    renderer = TissueRenderer(data, k)
    renders = [renderer.render(rng) for _ in range(2)]
    t_render = time.perf_counter() - t0
    sim = sim_fn or _simulate_volume
    axes = np.repeat(np.arange(3), cfg.slices_per_axis)
    cleans, corrs, params = [], [], []
    for r, _ in renders:
        corrupted, p = sim(r, artifact, float(severity), sim_seed, spacing)
        cleans.append(_extract(r, spacing, cfg))
        corrs.append(_extract(corrupted, spacing, cfg))
        params.append(p)
    keep = _keep_slices(_usable(cleans[0]) & _usable(cleans[1]), axes)
    entries = [_entry(c, n, axes, keep, severity, p, artifact, f"{aug}+{d}", v.path, dtype)
               for c, n, p, (_, d) in zip(cleans, corrs, params, renders)]
    return entries[0], entries[1], {"params": params, "render_seconds": t_render, "sim_seed": sim_seed}


def make_rank_entries(v: _CleanVolume, artifact: str, severities: tuple[float, float], seed: int, cfg, sim_fn=None,
                      contrast: float = 0.5, mask: float = 0.25, resample: float = 0.3, thick: float = 0.0,
                      dtype=torch.float16):
    """Two pool entries of one augmented clean volume (``thick``: see :func:`make_pool_entry`) with the same
    artifact type and simulator seed at two severities (lower first), sharing the clean slices and the kept
    planes. Returns ``(entry_lo, entry_hi, info)``."""
    rng = np.random.default_rng(seed)
    data, spacing, aug = _augment_volume(v, rng, contrast, mask, resample, thick)
    artifact = _graded_artifact(artifact, aug, rng)
    sim_seed = int(rng.integers(0, 2**31 - 1))
    sim = sim_fn or _simulate_volume
    axes = np.repeat(np.arange(3), cfg.slices_per_axis)
    clean_s = _extract(data, spacing, cfg)
    keep = _keep_slices(_usable(clean_s), axes, spacing)
    entries, params = [], []
    for s in sorted(float(x) for x in severities):
        corrupted, p = sim(data, artifact, s, sim_seed, spacing)
        entries.append(_entry(clean_s, _extract(corrupted, spacing, cfg), axes, keep, s, p, artifact, aug, v.path,
                              dtype))
        params.append(p)
    return entries[0], entries[1], {"params": params, "sim_seed": sim_seed}


class _PairPool(_Pool):
    """The training pool with paired entries: of every new item, ``render_pairs`` (fraction) are twins and
    ``rank_pairs`` ranking pairs (drawn from their own random stream, so the rest of the pool's draws keep
    the round-robin of :class:`_Pool`); both members of a pair are pool entries, and the pair is kept in
    :attr:`pairs` while both are in the pool."""

    def __init__(self, vols, cfg, capacity, seed, sim_fn, aug, render_pairs: float = 0.0, rank_pairs: float = 0.0):
        super().__init__(vols, cfg, capacity, seed, sim_fn, aug)
        self.render_pairs, self.rank_pairs = float(render_pairs), float(rank_pairs)
        self.kind_rng = np.random.default_rng(seed + 7919)
        self.pairs: list[tuple[str, dict, dict]] = []
        self.stats = {"single": [0, 0.0], "twin": [0, 0.0], "rank": [0, 0.0], "render_seconds": 0.0}

    def add_one(self) -> int:
        u = float(self.kind_rng.random())
        kind = "twin" if u < self.render_pairs else "rank" if u < self.render_pairs + self.rank_pairs else "single"
        if kind == "single":
            t0 = time.perf_counter()
            n = super().add_one()
            self._count("single", 1, time.perf_counter() - t0)
            return n
        t0 = time.perf_counter()
        v, art, sev, seed = self._next_draw()
        if kind == "twin":
            ea, eb, info = make_twin_entries(v, art, sev, seed, self.cfg, self.sim_fn, mask=self.aug["mask"],
                                             resample=self.aug["resample"])
            self.stats["render_seconds"] += info["render_seconds"]
        else:
            lo = sev * (1.0 - RANK_MIN_GAP)  # sev ~ U(0,1) -> lo ~ U(0, 1 - gap), hi ~ U(lo + gap, 1)
            hi = float(self.kind_rng.uniform(lo + RANK_MIN_GAP, 1.0))
            ea, eb, _ = make_rank_entries(v, art, (lo, hi), seed, self.cfg, self.sim_fn, **self.aug)
        self._append(ea, eb)
        self.pairs.append((kind, ea, eb))
        live = {id(e) for e in self.entries}
        self.pairs = [p for p in self.pairs if id(p[1]) in live and id(p[2]) in live]
        dt = time.perf_counter() - t0
        self.sim_seconds += dt
        self._count(kind, 2, dt)
        return 2

    def _count(self, kind: str, n: int, seconds: float) -> None:
        self.stats[kind][0] += n
        self.stats[kind][1] += seconds

    def summary(self) -> dict:
        """Entries made per kind and their seconds per entry (the pairs' cost against single entries)."""
        out = {}
        for kind in ("single", "twin", "rank"):
            n, sec = self.stats[kind]
            out[kind] = {"entries": n, "seconds": round(sec, 2), "seconds_per_entry": round(sec / n, 3) if n else None}
        out["render_seconds"] = round(self.stats["render_seconds"], 2)
        out["pairs_in_pool"] = {k: sum(p[0] == k for p in self.pairs) for k in ("twin", "rank")}
        return out

    def sample_pairs(self, kind: str, n_planes: int, planes: int, gen: torch.Generator):
        """``n_planes // planes`` pairs of ``kind`` (at least one), ``planes`` distinct planes of each (the
        same planes in both members). Returns ``(x, sev)``: for twins ``x`` = [corrupt A, corrupt B, clean A,
        clean B] and for ranking pairs [corrupt lo, corrupt hi], each ``[n_pairs * planes, 1, S, S]``
        (pair-major), the members' severities ``sev`` ``[n_pairs, 2]`` and per-head targets ``[n_pairs, 2, 5]``;
        ``None`` when the pool holds no such pair."""
        cand = [p for p in self.pairs if p[0] == kind]
        if not cand:
            return None
        n_pairs = max(1, int(n_planes) // max(1, int(planes)))
        idx = torch.randint(0, len(cand), (n_pairs,), generator=gen).tolist()
        parts: list[list[torch.Tensor]] = [[], [], [], []] if kind == "twin" else [[], []]
        sev, tgt = [], []
        for i in idx:
            _, ea, eb = cand[i]
            n = len(ea["axis"])
            perm = torch.randperm(n, generator=gen).tolist()
            while len(perm) < planes:
                perm += torch.randperm(n, generator=gen).tolist()
            js = torch.tensor(perm[:planes])
            srcs = ((ea["corrupt"], eb["corrupt"], ea["clean"], eb["clean"]) if kind == "twin"
                    else (ea["corrupt"], eb["corrupt"]))
            for lst, src in zip(parts, srcs):
                lst.append(src[js])
            sev.append((ea["severity"], eb["severity"]))
            tgt.append(torch.stack([ea["targets"], eb["targets"]]))
        x = [torch.cat(lst).float() for lst in parts]
        return x, torch.tensor(sev, dtype=torch.float32), torch.stack(tgt)


def sample_pair_blocks(pool, batch_size: int, gen: torch.Generator, cfg) -> list[dict]:
    """The paired part of one batch: for each enabled kind, ``pair_batch * batch_size`` planes in pairs of
    ``pair_planes`` (:meth:`_PairPool.sample_pairs`). Empty for a pool without pairs (the default path draws
    nothing from ``gen``)."""
    if not isinstance(pool, _PairPool):
        return []
    n_planes = max(int(cfg.pair_planes), int(round(cfg.pair_batch * batch_size)))
    blocks = []
    for kind, frac in (("twin", cfg.render_pairs), ("rank", cfg.rank_pairs)):
        if frac <= 0:
            continue
        got = pool.sample_pairs(kind, n_planes, int(cfg.pair_planes), gen)
        if got is not None:
            blocks.append({"kind": kind, "x": got[0], "sev": got[1], "tgt": got[2]})
    return blocks


def pair_losses(out: dict, offset: int, blocks: list[dict], cfg, planes: int) -> tuple[torch.Tensor, dict]:
    """The weighted paired losses of ``blocks`` whose outputs follow row ``offset`` of the batch output
    ``out`` (in the order of :func:`sample_pair_blocks`). Returns ``(weighted sum, {name: value})``."""
    from .losses import consistency_loss, head_ranking_loss, ranking_loss

    total = out["score"].new_zeros(())
    parts = {}
    i = offset
    for blk in blocks:
        n = blk["x"][0].shape[0]
        o = [{k: v[i + j * n:i + (j + 1) * n] for k, v in out.items()} for j in range(len(blk["x"]))]
        i += n * len(blk["x"])
        if blk["kind"] == "twin":
            a = {k: torch.cat([o[0][k], o[2][k]]) for k in ("score", "severity_logits")}
            b = {k: torch.cat([o[1][k], o[3][k]]) for k in ("score", "severity_logits")}
            val = consistency_loss(a, b)
            total = total + float(cfg.consistency) * val
            parts["consistency"] = float(val.detach())
        else:
            sev = blk["sev"].to(out["score"].device)
            val = ranking_loss(o[0]["score"], o[1]["score"], sev[:, 0], sev[:, 1], planes, float(cfg.rank_margin))
            total = total + float(cfg.rank) * val
            parts["rank"] = float(val.detach())
            if cfg.rank_heads > 0:
                tgt = blk["tgt"].to(out["score"].device)
                val = head_ranking_loss(o[0]["severity_logits"], o[1]["severity_logits"], tgt[:, 0], tgt[:, 1],
                                        planes, float(cfg.rank_margin))
                total = total + float(cfg.rank_heads) * val
                parts["rank_heads"] = float(val.detach())
    return total, parts
