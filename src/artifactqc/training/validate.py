"""Validation during training: the fixed held-out set of 3D-corrupted volumes (:func:`_val_items`), exact
BatchNorm recalibration (:func:`_recalibrate_bn`) and the correlation helpers of the validation metrics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..encoder.network import HEADS, SCORE_SCALE
from ..encoder.slices import extract_from_array
from .config import TRAIN_ARTIFACTS
from .pool import _simulate_volume


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _recalibrate_bn(model: nn.Module, batches: list[torch.Tensor], dev) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``batches`` (mixed clean/corrupted
    slices, like training batches). Removes the epoch-to-epoch jitter of momentum-averaged statistics that
    made the eval-mode clean score jump between epochs."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return
    saved = [(m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x.to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


def _val_items(vols, cfg, severities, seed, sim_fn) -> list[dict]:
    """Fixed validation set on the inference path: each held-out volume clean and 3D-corrupted with every
    single artifact type at each of ``severities`` plus one mixture; slices with the scorer's geometry."""
    single = [a for a in TRAIN_ARTIFACTS if a != "mix"]
    rng = np.random.default_rng(seed + 7919)
    items = []
    sim = sim_fn or _simulate_volume
    for v in vols:
        aff = np.diag([*v.spacing, 1.0])
        s, _ = extract_from_array(v.data, aff, cfg)
        items.append({"volume": v.path, "artifact": "none", "severity": 0.0, "slices": torch.from_numpy(s[:, None]),
                      "targets": torch.zeros(len(HEADS))})
        jobs = [(a, float(sv)) for a in single for sv in severities] + [("mix", float(max(severities)))]
        for a, sv in jobs:
            corr, params = sim(v.data, a, sv, int(rng.integers(0, 2**31 - 1)), v.spacing)
            s, _ = extract_from_array(corr, aff, cfg)
            hs = params.get("head_severities", {})
            items.append({"volume": v.path, "artifact": a, "severity": sv, "slices": torch.from_numpy(s[:, None]),
                          "targets": torch.tensor([float(hs.get(h, 0.0)) for h in HEADS], dtype=torch.float32)})
    return items


def evaluate_model(net: nn.Module, pool, val_items: list[dict], *, batch_size: int, bn_batches: int, bn_seed: int,
                   dev, recalibrate: bool = True) -> dict:
    """Validation metrics of ``net`` on the fixed items: each item scored per volume like
    :func:`artifactqc.encoder.score.predict_volume`; ``val_loss`` = mean (score - 2 SS)^2 + mean BCE of the
    volume-level severities, plus Pearson r, Spearman per type, head accuracy at SS >= 0.5 and the clean
    scores. With ``recalibrate`` the BatchNorm statistics are first recomputed exactly over ``bn_batches``
    training batches of ``pool`` (fixed ``bn_seed``)."""
    from ..encoder.score import predict_volume

    if recalibrate:
        bgen = torch.Generator().manual_seed(bn_seed)
        batches = []
        for _ in range(int(bn_batches)):
            xa, xp, xn, xn2, _, _ = pool.sample(batch_size, bgen)
            batches.append(torch.cat([xa, xp, xn, xn2]))
        _recalibrate_bn(net, batches, dev)
    net.eval()
    rows = [predict_volume(net, it["slices"].numpy(), device=dev) for it in val_items]
    net.train()
    sc = np.array([r["score"] for r in rows])
    sv = np.array([[r[f"severity_{h}"] for h in HEADS] for r in rows])
    ss = np.array([it["severity"] for it in val_items])
    tg = np.stack([it["targets"].numpy() for it in val_items])
    arts = [it["artifact"] for it in val_items]
    calib = float(((sc - SCORE_SCALE * ss) ** 2).mean())
    p = np.clip(sv, 1e-6, 1 - 1e-6)
    heads = float(-(tg * np.log(p) + (1 - tg) * np.log(1 - p)).mean())
    per_type = {}
    for a in [a for a in TRAIN_ARTIFACTS if a != "mix"]:
        m = np.array([x in (a, "none") for x in arts])
        per_type[a] = _spearman(ss[m], sc[m])
    hi = np.array([x not in ("mix", "none") for x in arts]) & (ss >= 0.5)
    acc = float((sv[hi].argmax(1) == tg[hi].argmax(1)).mean()) if hi.any() else float("nan")
    clean = sc[np.array([x == "none" for x in arts])]
    near_half = np.abs(ss - 0.5) < 0.11
    return {
        "val_loss": calib + heads,
        "val_calib_mse": calib,
        "val_heads_bce": heads,
        "val_pearson": _pearson(ss, sc),
        "val_spearman_by_type": per_type,
        "val_head_acc_ss05": acc,
        "val_clean_score_mean": float(clean.mean()),
        "val_clean_score_sd": float(clean.std()),
        "val_score_at_0.5": float(sc[near_half].mean()) if near_half.any() else float("nan"),
    }
