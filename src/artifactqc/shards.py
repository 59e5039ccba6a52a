"""Cohort scoring tables: one shard of a site at a time, then the cohort.

The workflow scores each ingest shard (≤ 500 volumes of one site) with one loaded encoder
(:func:`score_shard`), adds the flow's log-density, percentiles and flags (:func:`add_density`), and
gathers the shards into ``results/scores/cohort.parquet`` (:func:`gather`). Every row carries its
provenance: the input file's sha256, the model's and flow's ids and sha256, the hash of the config
sections that shape the scores, and the artifactqc version.

A volume that failed at ingest appears with ``status = 'failed'`` and the ingest reason; a volume that
fails at scoring gets the same plus a failures row with stage ``score``. Nothing stops the shard.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .cohort import COLUMN_DOCS as INGEST_DOCS
from .cohort import failures_frame
from .provenance import code_version
from .sitescore import COLUMN_DOCS as SITE_DOCS

log = logging.getLogger(__name__)

ID_COLUMNS = ("volume_id", "site", "subject", "session", "contrast", "path", "bids_name", "label")

COLUMN_DOCS = {
    **{k: INGEST_DOCS[k] for k in ID_COLUMNS},
    "status": "'ok' when the volume was scored, 'failed' otherwise",
    "error": "why a volume was not scored ('<stage>: <error_type>: <message>'); '' when ok",
    "score": "artifact severity score ≥ 0 (volume aggregate); 1 is the review threshold",
    "severity_noise": "predicted noise severity in [0,1]",
    "severity_ghosting": "predicted ghosting severity in [0,1]",
    "severity_motion": "predicted motion severity in [0,1]",
    "severity_bias": "predicted bias-field severity in [0,1]",
    "severity_resolution": "predicted resolution-loss (thick slices, blur) severity in [0,1]",
    "n_slices": "number of 2D slices the volume score aggregates",
    "seconds": "wall-clock seconds spent scoring the volume",
    "log_density": "log-density of the volume's latent under the flow (latent space units)",
    "density_pct": "percentile of log_density among the flow's reference volumes (0-100)",
    "density_pct_site": "percentile of log_density within the volume's own site (per-site calibration)",
    "pct_scope": "which reference density_pct_site used: 'site', or 'pooled' for sites with too few volumes",
    "flagged": "the config rule flags.rule over score > flags.score_threshold, the tau flags and (rules with a "
               "site term, set at the cohort gather; empty in the shards) score_site > site_score.threshold",
    **SITE_DOCS,
    "input_sha256": "SHA-256 of the scored file (from ingest)",
    "model_id": "id of the encoder that produced score, severities and latents",
    "model_sha256": "SHA-256 of the encoder's safetensors file",
    "flow_id": "id of the density flow",
    "flow_sha256": "SHA-256 of the flow's safetensors file",
    "config_sha256": "SHA-256 of the config sections that shape the scores (model, score, flow, flags)",
    "artifactqc_version": "artifactqc version that wrote the row",
    "code_version": "artifactqc version plus git describe of the source, when known",
}


def _model_meta(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "model.json").read_text())


def score_shard(
    volumes: pd.DataFrame,
    ingest_failures: pd.DataFrame,
    model_dir: str | Path,
    *,
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score the ingested volumes of one shard; returns ``(rows, score_failures)``.

    ``rows`` has one row per volume of the shard, ingested or not, in sheet order of the
    ingested ones followed by the ingest failures.
    """
    from .encoder.score import score_volumes

    meta = _model_meta(model_dir)
    raw = score_volumes(model_dir, volumes["path"].tolist(), batch_size=batch_size, device=device, threads=threads)
    raw = raw.drop(columns=["path"])
    ids = volumes[[c for c in ID_COLUMNS if c in volumes.columns]].reset_index(drop=True)
    rows = pd.concat([ids, raw.reset_index(drop=True)], axis=1)
    rows["error"] = rows["error"].fillna("").astype(str)
    rows.loc[rows["status"] != "ok", "error"] = "score: " + rows.loc[rows["status"] != "ok", "error"]
    rows["input_sha256"] = volumes["sha256"].to_numpy()
    failed = rows[rows["status"] != "ok"]
    score_fails = failures_frame(
        (r.volume_id, r.path, "score", r.error.split(": ", 2)[1] if r.error.count(": ") >= 2 else "score_error",
         r.error.split(": ", 2)[-1])
        for r in failed.itertuples()
    )
    if len(ingest_failures):
        lost = ingest_failures.rename(columns={"message": "_msg"})
        extra = pd.DataFrame(
            {
                "volume_id": lost["volume_id"],
                "path": lost["path"],
                "status": "failed",
                "error": "ingest: " + lost["error_type"] + ": " + lost["_msg"],
                "input_sha256": "",
            }
        )
        rows = pd.concat([rows, extra], ignore_index=True)
    rows["model_id"] = meta.get("model_id", "")
    rows["model_sha256"] = meta.get("weights_sha256") or meta.get("sha256") or ""
    for c in ID_COLUMNS:
        if c in rows.columns:
            rows[c] = rows[c].fillna("").astype(str)
    rows["n_slices"] = rows["n_slices"].fillna(0).astype("int64")
    return rows, score_fails


def add_density(rows: pd.DataFrame, flow_dir: str | Path, *, taus=(5, 3), rule: str, score_threshold: float,
                config_sha256: str) -> pd.DataFrame:
    """Log-density, reference percentile, τ flags and ``flagged``, then the provenance columns.

    A rule with a ``site`` term needs every site's reference (:mod:`artifactqc.sitescore`): the shard's
    ``flagged`` is then left empty (NA) and set by :func:`gather`."""
    from .density.flags import rule_uses_site, score_table
    from .density.flow import load_flow

    flow = load_flow(flow_dir)
    site_rule = rule_uses_site(rule)
    out = score_table(rows, flow, taus=taus, rule="score" if site_rule else rule, score_threshold=score_threshold)
    if site_rule:
        out["flagged"] = pd.array([pd.NA] * len(out), dtype="boolean")
    out["config_sha256"] = config_sha256
    out["artifactqc_version"] = __version__
    out["code_version"] = code_version()
    return out


def gather(parts: list[pd.DataFrame], per_site: bool = False, min_site_reference: int = 20, *,
           site_score: dict | None = None) -> pd.DataFrame:
    """The cohort table from shard tables; with ``per_site`` adds within-site percentiles.

    ``site_score`` (keyword arguments of :func:`artifactqc.sitescore.add_site_scores`: ``reference``,
    ``reference_ids``, ``min_reference``, ``min_scale``, ``rule``, ``score_threshold``, ``site_threshold``)
    adds the site-aware score and, for rules with a ``site`` term, sets ``flagged``."""
    parts = [p for p in parts if len(p)]
    cohort = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(COLUMN_DOCS))
    if site_score is not None and len(cohort):
        from .sitescore import add_site_scores

        cohort = add_site_scores(cohort, **site_score)
        cohort["flagged"] = cohort["flagged"].astype(bool)
    if per_site and len(cohort):
        from .density.flags import site_percentiles

        ok = (cohort["status"] == "ok") & np.isfinite(cohort["log_density"].astype(float))
        tmp = cohort[["site", "log_density"]].assign(in_reference=ok.to_numpy())
        sp = site_percentiles(tmp, "site", min_site_reference=min_site_reference)
        cohort["density_pct_site"] = sp["density_pct_site"].to_numpy()
        cohort["pct_scope"] = sp["pct_scope"].to_numpy()
    return cohort


def export_tsv(cohort: pd.DataFrame, path: str | Path) -> None:
    """A flat TSV keyed by ``volume_id`` / ``bids_name`` (lists and NaN written plainly)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cohort.to_csv(path, sep="\t", index=False, na_rep="NA", float_format="%.6g")


def write_reference_manifest(volumes_parquet: str | Path, out: str | Path, explicit: str | Path | None = None) -> pd.DataFrame:
    """Freeze the flow's reference: ``explicit`` (a TSV with a ``volume_id`` column) or every ingested volume.

    Ids of an explicit manifest that are not in the ingested volumes are an error naming them.
    """
    volumes = pd.read_parquet(volumes_parquet, columns=["volume_id", "site"])
    if explicit:
        ids = pd.read_csv(explicit, sep="\t", dtype=str)
        if "volume_id" not in ids.columns:
            raise ValueError(f"{explicit}: reference manifest needs a 'volume_id' column (found {list(ids.columns)})")
        unknown = sorted(set(ids["volume_id"]) - set(volumes["volume_id"]))
        if unknown:
            raise ValueError(f"{explicit}: {len(unknown)} reference volume_id(s) were not ingested, e.g. {unknown[:5]}")
        ref = volumes[volumes["volume_id"].isin(set(ids["volume_id"]))]
    else:
        ref = volumes
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    ref.to_csv(out, sep="\t", index=False)
    log.info("reference manifest: %d volumes from %d sites -> %s", len(ref), ref["site"].nunique(), out)
    return ref


def fit_flow_for_reference(scores: pd.DataFrame, reference_tsv: str | Path, weights_out: str | Path, *,
                           flow_id: str, **fit_kwargs) -> Path:
    """Fit the density flow on the reference volumes' latents and save it beside ``weights_out``."""
    from .density.fit import fit_flow_from_table
    from .io import sha256_file

    ref = pd.read_csv(reference_tsv, sep="\t", dtype=str)
    flow = fit_flow_from_table(
        scores, reference_ids=ref["volume_id"].tolist(), reference_sha256=sha256_file(reference_tsv),
        flow_id=flow_id, **fit_kwargs,
    )
    used = sorted(scores.loc[(scores["status"] == "ok") & scores["volume_id"].isin(set(ref["volume_id"])), "volume_id"])
    return flow.save(Path(weights_out).parent, extra={"reference_volume_ids": used})
