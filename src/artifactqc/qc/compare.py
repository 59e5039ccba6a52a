"""The workflow's simulated-artifact evaluation set and the MRIQC comparison (Table-2 analogue).

Hays et al. (Table 2) report, per simulated artifact type, mean ± sd of MRIQC's CJV, CNR, EFC and FBER and
of their score, and the Pearson r of each with the simulated severity. This module builds the same table
from the cohort itself, so it needs no extra data:

1. :func:`reference_volumes` picks, per contrast, the cleanest volumes of the scored cohort (status ok, not
   flagged, lowest score) that were **not** used to train the encoder (paths in the training manifest are
   excluded; if a contrast has nothing else, its training volumes are used and the row says so).
2. :func:`simulated_rows` (per contrast: :func:`simulate_contrast`, one workflow job each; :func:`summarise`
   gathers them) corrupts each reference volume at every (artifact, severity) with
   :func:`artifactqc.simulate.simulate_volume` (3D, native resolution; intensities brought to ~[0, 1] by a
   pure scale, :func:`artifactqc.encoder.slices.scale_for_simulation`, as for the encoder's training pool, so the
   background and its noise floor stay for the IQMs that need them: EFC, FBER, SNRd, QI1) and measures the corrupted volume twice: the encoder's score and per-artifact
   severities through the same slice path as cohort scoring (:func:`artifactqc.encoder.slices.extract_from_array`,
   :func:`artifactqc.encoder.score.score_slices`: encoder + clipping check), and artifactqc's MRIQC-style IQMs
   (:func:`artifactqc.qc.iqm.compute_iqms`). Severity 0 (the clean volume) is measured once and counted in
   every artifact type's rows, as the clean end of each ladder.
3. :func:`comparison_table` is :func:`artifactqc.qc.evaluate.compare_with_severity` over the score and the IQMs
   (per type and severity: n, mean, sd; per type: Pearson and Spearman r with the severity), and
   :func:`artifactqc.qc.evaluate.to_markdown` renders it.

The same seed gives the same random draws (ghost count, motion timing, noise) at every severity of one
volume and artifact, so each ladder differs only in severity.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: IQMs in the comparison table (Hays et al. used the first four); see :data:`artifactqc.qc.iqm.IQM_COLUMNS`.
COMPARE_IQMS = ("cjv", "cnr", "efc", "fber", "snr_total", "inu_med", "qi_1")


#: Column descriptions of the per-volume rows (Parquet field metadata).
ROW_DOCS = {
    "volume_id": "reference volume the artifact was simulated onto",
    "site": "site of the reference volume",
    "contrast": "contrast of the reference volume",
    "path": "input file of the reference volume",
    "used_for_training": "the reference volume was in the encoder's training data (no other clean volume)",
    "artifact": "simulated artifact type (severity 0 rows are the clean volume, repeated for each type)",
    "severity": "simulated severity in [0, 1] (artifactqc.simulate calibration)",
    "seed": "random seed of the simulation (same for every severity of one ladder)",
    "score": "score of the corrupted volume as a cohort row would get it (1 = review threshold): "
             "max(score_learned, 2 x severity_clipping)",
    "score_learned": "the encoder's own score of the corrupted volume",
    "severity_clipping": "measured intensity-clipping severity in [0,1] (artifactqc.encoder.saturation)",
    "saturation": "fraction of head pixels on the upper intensity plateau (the clipping check's measure)",
    "score_planes": "slices the score came from: all, or the acquisition planes of a thick-slice scan (score.planes)",
    "iqm_status": "ok or failed (IQMs could not be computed; see iqm_error)",
    "params": "simulator parameters and random draws (JSON)",
    "seconds": "wall seconds for simulation + scoring + IQMs",
}

#: Column descriptions of the comparison table.
TABLE_DOCS = {
    "artifact": "artifact type, or 'all' (pooled)",
    "severity_bin": "simulated severity, or 'all' (the row carrying the correlations)",
    "metric": "'score' (artifactqc encoder) or an IQM name (artifactqc.qc.iqm)",
    "n": "number of simulated volumes with a finite value",
    "mean": "mean of the metric",
    "sd": "standard deviation of the metric (ddof 1)",
    "pearson_r": "Pearson r of the metric with the simulated severity (severity_bin 'all' rows)",
    "spearman_r": "Spearman r of the metric with the simulated severity (severity_bin 'all' rows)",
}


def training_paths(model_dir, selection_files: Iterable[str] = ()) -> list[str]:
    """Input files the encoder saw: its model.json training/validation volumes and the ``raw_path`` column of
    the workflow's training selection tables (the preprocessed copies have other paths)."""
    from pathlib import Path

    paths: list[str] = []
    meta = Path(model_dir) / "model.json"
    if meta.is_file():
        training = json.loads(meta.read_text()).get("training", {})
        paths += [str(p) for p in training.get("train_volumes", []) + training.get("val_volumes", [])]
    for f in selection_files:
        sel = pd.read_csv(f, sep="\t", dtype=str)
        if "raw_path" in sel:
            paths += sel["raw_path"].dropna().tolist()
    return paths


def reference_volumes(
    scores: pd.DataFrame,
    per_contrast: int = 1,
    exclude_paths: Iterable[str] = (),
    contrasts: Iterable[str] | None = None,
    flag_col: str = "flagged",
) -> pd.DataFrame:
    """Per contrast, the ``per_contrast`` ok, unflagged, lowest-scoring volumes not in ``exclude_paths``.

    Returns their score rows plus ``used_for_training`` (True only when a contrast had no other volume).
    ``contrasts`` limits the contrasts considered (default: every contrast with an ok volume).
    """
    excl = {os.path.realpath(str(p)) for p in exclude_paths}
    ok = scores[(scores["status"].astype(str) == "ok") & np.isfinite(scores["score"].astype(float))].copy()
    if flag_col in ok:
        ok = ok[~ok[flag_col].fillna(False).astype(bool)]
    ok["used_for_training"] = ok["path"].astype(str).map(lambda p: os.path.realpath(p) in excl)
    wanted = sorted(ok["contrast"].dropna().astype(str).unique()) if contrasts is None else list(contrasts)
    picks = []
    for c in wanted:
        sub = ok[ok["contrast"].astype(str) == c]
        fresh = sub[~sub["used_for_training"]]
        pool = fresh if len(fresh) else sub
        if pool.empty:
            log.info("contrast %s: no ok, unflagged volume: not in the simulated set", c)
            continue
        if fresh.empty:
            log.warning("contrast %s: every clean volume was used for training; using training volumes", c)
        picks.append(pool.sort_values(["score", "volume_id"]).head(int(per_contrast)))
    if not picks:
        return ok.iloc[:0]
    return pd.concat(picks, ignore_index=True)


def _measure(model, data, affine, contrast, use_n4, seed, planes: str = "acquisition") -> dict:
    """Encoder outputs and IQMs of one (possibly corrupted) volume."""
    from . import iqm
    from ..encoder.score import score_slices
    from ..encoder.slices import extract_from_array

    row: dict = {}
    t0 = time.perf_counter()
    sl, info = extract_from_array(data, affine, model.slice_cfg)
    row.update(score_slices(model, sl, voxel_mm=info["voxel_mm"], planes=planes))
    row["n_slices"] = int(info["n_slices"])
    row["score_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        vals = iqm.compute_iqms(data, contrast, affine=affine, use_n4=use_n4, seed=seed)
        row.update(vals)
        row["iqm_status"] = "ok"
        row["iqm_error"] = ""
    except Exception as exc:  # noqa: BLE001 - one failed IQM set must not lose the others
        log.warning("IQMs failed: %s: %s", type(exc).__name__, exc)
        row["iqm_status"] = "failed"
        row["iqm_error"] = f"{type(exc).__name__}: {exc}"
    row["iqm_seconds"] = time.perf_counter() - t0
    return row


def simulated_rows(
    model,
    refs: pd.DataFrame,
    artifacts: Sequence[str],
    severities: Sequence[float],
    seed: int = 0,
    use_n4: bool = True,
    planes: str = "acquisition",
) -> pd.DataFrame:
    """One row per (reference volume, artifact, severity): the score, the five severity heads, the IQMs and
    the simulator's parameters (``params`` as JSON). See the module docstring."""
    from ..io import load_volume
    from ..encoder.slices import scale_for_simulation
    from ..simulate import simulate_volume

    sevs = sorted({float(s) for s in severities})
    rows = []
    for i, ref in enumerate(refs.itertuples(index=False)):
        vol = load_volume(ref.path)
        data = scale_for_simulation(vol.data)
        base = {"volume_id": ref.volume_id, "site": getattr(ref, "site", ""), "contrast": ref.contrast,
                "path": ref.path, "used_for_training": bool(getattr(ref, "used_for_training", False))}
        clean = None
        for j, art in enumerate(artifacts):
            for s in sevs:
                ladder_seed = int(seed) + 1000 * i + j
                t0 = time.perf_counter()
                if s == 0.0:
                    if clean is None:
                        clean = _measure(model, data, vol.affine, ref.contrast, use_n4, seed, planes)
                    vals, params = clean, {"artifact": art, "severity": 0.0}
                else:
                    corrupted, params = simulate_volume(data, art, s, seed=ladder_seed, spacing=vol.zooms)
                    vals = _measure(model, corrupted, vol.affine, ref.contrast, use_n4, seed, planes)
                rows.append({**base, "artifact": art, "severity": s, "seed": ladder_seed, **vals,
                             "params": json.dumps(params, default=str), "seconds": time.perf_counter() - t0})
                log.info("%s %s %.2f: score %.3f (%.1f s)", ref.volume_id, art, s, vals["score"],
                         rows[-1]["seconds"])
    return pd.DataFrame(rows)


def comparison_table(rows: pd.DataFrame, iqms: Sequence[str] = COMPARE_IQMS) -> pd.DataFrame:
    """Table-2 analogue over ``score`` and the IQMs present in ``rows`` (one severity bin per level)."""
    from .evaluate import compare_with_severity

    metrics = ["score"] + [m for m in iqms if m in rows.columns and np.isfinite(rows[m].astype(float)).any()]
    return compare_with_severity(rows, metrics, severity_col="severity", type_col="artifact", bins=None)


def comparison_markdown(table: pd.DataFrame, rows: pd.DataFrame) -> str:
    """The table as markdown, preceded by what was simulated onto which volumes."""
    from .evaluate import to_markdown

    refs = rows.drop_duplicates("volume_id")
    desc = ", ".join(
        f"{r.volume_id} ({r.contrast}{', a training volume' if r.used_for_training else ''})"
        for r in refs.itertuples(index=False)
    )
    corr = table[(table["severity_bin"] == "all")].pivot(index="artifact", columns="metric", values="pearson_r")
    corr = corr[[c for c in table["metric"].drop_duplicates() if c in corr.columns]]
    head = (
        "Simulated artifacts on the cohort's cleanest volumes not used for training: " + desc + ".\n"
        "Each artifact at each severity (3D, native resolution); score = artifactqc encoder, IQMs = "
        "artifactqc's MRIQC-style image-quality metrics. Cells: mean ± sd over volumes.\n\n"
        "Pearson r with the simulated severity, per artifact type:\n\n"
        + to_markdown(corr.reset_index(), digits=2)
        + "\nPer artifact and severity:\n\n"
    )
    return head + to_markdown(table)


def simulate_contrast(
    scores: pd.DataFrame,
    model_dir,
    contrast: str,
    exclude_paths: Iterable[str] = (),
    artifacts: Sequence[str] = ("noise", "ghosting", "bias", "anisotropy", "motion"),
    severities: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    per_contrast: int = 1,
    seed: int = 0,
    use_n4: bool = True,
    device: str = "auto",
    planes: str = "acquisition",
) -> pd.DataFrame:
    """The simulated rows of one contrast (rule ``compare_simulate``, one job per contrast); no rows when the
    contrast has no ok, unflagged volume."""
    from ..encoder.checkpoint import load_model

    refs = reference_volumes(scores, per_contrast, exclude_paths, contrasts=[contrast])
    if refs.empty:
        return pd.DataFrame(columns=list(ROW_DOCS))
    model = load_model(model_dir, device=device)
    return simulated_rows(model, refs, artifacts, severities, seed=seed, use_n4=use_n4, planes=planes)


def summarise(parts: Iterable[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """All contrasts' rows → (rows, table, markdown) (rule ``compare_mriqc``)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no contrast has an ok, unflagged scored volume to simulate artifacts on")
    rows = pd.concat(parts, ignore_index=True)
    table = comparison_table(rows)
    return rows, table, comparison_markdown(table, rows)
