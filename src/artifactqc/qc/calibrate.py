"""Few-label calibration: manual ratings in, a small calibrated classifier with per-site thresholds out.

Real cohorts carry *some* manual ratings (a pilot, a site's own QC, the review page's exports). This
module turns them into a probability of failure per volume, ``p_fail``, and a calibrated flag:

1. **Ratings** (:mod:`artifactqc.qc.ratings`): TSV files ``volume_id, rating, note, rater, time`` as the review
   page exports them. ``rating`` is ``accept``/``doubtful``/``exclude`` or the page's keys ``1``/``2``/``3``
   (1 = accept, 2 = doubtful, 3 = exclude), stored as the words. Unknown volume ids, unknown ratings,
   a volume rated twice in one file, a missing column or an empty file raise :class:`~artifactqc.qc.ratings.RatingsError`
   naming the file and line. A volume rated in several files keeps its latest rating (``time``).
   The words then go through the same ``labels.fail_values`` / ``labels.pass_values`` mapping as the
   sheet's ``label`` column (:func:`artifactqc.qc.evaluate.map_ratings`); a ratings-file rating replaces
   the sheet's label of that volume. By default ``exclude`` = fail, ``accept`` = pass and ``doubtful`` is
   in neither list: kept in the table, not used for fitting or evaluation.
2. **Site-robust scaling** (:func:`robust_scalers`): each feature is centred on its site's median and
   divided by 1.4826 × its site's MAD, computed over *all* ok volumes of the site (no labels needed, so
   a new site is rescaled before anyone rates it: MRIQC's per-site rescaling). A site with fewer than
   ``min_site_n`` volumes, or a MAD of 0, falls back to the pooled statistics. Features marked
   ``global`` are scaled with the pooled median/MAD instead (the absolute level of the score matters).
3. **Classifier** (:func:`fit`): L2 logistic regression (``sklearn.linear_model.LogisticRegression``),
   fit by log-loss, so its output is a calibrated probability on the training distribution; optional
   sample weights (the few-label benchmark up-weights a new site's rated scans).
4. **Thresholds**: the global threshold on ``p_fail`` maximises balanced accuracy on inner
   cross-validated predictions of the training labels; a site with rated fails and passes gets its own
   balanced-accuracy threshold, shrunk towards the global one with weight ``n_site / (n_site + prior_n)``.
5. **Evaluation** (:func:`cross_validate`): stratified K-fold over the rated volumes; the model *and* its
   thresholds are refitted on the other folds' ratings (the scalers use no ratings), so no volume is judged
   by a model or threshold fitted on its own rating. Metrics (sensitivity, specificity, balanced accuracy, AUROC, stratified
   bootstrap CIs) come from :func:`artifactqc.qc.evaluate.evaluate_flags`.

The fitted model is saved as JSON (:meth:`Calibration.to_json`): feature names and scaling kinds, the
per-site medians/MADs, coefficients, intercept and thresholds; applying it needs numpy only. Never pickle.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .ratings import merge_labels, read_ratings

log = logging.getLogger(__name__)

#: MAD → standard deviation of a normal distribution.
MAD_SCALE = 1.4826


# ------------------------------------------------------------------------------------------ scaling
def _numeric(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    try:
        return df[list(columns)].astype(np.float64)
    except (TypeError, ValueError):
        return df[list(columns)].apply(pd.to_numeric, errors="coerce").astype(np.float64)


def robust_scalers(df: pd.DataFrame, columns: Sequence[str], site_col: str = "site", min_site_n: int = 5,
                   global_columns: Iterable[str] = ()) -> dict:
    """Per-site and pooled ``median`` and ``scale`` (1.4826 × MAD) of each feature column.

    Returns ``{"pooled": {col: [median, scale]}, "sites": {site: {col: [median, scale]}}}``; a site with
    fewer than ``min_site_n`` finite values of a column, or a MAD of 0, gets the pooled statistics for
    it, and so does every column in ``global_columns``. (A pooled MAD of 0 falls back to the standard
    deviation, then to 1.)"""
    columns = list(columns)
    glob = set(global_columns)
    x = _numeric(df, columns)
    x = x.where(np.isfinite(x))
    med = x.median()
    scale = MAD_SCALE * (x - med).abs().median()
    sd = x.std(ddof=0)
    scale = scale.where(scale > 0, sd.where(sd > 0, 1.0)).fillna(1.0)
    med = med.fillna(0.0)
    pooled = {c: [float(med[c]), float(scale[c])] for c in columns}
    sites = {}
    if len(df):
        site = df[site_col].astype(str)
        g = x.groupby(site, sort=True)
        smed = g.median()
        smad = MAD_SCALE * (x - smed.loc[site].set_axis(x.index)).abs().groupby(site, sort=True).median()
        n, M, S = g.count().to_numpy(), smed.to_numpy(), smad.to_numpy()
        own = (n >= min_site_n) & np.isfinite(M) & (S > 0) & ~np.isin(columns, list(glob))[None, :]
        for i, s in enumerate(smed.index):
            sites[str(s)] = {c: ([float(M[i, j]), float(S[i, j])] if own[i, j] else pooled[c])
                             for j, c in enumerate(columns)}
    return {"pooled": pooled, "sites": sites}


def apply_scalers(df: pd.DataFrame, columns: Sequence[str], scalers: Mapping, site_col: str = "site") -> np.ndarray:
    """The scaled feature matrix ``[n, len(columns)]`` (clipped to ±20); a site absent from ``scalers``
    uses the pooled statistics; missing values become 0 (the site's median)."""
    columns = list(columns)
    sites = df[site_col].astype(str).to_numpy()
    names = sorted(set(sites))
    stats = np.array([[scalers["sites"].get(s, scalers["pooled"])[c] for c in columns] for s in names],
                     dtype=np.float64).reshape(len(names), len(columns), 2)
    idx = np.searchsorted(np.array(names, dtype=object), sites) if len(names) else np.zeros(0, int)
    v = _numeric(df, columns).to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (v - stats[idx, :, 0]) / stats[idx, :, 1]
    return np.where(np.isfinite(x), np.clip(x, -20, 20), 0.0)


# ------------------------------------------------------------------------------------------ model
def balanced_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold on ``p`` (flag when ``p >= t``) with the best balanced accuracy, placed midway
    between neighbouring predictions; ties go to the threshold nearest 0.5. NaN without both classes."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    if y.all() or not y.any():
        return float("nan")
    u = np.unique(p)
    cands = np.concatenate([[u[0] - 1e-9], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-9]]) if u.size > 1 else np.array([u[0]])
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    sens = 1.0 - np.searchsorted(pos, cands, side="left") / pos.size  # share of fails with p >= t
    spec = np.searchsorted(neg, cands, side="left") / neg.size  # share of passes with p < t
    ba = 0.5 * (sens + spec)
    best = np.flatnonzero(ba >= ba.max() - 1e-12)
    t = cands[best[np.argmin(np.abs(cands[best] - 0.5))]]
    return float(np.clip(t, 0.0, 1.0))


@dataclass
class Calibration:
    """A fitted calibration: scalers, logistic coefficients and per-site thresholds (JSON-serialisable)."""

    features: list[str]
    global_features: list[str]
    scalers: dict
    coef: list[float]
    intercept: float
    threshold: float
    site_thresholds: dict = field(default_factory=dict)
    site_labels: dict = field(default_factory=dict)
    C: float = 1.0
    prior_n: float = 20.0
    site_col: str = "site"

    def decision(self, df: pd.DataFrame) -> np.ndarray:
        X = apply_scalers(df, self.features, self.scalers, self.site_col)
        return X @ np.asarray(self.coef, dtype=np.float64) + float(self.intercept)

    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        """``p_fail`` of every row (logistic of the linear decision)."""
        return 1.0 / (1.0 + np.exp(-self.decision(df)))

    def thresholds_for(self, sites: Iterable) -> np.ndarray:
        return np.array([self.site_thresholds.get(str(s), self.threshold) for s in sites], dtype=np.float64)

    def flag(self, df: pd.DataFrame, p: np.ndarray | None = None) -> np.ndarray:
        """``p_fail >= the site's threshold`` (the global one for a site without its own)."""
        p = self.predict_proba(df) if p is None else p
        return p >= self.thresholds_for(df[self.site_col].astype(str))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "Calibration":
        keys = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in keys})

    def save(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": "artifactqc-calibration/1", **self.to_json(), **extra}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_json(json.loads(Path(path).read_text()))


def _fit_lr(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, C: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="newton-cholesky", max_iter=200).fit(X, y, sample_weight=w)


def _inner_predictions(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, C: float, seed: int) -> np.ndarray:
    """Out-of-fold probabilities of the training labels (stratified, up to 5 folds)."""
    from sklearn.model_selection import StratifiedKFold

    k = int(min(5, y.sum(), (~y).sum()))
    if k < 2:
        return np.full(y.size, np.nan)
    p = np.empty(y.size)
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y):
        if y[tr].all() or not y[tr].any():
            p[te] = np.nan
            continue
        p[te] = _fit_lr(X[tr], y[tr], None if w is None else w[tr], C).predict_proba(X[te])[:, 1]
    return p


def fit(df: pd.DataFrame, features: Sequence[str], *, label_col: str = "fail", site_col: str = "site",
        global_features: Iterable[str] = (), scale_df: pd.DataFrame | None = None, weights: np.ndarray | None = None,
        C: float = 1.0, prior_n: float = 20.0, min_site_n: int = 5, seed: int = 0) -> Calibration:
    """Fit the calibration on the rated rows of ``df`` (``label_col`` boolean; NA rows are skipped).

    Scalers come from ``scale_df`` (default ``df``: all rows, rated or not). Thresholds: see the module
    docstring (inner cross-validated predictions, so they are not tuned on in-sample probabilities).
    Raises ``ValueError`` with fewer than 2 fails or 2 passes."""
    features = list(features)
    scale_df = df if scale_df is None else scale_df
    scalers = robust_scalers(scale_df, features, site_col, min_site_n, global_features)
    rated = df[label_col].notna().to_numpy()
    d = df[rated]
    y = d[label_col].astype(bool).to_numpy()
    if y.sum() < 2 or (~y).sum() < 2:
        raise ValueError(f"calibration needs at least 2 fail and 2 pass ratings; have {int(y.sum())} fail, "
                         f"{int((~y).sum())} pass")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[rated]
    X = apply_scalers(d, features, scalers, site_col)
    lr = _fit_lr(X, y, w, C)
    p_in = _inner_predictions(X, y, w, C, seed)
    ok = np.isfinite(p_in)
    thr = balanced_threshold(y[ok], p_in[ok]) if ok.any() else float("nan")
    if not np.isfinite(thr):
        thr = 0.5
    site_thr, site_labels = {}, {}
    sites = d[site_col].astype(str).to_numpy()
    for s in sorted(set(sites)):
        m = sites == s
        site_labels[s] = {"n": int(m.sum()), "n_fail": int(y[m].sum())}
        mm = m & ok
        t_s = balanced_threshold(y[mm], p_in[mm]) if mm.any() else float("nan")
        if np.isfinite(t_s):
            a = m.sum() / (m.sum() + prior_n)
            site_thr[s] = float(a * t_s + (1 - a) * thr)
    return Calibration(features=features, global_features=sorted(set(global_features) & set(features)),
                       scalers=scalers, coef=[float(c) for c in lr.coef_[0]], intercept=float(lr.intercept_[0]),
                       threshold=float(thr), site_thresholds=site_thr, site_labels=site_labels, C=float(C),
                       prior_n=float(prior_n), site_col=site_col)


def cross_validate(df: pd.DataFrame, features: Sequence[str], *, label_col: str = "fail", site_col: str = "site",
                   n_folds: int = 5, seed: int = 0, **fit_kw) -> pd.DataFrame:
    """Out-of-fold ``p_fail_cv`` and ``flagged_calibrated_cv`` for every rated row (``fold`` says which).

    Stratified by site × label so each fold sees every site's ratings in proportion; the scalers use all
    rows (unsupervised), the model and its thresholds only the other folds' labels."""
    from sklearn.model_selection import StratifiedKFold

    rated = df[df[label_col].notna()].copy()
    y = rated[label_col].astype(bool).to_numpy()
    k = int(min(n_folds, y.sum(), (~y).sum()))
    out = pd.DataFrame({"p_fail_cv": np.nan, "flagged_calibrated_cv": pd.NA, "fold": -1}, index=rated.index)
    out["flagged_calibrated_cv"] = out["flagged_calibrated_cv"].astype("boolean")
    if k < 2:
        return out
    strata = rated[site_col].astype(str) + "|" + pd.Series(y, index=rated.index).astype(str)
    counts = strata.value_counts()
    strata = strata.where(strata.map(counts) >= k, pd.Series(y, index=rated.index).astype(str))
    for i, (tr, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(rated, strata)):
        train = df.copy()
        train[label_col] = train[label_col].astype("boolean")
        train.loc[rated.index[te], label_col] = pd.NA  # held-out labels invisible to the fit
        try:
            cal = fit(train, features, label_col=label_col, site_col=site_col, seed=seed, **fit_kw)
        except ValueError:
            continue
        test = rated.iloc[te]
        p = cal.predict_proba(test)
        out.loc[test.index, "p_fail_cv"] = p
        out.loc[test.index, "flagged_calibrated_cv"] = cal.flag(test, p)
        out.loc[test.index, "fold"] = i
    return out


# ------------------------------------------------------------------------------------------ workflow
#: severity columns used as calibration features (``severity_clipping``, the measured clipping check, only when
#: the table has it and it varies: see :func:`workflow_features`)
SEVERITIES = ("severity_noise", "severity_ghosting", "severity_motion", "severity_bias", "severity_resolution",
              "severity_clipping")

#: Column descriptions of the calibrated cohort table's new columns.
COLUMN_DOCS = {
    "label": "manual rating used: the ratings files' (accept/doubtful/exclude) where given, else the sheet's",
    "label_source": "where the rating came from: 'sheet', '<ratings file>:<line>' or '' (unrated)",
    "rater": "rater named in the ratings file",
    "rating_time": "time of the rating in the ratings file",
    "rating_note": "the rater's note",
    "fail": "rating mapped with labels.fail_values / pass_values (NA: unrated, or a rating in neither list)",
    "p_fail": "calibrated probability that a reviewer fails the volume (model fitted on every rating)",
    "p_fail_threshold": "the volume's site threshold on p_fail (results/calibration/thresholds.tsv)",
    "flagged_calibrated": "p_fail >= the site's calibrated threshold (results/calibration/thresholds.tsv)",
    "p_fail_cv": "out-of-fold p_fail of a rated volume (its own rating unseen by the model); NA when unrated",
    "flagged_calibrated_cv": "out-of-fold calibrated flag of a rated volume (model and threshold fitted without it)",
}


def workflow_features(df: pd.DataFrame, iqm_cols: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The calibration features of a cohort table: ``score`` (pooled scaling), the site-relative score
    (``score_site`` when the table has it, else ``score`` scaled per site), the severities (:data:`SEVERITIES`) and
    ``density_pct`` (pooled scaling) and the IQMs (per-site scaling). Columns without two distinct finite
    values are left out. Returns ``(frame with the added columns, features, pooled-scaled features)``."""
    d = df.copy()
    if "score_site" not in d:
        d["score_site_relative"] = d["score"]
        site_score = "score_site_relative"
    else:
        site_score = "score_site"
    glob = ["score", *SEVERITIES, "density_pct"]
    feats = ["score", site_score, *SEVERITIES, "density_pct", *iqm_cols]
    keep = []
    for c in feats:
        if c in d:
            v = pd.to_numeric(d[c], errors="coerce").to_numpy(dtype=np.float64)
            d[c] = v
            if np.unique(v[np.isfinite(v)]).size >= 2:
                keep.append(c)
    return d, keep, [c for c in glob if c in keep]


def _label_counts(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("site", sort=True)
    rated = df["label"].astype(str).str.strip() != ""
    return pd.DataFrame({
        "n_volumes": g.size(),
        "n_rated": rated.groupby(df["site"]).sum(),
        "n_fail": df["fail"].eq(True).groupby(df["site"]).sum(),
        "n_pass": df["fail"].eq(False).groupby(df["site"]).sum(),
        "n_unmapped": (rated & df["fail"].isna()).groupby(df["site"]).sum(),
    }).fillna(0).astype(int)


def calibrate_cohort(scores: pd.DataFrame, ratings_paths: Sequence[str | Path], fail_values: Iterable,
                     pass_values: Iterable, iqm_tables: Iterable[pd.DataFrame] = (), *, n_boot: int = 1000,
                     seed: int = 0, C: float = 1.0, prior_n: float = 20.0, min_site_n: int = 5,
                     n_folds: int = 5) -> dict:
    """Everything the ``calibrate`` rule writes, as frames: ``cohort`` (the scores table with the label
    columns, ``p_fail``, ``flagged_calibrated`` and their out-of-fold ``_cv`` versions), ``thresholds``
    (per site: volumes, ratings, fails, passes, threshold and its source), ``metrics`` (cross-validated
    metrics pooled and per site, next to the raw flag on the same volumes), ``labels`` (every rating used),
    ``model`` (:class:`Calibration` or None) and ``status`` (a sentence: fitted, or why not).

    Ratings files are read and checked first (:func:`read_ratings`), against the cohort's volume ids."""
    from .evaluate import evaluate_flags
    from ..report.stage import join_iqms

    ratings = read_ratings(ratings_paths, known_ids=scores["volume_id"].astype(str))
    merged = merge_labels(scores, ratings, fail_values, pass_values)
    ok = merged["status"].astype(str) == "ok"
    failed_rated = merged[~ok & merged["fail"].notna()]
    if len(failed_rated):
        log.warning("%d rated volume(s) were not scored and are left out: %s", len(failed_rated),
                    ", ".join(failed_rated["volume_id"].astype(str).head(20)))
    withiqm, iqm_cols = join_iqms(merged, iqm_tables)
    feats_df, features, glob = workflow_features(withiqm[ok], iqm_cols)
    feats_df["fail"] = feats_df["fail"].astype("boolean")
    out = merged.copy()
    for c in ("p_fail", "p_fail_threshold", "p_fail_cv"):
        out[c] = np.nan
    out["flagged_calibrated"] = pd.array([pd.NA] * len(out), dtype="boolean")
    out["flagged_calibrated_cv"] = pd.array([pd.NA] * len(out), dtype="boolean")
    fit_kw = dict(global_features=glob, C=C, prior_n=prior_n, min_site_n=min_site_n)
    model, status = None, ""
    try:
        model = fit(feats_df, features, seed=seed, **fit_kw)
        status = (f"fitted on {int(feats_df['fail'].notna().sum())} rated volumes "
                  f"({int(feats_df['fail'].eq(True).sum())} fail) with features {', '.join(features)}")
    except ValueError as exc:
        status = f"not fitted: {exc}"
        log.warning("calibration %s", status)
    if model is not None:
        p = model.predict_proba(feats_df)
        out.loc[feats_df.index, "p_fail"] = p
        out.loc[feats_df.index, "flagged_calibrated"] = model.flag(feats_df, p)
        out.loc[feats_df.index, "p_fail_threshold"] = model.thresholds_for(feats_df["site"].astype(str))
        cv = cross_validate(feats_df, features, n_folds=n_folds, seed=seed, **fit_kw)
        out.loc[cv.index, "p_fail_cv"] = cv["p_fail_cv"]
        out.loc[cv.index, "flagged_calibrated_cv"] = cv["flagged_calibrated_cv"]
        n_rated, n_cv = len(cv), int(cv["p_fail_cv"].notna().sum())
        if n_cv < n_rated:
            n_fail = int(feats_df["fail"].eq(True).sum())
            status += (f"; the out-of-fold evaluation covers {n_cv} of {n_rated} rated volumes: each fold's fit needs "
                       f"at least 2 fail and 2 pass ratings of the other folds, and {n_fail} rated fails are too few "
                       "(at least 3, better 10 or more)")
            log.warning("calibration: out-of-fold evaluation covers %d of %d rated volumes", n_cv, n_rated)
    # thresholds and label counts per site
    counts = _label_counts(out[ok])
    thr = counts.reset_index().rename(columns={"index": "site"})
    thr["threshold"] = [model.site_thresholds.get(str(s), model.threshold) if model else np.nan for s in thr["site"]]
    thr["threshold_source"] = ["site (shrunk to global)" if model and str(s) in model.site_thresholds
                               else ("global" if model else "not fitted") for s in thr["site"]]
    # cross-validated metrics, next to the raw flag on the same volumes
    rated = out[ok & out["fail"].notna()].copy()
    mrows = []
    if model is not None:
        ev = rated.assign(flagged_calibrated_cv=rated["flagged_calibrated_cv"].astype("Float64").astype(float),
                          flagged=rated["flagged"].astype(bool).astype(float))
        for scope, g in [("pooled", ev), *((str(s), x) for s, x in ev.groupby("site", sort=True))]:
            t = evaluate_flags(g, "fail", ["flagged_calibrated_cv", "flagged"], ["p_fail_cv", "score"],
                               n_boot=n_boot, seed=seed)
            t.insert(0, "scope", scope)
            mrows.append(t)
    metrics = pd.concat(mrows, ignore_index=True) if mrows else pd.DataFrame(columns=["scope", "metric"])
    labels = out.loc[out["label"].astype(str).str.strip() != "",
                     ["volume_id", "site", "status", "label", "fail", "label_source", "rater", "rating_time", "rating_note"]]
    return {"cohort": out, "thresholds": thr, "metrics": metrics, "labels": labels.reset_index(drop=True),
            "model": model, "status": status}


def metrics_markdown(res: Mapping) -> str:
    """``results/calibration/metrics.md``: status, thresholds and label counts per site, cross-validated metrics."""
    from ..report.figures import markdown_table
    from ..report.stage import ci_cell

    L = ["# Calibration against the manual ratings", "", f"Status: {res['status']}.", "",
         "Ratings → fail with labels.fail_values / labels.pass_values; a rating in neither list (by default "
         "'doubtful') is counted under n_unmapped and not used. `p_fail` is a logistic regression on "
         "site-robust scaled features; each site's threshold on p_fail is the balanced-accuracy optimum of "
         "inner cross-validated predictions, shrunk towards the global threshold.", "",
         "## Sites", "", markdown_table(res["thresholds"]), ""]
    m = res["metrics"]
    if len(m):
        L += ["## Cross-validated metrics", "",
              "`flagged_calibrated_cv` and `p_fail_cv` are out-of-fold: every rated volume is judged by a model and "
              "threshold fitted without its rating. `flagged` and `score` are the uncalibrated flag and score on the "
              "same volumes. 95 % stratified bootstrap CIs in brackets.", "",
              "| scope | metric | n | n_fail | sensitivity | specificity | balanced accuracy | AUROC |",
              "|---|---|---:|---:|---|---|---|---|"]

        for _, r in m.iterrows():
            L.append(f"| {r['scope']} | {r['metric']} | {int(r['n'])} | {int(r['n_fail'])} | {ci_cell(r, 'sensitivity')} | "
                     f"{ci_cell(r, 'specificity')} | {ci_cell(r, 'balanced_accuracy')} | {ci_cell(r, 'auroc')} |")
    return "\n".join(L) + "\n"


def write_calibration(scores: pd.DataFrame, ratings_paths: Sequence[str | Path], out: Mapping[str, str | Path], *,
                      fail_values: Iterable, pass_values: Iterable, iqm_tables: Iterable[pd.DataFrame] = (),
                      provenance: Mapping | None = None, **kw) -> dict:
    """Run :func:`calibrate_cohort` and write ``out['model']`` (JSON), ``out['thresholds']``,
    ``out['labels']`` (TSV), ``out['metrics']`` (TSV), ``out['markdown']``, ``out['cohort']`` (Parquet) and
    ``out['tsv']`` (the cohort table as TSV). ``provenance`` (input hashes) goes into the model JSON."""
    from ..provenance import write_parquet
    from ..shards import COLUMN_DOCS as SCORE_DOCS, export_tsv

    res = calibrate_cohort(scores, ratings_paths, list(fail_values), list(pass_values), iqm_tables, **kw)
    extra = {"status": res["status"], "fail_values": list(fail_values), "pass_values": list(pass_values),
             "provenance": dict(provenance or {})}
    if res["model"] is not None:
        res["model"].save(out["model"], **extra)
    else:
        Path(out["model"]).write_text(json.dumps({"format": "artifactqc-calibration/1", **extra}, indent=1))
    res["thresholds"].to_csv(out["thresholds"], sep="\t", index=False, float_format="%.6g")
    res["labels"].to_csv(out["labels"], sep="\t", index=False)
    res["metrics"].to_csv(out["metrics"], sep="\t", index=False, float_format="%.6g")
    Path(out["markdown"]).write_text(metrics_markdown(res))
    docs = {**SCORE_DOCS, **COLUMN_DOCS}
    write_parquet(res["cohort"], out["cohort"], docs)
    export_tsv(res["cohort"], out["tsv"])
    return res
