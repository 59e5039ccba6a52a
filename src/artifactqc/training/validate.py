"""Validation during training: the fixed held-out set of 3D-corrupted volumes (:func:`_val_items`), exact
BatchNorm recalibration (:func:`_recalibrate_bn`) and the correlation helpers of the validation metrics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..encoder.network import HEADS
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
