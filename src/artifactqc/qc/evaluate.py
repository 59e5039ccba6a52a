"""Evaluation against labels and severities: sensitivity/specificity, AUROC, bootstrap CIs, tables.

* :func:`map_ratings` turns manual ratings into a boolean ``fail`` (True = the scan should be
  excluded/reviewed) with an explicit mapping; unmapped ratings become missing, never pass.
* :func:`evaluate_flags` gives, for each boolean flag column, sensitivity, specificity and balanced
  accuracy, and for each continuous score column the AUROC (``sklearn.metrics.roc_auc_score``),
  all with percentile bootstrap 95% CIs (stratified resampling of scans, fixed seed; the
  resamples are handled as multiplicity vectors so 1000 resamples of 1000 scans take well under
  a second). :func:`bootstrap_ci` is the generic, slow version for any statistic.
* :func:`roc_curves` returns the ROC points for plotting.
* :func:`compare_with_severity` is the analogue of Table 2 of Hays et al.: per artifact type and
  severity bin, mean ± sd of each metric, and Pearson and Spearman r of each metric with the
  simulated severity, per type and overall. :func:`to_markdown` renders it.

Convention: the positive class is ``fail``. A score whose *low* values mean failure (e.g. CNR,
SNR) gets an AUROC below 0.5; :func:`evaluate_flags` reports the raw AUROC and, in
``auroc_oriented``, max(AUROC, 1 − AUROC) together with the direction, so that IQMs of either
polarity can be ranked.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

#: Default rating → fail mapping for MRIQC-style ratings (-1 exclude, 0 doubtful, 1 accept).
DEFAULT_RATING_MAP: dict = {-1: True, 0: False, 1: False}


def map_ratings(series: Iterable, mapping: Mapping | None = None) -> pd.Series:
    """Map ratings to a nullable boolean ``fail`` series (``pd.BooleanDtype``).

    ``mapping`` maps rating values to True (fail) / False (pass); keys are matched as given, and
    numeric ratings also by value (``1.0`` matches key ``1`` or ``"1"``), strings case-insensitively.
    Missing ratings and ratings absent from the mapping become ``<NA>``.
    """
    mapping = DEFAULT_RATING_MAP if mapping is None else mapping
    norm: dict = {}
    for k, v in mapping.items():
        norm[_norm_key(k)] = bool(v)
    s = pd.Series(series) if not isinstance(series, pd.Series) else series
    out = [norm.get(_norm_key(x), pd.NA) if not _is_missing(x) else pd.NA for x in s]
    return pd.Series(out, index=s.index, dtype="boolean", name="fail")


def _is_missing(x) -> bool:
    if x is None or x is pd.NA:
        return True
    if isinstance(x, float) and math.isnan(x):
        return True
    return isinstance(x, str) and x.strip().lower() in ("", "n/a", "na", "nan")


def _norm_key(x):
    if isinstance(x, (bool, np.bool_)):
        return ("b", bool(x))
    if isinstance(x, (int, float, np.integer, np.floating)):
        return ("n", float(x))
    sx = str(x).strip().lower()
    try:
        return ("n", float(sx))
    except ValueError:
        return ("s", sx)


def confusion(y_true: Sequence[bool], y_pred: Sequence[bool]) -> dict[str, int]:
    """Counts ``tp, fp, tn, fn`` with fail as the positive class."""
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    return {
        "tp": int(np.sum(t & p)),
        "fp": int(np.sum(~t & p)),
        "tn": int(np.sum(~t & ~p)),
        "fn": int(np.sum(t & ~p)),
    }


def sens_spec(y_true: Sequence[bool], y_pred: Sequence[bool]) -> dict[str, float]:
    """Sensitivity TP/(TP+FN), specificity TN/(TN+FP), balanced accuracy (their mean); NaN if undefined."""
    c = confusion(y_true, y_pred)
    sens = c["tp"] / (c["tp"] + c["fn"]) if (c["tp"] + c["fn"]) else float("nan")
    spec = c["tn"] / (c["tn"] + c["fp"]) if (c["tn"] + c["fp"]) else float("nan")
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": 0.5 * (sens + spec)}


def auroc(y_true: Sequence[bool], score: Sequence[float]) -> float:
    """AUROC (``sklearn.metrics.roc_auc_score``) of ``score`` for fail; NaN if one class is absent."""
    from sklearn.metrics import roc_auc_score

    t = np.asarray(y_true, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if t.all() or not t.any():
        return float("nan")
    return float(roc_auc_score(t, s))


def auroc_rank(y_true: Sequence[bool], score: Sequence[float]) -> float:
    """AUROC as the Mann-Whitney U statistic from mid-ranks (ties count 1/2).

    Numerically identical to :func:`auroc` (tested) and ~50x faster, so it is what the bootstrap
    uses for continuous scores.
    """
    from scipy.stats import rankdata

    t = np.asarray(y_true, dtype=bool)
    n1 = int(t.sum())
    n0 = t.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.asarray(score, dtype=np.float64))
    return float((r[t].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _bootstrap_indices(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> Iterable[np.ndarray]:
    """Stratified resamples: positives and negatives resampled separately (keeps both classes)."""
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    for _ in range(n_boot):
        yield np.concatenate([rng.choice(pos, pos.size, replace=True), rng.choice(neg, neg.size, replace=True)])


def bootstrap_ci(
    stat,
    y_true: Sequence[bool],
    x: Sequence,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap ``(1 − alpha)`` CI of ``stat(y_true, x)``.

    Resampling is stratified by class (see :func:`_bootstrap_indices`); resamples where the
    statistic is undefined (NaN) are dropped. Deterministic for a given ``seed``.
    """
    y = np.asarray(y_true, dtype=bool)
    xv = np.asarray(x)
    point = float(stat(y, xv))
    if not y.any() or y.all() or n_boot <= 0:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = np.array([stat(y[idx], xv[idx]) for idx in _bootstrap_indices(y, n_boot, rng)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def _stratified_counts(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicities of each positive (``C``, n_boot × n1) and negative (``D``, n_boot × n0) scan in
    ``n_boot`` stratified bootstrap resamples (each class resampled with replacement to its size)."""
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    C = rng.multinomial(n1, np.full(n1, 1.0 / n1), size=n_boot).astype(np.float64)
    D = rng.multinomial(n0, np.full(n0, 1.0 / n0), size=n_boot).astype(np.float64)
    return C, D


def auroc_weighted(x_pos: np.ndarray, x_neg: np.ndarray, C: np.ndarray, D: np.ndarray) -> np.ndarray:
    """AUROC of resamples given as multiplicities ``C`` (rows × n_pos) and ``D`` (rows × n_neg).

    ``AUC = Σ_i Σ_j C_i D_j ([x_i > x_j] + ½[x_i = x_j]) / (Σ C · Σ D)``, computed with one sort
    of the negatives and cumulative sums, so ``n_boot`` resamples cost O(n_boot · n) without
    ranking each resample. Equals :func:`auroc` of the expanded resample (tested).
    """
    order = np.argsort(x_neg, kind="mergesort")
    xs = x_neg[order]
    cum = np.concatenate([np.zeros((D.shape[0], 1)), np.cumsum(D[:, order], axis=1)], axis=1)
    left = np.searchsorted(xs, x_pos, side="left")
    right = np.searchsorted(xs, x_pos, side="right")
    below = cum[:, left]
    ties = cum[:, right] - below
    num = (C * (below + 0.5 * ties)).sum(axis=1)
    return num / (C.sum(axis=1) * D.sum(axis=1))


def _fast_cis(y: np.ndarray, x: np.ndarray, kind: str, n_boot: int, seed: int, alpha: float) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs (stratified) of AUROC and, for flags, sensitivity/specificity/BA."""
    out: dict[str, tuple[float, float]] = {}
    if n_boot <= 0 or y.all() or not y.any():
        return out
    rng = np.random.default_rng(seed)
    C, D = _stratified_counts(y, n_boot, rng)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    xp, xn = x[y], x[~y]
    vals = {"auroc": auroc_weighted(xp, xn, C, D)}
    if kind == "flag":
        sens = C @ xp.astype(bool).astype(np.float64) / C.sum(axis=1)
        spec = D @ (~xn.astype(bool)).astype(np.float64) / D.sum(axis=1)
        vals.update(sensitivity=sens, specificity=spec, balanced_accuracy=0.5 * (sens + spec))
    for k, v in vals.items():
        lo, hi = np.percentile(v, q)
        out[k] = (float(lo), float(hi))
    return out


def evaluate_flags(
    df: pd.DataFrame,
    label_col: str = "fail",
    flag_cols: Sequence[str] = (),
    score_cols: Sequence[str] = (),
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per flag and per score: sensitivity/specificity/balanced accuracy and AUROC, with CIs.

    ``label_col`` holds booleans (True = fail); rows with a missing label are dropped. Flags are
    boolean columns (missing → that row skipped for that flag); for flags the AUROC is that of the
    0/1 flag. Scores are continuous (higher = worse expected; see ``auroc_oriented``).
    Columns: ``metric, kind, n, n_fail, sensitivity(_lo,_hi), specificity(_lo,_hi),
    balanced_accuracy(_lo,_hi), auroc(_lo,_hi), auroc_oriented(_lo,_hi), direction``.
    """
    lab = df[label_col]
    keep = lab.notna()
    rows = []
    for kind, cols in (("flag", flag_cols), ("score", score_cols)):
        for col in cols:
            sub = df.loc[keep, [label_col, col]].dropna()
            y = sub[label_col].astype(bool).to_numpy()
            x = sub[col].to_numpy(dtype=np.float64)
            row: dict = {"metric": col, "kind": kind, "n": int(y.size), "n_fail": int(y.sum())}
            cis = _fast_cis(y, x, kind, n_boot, seed, alpha)
            nan2 = (float("nan"), float("nan"))
            if kind == "flag":
                point = sens_spec(y, x.astype(bool))
                for name in ("sensitivity", "specificity", "balanced_accuracy"):
                    lo, hi = cis.get(name, nan2)
                    row.update({name: point[name], f"{name}_lo": lo, f"{name}_hi": hi})
            p = auroc(y, x)  # point estimate from sklearn.metrics
            lo, hi = cis.get("auroc", nan2)
            row.update(auroc=p, auroc_lo=lo, auroc_hi=hi)
            if np.isfinite(p) and p < 0.5:
                row.update(auroc_oriented=1 - p, auroc_oriented_lo=1 - hi, auroc_oriented_hi=1 - lo, direction="low=fail")
            else:
                row.update(auroc_oriented=p, auroc_oriented_lo=lo, auroc_oriented_hi=hi, direction="high=fail")
            rows.append(row)
    cols = ["metric", "kind", "n", "n_fail"]
    for name in ("sensitivity", "specificity", "balanced_accuracy", "auroc", "auroc_oriented"):
        cols += [name, f"{name}_lo", f"{name}_hi"]
    cols.append("direction")
    out = pd.DataFrame(rows)
    for c in cols:
        if c not in out.columns:
            out[c] = np.nan
    return out[cols]


def roc_curves(df: pd.DataFrame, label_col: str, score_cols: Sequence[str]) -> pd.DataFrame:
    """Long table ``metric, fpr, tpr, threshold`` of ROC points (``sklearn.metrics.roc_curve``)."""
    from sklearn.metrics import roc_curve

    parts = []
    for col in score_cols:
        sub = df[[label_col, col]].dropna()
        y = sub[label_col].astype(bool).to_numpy()
        if y.all() or not y.any():
            continue
        fpr, tpr, thr = roc_curve(y, sub[col].to_numpy(dtype=np.float64))
        parts.append(pd.DataFrame({"metric": col, "fpr": fpr, "tpr": tpr, "threshold": thr}))
    if not parts:
        return pd.DataFrame(columns=["metric", "fpr", "tpr", "threshold"])
    return pd.concat(parts, ignore_index=True)


def _corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(x, y)[0]), float(spearmanr(x, y)[0])


def compare_with_severity(
    df: pd.DataFrame,
    metric_cols: Sequence[str],
    severity_col: str = "severity",
    type_col: str = "artifact",
    bins: Sequence[float] | None = (0.0, 0.25, 0.5, 0.75, 1.0001),
) -> pd.DataFrame:
    """Table-2 analogue: per artifact type and severity bin, mean ± sd of every metric, and r.

    Returns a long table with columns ``artifact, severity_bin, metric, n, mean, sd, pearson_r,
    spearman_r``: rows with ``severity_bin == "all"`` carry the correlations of the metric with the
    (continuous) severity within that artifact type, and ``artifact == "all"`` rows pool the types.
    ``bins=None`` uses every distinct severity value as its own bin.
    """
    d = df.copy()
    if bins is None:
        d["_bin"] = d[severity_col].map(lambda v: f"{v:g}")
    else:
        cats = pd.cut(d[severity_col], bins=list(bins), right=False, include_lowest=True)
        d["_bin"] = cats.map(lambda iv: f"[{iv.left:g}, {min(iv.right, 1.0):g}{']' if iv.right > 1 else ')'}")
    rows = []
    groups = [(t, g) for t, g in d.groupby(type_col, sort=True)] + [("all", d)]
    for t, g in groups:
        for m in metric_cols:
            for b, gb in g.groupby("_bin", sort=True, observed=True):
                v = gb[m].to_numpy(dtype=np.float64)
                v = v[np.isfinite(v)]
                rows.append(
                    {"artifact": t, "severity_bin": str(b), "metric": m, "n": int(v.size),
                     "mean": float(v.mean()) if v.size else np.nan,
                     "sd": float(v.std(ddof=1)) if v.size > 1 else np.nan,
                     "pearson_r": np.nan, "spearman_r": np.nan}
                )
            v = g[m].to_numpy(dtype=np.float64)
            pr, sr = _corr(g[severity_col].to_numpy(dtype=np.float64), v)
            fin = v[np.isfinite(v)]
            rows.append(
                {"artifact": t, "severity_bin": "all", "metric": m, "n": int(fin.size),
                 "mean": float(fin.mean()) if fin.size else np.nan,
                 "sd": float(fin.std(ddof=1)) if fin.size > 1 else np.nan,
                 "pearson_r": pr, "spearman_r": sr}
            )
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """Markdown for :func:`compare_with_severity` (one row per artifact × bin, ``mean ± sd`` cells,
    then ``r`` rows) or, for any other DataFrame, a plain pipe table."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.{digits}g}"
        return str(v)

    if {"artifact", "severity_bin", "metric", "mean", "sd"}.issubset(table.columns):
        metrics = list(dict.fromkeys(table["metric"]))
        lines = ["| artifact | severity | n | " + " | ".join(metrics) + " |",
                 "|---|---|---|" + "---|" * len(metrics)]
        for (t, b), g in table.groupby(["artifact", "severity_bin"], sort=False):
            g = g.set_index("metric")
            cells = [f"{fmt(g.loc[m, 'mean'])} ± {fmt(g.loc[m, 'sd'])}" if m in g.index else "" for m in metrics]
            lines.append(f"| {t} | {b} | {int(g['n'].max())} | " + " | ".join(cells) + " |")
            if b == "all":
                lines.append(f"| {t} | Pearson r | | " + " | ".join(fmt(g.loc[m, 'pearson_r']) for m in metrics) + " |")
                lines.append(f"| {t} | Spearman r | | " + " | ".join(fmt(g.loc[m, 'spearman_r']) for m in metrics) + " |")
        return "\n".join(lines) + "\n"
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
