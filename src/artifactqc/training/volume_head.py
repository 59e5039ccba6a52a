"""Fitting the volume head (:class:`artifactqc.encoder.network.VolumeHead`) on the frozen encoder's
features of whole corrupted training volumes (:func:`fit_volume_head`).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..encoder.network import SCORE_SCALE, ArtifactEncoder, VolumeHead, pool_volume_features, resolve_device
from .validate import _pearson

log = logging.getLogger(__name__)


def _hidden(model: ArtifactEncoder, x: torch.Tensor, dev, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch].float().to(dev))["hidden"].float().cpu()
                          for i in range(0, len(x), batch)])


def fit_volume_head(
    model: ArtifactEncoder, entries: Sequence[dict], val_items: Sequence[dict], *, seed: int = 0,
    epochs: int = 400, lr: float = 3e-3, weight_decay: float = 1e-3, batch_size: int = 32, patience: int = 60,
    slices_per_axis: int = 8, max_seconds: float | None = None, device="cpu",
) -> dict:
    """Fit a :class:`VolumeHead` on the frozen encoder and attach it (``model.volume_head``).

    Training examples: every pool entry (:func:`make_pool_entry`) gives its clean volume (target score 0,
    severities 0) and its corrupted volume (target ``SCORE_SCALE * SS``, the simulator's per-head
    severities); the slices of each are reduced to :func:`pool_volume_features` of a random subset of up
    to ``slices_per_axis`` slices per orientation (the scorer's count). Loss per entry: squared error of
    both scores to their targets, the triplet term ``relu(S_clean - S_corrupt + SS)``, per-head BCE, and
    the latent decoder's squared error (the latent must carry score target and severities). Early stopping
    on the validation items' ``val_loss`` (as in :func:`train_encoder`: calibration MSE + heads BCE) with
    ``patience`` epochs; the best head is kept. Returns its metrics.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(seed + 613)
    torch.manual_seed(seed + 613)
    tr = []
    for e in entries:
        ax = torch.as_tensor(np.asarray(e["axis"]), dtype=torch.long)
        tr.append((_hidden(model, e["clean"], dev), _hidden(model, e["corrupt"], dev), ax, float(e["severity"]),
                   e["targets"].float()))
    if not tr:
        raise ValueError("no training entries for the volume head")
    from ..encoder.score import slice_axes

    va = []
    for it in val_items:
        axis = torch.from_numpy(slice_axes(len(it["slices"])))
        va.append((pool_volume_features(_hidden(model, it["slices"], dev), axis), float(it["severity"]),
                   it["targets"].float()))
    t_feat = time.perf_counter() - t0
    head = VolumeHead(3 * cfg.hidden, cfg.volume_hidden, cfg.n_heads, cfg.latent_dim)
    full = torch.stack([pool_volume_features(h, ax) for c, n, ax, _, _ in tr for h in (c, n)])
    head.feat_mean.copy_(full.mean(0))
    head.feat_std.copy_(full.std(0).clamp_min(1e-4))
    head = head.to(dev)
    vF = torch.stack([f for f, _, _ in va]).to(dev)
    vS = torch.tensor([s for _, s, _ in va], device=dev)
    vT = torch.stack([t for _, _, t in va]).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    k = int(slices_per_axis)

    def subset(h, ax):
        keep = []
        for a in range(3):
            idx = torch.nonzero(ax == a)[:, 0]
            if len(idx) > k:
                idx = idx[torch.randperm(len(idx), generator=gen)[:k]]
            keep.append(idx)
        keep = torch.cat(keep)
        return h[keep], ax[keep]

    def val_loss() -> tuple[float, float]:
        head.eval()
        with torch.no_grad():
            o = head(vF)
            calib = float(((o["score"] - SCORE_SCALE * vS) ** 2).mean())
            bce = float(F.binary_cross_entropy_with_logits(o["severity_logits"], vT))
        head.train()
        return calib + bce, _pearson(vS.cpu().numpy(), o["score"].cpu().numpy())

    best = {"val_loss": float("inf"), "epoch": 0}
    best_state = None
    bad = 0
    history = []
    head.train()
    epoch = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(tr), generator=gen).tolist()
        tot = 0.0
        for i in range(0, len(order), batch_size):
            fc, fn, ss, tg = [], [], [], []
            for j in order[i:i + batch_size]:
                c, n, ax, s_, t_ = tr[j]
                fc.append(pool_volume_features(*subset(c, ax)))
                fn.append(pool_volume_features(*subset(n, ax)))
                ss.append(s_)
                tg.append(t_)
            b = len(fc)
            o = head(torch.stack(fc + fn).to(dev))
            ss_t = torch.tensor(ss, device=dev)
            tg_t = torch.stack(tg).to(dev)
            sc, sn = o["score"][:b], o["score"][b:]
            target = torch.cat([torch.zeros(b, device=dev), SCORE_SCALE * ss_t])
            tgt_heads = torch.cat([torch.zeros_like(tg_t), tg_t])
            lat_t = torch.cat([target[:, None], tgt_heads], 1)
            loss = (((o["score"] - target) ** 2).mean()
                    + F.relu(sc - sn + SCORE_SCALE * ss_t / 2).mean()
                    + F.binary_cross_entropy_with_logits(o["severity_logits"], tgt_heads)
                    + 0.5 * F.mse_loss(o["latent_pred"], lat_t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * b
        vl, vr = val_loss()
        history.append({"epoch": epoch, "train_loss": tot / len(tr), "val_loss": vl, "val_pearson": vr})
        if vl < best["val_loss"] - 1e-4:
            best = {"val_loss": vl, "epoch": epoch, "val_pearson": vr}
            best_state = {k_: v.detach().clone() for k_, v in head.state_dict().items()}
            bad = 0
        else:
            bad += 1
            if bad >= patience:
                break
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    model.volume_head = head
    model.config.volume_head = True
    res = {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "best_val_pearson": best.get("val_pearson"),
           "epochs_run": epoch, "n_entries": len(tr), "n_val_items": len(va), "feature_seconds": t_feat,
           "seconds": time.perf_counter() - t0, "history": history}
    log.info("volume head: best epoch %d/%d, val loss %.4f, val r %.3f (%d entries, %.1f s)", best["epoch"], epoch,
             best["val_loss"], best.get("val_pearson") or float("nan"), len(tr), res["seconds"])
    return res
