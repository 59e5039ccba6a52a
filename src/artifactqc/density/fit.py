"""Fitting the latent density flow: :func:`fit_flow` (maximum likelihood with noise, weight decay and early
stopping, deterministic for a seed; see :mod:`artifactqc.density.flow` for why) and the workflow's helpers
that fit from a scores table or files (:func:`fit_flow_from_table`, :func:`fit_flow_from_files`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .flow import (
    _SD_FLOOR,
    MIN_REFERENCE,
    FlowConfig,
    FlowModel,
    _build_flow,
    _check_latents,
    _config_to_json,
    _ok_rows,
    _select_device,
    latent_columns_of,
)

log = logging.getLogger(__name__)


def fit_flow(
    latents,
    *,
    n_transforms: int = 6,
    hidden: Sequence[int] = (64, 64),
    epochs: int = 400,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    val_fraction: float = 0.2,
    weight_decay: float = 1e-3,
    noise_std: float | str = "auto",
    patience: int = 40,
    max_steps: int = 20000,
    flow_id: str | None = None,
    reference_sha256: str | None = None,
    latent_columns: Sequence[str] | None = None,
) -> FlowModel:
    """Fit a RealNVP (``n_transforms`` affine coupling layers, MLPs of widths ``hidden``) to ``latents`` [N, k].

    The caller passes only the reference volumes, with rows whose scoring failed (``status != "ok"``,
    NaN latents) already dropped; NaN/Inf latents are refused with a message saying so.

    Maximum likelihood with AdamW (``lr``, ``weight_decay``), minibatches of ``batch_size``, Gaussian noise
    ``noise_std`` on the standardised training latents (``"auto"``: see the module docstring), early stopping
    when the held-out negative log-likelihood has not improved for ``patience`` epochs, at most ``epochs``
    epochs / ``max_steps`` optimizer steps; the best weights on the held-out split are restored.
    ``val_fraction`` of the volumes (at least 2) are held out; the final standardisation and the reference
    log-densities use all volumes. ``device="auto"`` uses CUDA when available, otherwise CPU.

    ``flow_id`` defaults to ``"flow-"`` + the first 12 hex digits of the sha256 of the config, the
    reference sha256 and the latents' bytes.
    """
    import torch

    x = _check_latents(latents)
    n, k = x.shape
    if n < MIN_REFERENCE:
        raise ValueError(f"need at least {MIN_REFERENCE} reference volumes to fit a flow; got {n}")
    if not 0.0 <= val_fraction < 0.9:
        raise ValueError(f"val_fraction must be in [0, 0.9); got {val_fraction}")
    if noise_std != "auto" and not (isinstance(noise_std, (int, float)) and noise_std >= 0):
        raise ValueError(f"noise_std must be 'auto' or a number >= 0; got {noise_std!r}")
    cfg = FlowConfig(
        features=k,
        n_transforms=int(n_transforms),
        hidden=tuple(int(h) for h in hidden),
        epochs=int(epochs),
        lr=float(lr),
        batch_size=int(batch_size),
        seed=int(seed),
        weight_decay=float(weight_decay),
        noise_std=noise_std,
        val_fraction=float(val_fraction),
        patience=int(patience),
        max_steps=int(max_steps),
    )
    mean = x.mean(axis=0)
    sd = np.maximum(x.std(axis=0), _SD_FLOOR)
    z = ((x - mean) / sd).astype(np.float32)

    dev = _select_device(device)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = 0 if val_fraction == 0 else max(2, int(round(val_fraction * n)))
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    noise = cfg.resolved_noise(len(tr_idx))

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = _build_flow(cfg).to(dev)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    ztr = torch.from_numpy(z[tr_idx]).to(dev)
    zval = torch.from_numpy(z[val_idx]).to(dev) if n_val else None
    opt = torch.optim.AdamW(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = max(1, min(cfg.batch_size, len(tr_idx)))

    best, best_state, best_epoch, bad, steps = math.inf, None, -1, 0, 0
    history: list[tuple[float, float]] = []
    epoch = 0
    for epoch in range(cfg.epochs):
        flow.train()
        order = torch.randperm(len(ztr), generator=gen).to(dev)
        tot, cnt = 0.0, 0
        for i in range(0, len(ztr), bs):
            xb = ztr[order[i : i + bs]]
            if noise > 0:
                xb = xb + noise * torch.randn(xb.shape, generator=gen).to(dev)
            loss = -flow().log_prob(xb).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(xb)
            cnt += len(xb)
            steps += 1
            if steps >= cfg.max_steps:
                break
        train_nll = tot / max(cnt, 1)
        flow.eval()
        with torch.no_grad():
            monitor = zval if zval is not None else ztr
            val_nll = float(-flow().log_prob(monitor).mean())
        history.append((train_nll, val_nll))
        if not math.isfinite(val_nll):
            log.warning("flow fit: non-finite held-out loss at epoch %d; stopping", epoch)
            break
        if val_nll < best - 1e-6:
            best, best_epoch, bad = val_nll, epoch, 0
            best_state = {kk: v.detach().clone() for kk, v in flow.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
        if steps >= cfg.max_steps:
            break
    if best_state is not None:
        flow.load_state_dict(best_state)
    flow = flow.to("cpu").eval()
    seconds = time.perf_counter() - t0

    if flow_id is None:
        h = hashlib.sha256()
        h.update(json.dumps(_config_to_json(cfg), sort_keys=True).encode())
        h.update(str(reference_sha256).encode())
        h.update(np.ascontiguousarray(x).tobytes())
        flow_id = "flow-" + h.hexdigest()[:12]
    model = FlowModel(
        flow=flow,
        mean=mean,
        sd=sd,
        config=cfg,
        reference_log_density=np.empty(0),
        flow_id=flow_id,
        reference_sha256=reference_sha256,
        latent_columns=list(latent_columns) if latent_columns is not None else None,
    )
    model.reference_log_density = model.log_density(x)
    # NLL in the original latent space (per volume) for the record
    shift = model.log_standardisation_det()
    model.metrics = {
        "n_reference": int(n),
        "n_train": int(len(tr_idx)),
        "n_val": int(n_val),
        "noise_std_used": float(noise),
        "epochs_run": int(epoch + 1),
        "best_epoch": int(best_epoch),
        "steps": int(steps),
        "seconds": round(seconds, 3),
        "device": str(dev),
        "best_val_nll_standardised": float(best),
        "final_train_nll_standardised": float(history[-1][0]) if history else None,
        "train_nll_latent": float(-np.mean(model.reference_log_density[tr_idx])),
        "val_nll_latent": float(-np.mean(model.reference_log_density[val_idx])) if n_val else None,
        "log_standardisation_det": shift,
    }
    log.info(
        "flow %s: %d volumes (k=%d), %d epochs / %d steps in %.1f s, best held-out NLL %.3f at epoch %d",
        flow_id, n, k, epoch + 1, steps, seconds, best, best_epoch,
    )
    return model


def fit_flow_from_table(
    df,
    *,
    reference_ids: Sequence[str] | None = None,
    id_col: str = "volume_id",
    reference_sha256: str | None = None,
    **fit_kwargs,
) -> FlowModel:
    """Fit the flow on the latents of a scores table (rows with ``status == "ok"``; restricted to
    ``reference_ids`` when given). Rows with NaN latents among those are an error, not silently dropped."""
    cols = latent_columns_of(df)
    sel = _ok_rows(df)
    if reference_ids is not None:
        ids = set(map(str, reference_ids))
        sel &= df[id_col].astype(str).isin(ids)
        missing = ids - set(df.loc[sel, id_col].astype(str))
        if missing:
            log.warning("%d reference volumes are not in the table with status ok (e.g. %s)", len(missing), sorted(missing)[:3])
    ref = df.loc[sel]
    model = fit_flow(ref[cols].to_numpy(), latent_columns=cols, reference_sha256=reference_sha256, **fit_kwargs)
    return model


def fit_flow_from_files(
    scores: str | Path,
    out_dir: str | Path,
    *,
    reference: str | Path | None = None,
    **fit_kwargs,
) -> Path:
    """CLI/script entry: read a scores table (Parquet or TSV), optionally a reference manifest (a file with
    a ``volume_id`` column, or one id per line), fit and save the flow into ``out_dir``.

    The reference manifest's sha256 is recorded in ``flow.json``; without a manifest, the sha256 of the
    sorted list of volume ids used is recorded instead.
    """
    import pandas as pd

    from ..io import sha256_file

    scores = Path(scores)
    df = pd.read_parquet(scores) if scores.suffix == ".parquet" else pd.read_csv(scores, sep="\t")
    ids = None
    ref_sha = None
    if reference is not None:
        reference = Path(reference)
        ref_sha = sha256_file(reference)
        if reference.suffix == ".parquet":
            ids = pd.read_parquet(reference)["volume_id"].astype(str).tolist()
        else:
            text = reference.read_text().splitlines()
            if text and "volume_id" in text[0].split("\t"):
                ids = pd.read_csv(reference, sep="\t")["volume_id"].astype(str).tolist()
            else:
                ids = [t.strip() for t in text if t.strip()]
    model = fit_flow_from_table(df, reference_ids=ids, reference_sha256=ref_sha, **fit_kwargs)
    used = sorted(df.loc[_ok_rows(df) & (df["volume_id"].astype(str).isin(ids) if ids is not None else True), "volume_id"].astype(str))
    if ref_sha is None:
        model.reference_sha256 = hashlib.sha256("\n".join(used).encode()).hexdigest()
    return model.save(out_dir, extra={"reference_volume_ids": used})
