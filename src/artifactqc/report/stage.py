"""End-of-workflow report stage: builds the report figures and the label evaluation from the cohort tables.

Thin glue between the workflow's tables (``results/scores/cohort.parquet``, ``results/cohort/*.parquet``,
the flow and the encoder folders) and the plotting/evaluation functions of :mod:`artifactqc.report.figures` and
:mod:`artifactqc.qc.evaluate`; the workflow scripts call one function each:

* :func:`make_report_figures` — cohort overview, per-site score distributions, latent plane with the τ
  contours, per-site thumbnail strips and per-contrast image rulers.
* :func:`evaluate_labels` — rating → fail mapping, metrics with bootstrap CIs for ``score > threshold``,
  each τ flag and ``flagged``, AUROC of the continuous score, a markdown table and a ROC figure.

Image rulers (:func:`ruler_rungs`): one clean reference volume per contrast (lowest score among the volumes
that are not flagged) is corrupted in 3D with :func:`artifactqc.simulate.simulate_volume` — the simulator
the encoder's training pool uses — at increasing severity with fixed random draws, and each corrupted
volume is scored exactly like a cohort volume (model slices, encoder, volume aggregation); the displayed
image is the axial mid-slice of the model's slices. A 3D corruption costs seconds per rung (motion the
most), so the number of rungs (``figures.ruler.severities``) sets most of the figure job's time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Default ruler artifacts and severities.
RULER_ARTIFACTS = ("motion", "ghosting", "noise", "bias")
RULER_SEVERITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def failures_table(*tables: pd.DataFrame) -> pd.DataFrame:
    """Failure rows of every stage (ingest, scoring, ...) in one frame; a row counted once per
    ``(volume_id, stage, error_type)``."""
    parts = [t for t in tables if t is not None and len(t)]
    if not parts:
        return pd.DataFrame(columns=["volume_id", "path", "stage", "error_type", "message"])
    f = pd.concat(parts, ignore_index=True)
    keys = [c for c in ("volume_id", "stage", "error_type") if c in f.columns]
    return f.drop_duplicates(subset=keys or None).reset_index(drop=True)


def overview_table(volumes: pd.DataFrame, failures: pd.DataFrame, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every cohort volume for :func:`artifactqc.report.figures.plot_cohort_overview`: the ingested volumes plus one
    ``status="failed"`` row per failed volume not among them. Site and contrast of a failed volume come from
    the scores table when it has them, else ``"?"`` / ``"unknown"`` (ingest failure rows carry neither)."""
    cols = ["volume_id", "site", "contrast", "status"]
    v = volumes.reindex(columns=cols).copy()
    v["status"] = v["status"].fillna("ok")
    f = failures[~failures["volume_id"].astype(str).isin(set(v["volume_id"].astype(str)))] if len(failures) else failures
    if f is None or not len(f):
        return v
    f = f.drop_duplicates("volume_id")[["volume_id"]].assign(site="", contrast="", status="failed")
    if scores is not None and len(scores):
        known = scores.drop_duplicates("volume_id").set_index(scores.drop_duplicates("volume_id")["volume_id"].astype(str))
        for c in ("site", "contrast"):
            if c in known:
                f[c] = f["volume_id"].astype(str).map(known[c]).fillna("").astype(str)
    f["site"] = f["site"].where(f["site"].str.strip() != "", "?")
    f["contrast"] = f["contrast"].where(f["contrast"].str.strip() != "", "unknown")
    return pd.concat([v, f[cols]], ignore_index=True)


# ------------------------------------------------------------------------------------------ rulers
def ruler_reference(scores: pd.DataFrame, contrast: str, flag_col: str = "flagged") -> pd.Series | None:
    """The reference volume of a contrast for its ruler: the ok, unflagged volume with the lowest score
    (any ok volume when all are flagged); ``None`` when the contrast has no ok volume."""
    ok = scores[(scores["status"].astype(str) == "ok") & (scores["contrast"].astype(str) == str(contrast))]
    ok = ok[np.isfinite(ok["score"].astype(float))]
    if ok.empty:
        return None
    clean = ok[~ok[flag_col].fillna(False).astype(bool)] if flag_col in ok else ok
    pool = clean if len(clean) else ok
    return pool.sort_values(["score", "volume_id"]).iloc[0]


def ruler_rungs(model, path, artifact: str, severities: Sequence[float] = RULER_SEVERITIES, seed: int = 0,
                batch_size: int = 64, planes: str = "acquisition") -> list[tuple[float, np.ndarray, float]]:
    """``[(severity, display image, volume score), …]`` for :func:`artifactqc.report.figures.plot_image_ruler`.

    The volume (brought to ~[0, 1] by a pure scale as for training, :func:`artifactqc.encoder.slices.scale_for_simulation`)
    is corrupted in 3D at its native resolution with :func:`artifactqc.simulate.simulate_volume` at each
    severity with the same seed (only the severity changes between rungs; the scale does not change the
    scorer's slices, so rung 0 is the file as scored), then goes through the scorer's
    own path: :func:`artifactqc.encoder.slices.extract_from_array` with the model's slice geometry and
    :func:`artifactqc.encoder.score.score_slices` (encoder + clipping check) — so each rung's score is the score a cohort volume with that
    artifact would get. The image is the axial mid-slice, oriented for ``plot_image_ruler`` (which rotates
    by 90°).
    """
    from ..io import load_volume
    from ..encoder.slices import scale_for_simulation
    from ..encoder.score import score_slices
    from ..simulate import simulate_volume
    from ..encoder.slices import extract_from_array

    vol = load_volume(path)
    data = scale_for_simulation(vol.data)
    n_ax = int(model.slice_cfg.slices_per_axis)
    rungs = []
    for s in severities:
        corrupted, _ = simulate_volume(data, artifact, float(s), seed=int(seed), spacing=vol.zooms)
        sl, info = extract_from_array(corrupted, vol.affine, model.slice_cfg)
        mid = 2 * n_ax + n_ax // 2 if sl.shape[0] >= 3 * n_ax else sl.shape[0] // 2
        score = score_slices(model, sl, batch_size, voxel_mm=info["voxel_mm"], planes=planes)["score"]
        rungs.append((float(s), np.clip(np.rot90(sl[mid], -1), 0, 1), float(score)))
    return rungs


def plot_rulers(scores: pd.DataFrame, model_dir, out_dir, artifacts: Iterable[str] = RULER_ARTIFACTS,
                severities: Sequence[float] = RULER_SEVERITIES, threshold: float = 1.0, seed: int = 0,
                device: str = "auto", flag_col: str = "flagged", planes: str = "acquisition") -> list[Path]:
    """One image ruler per (contrast, artifact): ``<out_dir>/ruler_<contrast>_<artifact>.png``, with the
    flagged volumes of that contrast placed on the score axis."""
    from . import figures
    from ..encoder.checkpoint import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, device=device)
    paths = []
    ok = scores[scores["status"].astype(str) == "ok"]
    for contrast in sorted(c for c in ok["contrast"].dropna().astype(str).unique() if c):
        ref = ruler_reference(scores, contrast, flag_col)
        if ref is None:
            log.info("ruler %s: no ok volume, skipped", contrast)
            continue
        sub = scores[(scores["contrast"].astype(str) == contrast) & (scores["status"].astype(str) == "ok")]
        flagged = sub[sub[flag_col].fillna(False).astype(bool)] if flag_col in sub else sub.iloc[:0]
        for art in artifacts:
            rungs = ruler_rungs(model, ref["path"], art, severities, seed=seed, planes=planes)
            out = out_dir / f"ruler_{_safe(contrast)}_{_safe(art)}.png"
            figures.plot_image_ruler(rungs, out, art, contrast=f"{contrast}, reference {ref['volume_id']}",
                                    flagged=flagged[["volume_id", "score"]], threshold=threshold)
            log.info("ruler %s/%s: reference %s, rung scores %s", contrast, art, ref["volume_id"],
                     ", ".join(f"{r[2]:.2f}" for r in rungs))
            paths.append(out)
    return paths


# ------------------------------------------------------------------------------------------ figures
def make_report_figures(
    scores: pd.DataFrame,
    volumes: pd.DataFrame,
    failures: pd.DataFrame,
    flow_dir,
    model_dir,
    overview: str | Path,
    distributions: str | Path,
    latent: str | Path,
    thumbnails_dir: str | Path,
    rulers_dir: str | Path,
    taus: Sequence[float] = (5, 3),
    threshold: float = 1.0,
    thumbnails_k: int = 4,
    ruler_artifacts: Iterable[str] = RULER_ARTIFACTS,
    ruler_severities: Sequence[float] = RULER_SEVERITIES,
    seed: int = 0,
    device: str = "auto",
    planes: str = "acquisition",
) -> dict[str, list[Path]]:
    """Every report figure (see the module docstring); returns the written paths by kind."""
    from . import figures
    from ..density.flow import load_flow

    out: dict[str, list[Path]] = {}
    out["overview"] = [figures.plot_cohort_overview(overview_table(volumes, failures, scores), failures, overview)]
    out["distributions"] = [figures.plot_score_distributions(scores, distributions, threshold=threshold)]
    flow = load_flow(flow_dir) if flow_dir else None
    out["latent"] = [figures.plot_latent_plane(scores, latent, flow=flow, taus=taus)]
    Path(thumbnails_dir).mkdir(parents=True, exist_ok=True)
    out["thumbnails"] = figures.plot_thumbnail_strips(scores, thumbnails_dir, k=thumbnails_k)
    out["rulers"] = plot_rulers(scores, model_dir, rulers_dir, ruler_artifacts, ruler_severities,
                                threshold=threshold, seed=seed, device=device, planes=planes)
    return out


# ------------------------------------------------------------------------------------------ labels
def rating_mapping(fail_values: Iterable, pass_values: Iterable) -> dict:
    """``{rating: True (fail) / False (pass)}`` for :func:`artifactqc.qc.evaluate.map_ratings`; a value in
    both lists is an error."""
    fail_values, pass_values = list(fail_values), list(pass_values)
    both = {str(v).strip().lower() for v in fail_values} & {str(v).strip().lower() for v in pass_values}
    if both:
        raise ValueError(f"ratings listed as both fail and pass: {sorted(both)}")
    m = {v: True for v in fail_values}
    m.update({v: False for v in pass_values})
    return m


def label_frame(scores: pd.DataFrame, fail_values: Iterable, pass_values: Iterable,
                taus: Sequence[float] = (5, 3), threshold: float = 1.0) -> tuple[pd.DataFrame, list[str]]:
    """The ok, labelled rows with a boolean ``fail`` column and the flag columns to evaluate
    (``score>threshold``, ``flag_tau<τ>`` for each τ present, ``flagged``)."""
    from ..density.flags import tau_column
    from ..qc.evaluate import map_ratings

    df = scores[scores["status"].astype(str) == "ok"].copy()
    df["fail"] = map_ratings(df["label"], rating_mapping(fail_values, pass_values))
    unmapped = df.loc[df["fail"].isna() & (df["label"].astype(str).str.strip() != ""), "label"]
    if len(unmapped):
        log.warning("ratings not in labels.fail_values/pass_values (ignored): %s",
                    sorted(unmapped.astype(str).unique()))
    df = df[df["fail"].notna()].copy()
    score_flag = f"score>{threshold:g}"
    df[score_flag] = df["score"].astype(float) > threshold
    flags = [score_flag] + [c for c in (tau_column(t) for t in taus) if c in df.columns] + ["flagged"]
    for c in flags:
        df[c] = df[c].astype(bool)
    if "flagged_calibrated_cv" in df:  # out-of-fold calibrated flag (artifactqc.qc.calibrate); NA where not judged
        df["flagged_calibrated_cv"] = df["flagged_calibrated_cv"].astype("Float64").astype(float)
        flags.append("flagged_calibrated_cv")
    return df, flags


#: IQMs whose AUROC the label evaluation reports (artifactqc's own and, with prefix ``mriqc_``, imported).
EVAL_IQMS = ("cjv", "cnr", "efc", "fber", "snr_total", "snrd_total", "wm2max", "qi_1", "inu_range")


def join_iqms(scores: pd.DataFrame, tables: Iterable[pd.DataFrame] = ()) -> tuple[pd.DataFrame, list[str]]:
    """``scores`` with the :data:`EVAL_IQMS` of each IQM table joined on ``volume_id`` (artifactqc's own
    table: rows with ``status`` ok; an imported MRIQC table: rows with ``mriqc_status`` ok), and the names
    of the joined columns that hold at least one finite value."""
    out = scores.copy()
    added: list[str] = []
    for t in tables:
        if "mriqc_status" in t:
            t = t[t["mriqc_status"].astype(str) == "ok"]
            cols = [f"mriqc_{m}" for m in EVAL_IQMS]
        else:
            t = t[t["status"].astype(str) == "ok"] if "status" in t else t
            cols = list(EVAL_IQMS)
        cols = [c for c in cols if c in t and c not in out and np.isfinite(pd.to_numeric(t[c], errors="coerce")).any()]
        if not cols:
            continue
        right = t.drop_duplicates("volume_id")
        right = right.set_index(right["volume_id"].astype(str))
        for c in cols:
            out[c] = out["volume_id"].astype(str).map(pd.to_numeric(right[c], errors="coerce"))
        added += cols
    return out, added


def evaluate_labels(scores: pd.DataFrame, fail_values: Iterable, pass_values: Iterable,
                    taus: Sequence[float] = (5, 3), threshold: float = 1.0, n_boot: int = 1000,
                    seed: int = 0, iqm_tables: Iterable[pd.DataFrame] = ()) -> tuple[pd.DataFrame, dict]:
    """Metrics against the manual labels: one row per flag (sensitivity, specificity, balanced accuracy,
    AUROC of the 0/1 flag), one for the continuous ``score`` (and ``score_site``, ``score_learned``, ``p_fail_cv``
    when present) and one per IQM of ``iqm_tables``
    (:func:`join_iqms`; AUROC, and ``auroc_oriented`` = max(AUROC, 1 − AUROC) with its direction, since
    some IQMs fall and others rise with damage), with stratified bootstrap 95 % CIs
    (:func:`artifactqc.qc.evaluate.evaluate_flags`). Also returns the ROC curves of the flags and the score for
    :func:`artifactqc.report.figures.plot_roc_curves`."""
    from ..qc.evaluate import evaluate_flags, roc_curves

    scores, iqm_cols = join_iqms(scores, iqm_tables)
    df, flags = label_frame(scores, fail_values, pass_values, taus, threshold)
    # the site-aware score, the encoder's own score and the calibrated probability beside the reported score,
    # when the table has them
    extra = [c for c in ("score_site", "score_learned") if c in df and df[c].notna().any()]
    extra += ["p_fail_cv"] if "p_fail_cv" in df else []  # kept when empty: its n = 0 says no fold could judge
    table = evaluate_flags(df, "fail", flag_cols=flags, score_cols=["score", *extra, *iqm_cols], n_boot=n_boot,
                           seed=seed)
    table.insert(2, "n_pass", table["n"] - table["n_fail"])
    curves = {}
    dfn = df.assign(**{c: df[c].astype(float) for c in flags})
    roc = roc_curves(dfn, "fail", ["score", *extra] + flags)
    for _, r in table.iterrows():
        pts = roc[roc["metric"] == r["metric"]]
        if len(pts):
            curves[r["metric"]] = {"fpr": pts["fpr"].to_numpy(), "tpr": pts["tpr"].to_numpy(),
                                   "auc": float(r["auroc"]), "ci": (float(r["auroc_lo"]), float(r["auroc_hi"]))}
    return table, curves


def site_markdown(summary: pd.DataFrame, score_threshold: float) -> str:
    """The per-site table of the report (:func:`artifactqc.sitescore.site_summary`), with a line per site
    whose median score is at or above the review threshold."""
    has_flag, has_basis = "flagged" in summary, "basis" in summary
    head = ["site", "scans", "scored", "failed", "median score", f"share ≥ {score_threshold:g}"]
    head += ["flagged"] * has_flag + ["site-aware basis"] * has_basis + ["site-wide review"]
    numeric = 5 + has_flag  # right-aligned: scans ... flagged
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * numeric + "---|" * (len(head) - 1 - numeric)]
    for _, r in summary.iterrows():
        cells = [str(r["site"]), str(r["scans"]), str(r["scored"]), str(r["failed"]),
                 "" if not np.isfinite(r["median_score"]) else f"{r['median_score']:.2f}",
                 "" if not np.isfinite(r["above_threshold"]) else f"{r['above_threshold']:.2f}"]
        cells += ([str(r["flagged"])] if has_flag else []) + ([str(r["basis"])] if has_basis else [])
        cells.append("**yes**" if r["site_review"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    review = summary.loc[summary["site_review"], "site"].tolist()
    note = ""
    if review:
        one = len(review) == 1
        note = (f"**Site-wide review: {', '.join(review)}.** The typical scan of "
                f"{'this site' if one else 'these sites'} scores at or above the review threshold "
                f"{score_threshold:g}: either the whole delivery is bad or the site's protocol or scanner reads as "
                "an artifact to the encoder. Per-scan flags cannot tell the two apart (and site-aware rules hide "
                f"both): look at a few {'of its scans' if one else 'scans of each'}.\n\n")
    return ("Sites, by median score (status ok). `site-wide review` = the site's median score is at or above the "
            f"review threshold {score_threshold:g}.\n\n" + note + "\n".join(lines) + "\n")


def ci_cell(r, name: str) -> str:
    """``0.91 [0.85, 0.96]`` from a row's ``name``, ``name_lo``, ``name_hi`` (no CI when it is NaN; '' for NaN)."""
    v = r[name]
    if not np.isfinite(v):
        return ""
    lo, hi = r[f"{name}_lo"], r[f"{name}_hi"]
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) else f"{v:.2f}"


def label_markdown(table: pd.DataFrame) -> str:
    """Markdown table ``metric | kind | n | n_fail | sensitivity [CI] | specificity [CI] | balanced acc. [CI] |
    AUROC [CI] | direction``; continuous metrics show the oriented AUROC (max(AUROC, 1 − AUROC)) and which
    end means fail."""
    lines = ["| metric | kind | n | n_fail | sensitivity | specificity | balanced accuracy | AUROC | direction |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in table.iterrows():
        cont = r["kind"] == "score" and "auroc_oriented" in r
        auc = ci_cell(r, "auroc_oriented" if cont else "auroc")
        lines.append(f"| {r['metric']} | {r['kind']} | {int(r['n'])} | {int(r['n_fail'])} | "
                     + " | ".join(ci_cell(r, n) for n in ("sensitivity", "specificity", "balanced_accuracy"))
                     + f" | {auc} | {r.get('direction', '') if cont else ''} |")
    cal = ("`flagged_calibrated_cv` and `p_fail_cv` are the calibrated flag and probability (results/calibration/), "
           "out-of-fold: each rated volume judged by a calibration fitted without its rating; compare them with "
           "the raw `flagged` and `score` rows.\n\n") if table["metric"].astype(str).str.contains("calibrated").any() else ""
    return ("Label evaluation (positive class = fail; 95 % stratified bootstrap CIs in brackets). For the "
            "continuous score and the IQMs the AUROC is oriented (max(AUROC, 1 - AUROC)); `direction` says "
            "whether high or low values go with fail.\n\n" + cal
            + "\n".join(lines) + "\n")
