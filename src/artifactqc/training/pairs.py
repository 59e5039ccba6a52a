"""Paired training items: the same anatomy seen twice, so that per-volume offsets cancel in the loss.

Two kinds of pair (both off by default; :class:`~artifactqc.training.config.TrainConfig` ``render_pairs`` /
``rank_pairs``), made in the pool refresh by :class:`_PairPool` and drawn into every batch by
:meth:`_PairPool.sample_pairs`; their losses are :func:`artifactqc.training.losses.consistency_loss` and
:func:`artifactqc.training.losses.ranking_loss`:

* **twins** (:func:`make_twin_entries`): one clean training volume (after the usual skull-stripped-look and
  resampling augmentation, no other contrast change) is re-rendered twice with random intensities per tissue
  class (:func:`artifactqc.training.tissues.render_tissues`: T1w-, T2w-, FLAIR-, PD-like orderings), and the *same* artifact (type,
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

The rendering and its known limits: :mod:`artifactqc.training.tissues`.

Both members of a pair are ordinary pool entries as well (triplet, calibration and head terms, the volume
head's fit); the pair only adds the paired loss. A pair counts as two entries of ``pool_refresh``, so the
pool refresh makes about as many simulations as without pairs; the pair's extra cost is the rendering and
the lost diversity (two entries share one anatomy), reported in ``model.json`` (``training.pairs``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..encoder.slices import extract_from_array
from .augment import _augment_volume
from .pool import _entry, _graded_artifact, _keep_slices, _Pool, _simulate_volume
from .tissues import TissueRenderer
from .volumes import _CleanVolume, _usable

#: Smallest gap between two severities of a ranking pair.
RANK_MIN_GAP = 0.15


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
