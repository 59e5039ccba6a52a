"""The normalizing-flow density of encoder latents: fit (:func:`fit_flow`), the model
(:class:`FlowModel`: ``log_density`` in the original latent space, ``flow.safetensors`` + ``flow.json``;
:func:`load_flow` loads only that format, never pickle) and the workflow's fit-from-table helpers.

Latent-space QC (Zuo et al.) fits a RealNVP normalizing flow with six affine coupling layers to the
latents of a reference cohort and flags volumes whose density falls below the τ-th percentile of the
reference (τ = 5 % and 3 % by default); the percentiles and flags are in :mod:`artifactqc.density.flags`.
This module fits the flow with `zuko <https://github.com/probabilists/zuko>`_ (``zuko.flows.RealNVP``).

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
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

#: Fitting is refused below this many reference volumes.
MIN_REFERENCE = 8
#: Quantiles (in percent) of the reference log-density recorded in ``flow.json``.
REF_QUANTILES = (1, 3, 5, 10, 25, 50, 75, 90, 95, 99)
FLOW_WEIGHTS = "flow.safetensors"
FLOW_META = "flow.json"
_SD_FLOOR = 1e-8


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

        from .. import __version__

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"flow.{k}": v.detach().cpu().contiguous() for k, v in self.flow.state_dict().items()}
        tensors["standardize.mean"] = torch.from_numpy(np.ascontiguousarray(self.mean, dtype=np.float64))
        tensors["standardize.sd"] = torch.from_numpy(np.ascontiguousarray(self.sd, dtype=np.float64))
        tensors["reference.log_density"] = torch.from_numpy(
            np.ascontiguousarray(self.reference_log_density, dtype=np.float64)
        )
        weights = d / FLOW_WEIGHTS
        from ..atomic import atomic_path

        # one metadata key only: safetensors writes the metadata map in arbitrary order, so a second key made
        # the bytes (and flow_sha256 in every score row) of identical flows differ between runs
        with atomic_path(weights) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "artifactqc-flow"})
        from ..io import sha256_file

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
        from ..atomic import write_text

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
    from safetensors.torch import load_file

    from ..io import sha256_file

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
