"""The training run: :func:`train_encoder` as a short sequence of named steps (start → split → load →
validation set → initial pool → model → epochs (train, validate, refresh the pool, keep the best) → volume
head → save), and the CLI/workflow entry point :func:`train_from_cli`.

The settings are a :class:`~artifactqc.training.config.TrainConfig` (every field is a keyword of
:func:`train_encoder`); each step below is one function, so a change to one of them (a new augmentation, a
different validation) is made in that step or in the module it calls, not in a 350-line loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..encoder.checkpoint import save_model
from ..encoder.network import ArtifactEncoder, EncoderConfig, resolve_device
from ..encoder.slices import SliceConfig
from ..io import sha256_file
from ..progress import Progress, track
from .augment import _apply_contrast, _contrast_augment
from .config import TRAIN_ARTIFACTS, TrainConfig, demo_config
from .finetune import load_init
from .losses import encoder_loss
from .pairs import _PairPool, pair_losses, sample_pair_blocks
from .pool import _Pool, _simulate, _simulate_volume
from .validate import _val_items, evaluate_model
from .volume_head import fit_volume_head
from .volumes import TrainingVolumeError, _err, _load_clean_volume

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """What every step of one training run shares: settings, device, clocks and the split's random stream."""

    cfg: TrainConfig
    dev: torch.device
    out_dir: Path
    t_start: float
    deadline: float | None
    rng: np.random.Generator
    group: int
    slice_cfg: SliceConfig  # the scoring geometry (stored in model.json)
    train_cfg: SliceConfig  # the same with the training slice count

    @property
    def step_budget(self) -> bool:
        """With a fixed ``pool_refresh`` the run is counted in steps: the clock may only stop it (a reported
        safety stop), never shape it (pool sizes, learning rate, head fit)."""
        return self.cfg.pool_refresh is not None


def train_encoder(
    volumes: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    model_id: str | None = None,
    manifest: str | os.PathLike | None = None,
    val_volumes: Sequence[str | os.PathLike] | None = None,
    simulate_fn=None,
    simulate_slices_fn=None,
    val_slices: int | None = None,
    **settings,
) -> dict:
    """Train the encoder on the inference path; write ``encoder.safetensors`` + ``model.json`` to ``out_dir``.

    ``settings`` are the fields of :class:`~artifactqc.training.config.TrainConfig` (``epochs``, ``lr``,
    ``seed``, ``pool_size``, ...; an unknown name is a ``TypeError``), documented there. Validation uses the
    held-out ``val_fraction`` of the volumes, or ``val_volumes``. ``simulate_fn(data, artifact, severity,
    seed, spacing) -> (array, params)`` overrides the 3D simulator and ``simulate_slices_fn`` the 2D one
    (tests). ``model_id`` (default: the folder name) and ``manifest`` (its sha256) go into ``model.json``.
    ``val_slices`` is accepted for backwards compatibility and ignored. Returns the metrics dict.
    """
    cfg, init_state, init_record = load_init(TrainConfig.from_settings(settings))
    run = _start(cfg, device, out_dir)
    train_set, val_set = _split(volumes, val_volumes, run)
    tr_vols, va_vols, skipped = _load_volumes(train_set, val_set, run)
    simulate_fn, simulator = _simulator(simulate_fn, run.cfg.match_ssim)
    val_items = _validation_set(va_vols, simulate_fn, run)
    pool = _initial_pool(tr_vols, simulate_fn, run)
    model, ema, opt = _build_model(run, init_state)
    history, best, stop_reason = _train_epochs(model, ema, opt, pool, val_items, simulate_slices_fn, run)
    head_metrics = _fit_head(model, pool, val_items, run)
    metrics = {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "stop_reason": stop_reason,
        "stopped_by_clock": stop_reason.startswith(("safety stop", "time limit")),
        "train_seconds": time.perf_counter() - run.t_start,
        "simulation_seconds": pool.sim_seconds,
        "n_corrupted_volumes": pool.made,
        "n_val_items": len(val_items),
        "final": history[best["epoch"] - 1] if best["epoch"] > 0 else None,
        "volume_head": head_metrics,
    }
    if isinstance(pool, _PairPool):
        metrics["pairs"] = pool.summary()
        log.info("paired entries: %s", metrics["pairs"])
    training = {"train_volumes": [v.path for v in tr_vols], "val_volumes": [v.path for v in va_vols],
                "skipped_volumes": skipped, "simulator": simulator, "init_model": init_record, "epochs": history,
                **metrics}
    _save(model, run, model_id, manifest, training)
    return metrics


# ------------------------------------------------------------------------------------------- steps
def _start(cfg: TrainConfig, device, out_dir) -> _Run:
    """Threads, seeds, deterministic algorithms, device, output folder and the time limit."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover
        pass
    dev = resolve_device(device)
    group = max(1, int(cfg.slice_group))
    if group > 1 and cfg.slice_sim_fraction > 0:
        raise ValueError("slice_group > 1 cannot be combined with slice_sim_fraction > 0 (2D-simulated negatives "
                         "have per-slice severities)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if cfg.max_minutes is None else t_start + 60.0 * float(cfg.max_minutes)
    slice_cfg = SliceConfig(image_size=cfg.image_size, pixel_mm=cfg.pixel_mm,
                            thick_pixel_ratio=float(cfg.thick_pixel_ratio))
    train_cfg = dataclasses.replace(slice_cfg, slices_per_axis=int(cfg.train_slices_per_axis))
    return _Run(cfg, dev, out_dir, t_start, deadline, rng, group, slice_cfg, train_cfg)


def _split(volumes, val_volumes, run: _Run) -> tuple[list[str], list[str]]:
    """Training and validation volumes, split by whole volume (``val_volumes``, or ``val_fraction`` by seed)."""
    vols = [str(v) for v in volumes]
    if val_volumes is not None:
        val_set = [str(v) for v in val_volumes]
        train_set = [v for v in vols if v not in set(val_set)]
    else:
        order = run.rng.permutation(len(vols))
        n_val = max(1, int(round(run.cfg.val_fraction * len(vols)))) if len(vols) > 1 else 0
        val_set = sorted(vols[i] for i in order[:n_val])
        train_set = sorted(vols[i] for i in order[n_val:])
    if not train_set or not val_set:
        raise ValueError(f"need at least one training and one validation volume (got {len(vols)} volumes)")
    return train_set, val_set


def _load_some(paths, run: _Run, with_brain: bool):
    """Clean volumes of ``paths``; a broken or too-small file is skipped with a warning and recorded."""
    used, skipped = [], []
    for p in track(paths, desc="load", unit="volume"):
        try:
            used.append(_load_clean_volume(p, run.train_cfg, with_brain))
        except Exception as exc:  # a broken training file must not kill training
            msg = str(exc) if isinstance(exc, TrainingVolumeError) else f"{p}: {_err(exc)}"
            log.warning("skipping training volume %s", msg)
            skipped.append({"path": p, "error": msg})
    return used, skipped


def _load_volumes(train_set, val_set, run: _Run):
    """Training volumes (with a brain mask when the skull-stripped look is used) and validation volumes."""
    log.info("loading %d training and %d validation volumes", len(train_set), len(val_set))
    tr_vols, skipped_tr = _load_some(train_set, run, run.cfg.mask_augment > 0)
    va_vols, skipped_va = _load_some(val_set, run, False)
    if not tr_vols:
        raise ValueError(f"no usable training volumes ({len(skipped_tr)} skipped: see the warnings)")
    if not va_vols:
        raise ValueError(f"no usable validation volumes ({len(skipped_va)} skipped: see the warnings)")
    log.info("loaded %d + %d volumes (%.1f s)", len(tr_vols), len(va_vols), time.perf_counter() - run.t_start)
    return tr_vols, va_vols, skipped_tr + skipped_va


def _simulator(simulate_fn, match_ssim: bool):
    """The 3D simulator to use (``None`` = ``simulate.simulate_volume``) and its name for ``model.json``."""
    simulator = "artifactqc.simulate.simulate_volume" if simulate_fn is None else repr(simulate_fn)
    if simulate_fn is None and match_ssim:
        simulate_fn = functools.partial(_simulate_volume, match_ssim=True)
        simulator += "(match_ssim=True)"
    return simulate_fn, simulator


def _validation_set(va_vols, simulate_fn, run: _Run) -> list[dict]:
    """The fixed validation items: each held-out volume clean and 3D-corrupted (:func:`_val_items`)."""
    t0 = time.perf_counter()
    val_items = _val_items(va_vols, run.slice_cfg, tuple(run.cfg.val_severities), run.cfg.seed, simulate_fn)
    log.info("validation set: %d volumes (%d clean), 3D-simulated in %.1f s", len(val_items), len(va_vols),
             time.perf_counter() - t0)
    return val_items


def _initial_pool(tr_vols, simulate_fn, run: _Run) -> _Pool:
    """The training pool, first filled with ``pool_init_per_volume`` corrupted volumes per training volume
    (at most 35 % of the remaining time when ``max_minutes`` is set)."""
    cfg = run.cfg
    aug = {"contrast": cfg.contrast_augment, "mask": cfg.mask_augment, "resample": cfg.resample_augment,
           "thick": cfg.thick_augment}
    if cfg.pairs:
        pool = _PairPool(tr_vols, run.train_cfg, cfg.pool_size, cfg.seed, simulate_fn, aug, cfg.render_pairs,
                         cfg.rank_pairs)
    else:
        pool = _Pool(tr_vols, run.train_cfg, cfg.pool_size, cfg.seed, simulate_fn,
                     aug | {"zoom": cfg.zoom_augment, "synth": cfg.synth_augment})
    n_init = min(pool.capacity, max(2, int(cfg.pool_init_per_volume) * len(tr_vols)))
    t0 = time.perf_counter()
    init_budget = None if run.deadline is None or run.step_budget else 0.35 * (run.deadline - time.perf_counter())
    pool.fill(n_init, init_budget)
    log.info("initial pool: %d corrupted volumes in %.1f s (%.2f s each)", len(pool.entries),
             time.perf_counter() - t0, (time.perf_counter() - t0) / max(1, len(pool.entries)))
    return pool


def _build_model(run: _Run, init_state: dict | None = None):
    """The encoder (without volume head: it is fitted afterwards on frozen features; from ``init_state``, the
    weights of the ``init`` model, when fine-tuning), the exponential moving average of its weights
    (validated, kept and saved instead of the raw weights) and the optimizer."""
    cfg = run.cfg
    enc_cfg = dataclasses.replace(EncoderConfig.from_dict(cfg.encoder or {}), volume_head=False)
    model = ArtifactEncoder(enc_cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(run.dev)
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(cfg.ema_decay)), use_buffers=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, ema, opt


class _Schedule:
    """Learning rate: warm-up (first 10 %) then cosine decay to 2 % of ``lr`` over the run's progress: the
    larger of the step fraction and, with a ``deadline`` (``max_minutes`` without a fixed ``pool_refresh``),
    the elapsed fraction of the remaining time budget (so a time-capped run still anneals)."""

    def __init__(self, opt, lr: float, total_steps: int, deadline: float | None):
        self.opt, self.lr, self.total_steps, self.deadline = opt, lr, total_steps, deadline
        self.t_loop = time.perf_counter()
        self.step = 0

    def apply(self) -> float:
        prog = self.step / self.total_steps
        if self.deadline is not None:
            prog = max(prog, (time.perf_counter() - self.t_loop) / max(1e-6, self.deadline - self.t_loop))
        prog = min(prog, 1.0)
        f = min(1.0, (prog + 1.0 / self.total_steps) / 0.1) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in self.opt.param_groups:
            g["lr"] = self.lr * f
        return self.lr * f


def _slice_sim_negatives(batch, gen, cfg: TrainConfig, sim2d):
    """Replace ``slice_sim_fraction`` of a batch's negatives with the 2D simulator on contrast-augmented clean
    slices (off by default)."""
    xa, xp, xn, xn2, sev, tgt = batch
    k = int(round(cfg.slice_sim_fraction * xa.shape[0]))
    if k <= 0:
        return batch
    sel, gamma, inv = _contrast_augment(xa[:k], gen, cfg.contrast_augment)
    ca = _apply_contrast(xa[:k], sel, gamma, inv)
    cp = _apply_contrast(xp[:k], sel, gamma, inv)
    arts = [TRAIN_ARTIFACTS[i] for i in torch.randint(0, len(TRAIN_ARTIFACTS), (k,), generator=gen)]
    s2 = torch.rand(k, generator=gen)
    neg, t2 = sim2d(torch.cat([ca, cp]), arts + arts, torch.cat([s2, s2]), gen)
    return (torch.cat([ca, xa[k:]]), torch.cat([cp, xp[k:]]), torch.cat([neg[:k], xn[k:]]),
            torch.cat([neg[k:], xn2[k:]]), torch.cat([s2, sev[k:]]), torch.cat([t2[:k].float(), tgt[k:]]))


def _train_epoch(model, ema, opt, schedule: _Schedule, pool: _Pool, gen, sim2d, run: _Run, bar: Progress):
    """``steps_per_epoch`` optimizer steps on triplet batches from the pool (each counted on ``bar``);
    returns the mean loss parts and the last learning rate."""
    cfg, dev, group = run.cfg, run.dev, run.group
    sums: dict[str, float] = {}
    cur_lr = None
    for _ in range(cfg.steps_per_epoch):
        b = max(1, cfg.batch_size // group) * group
        batch = pool.sample(b, gen, group)
        if cfg.slice_sim_fraction > 0:
            batch = _slice_sim_negatives(batch, gen, cfg, sim2d)
        xa, xp, xn, xn2, sev, tgt = batch
        blocks = sample_pair_blocks(pool, b, gen, cfg)  # [] unless render_pairs / rank_pairs
        cur_lr = schedule.apply()
        schedule.step += 1
        out = model(torch.cat([xa, xp, xn, xn2, *(x for blk in blocks for x in blk["x"])]).to(dev))
        parts_out = [{k_: v[i * b:(i + 1) * b] for k_, v in out.items()} for i in range(4)]
        loss, parts = encoder_loss(*parts_out, sev.to(dev), tgt.to(dev), group=group)
        if blocks:
            extra, pair_parts = pair_losses(out, 4 * b, blocks, cfg, int(cfg.pair_planes))
            loss = loss + extra
            parts.update(pair_parts)
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
    return {f"train_{k}": v / cfg.steps_per_epoch for k, v in sums.items()}, cur_lr


def _refresh_pool(pool: _Pool, t_train: float, run: _Run) -> int:
    """New corrupted volumes for the pool: ``pool_refresh`` of them (deterministic), or as many as fit in
    ``sim_time_fraction`` of the wall time (never past the time limit)."""
    f = min(max(float(run.cfg.sim_time_fraction), 0.0), 0.95)
    budget = t_train * f / (1.0 - f)
    if run.deadline is not None:
        budget = min(budget, max(0.0, run.deadline - time.perf_counter() - 1.5 * t_train))
    if run.cfg.pool_refresh is not None:
        return pool.fill(int(run.cfg.pool_refresh))
    return pool.fill(10**9, budget) if budget > 0 else 0


def _log_epoch(rec: dict, pool: _Pool, epochs: int) -> None:
    sp = " ".join(f"{k[:4]}={v:.2f}" for k, v in rec["val_spearman_by_type"].items())
    log.info(
        "epoch %d/%d loss %.4f | val loss %.4f r %.3f headacc %.2f clean %.3f±%.3f s@0.5 %.2f | spearman %s | "
        "train %.0fs sim %.0fs (+%d, pool %d, made %d)",
        rec["epoch"], epochs, rec["train_loss"], rec["val_loss"], rec["val_pearson"], rec["val_head_acc_ss05"],
        rec["val_clean_score_mean"], rec["val_clean_score_sd"], rec["val_score_at_0.5"], sp, rec["train_seconds"],
        rec["sim_seconds"], rec["pool_added"], len(pool.entries), pool.made,
    )
    if isinstance(pool, _PairPool):
        log.info("  pairs: consistency %.4f rank %.4f | %s", rec.get("train_consistency", float("nan")),
                 rec.get("train_rank", float("nan")), pool.summary())


def _train_epochs(model, ema, opt, pool: _Pool, val_items, simulate_slices_fn, run: _Run):
    """Epochs of train → validate → refresh the pool → keep the best weights, until ``epochs``, early
    stopping (``patience``) or the time limit; loads the best weights into ``model``. Returns the epoch
    records, the best ``{"val_loss", "epoch"}`` and why it stopped."""
    cfg = run.cfg
    gen = torch.Generator().manual_seed(cfg.seed)
    head_reserve = (0.0 if not cfg.volume_head or run.deadline is None or run.step_budget
                    else min(90.0, 0.08 * (run.deadline - time.perf_counter())))
    schedule = _Schedule(opt, cfg.lr, max(1, cfg.epochs * cfg.steps_per_epoch),
                         None if run.step_budget else run.deadline)
    sim2d = simulate_slices_fn or _simulate
    history, best, best_state, bad_epochs = [], {"val_loss": float("inf"), "epoch": -1}, None, 0
    model.train()
    stop_reason = "epochs"
    bar = Progress(cfg.epochs * cfg.steps_per_epoch, desc="train", unit="step")
    for epoch in range(1, cfg.epochs + 1):
        t_ep = time.perf_counter()
        train_metrics, cur_lr = _train_epoch(model, ema, opt, schedule, pool, gen, sim2d, run, bar)
        t_train = time.perf_counter() - t_ep
        net = ema.module if ema is not None else model
        val = evaluate_model(net, pool, val_items, batch_size=cfg.batch_size,
                             bn_batches=cfg.bn_recalib_batches, bn_seed=cfg.seed + 31, dev=run.dev)
        t_sim = time.perf_counter()
        added = _refresh_pool(pool, t_train, run)
        rec = {"epoch": epoch, **train_metrics, **val, "seconds": time.perf_counter() - t_ep, "train_seconds": t_train,
               "sim_seconds": time.perf_counter() - t_sim, "pool_added": added, "pool_made": pool.made,
               "lr": cur_lr}
        history.append(rec)
        _log_epoch(rec, pool, cfg.epochs)
        if val["val_loss"] < best["val_loss"] - 1e-4:
            best = {"val_loss": val["val_loss"], "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                stop_reason = f"early stopping: no improvement for {cfg.patience} epochs"
                log.info(stop_reason)
                break
        if run.step_budget and run.deadline is not None and epoch < cfg.epochs and time.perf_counter() > run.deadline:
            stop_reason = (f"safety stop: time limit of {cfg.max_minutes} min after epoch {epoch} of {cfg.epochs} "
                           "(the step budget was not reached; this model depends on the machine's speed)")
            log.warning(stop_reason)
            break
        if (not run.step_budget and run.deadline is not None
                and time.perf_counter() + 1.2 * t_train + head_reserve > run.deadline):
            stop_reason = f"time limit of {cfg.max_minutes} min"
            log.info("stopping: %s", stop_reason)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return history, best, stop_reason


def _fit_head(model, pool: _Pool, val_items, run: _Run) -> dict | None:
    """With ``volume_head``: fit it on the best weights and the final pool (:func:`fit_volume_head`), then
    validate the whole model once more (on the BatchNorm statistics the head was fitted on)."""
    if not run.cfg.volume_head:
        return None
    budget = None if run.deadline is None or run.step_budget else max(20.0, run.deadline - time.perf_counter())
    head_metrics = fit_volume_head(model, pool.entries, val_items, seed=run.cfg.seed, max_seconds=budget,
                                   device=run.dev)
    head_metrics["final"] = evaluate_model(model, pool, val_items, batch_size=run.cfg.batch_size,
                                           bn_batches=run.cfg.bn_recalib_batches, bn_seed=run.cfg.seed + 31,
                                           dev=run.dev, recalibrate=False)
    return head_metrics


def _save(model, run: _Run, model_id, manifest, training: dict) -> None:
    """``encoder.safetensors`` + ``model.json`` with the hyper-parameters, data and history of the run."""
    cfg = run.cfg
    model.cpu()
    manifest_sha = sha256_file(manifest) if manifest and Path(manifest).is_file() else None
    hp = {**cfg.recorded(), "device": str(run.dev), "threads": cfg.threads}
    meta = {
        "model_id": model_id or run.out_dir.name,
        "training": {
            "hyperparameters": hp,
            "manifest": str(manifest) if manifest else None,
            "manifest_sha256": manifest_sha,
            "train_volumes": training.pop("train_volumes"),
            "val_volumes": training.pop("val_volumes"),
            "skipped_volumes": training.pop("skipped_volumes"),
            "data_path": "3D simulation at native resolution, then slices.extract_from_array (inference path)",
            "simulator": training.pop("simulator"),
            "artifacts": list(TRAIN_ARTIFACTS),
            **training,
        },
    }
    save_model(model, run.out_dir, run.slice_cfg, meta)
    log.info("saved %s (best epoch %d, val loss %.4f) in %.1f s", run.out_dir / "encoder.safetensors",
             training["best_epoch"], training["best_val_loss"], training["train_seconds"])


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
