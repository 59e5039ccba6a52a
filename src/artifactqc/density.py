"""Normalizing-flow density of encoder latents, density percentiles, τ flags and the ``flagged`` rule.

Latent-space QC (Zuo et al.) fits a RealNVP normalizing flow with six affine coupling layers to the
latents of a reference cohort and flags volumes whose density falls below the τ-th percentile of the
reference (τ = 5 % and 3 % by default). This module does that with `zuko <https://github.com/probabilists/zuko>`_
(``zuko.flows.RealNVP``), and adds what a cohort workflow needs around it:

* :func:`fit_flow` — standardise the latents, fit by maximum likelihood with early stopping on a held-out
  split, deterministically for a seed, robust to the tiny reference sets of a demo (see *Small cohorts*).
* :class:`FlowModel` — ``log_density`` in the **original** latent space, ``save`` to
  ``flow.safetensors`` + ``flow.json``; :func:`load_flow` loads only that format (never pickle).
* :func:`density_percentiles`, :func:`tau_flags`, :func:`site_percentiles` — the percentile of each
  volume's log-density within the reference, pooled or per site.
* :func:`combine_flags` — the documented config rule that makes the ``flagged`` column.
* :func:`fit_flow_from_table`, :func:`score_table` — thin-script helpers over the scores table
  (``latent_0 … latent_{k-1}`` columns, see ``DESIGN.md``).

Standardisation
    ``z = (x - mean) / sd`` per latent dimension with the reference mean and sd (sd floored at 1e-8).
    The flow models ``p_z``; the density in latent space is
    ``log p_x(x) = log p_z(z) - Σ_j log sd_j`` (change of variables), which is what
    :meth:`FlowModel.log_density` returns.

Small cohorts
    A six-layer RealNVP has thousands of parameters; with 20–30 reference volumes it would memorise them.
    Three things keep it honest: (1) Gaussian noise is added to the standardised training latents at every
    step (``noise_std``; ``"auto"`` = ``0.5 · N^(-1/(k+4))``, half of Scott's kernel-density bandwidth
    factor, so the fit behaves like a smoothed KDE when N is small and the noise fades as N grows);
    (2) decoupled weight decay (AdamW, ``weight_decay``); (3) early stopping on a held-out split
    (``val_fraction``, at least 2 volumes) with the best weights restored. The validation loss is
    computed without noise. With fewer than :data:`MIN_REFERENCE` volumes fitting is refused.

Determinism
    For a given seed, thread count and torch build the fit is bit-for-bit reproducible: the split, the
    initial weights, the batch order and the noise all come from generators seeded from ``seed``, and the
    global torch RNG state is restored afterwards. Log-densities are evaluated in float64.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: Fitting is refused below this many reference volumes.
MIN_REFERENCE = 8
#: Quantiles (in percent) of the reference log-density recorded in ``flow.json``.
REF_QUANTILES = (1, 3, 5, 10, 25, 50, 75, 90, 95, 99)
FLOW_WEIGHTS = "flow.safetensors"
FLOW_META = "flow.json"
_SD_FLOOR = 1e-8


# --------------------------------------------------------------------------------------------- config
@dataclass
class FlowConfig:
    """Every setting of a flow fit (recorded in ``flow.json``)."""

    features: int
    n_transforms: int = 6
    hidden: tuple[int, ...] = (64, 64)
    epochs: int = 400
    lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    weight_decay: float = 1e-3
    noise_std: float | str = "auto"
    val_fraction: float = 0.2
    patience: int = 40
    max_steps: int = 20000

    def resolved_noise(self, n_train: int) -> float:
        """The noise standard deviation actually used (``"auto"`` resolved for ``n_train`` volumes)."""
        if self.noise_std == "auto":
            return 0.5 * float(n_train) ** (-1.0 / (self.features + 4))
        return float(self.noise_std)


def _build_flow(cfg: FlowConfig):
    import zuko

    return zuko.flows.RealNVP(
        features=cfg.features,
        transforms=cfg.n_transforms,
        hidden_features=tuple(int(h) for h in cfg.hidden),
    )


def _select_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_latents(latents, what: str = "latents") -> np.ndarray:
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2D array [N, k]; got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"{what} contain NaN or Inf in {rows.size} row(s) (first rows: {rows[:5].tolist()}); "
            "drop volumes whose scoring failed (status != 'ok') before fitting or scoring the flow"
        )
    return x


# ---------------------------------------------------------------------------------------------- model
@dataclass
class FlowModel:
    """A fitted flow plus its standardisation, reference log-densities and provenance.

    Attributes:
        flow: the ``zuko.flows.RealNVP`` module (float32 weights, on CPU).
        mean, sd: standardisation of the latents (reference statistics, float64).
        config: the :class:`FlowConfig` used.
        reference_log_density: log-densities of the reference volumes (float64) — the distribution
            that :meth:`percentiles` ranks new volumes in.
        metrics: training metrics (losses, epochs, steps, seconds, noise used).
        flow_id: identifier (given, or derived from the config and the reference).
        reference_sha256: sha256 of the reference manifest (given by the caller), or ``None``.
        latent_columns: names of the latent columns in the scores table, if known.
    """

    flow: Any
    mean: np.ndarray
    sd: np.ndarray
    config: FlowConfig
    reference_log_density: np.ndarray
    metrics: dict = field(default_factory=dict)
    flow_id: str = ""
    reference_sha256: str | None = None
    latent_columns: list[str] | None = None
    sha256: str | None = None  # of flow.safetensors, set by save()/load_flow()

    @property
    def features(self) -> int:
        return int(self.config.features)

    def log_standardisation_det(self) -> float:
        """``log |det dz/dx| = -Σ log sd`` of the standardisation ``z = (x - mean) / sd``."""
        return float(-np.sum(np.log(self.sd)))

    def log_density(self, latents, batch_size: int = 65536) -> np.ndarray:
        """Log-density (natural log) of each row of ``latents`` [N, k] in the original latent space."""
        import torch

        x = _check_latents(latents)
        if x.shape[1] != self.features:
            raise ValueError(f"latents have {x.shape[1]} dimensions; this flow was fitted on {self.features}")
        z = (x - self.mean) / self.sd
        flow64 = copy.deepcopy(self.flow).to(device="cpu", dtype=torch.float64).eval()
        out = np.empty(len(z), dtype=np.float64)
        with torch.no_grad():
            dist = flow64()
            for i in range(0, len(z), batch_size):
                out[i : i + batch_size] = dist.log_prob(torch.from_numpy(z[i : i + batch_size])).numpy()
        return out + self.log_standardisation_det()

    def percentiles(self, latents) -> np.ndarray:
        """Percentile (0–100) of each row's log-density within the reference (see :func:`density_percentiles`)."""
        return density_percentiles(self.reference_log_density, self.log_density(latents))

    def reference_quantiles(self) -> dict[str, float]:
        q = np.percentile(self.reference_log_density, REF_QUANTILES)
        return {f"q{p:g}": float(v) for p, v in zip(REF_QUANTILES, q)}

    def tau_levels(self, taus: Iterable[float] = (5, 3)) -> dict[float, float]:
        """Log-density level below which a volume is flagged at each τ (the τ-th reference percentile).

        Uses ``numpy.percentile``'s linear interpolation; it is meant for drawing contours, the flags
        themselves come from :func:`density_percentiles` + :func:`tau_flags`.
        """
        return {float(t): float(np.percentile(self.reference_log_density, t)) for t in taus}

    # -------------------------------------------------------------------------------------- save
    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write ``flow.safetensors`` (weights, standardisation, reference log-densities) and ``flow.json``.

        Returns the directory. ``flow.json`` records flow_id, config, standardisation, reference manifest
        sha256, training metrics, reference log-density quantiles, artifactqc/zuko/torch versions and the
        sha256 of ``flow.safetensors``. ``extra`` is merged into the json (e.g. the reference volume ids).
        """
        import torch
        import zuko
        from safetensors.torch import save_file

        from . import __version__

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"flow.{k}": v.detach().cpu().contiguous() for k, v in self.flow.state_dict().items()}
        tensors["standardize.mean"] = torch.from_numpy(np.ascontiguousarray(self.mean, dtype=np.float64))
        tensors["standardize.sd"] = torch.from_numpy(np.ascontiguousarray(self.sd, dtype=np.float64))
        tensors["reference.log_density"] = torch.from_numpy(
            np.ascontiguousarray(self.reference_log_density, dtype=np.float64)
        )
        weights = d / FLOW_WEIGHTS
        from .atomic import atomic_path

        # one metadata key only: safetensors writes the metadata map in arbitrary order, so a second key made
        # the bytes (and flow_sha256 in every score row) of identical flows differ between runs
        with atomic_path(weights) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "artifactqc-flow"})
        from .io import sha256_file

        self.sha256 = sha256_file(weights)
        meta = {
            "flow_id": self.flow_id,
            "kind": "zuko.flows.RealNVP",
            "config": _config_to_json(self.config),
            "standardisation": {"mean": self.mean.tolist(), "sd": self.sd.tolist()},
            "latent_columns": self.latent_columns,
            "reference_manifest_sha256": self.reference_sha256,
            "n_reference": int(len(self.reference_log_density)),
            "reference_log_density_quantiles": self.reference_quantiles(),
            "training_metrics": self.metrics,
            "artifactqc_version": __version__,
            "zuko_version": getattr(zuko, "__version__", "unknown"),
            "torch_version": torch.__version__,
            "weights_file": FLOW_WEIGHTS,
            "weights_sha256": self.sha256,
        }
        if extra:
            meta.update(extra)
        from .atomic import write_text

        write_text(d / FLOW_META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return d


def _config_to_json(cfg: FlowConfig) -> dict:
    out = asdict(cfg)
    out["hidden"] = list(cfg.hidden)
    return out


def _config_from_json(d: dict) -> FlowConfig:
    d = dict(d)
    d["hidden"] = tuple(d.get("hidden", (64, 64)))
    return FlowConfig(**d)


def load_flow(directory: str | Path, verify: bool = True) -> FlowModel:
    """Load a flow saved by :meth:`FlowModel.save`. Only safetensors weights are accepted.

    ``directory`` may also be the path of ``flow.json`` or ``flow.safetensors``. Any other weights file
    (``.pt``, ``.pth``, ``.pkl``, ``.ckpt`` …) is refused with an explanation — pickled weights can run
    arbitrary code when loaded. With ``verify`` the sha256 of the weights must match ``flow.json``.
    """
    import torch
    from safetensors.torch import load_file

    from .io import sha256_file

    p = Path(directory)
    if p.is_file():
        if p.name not in (FLOW_WEIGHTS, FLOW_META):
            raise ValueError(
                f"{p}: refusing to load flow weights from {p.suffix or p.name!r}; only {FLOW_WEIGHTS} + {FLOW_META} "
                "(safetensors) are accepted — pickle-based formats can execute code when loaded"
            )
        p = p.parent
    meta_path, weights = p / FLOW_META, p / FLOW_WEIGHTS
    if not weights.is_file():
        others = sorted(x.name for x in p.glob("*") if x.suffix in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"))
        hint = f" (found {others}: pickle-based formats are refused)" if others else ""
        raise FileNotFoundError(f"{p}: no {FLOW_WEIGHTS}{hint}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{p}: no {FLOW_META} beside {FLOW_WEIGHTS}")
    meta = json.loads(meta_path.read_text())
    digest = sha256_file(weights)
    if verify and meta.get("weights_sha256") and meta["weights_sha256"] != digest:
        raise ValueError(
            f"{weights}: sha256 {digest[:12]}… does not match flow.json ({meta['weights_sha256'][:12]}…); "
            "the weights were changed after saving"
        )
    tensors = load_file(str(weights))
    cfg = _config_from_json(meta["config"])
    flow = _build_flow(cfg)
    state = {k[len("flow.") :]: v for k, v in tensors.items() if k.startswith("flow.")}
    flow.load_state_dict(state, strict=True)
    flow.eval()
    return FlowModel(
        flow=flow,
        mean=tensors["standardize.mean"].numpy().astype(np.float64),
        sd=tensors["standardize.sd"].numpy().astype(np.float64),
        config=cfg,
        reference_log_density=tensors["reference.log_density"].numpy().astype(np.float64),
        metrics=meta.get("training_metrics", {}),
        flow_id=meta.get("flow_id", ""),
        reference_sha256=meta.get("reference_manifest_sha256"),
        latent_columns=meta.get("latent_columns"),
        sha256=digest,
    )


# ------------------------------------------------------------------------------------------------ fit
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


# ------------------------------------------------------------------------------------ percentiles
def density_percentiles(ref_logdens, logdens) -> np.ndarray:
    """Percentile (0–100) of each log-density within the reference log-densities (mid-rank ECDF).

    ``pct = 100 · (#{ref < v} + ½ · #{ref == v}) / n_ref``: a value below every reference value gets 0,
    above every one 100; ties count half (so a reference volume ranked against a reference that contains
    it gets ``100 · (rank - ½) / n``, e.g. the lowest of 20 gets 2.5). NaN inputs give NaN; NaN reference
    values are ignored.
    """
    ref = np.asarray(ref_logdens, dtype=np.float64).ravel()
    ref = np.sort(ref[np.isfinite(ref)])
    if ref.size == 0:
        raise ValueError("reference log-densities are empty (or all NaN)")
    v = np.asarray(logdens, dtype=np.float64)
    below = np.searchsorted(ref, v, side="left")
    upto = np.searchsorted(ref, v, side="right")
    pct = 100.0 * (below + 0.5 * (upto - below)) / ref.size
    return np.where(np.isnan(v), np.nan, pct)


def tau_column(tau: float) -> str:
    """Column name of the flag at ``tau`` percent: ``flag_tau5``, ``flag_tau3``, ``flag_tau2.5``."""
    return f"flag_tau{float(tau):g}"


def tau_flags(pct, taus: Iterable[float] = (5, 3)) -> dict[str, np.ndarray]:
    """``{"flag_tau5": pct < 5, "flag_tau3": pct < 3, …}`` (strictly below; NaN percentiles → False)."""
    p = np.asarray(pct, dtype=np.float64)
    out = {}
    for t in taus:
        t = float(t)
        if not 0 < t < 100:
            raise ValueError(f"τ must be a percentage in (0, 100); got {t}")
        out[tau_column(t)] = np.asarray(np.nan_to_num(p, nan=np.inf) < t)
    return out


def site_percentiles(
    df,
    site_col: str = "site",
    *,
    logdens_col: str = "log_density",
    reference_col: str | None = "in_reference",
    min_site_reference: int = 20,
):
    """Per-site calibration: each volume's percentile among its own site's reference volumes.

    Reference membership is ``df[reference_col]`` (bool) when that column exists, otherwise every row with
    a finite log-density is reference. A site with fewer than ``min_site_reference`` reference volumes
    falls back to the pooled reference (all sites). Returns a DataFrame indexed like ``df`` with
    ``density_pct_site`` (0–100, NaN where the log-density is NaN) and ``pct_scope`` (``"site"`` or
    ``"pooled"``). Use it for multi-site cohorts whose sites differ systematically in the latent space
    (scanner, protocol) when τ should mean "the worst τ % of this site".
    """
    import pandas as pd

    ld = df[logdens_col].to_numpy(dtype=np.float64)
    if reference_col is not None and reference_col in df.columns:
        is_ref = df[reference_col].fillna(False).to_numpy(dtype=bool) & np.isfinite(ld)
    else:
        is_ref = np.isfinite(ld)
    if not is_ref.any():
        raise ValueError("no reference volumes with a finite log-density")
    pooled = density_percentiles(ld[is_ref], ld)
    pct = pooled.copy()
    scope = np.full(len(df), "pooled", dtype=object)
    sites = df[site_col].to_numpy()
    for s in pd.unique(sites):
        m = sites == s
        ref_s = ld[m & is_ref]
        if ref_s.size >= min_site_reference:
            pct[m] = density_percentiles(ref_s, ld[m])
            scope[m] = "site"
        else:
            log.info("site %s: %d reference volumes < %d, using pooled percentiles", s, ref_s.size, min_site_reference)
    return pd.DataFrame({"density_pct_site": pct, "pct_scope": scope}, index=df.index)


# ----------------------------------------------------------------------------------------- flag rule
_RULE_RE = re.compile(r"^(score|tau(\d+(?:\.\d+)?)|score_(or|and)_tau(\d+(?:\.\d+)?))$")
#: The rule strings documented for config key ``flag_rule`` (any τ in the config works in place of 5/3).
FLAG_RULES = ("score", "tau5", "tau3", "score_or_tau5", "score_and_tau5", "score_or_tau3", "score_and_tau3")
DEFAULT_FLAG_RULE = "score_or_tau5"


def combine_flags(df, rule: str = DEFAULT_FLAG_RULE, score_threshold: float = 1.0, score_col: str = "score"):
    """The ``flagged`` column from a rule over ``score > score_threshold`` and the τ flags.

    Rules: ``"score"`` (score above the review threshold), ``"tau<τ>"`` (density below the τ-th
    reference percentile: column ``flag_tau<τ>``), ``"score_or_tau<τ>"`` (either; the default
    ``"score_or_tau5"``) and ``"score_and_tau<τ>"`` (both). A missing score (failed volume) or missing τ
    flag counts as not raised, so failed rows get ``False``; tell them apart with ``status``.
    Returns a bool ``pandas.Series`` indexed like ``df``.
    """
    import pandas as pd

    m = _RULE_RE.match(str(rule))
    if not m:
        raise ValueError(
            f"unknown flag rule {rule!r}; allowed: {', '.join(FLAG_RULES)} "
            "(or tau<τ>/score_or_tau<τ>/score_and_tau<τ> for any τ in the config)"
        )

    def score_flag():
        s = pd.to_numeric(df[score_col], errors="coerce").to_numpy(dtype=np.float64)
        return np.nan_to_num(s, nan=-np.inf) > score_threshold

    def tau_flag(t: str):
        col = tau_column(float(t))
        if col not in df.columns:
            raise ValueError(f"flag rule {rule!r} needs column {col!r}; present: {[c for c in df.columns if c.startswith('flag_tau')]}")
        return df[col].fillna(False).to_numpy(dtype=bool)

    if m.group(1) == "score":
        out = score_flag()
    elif m.group(2) is not None:
        out = tau_flag(m.group(2))
    elif m.group(3) == "or":
        out = score_flag() | tau_flag(m.group(4))
    else:
        out = score_flag() & tau_flag(m.group(4))
    return pd.Series(out, index=df.index, name="flagged", dtype=bool)


# ------------------------------------------------------------------------------ table-level helpers
def latent_columns_of(df, prefix: str = "latent_") -> list[str]:
    """The ``latent_0 … latent_{k-1}`` columns of a scores table, in numeric order."""
    cols = [c for c in df.columns if re.fullmatch(re.escape(prefix) + r"\d+", str(c))]
    if not cols:
        raise ValueError(f"no {prefix}<i> columns in the table (columns: {list(df.columns)[:12]}…)")
    return sorted(cols, key=lambda c: int(str(c)[len(prefix) :]))


def _ok_rows(df):
    import pandas as pd

    m = pd.Series(True, index=df.index)
    if "status" in df.columns:
        m &= df["status"].astype(str) == "ok"
    return m


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


def score_table(
    df,
    flow: FlowModel,
    *,
    taus: Iterable[float] = (5, 3),
    rule: str = DEFAULT_FLAG_RULE,
    score_threshold: float = 1.0,
    per_site: bool = False,
    site_col: str = "site",
    min_site_reference: int = 20,
    reference_ids: Sequence[str] | None = None,
    id_col: str = "volume_id",
):
    """Add ``log_density``, ``density_pct``, ``flag_tau<τ>…``, ``flagged`` and ``flow_id``/``flow_sha256``.

    Rows with ``status != "ok"`` (or NaN latents) get NaN log-density/percentile and False flags.
    ``density_pct`` ranks against the flow's stored reference log-densities (pooled); with ``per_site``
    it is replaced by :func:`site_percentiles` (reference = ``reference_ids`` if given, else every ok row),
    and a ``pct_scope`` column says which calibration each row got. Returns a new DataFrame.
    """
    out = df.copy()
    cols = flow.latent_columns or latent_columns_of(df)
    lat = out[cols].to_numpy(dtype=np.float64)
    ok = _ok_rows(out).to_numpy() & np.isfinite(lat).all(axis=1)
    ld = np.full(len(out), np.nan)
    if ok.any():
        ld[ok] = flow.log_density(lat[ok])
    out["log_density"] = ld
    if per_site:
        ref_flag = ok.copy()
        if reference_ids is not None:
            ref_flag &= out[id_col].astype(str).isin(set(map(str, reference_ids))).to_numpy()
        tmp = out[[site_col, "log_density"]].assign(in_reference=ref_flag)
        sp = site_percentiles(tmp, site_col, min_site_reference=min_site_reference)
        out["density_pct"] = sp["density_pct_site"].to_numpy()
        out["pct_scope"] = sp["pct_scope"].to_numpy()
    else:
        out["density_pct"] = density_percentiles(flow.reference_log_density, ld)
    for name, arr in tau_flags(out["density_pct"].to_numpy(), taus).items():
        out[name] = arr
    out["flagged"] = combine_flags(out, rule, score_threshold=score_threshold)
    out["flow_id"] = flow.flow_id
    out["flow_sha256"] = flow.sha256
    return out


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

    from .io import sha256_file

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
