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
    "score": "artifact severity score ≥ 0 (volume aggregate); 1 is the review threshold: "
             "max(score_learned, 2 × severity_clipping)",
    "score_learned": "the encoder's own score (before the clipping check); equals score unless severity_clipping set it",
    "severity_noise": "predicted noise severity in [0,1]",
    "severity_ghosting": "predicted ghosting severity in [0,1]",
    "severity_motion": "predicted motion severity in [0,1]",
    "severity_bias": "predicted bias-field severity in [0,1]",
    "severity_resolution": "predicted resolution-loss (thick slices, blur) severity in [0,1]",
    "severity_clipping": "measured (not learned) intensity-clipping/saturation severity in [0,1] from saturation "
                         "(artifactqc.encoder.saturation; benchmarks/saturation)",
    "saturation": "fraction of head pixels of the scorer's slices on the upper intensity plateau (|x - 1| < 0.001 "
                  "after the scorer's 0.5/99.5 percentile scaling): the clipping check's measure",
    "score_planes": "slices the score and non-resolution severities come from: all (three orientations) or the "
                    "acquisition planes (sagittal/coronal/axial) of a thick-slice 2D scan (config score.planes)",
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


def model_identity(model_dir: str | Path, info: dict) -> dict:
    """``{"model_id", "model_sha256"}`` of the encoder loaded from ``model_dir`` with model.json ``info``:
    its id and the sha256 of its weights file (verified against model.json by
    :func:`artifactqc.encoder.checkpoint.load_model`; hashed here when model.json does not record it)."""
    from .io import sha256_file

    sha = info.get("weights_sha256") or sha256_file(Path(model_dir) / info.get("weights_file", "encoder.safetensors"))
    return {"model_id": str(info.get("model_id") or Path(model_dir).name), "model_sha256": sha}


def score_shard(
    volumes: pd.DataFrame,
    ingest_failures: pd.DataFrame,
    model_dir: str | Path,
    *,
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
    sheet_rows: pd.DataFrame | None = None,
    planes: str = "acquisition",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score the ingested volumes of one shard; returns ``(rows, score_failures)``.

    ``rows`` has one row per volume of the shard, ingested or not, in sheet order of the
    ingested ones followed by the ingest failures. ``sheet_rows`` (the shard's cohort rows) give every
    row, failed ones included, its sheet identity (site, subject, session, contrast, ...) and the sheet's
    extra columns (after the provenance columns; one named like a score column gets a ``sheet_`` prefix).
    """
    from .encoder.checkpoint import load_model
    from .encoder.score import score_volumes

    model = load_model(model_dir, device=device)
    identity = model_identity(model_dir, model.model_info)
    raw = score_volumes(model, volumes["path"].tolist(), batch_size=batch_size, device=device, threads=threads,
                        planes=planes)
    raw = raw.drop(columns=["path"])
    ids = volumes[[c for c in ID_COLUMNS if c in volumes.columns]].reset_index(drop=True)
    rows = pd.concat([ids, raw.reset_index(drop=True)], axis=1)
    rows["error"] = rows["error"].fillna("").astype(str)
    rows.loc[rows["status"] != "ok", "error"] = "score: " + rows.loc[rows["status"] != "ok", "error"]
    rows["input_sha256"] = volumes["sha256"].to_numpy()
    failed = rows[rows["status"] != "ok"]
    score_fails = failures_frame(
        ((r.volume_id, r.path, "score", r.error.split(": ", 2)[1] if r.error.count(": ") >= 2 else "score_error",
          r.error.split(": ", 2)[-1])
         for r in failed.itertuples()),
        sites=zip(rows["volume_id"], rows["site"]),
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
    rows["model_id"] = identity["model_id"]
    rows["model_sha256"] = identity["model_sha256"]
    if sheet_rows is not None and len(sheet_rows):
        rows = with_sheet_columns(rows, sheet_rows)
    for c in ID_COLUMNS:
        if c in rows.columns:
            rows[c] = rows[c].fillna("").astype(str)
    rows["n_slices"] = rows["n_slices"].fillna(0).astype("int64")
    return rows, score_fails


def with_sheet_columns(rows: pd.DataFrame, sheet_rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with each volume's sheet identity filled in where empty (a volume that failed at ingest has
    only its id and path) and the sheet's extra columns appended."""
    from .cohort import COHORT_COLUMNS

    sheet = sheet_rows.drop_duplicates("volume_id").set_index("volume_id")
    rows = rows.copy()
    for c in ID_COLUMNS:
        if c in sheet.columns and c != "path":
            known = rows["volume_id"].map(sheet[c])
            if c in rows.columns:
                empty = rows[c].isna() | (rows[c].astype(str) == "")
                rows.loc[empty, c] = known[empty]
            else:
                rows[c] = known
    for c in [c for c in sheet.columns if c not in COHORT_COLUMNS]:
        name = c if c not in rows.columns and c not in COLUMN_DOCS else f"sheet_{c}"
        rows[name] = rows["volume_id"].map(sheet[c]).fillna("").astype(str)
    return rows


def add_density(rows: pd.DataFrame, flow_dir: str | Path, *, taus=(5, 3), rule: str, score_threshold: float,
                config_sha256: str) -> pd.DataFrame:
    """Log-density, reference percentile, τ flags and ``flagged``, then the provenance columns.

    A rule with a ``site`` term needs every site's reference (:mod:`artifactqc.sitescore`): the shard's
    ``flagged`` is then left empty (NA) and set by :func:`gather`."""
    from .density.flags import rule_uses_site, score_table
    from .density.flow import load_flow

    flow = load_flow(flow_dir)
    check_flow_encoder(rows, flow_dir)
    site_rule = rule_uses_site(rule)
    out = score_table(rows, flow, taus=taus, rule="score" if site_rule else rule, score_threshold=score_threshold)
    if site_rule:
        out["flagged"] = pd.array([pd.NA] * len(out), dtype="boolean")
    out["config_sha256"] = config_sha256
    out["artifactqc_version"] = __version__
    out["code_version"] = code_version()
    return out


class FlowEncoderMismatch(ValueError):
    """Score rows and a flow made with different encoders: their latents are not comparable."""


def flow_encoder(flow_dir: str | Path) -> dict:
    """``{"model_id", "model_sha256"}`` of the encoder whose latents the flow was fitted on (flow.json)."""
    meta = json.loads((Path(flow_dir) / "flow.json").read_text())
    return {"model_id": meta.get("model_id"), "model_sha256": meta.get("model_sha256")}


def check_flow_encoder(rows: pd.DataFrame, flow_dir: str | Path) -> None:
    """Raise :class:`FlowEncoderMismatch` unless every scored row comes from the encoder the flow was
    fitted on (flow.json's ``model_sha256``; a flow that does not record it is refused too)."""
    enc = flow_encoder(flow_dir)
    scored = rows.loc[rows["status"] == "ok", "model_sha256"].astype(str)
    if not enc["model_sha256"]:
        raise FlowEncoderMismatch(
            f"{Path(flow_dir) / 'flow.json'}: records no model_sha256, so the encoder it was fitted on is unknown; "
            "refit it (delete the folder, or use a new flow.id)"
        )
    other = sorted(set(scored) - {enc["model_sha256"]})
    if other:
        raise FlowEncoderMismatch(
            f"{Path(flow_dir) / 'flow.json'}: fitted on the latents of encoder {enc['model_id']} "
            f"(sha256 {enc['model_sha256'][:12]}…) but {int(scored.isin(other).sum())} row(s) were scored by "
            f"another encoder (sha256 {other[0][:12]}…); their densities would be meaningless. Fit a flow for "
            "that encoder (a new model.id gets its own flow folder)"
        )


class IncompleteCohort(ValueError):
    """The score shards do not cover every ingested volume."""


def gather(parts: list[pd.DataFrame], per_site: bool = False, min_site_reference: int = 20, *,
           ingested: pd.DataFrame | None = None, site_score: dict | None = None) -> pd.DataFrame:
    """The cohort table from shard tables; with ``per_site`` adds within-site percentiles. With ``ingested``
    (``volumes.parquet``), every ingested volume must have a row (else :class:`IncompleteCohort`).

    ``site_score`` (keyword arguments of :func:`artifactqc.sitescore.add_site_scores`: ``reference``,
    ``reference_ids``, ``min_reference``, ``min_scale``, ``rule``, ``score_threshold``, ``site_threshold``)
    adds the site-aware score and, for rules with a ``site`` term, sets ``flagged``."""
    parts = [p for p in parts if len(p)]
    cohort = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(COLUMN_DOCS))
    if ingested is not None:
        lost = sorted(set(ingested["volume_id"].astype(str)) - set(cohort["volume_id"].astype(str)))
        if lost:
            raise IncompleteCohort(f"{len(lost)} ingested volume(s) have no score row, e.g. {lost[:5]}: the score "
                                   "shards are older than the cohort table; rerun")
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
    from .atomic import write_tsv

    write_tsv(cohort, path, na_rep="NA", float_format="%.6g")


def write_reference_manifest(volumes_parquet: str | Path, out: str | Path, explicit: str | Path | None = None) -> pd.DataFrame:
    """Freeze the flow's reference: ``explicit`` (a TSV with a ``volume_id`` column) or every ingested volume.

    Ids of an explicit manifest that are not in the ingested volumes are an error naming them. A volume
    whose bytes duplicate an earlier one (``duplicate_of``) is left out: its first copy is in, and the flow's
    reference density must not count one image twice.
    """
    volumes = pd.read_parquet(volumes_parquet, columns=["volume_id", "site", "duplicate_of"])
    if explicit:
        ids = pd.read_csv(explicit, sep="\t", dtype=str)
        if "volume_id" not in ids.columns:
            raise ValueError(f"{explicit}: reference manifest needs a 'volume_id' column (found {list(ids.columns)})")
        unknown = sorted(set(ids["volume_id"]) - set(volumes["volume_id"]))
        if unknown:
            raise ValueError(f"{explicit}: {len(unknown)} reference volume_id(s) were not ingested, e.g. {unknown[:5]}")
        volumes = volumes[volumes["volume_id"].isin(set(ids["volume_id"]))]
    copies = volumes["duplicate_of"].fillna("").astype(str) != ""
    if copies.any():
        log.info("reference manifest: %d duplicate-content copies left out (their first copy is in)", int(copies.sum()))
    ref = volumes.loc[~copies, ["volume_id", "site"]]
    from .atomic import write_tsv

    write_tsv(ref, out)
    log.info("reference manifest: %d volumes from %d sites -> %s", len(ref), ref["site"].nunique(), out)
    return ref


def fit_flow_for_reference(scores: pd.DataFrame, reference_tsv: str | Path, weights_out: str | Path, *,
                           flow_id: str, model_dir: str | Path, **fit_kwargs) -> Path:
    """Fit the density flow on the reference volumes' latents and save it beside ``weights_out``.

    ``model_dir`` is the encoder that scored the rows: its id and weights sha256 go into ``flow.json``, and
    reference rows scored by any other encoder are an error (:class:`FlowEncoderMismatch`)."""
    from .density.fit import fit_flow_from_table
    from .io import sha256_file

    encoder = model_identity(model_dir, {k: v for k, v in json.loads((Path(model_dir) / "model.json").read_text()).items()
                                         if k != "weights_sha256"})
    ref = pd.read_csv(reference_tsv, sep="\t", dtype=str)
    in_ref = scores["volume_id"].isin(set(ref["volume_id"])) & (scores["status"] == "ok")
    stale = sorted(set(scores.loc[in_ref, "model_sha256"].astype(str)) - {encoder["model_sha256"]})
    if stale:
        raise FlowEncoderMismatch(
            f"{reference_tsv}: reference rows were scored by encoder sha256 {stale[0][:12]}…, not by "
            f"{model_dir} ({encoder['model_sha256'][:12]}…); rescore them before fitting the flow"
        )
    flow = fit_flow_from_table(
        scores, reference_ids=ref["volume_id"].tolist(), reference_sha256=sha256_file(reference_tsv),
        flow_id=flow_id, **fit_kwargs,
    )
    used = sorted(scores.loc[(scores["status"] == "ok") & scores["volume_id"].isin(set(ref["volume_id"])), "volume_id"])
    return flow.save(Path(weights_out).parent, extra={"reference_volume_ids": used, **encoder})
