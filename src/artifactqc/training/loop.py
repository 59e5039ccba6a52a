"""The training run: :func:`train_encoder` (split, load, simulate, train, validate, keep the best weights,
fit the volume head, save) and the CLI/workflow entry point :func:`train_from_cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..encoder.checkpoint import save_model
from ..encoder.network import HEADS, SCORE_SCALE, ArtifactEncoder, EncoderConfig, resolve_device
from ..encoder.slices import SliceConfig
from ..io import sha256_file
from ..progress import Progress, track
from .augment import _apply_contrast, _contrast_augment
from .config import TRAIN_ARTIFACTS, demo_config
from .losses import encoder_loss
from .pool import _Pool, _simulate, _simulate_volume
from .validate import _pearson, _recalibrate_bn, _spearman, _val_items
from .volume_head import fit_volume_head
from .volumes import TrainingVolumeError, _err, _load_clean_volume

log = logging.getLogger(__name__)


def train_encoder(
    volumes: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    epochs: int = 40,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
    patience: int = 8,
    image_size: int = 128,
    pixel_mm: float = 1.5,
    steps_per_epoch: int = 40,
    train_slices_per_axis: int = 12,
    val_severities: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    threads: int | None = 2,
    max_minutes: float | None = None,
    pool_size: int = 240,
    pool_init_per_volume: int = 2,
    sim_time_fraction: float = 0.45,
    pool_refresh: int | None = None,
    contrast_augment: float = 0.6,
    mask_augment: float = 0.3,
    resample_augment: float = 0.5,
    slice_sim_fraction: float = 0.0,
    slice_group: int = 1,
    bn_recalib_batches: int = 6,
    ema_decay: float | None = 0.995,
    volume_head: bool = True,
    weight_decay: float = 1e-4,
    match_ssim: bool = False,
    encoder: dict | None = None,
    model_id: str | None = None,
    manifest: str | os.PathLike | None = None,
    val_volumes: Sequence[str | os.PathLike] | None = None,
    simulate_fn=None,
    simulate_slices_fn=None,
    val_slices: int | None = None,
) -> dict:
    """Train the encoder on the inference path; write ``encoder.safetensors`` + ``model.json`` to ``out_dir``.

    Training data (see :func:`make_pool_entry`): every training volume is loaded once (canonical, normalised).
    A pool of at most ``pool_size`` corrupted volumes is built with the 3D simulator at native resolution
    (random type incl. ``"mix"``, severity U(0,1), deterministic seeds; ``pool_init_per_volume`` per volume
    first) and their slices are extracted with the scorer's code, so normalisation happens after corruption
    exactly as at scoring. After every epoch the pool is refreshed (oldest out) for ``sim_time_fraction`` of
    the wall time (e.g. 0.45: 45 % simulating, 55 % training). Volume augmentations before the simulation:
    ``contrast_augment`` (tissue remapping or gamma/inversion), ``mask_augment`` (skull-stripped look),
    ``resample_augment`` (random 1.0–1.7 mm grid); see :func:`_augment_volume`. ``slice_sim_fraction`` > 0
    replaces that fraction of each batch's negatives with the cheap 2D simulator on the clean slices (off by
    default). ``slice_group`` > 1 draws each batch as groups of
    that many triplets from one corrupted volume and puts the severity terms of the loss on the group means
    (see :func:`encoder_loss`); the batch is rounded down to a multiple of it.

    Validation (held-out whole volumes: ``val_fraction`` of them chosen with ``seed``, or ``val_volumes``):
    the volumes are corrupted once in 3D (every single type at ``val_severities`` plus a mixture, own seed),
    scored per volume like :func:`artifactqc.encoder.score.score_volume` (trimmed mean of the slice outputs: the
    volume head is fitted afterwards), and ``val_loss`` = mean (score - 2 SS)^2 + mean BCE of the volume-level severities. With ``ema_decay`` the
    validated, kept and saved weights are an exponential moving average of the trained ones (per step).
    With ``volume_head`` (default) :func:`fit_volume_head` runs on the best weights and the final pool at the
    end (``max_minutes`` keeps up to 90 s for it). BatchNorm statistics are
    recomputed exactly before each validation (``bn_recalib_batches`` training batches). Early stopping on
    ``val_loss`` with ``patience``; ``max_minutes`` caps the whole run. Broken or too-small training files
    are skipped with a warning (recorded in ``model.json``). ``simulate_fn(data, artifact, severity, seed,
    spacing) -> (array, params)`` overrides the 3D simulator and ``simulate_slices_fn`` the 2D one (tests).
    ``match_ssim`` makes the 3D simulator match every training and validation sample's masked SSIM to its
    severity (``simulate_volume(match_ssim=True)``: the severity label is then that sample's measured loss
    of fidelity, not the type-mean calibration's expectation; 2-3 simulations per sample).
    ``val_slices`` is accepted for backwards compatibility and ignored. Returns the metrics dict.
    """
    from ..encoder.score import predict_volume

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover
        pass
    dev = resolve_device(device)
    group = max(1, int(slice_group))
    if group > 1 and slice_sim_fraction > 0:
        raise ValueError("slice_group > 1 cannot be combined with slice_sim_fraction > 0 (2D-simulated negatives "
                         "have per-slice severities)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if max_minutes is None else t_start + 60.0 * float(max_minutes)

    vols = [str(v) for v in volumes]
    if val_volumes is not None:
        val_set = [str(v) for v in val_volumes]
        train_set = [v for v in vols if v not in set(val_set)]
    else:
        order = rng.permutation(len(vols))
        n_val = max(1, int(round(val_fraction * len(vols)))) if len(vols) > 1 else 0
        val_set = sorted(vols[i] for i in order[:n_val])
        train_set = sorted(vols[i] for i in order[n_val:])
    if not train_set or not val_set:
        raise ValueError(f"need at least one training and one validation volume (got {len(vols)} volumes)")

    slice_cfg = SliceConfig(image_size=image_size, pixel_mm=pixel_mm)  # scoring geometry (stored in model.json)
    train_cfg = SliceConfig(image_size=image_size, pixel_mm=pixel_mm, slices_per_axis=int(train_slices_per_axis))

    def load(paths, with_brain):
        used, skipped = [], []
        for p in track(paths, desc="load", unit="volume"):
            try:
                used.append(_load_clean_volume(p, train_cfg, with_brain))
            except Exception as exc:  # a broken training file must not kill training
                msg = str(exc) if isinstance(exc, TrainingVolumeError) else f"{p}: {_err(exc)}"
                log.warning("skipping training volume %s", msg)
                skipped.append({"path": p, "error": msg})
        return used, skipped

    log.info("loading %d training and %d validation volumes", len(train_set), len(val_set))
    tr_vols, skipped_tr = load(train_set, mask_augment > 0)
    va_vols, skipped_va = load(val_set, False)
    if not tr_vols:
        raise ValueError(f"no usable training volumes ({len(skipped_tr)} skipped: see the warnings)")
    if not va_vols:
        raise ValueError(f"no usable validation volumes ({len(skipped_va)} skipped: see the warnings)")
    log.info("loaded %d + %d volumes (%.1f s)", len(tr_vols), len(va_vols), time.perf_counter() - t_start)

    t0 = time.perf_counter()
    simulator = "artifactqc.simulate.simulate_volume" if simulate_fn is None else repr(simulate_fn)
    if simulate_fn is None and match_ssim:
        simulate_fn = functools.partial(_simulate_volume, match_ssim=True)
        simulator += "(match_ssim=True)"
    val_items = _val_items(va_vols, slice_cfg, tuple(val_severities), seed, simulate_fn)
    log.info("validation set: %d volumes (%d clean), 3D-simulated in %.1f s", len(val_items), len(va_vols),
             time.perf_counter() - t0)

    aug = {"contrast": contrast_augment, "mask": mask_augment, "resample": resample_augment}
    pool = _Pool(tr_vols, train_cfg, pool_size, seed, simulate_fn, aug)
    n_init = min(pool.capacity, max(2, int(pool_init_per_volume) * len(tr_vols)))
    t0 = time.perf_counter()
    init_budget = None if deadline is None else 0.35 * (deadline - time.perf_counter())
    pool.fill(n_init, init_budget)
    log.info("initial pool: %d corrupted volumes in %.1f s (%.2f s each)", len(pool.entries),
             time.perf_counter() - t0, (time.perf_counter() - t0) / max(1, len(pool.entries)))

    gen = torch.Generator().manual_seed(seed)
    bn_gen_seed = seed + 31
    # the volume head is fitted after the encoder (fit_volume_head), on its frozen features
    enc_cfg = dataclasses.replace(EncoderConfig.from_dict(encoder or {}), volume_head=False)
    model = ArtifactEncoder(enc_cfg).to(dev)
    # exponential moving average of the weights (validated, kept and saved instead of the raw weights)
    ema = None
    if ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(ema_decay)), use_buffers=False)
    head_reserve = 0.0 if not volume_head or deadline is None else min(90.0, 0.08 * (deadline - time.perf_counter()))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * steps_per_epoch)
    t_loop = time.perf_counter()
    step = 0

    def set_lr() -> float:
        """Warm-up (first 10 %) then cosine decay to 2 % of ``lr`` over the run's progress: the larger of the
        step fraction and, with ``max_minutes``, the elapsed fraction of the remaining time budget (so a
        time-capped run still anneals)."""
        prog = step / total_steps
        if deadline is not None:
            prog = max(prog, (time.perf_counter() - t_loop) / max(1e-6, deadline - t_loop))
        prog = min(prog, 1.0)
        f = min(1.0, (prog + 1.0 / total_steps) / 0.1) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        return lr * f

    sim2d = simulate_slices_fn or _simulate
    single = [a for a in TRAIN_ARTIFACTS if a != "mix"]

    def evaluate(net: nn.Module, recalibrate: bool = True) -> dict:
        if recalibrate:
            bgen = torch.Generator().manual_seed(bn_gen_seed)
            batches = []
            for _ in range(int(bn_recalib_batches)):
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
        for a in single:
            m = np.array([x in (a, "none") for x in arts])
            per_type[a] = _spearman(ss[m], sc[m])
        hi = np.array([x not in ("mix", "none") for x in arts]) & (ss >= 0.5)
        acc = float((sv[hi].argmax(1) == tg[hi].argmax(1)).mean()) if hi.any() else float("nan")
        clean = sc[np.array([x == "none" for x in arts])]
        return {
            "val_loss": calib + heads,
            "val_calib_mse": calib,
            "val_heads_bce": heads,
            "val_pearson": _pearson(ss, sc),
            "val_spearman_by_type": per_type,
            "val_head_acc_ss05": acc,
            "val_clean_score_mean": float(clean.mean()),
            "val_clean_score_sd": float(clean.std()),
            "val_score_at_0.5": float(sc[np.abs(ss - 0.5) < 0.11].mean()) if (np.abs(ss - 0.5) < 0.11).any()
            else float("nan"),
        }

    history = []
    best = {"val_loss": float("inf"), "epoch": -1}
    best_state = None
    bad_epochs = 0
    model.train()
    stop_reason = "epochs"
    bar = Progress(epochs * steps_per_epoch, desc="train", unit="step")
    for epoch in range(1, epochs + 1):
        t_ep = time.perf_counter()
        sums: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            b = max(1, batch_size // group) * group
            xa, xp, xn, xn2, sev, tgt = pool.sample(b, gen, group)
            if slice_sim_fraction > 0:
                k = int(round(slice_sim_fraction * b))
                if k > 0:
                    sel, gamma, inv = _contrast_augment(xa[:k], gen, contrast_augment)
                    ca = _apply_contrast(xa[:k], sel, gamma, inv)
                    cp = _apply_contrast(xp[:k], sel, gamma, inv)
                    arts = [TRAIN_ARTIFACTS[i] for i in torch.randint(0, len(TRAIN_ARTIFACTS), (k,), generator=gen)]
                    s2 = torch.rand(k, generator=gen)
                    neg, t2 = sim2d(torch.cat([ca, cp]), arts + arts, torch.cat([s2, s2]), gen)
                    xa, xp = torch.cat([ca, xa[k:]]), torch.cat([cp, xp[k:]])
                    xn, xn2 = torch.cat([neg[:k], xn[k:]]), torch.cat([neg[k:], xn2[k:]])
                    sev, tgt = torch.cat([s2, sev[k:]]), torch.cat([t2[:k].float(), tgt[k:]])
            cur_lr = set_lr()
            step += 1
            out = model(torch.cat([xa, xp, xn, xn2]).to(dev))
            parts_out = [{k_: v[i * b:(i + 1) * b] for k_, v in out.items()} for i in range(4)]
            loss, parts = encoder_loss(*parts_out, sev.to(dev), tgt.to(dev), group=group)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k_, v in parts.items():
                sums[k_] = sums.get(k_, 0.0) + v
            bar.update()
        t_train = time.perf_counter() - t_ep
        train_metrics = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
        val = evaluate(ema.module if ema is not None else model)
        # refresh part of the pool: simulate for sim_time_fraction of the wall time
        t_sim = time.perf_counter()
        f = min(max(float(sim_time_fraction), 0.0), 0.95)
        budget = t_train * f / (1.0 - f)
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - time.perf_counter() - 1.5 * t_train))
        if pool_refresh is not None:  # deterministic: a fixed number of new corrupted volumes per epoch
            added = pool.fill(int(pool_refresh))
        else:
            added = pool.fill(10**9, budget) if budget > 0 else 0
        rec = {"epoch": epoch, **train_metrics, **val, "seconds": time.perf_counter() - t_ep, "train_seconds": t_train,
               "sim_seconds": time.perf_counter() - t_sim, "pool_added": added, "pool_made": pool.made,
               "lr": cur_lr}
        history.append(rec)
        sp = " ".join(f"{k[:4]}={v:.2f}" for k, v in val["val_spearman_by_type"].items())
        log.info(
            "epoch %d/%d loss %.4f | val loss %.4f r %.3f headacc %.2f clean %.3f±%.3f s@0.5 %.2f | spearman %s | "
            "train %.0fs sim %.0fs (+%d, pool %d, made %d)",
            epoch, epochs, train_metrics["train_loss"], val["val_loss"], val["val_pearson"], val["val_head_acc_ss05"],
            val["val_clean_score_mean"], val["val_clean_score_sd"], val["val_score_at_0.5"], sp, t_train,
            rec["sim_seconds"], added, len(pool.entries), pool.made,
        )
        if val["val_loss"] < best["val_loss"] - 1e-4:
            best = {"val_loss": val["val_loss"], "epoch": epoch}
            net = ema.module if ema is not None else model
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                stop_reason = f"early stopping: no improvement for {patience} epochs"
                log.info(stop_reason)
                break
        if deadline is not None and time.perf_counter() + 1.2 * t_train + head_reserve > deadline:
            stop_reason = f"time limit of {max_minutes} min"
            log.info("stopping: %s", stop_reason)
            break
    bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    head_metrics = None
    if volume_head:
        budget = None if deadline is None else max(20.0, deadline - time.perf_counter())
        head_metrics = fit_volume_head(model, pool.entries, val_items, seed=seed, max_seconds=budget, device=dev)
        # the head was fitted on the features of the current BatchNorm statistics: keep them
        head_metrics["final"] = evaluate(model, recalibrate=False)
    model.cpu()
    manifest_sha = sha256_file(manifest) if manifest and Path(manifest).is_file() else None
    hp = dict(val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience,
              image_size=image_size, pixel_mm=pixel_mm, steps_per_epoch=steps_per_epoch,
              train_slices_per_axis=train_slices_per_axis, val_severities=list(val_severities),
              pool_size=pool_size, pool_init_per_volume=pool_init_per_volume, sim_time_fraction=sim_time_fraction,
              pool_refresh=pool_refresh,
              contrast_augment=contrast_augment, mask_augment=mask_augment, resample_augment=resample_augment,
              slice_sim_fraction=slice_sim_fraction, slice_group=slice_group,
              bn_recalib_batches=bn_recalib_batches, ema_decay=ema_decay, volume_head=volume_head,
              weight_decay=weight_decay, match_ssim=match_ssim, max_minutes=max_minutes, device=str(dev),
              threads=threads)
    metrics = {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "stop_reason": stop_reason,
        "train_seconds": time.perf_counter() - t_start,
        "simulation_seconds": pool.sim_seconds,
        "n_corrupted_volumes": pool.made,
        "n_val_items": len(val_items),
        "final": history[best["epoch"] - 1] if best["epoch"] > 0 else None,
        "volume_head": head_metrics,
    }
    meta = {
        "model_id": model_id or out_dir.name,
        "training": {
            "hyperparameters": hp,
            "manifest": str(manifest) if manifest else None,
            "manifest_sha256": manifest_sha,
            "train_volumes": [v.path for v in tr_vols],
            "val_volumes": [v.path for v in va_vols],
            "skipped_volumes": skipped_tr + skipped_va,
            "data_path": "3D simulation at native resolution, then slices.extract_from_array (inference path)",
            "simulator": simulator,
            "artifacts": list(TRAIN_ARTIFACTS),
            "epochs": history,
            **metrics,
        },
    }
    save_model(model, out_dir, slice_cfg, meta)
    log.info("saved %s (best epoch %d, val loss %.4f) in %.1f s", out_dir / "encoder.safetensors", best["epoch"],
             best["val_loss"], metrics["train_seconds"])
    return metrics


def train_from_cli(
    paths: Sequence[str], list_file: str | None, out_dir: str, *, demo: bool = False, seed: int = 0,
    device: str = "auto", model_id: str | None = None, **overrides,
) -> dict:
    """``artifactqc train`` / the workflow rule: volumes from ``paths`` and/or a list/manifest file.

    ``demo=True`` starts from :func:`demo_config`; ``overrides`` replace single settings.
    """
    from ..encoder.score import read_path_list

    vols = list(paths or []) + (read_path_list(list_file) if list_file else [])
    if not vols:
        raise ValueError("no training volumes given")
    cfg = demo_config() if demo else {}
    cfg.update(overrides)
    return train_encoder(vols, out_dir, seed=seed, device=device, model_id=model_id, manifest=list_file, **cfg)
