"""Site-aware score: each volume's raw score relative to its site's reference distribution.

Real cohorts come in sites (scanner, protocol) whose clean volumes score differently: a site with a noisier
protocol or anatomy the encoder never saw sits above another site's clean level. As MRIQC's classifier scales
its IQMs per site, ``score_site`` is a robust z-score of the raw ``score`` within the site::

    score_site = (score - median_ref) / max(1.4826 * MAD_ref, min_scale)

over the site's *reference* volumes (the flow's frozen reference manifest, or every scored volume of the
site; see :func:`site_scores`). A site with fewer than ``min_reference`` reference volumes uses the pooled
reference (every reference volume of the cohort) instead; ``score_site_basis`` says which (``site`` /
``pooled``). The raw ``score`` is kept: a site whose scans are *all* bad has an unremarkable ``score_site``
(its own median is bad) and shows up only through the raw score, hence rules like ``score_or_site``
(:func:`artifactqc.density.flags.combine_flags`).

Computed at the cohort gather (a table operation over every site), so a new site's delivery scores only its
own shards; the per-site statistics of the other sites do not depend on it (with the manifest reference, which
is frozen per flow id, not even the pooled ones).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

log = logging.getLogger(__name__)

#: 1 / Φ⁻¹(3/4): MAD × this estimates the sd of a normal distribution
MAD_TO_SD = 1.482602218505602
SITE_REFERENCES = ("manifest", "all")
COLUMN_DOCS = {
    "score_site": "robust z of score within the site's reference: (score - median) / max(1.4826 MAD, min_scale)",
    "score_site_basis": "reference of score_site: 'site' (the site's own), 'pooled' (too few site references), "
                        "'' for failed volumes",
    "score_site_n_ref": "number of reference volumes behind score_site's median and scale",
    "score_site_median": "median score of those reference volumes",
    "score_site_scale": "scale of score_site: max(1.4826 x MAD of those reference scores, site_score.min_scale)",
}


def robust_location_scale(x, min_scale: float = 0.0) -> tuple[float, float]:
    """``(median, max(1.4826 · MAD, min_scale))`` of the finite values of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no finite values to compute a median and MAD from")
    med = float(np.median(x))
    return med, max(MAD_TO_SD * float(np.median(np.abs(x - med))), float(min_scale))


def site_scores(
    df,
    reference_ids: Iterable[str] | None = None,
    *,
    min_reference: int = 20,
    min_scale: float = 0.1,
    site_col: str = "site",
    score_col: str = "score",
    id_col: str = "volume_id",
):
    """The site-aware score of every row of a scores table (a DataFrame indexed like ``df``).

    Reference volumes: rows with ``status == "ok"`` (when the column exists) and a finite score whose
    ``id_col`` is in ``reference_ids``; ``reference_ids=None`` makes every such row a reference volume.
    A site with at least ``min_reference`` of them is scaled by its own median and MAD, others by the pooled
    ones. ``min_scale`` (score units) bounds the scale from below, so a site of near-identical clean scores
    does not turn score differences of a few hundredths into large z values. Rows without a finite score get
    NaN and basis ``''``. Columns: :data:`COLUMN_DOCS`.
    """
    import pandas as pd

    if min_reference < 1:
        raise ValueError(f"min_reference must be >= 1, got {min_reference}")
    if min_scale <= 0:
        raise ValueError(f"min_scale must be > 0 (score units), got {min_scale}")
    for c in (site_col, score_col) + ((id_col,) if reference_ids is not None else ()):
        if c not in df.columns:
            raise ValueError(f"site-aware score needs column {c!r}; the table has {list(df.columns)[:12]}")
    score = pd.to_numeric(df[score_col], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(score)
    if "status" in df.columns:
        ok &= (df["status"].astype(str) == "ok").to_numpy()
    is_ref = ok.copy()
    if reference_ids is not None:
        is_ref &= df[id_col].astype(str).isin(set(map(str, reference_ids))).to_numpy()
    if not is_ref.any():
        raise ValueError("no reference volume with status ok and a finite score: the site-aware score has no "
                         "reference (check the reference manifest against the scored volumes)")
    p_med, p_scale = robust_location_scale(score[is_ref], min_scale)
    n = len(df)
    med, scale, nref = np.full(n, p_med), np.full(n, p_scale), np.full(n, int(is_ref.sum()), dtype=np.int64)
    basis = np.full(n, "pooled", dtype=object)
    sites = df[site_col].astype(str).to_numpy()
    for s in pd.unique(sites):
        m = sites == s
        k = int((m & is_ref).sum())
        if k >= min_reference:
            med[m], scale[m] = robust_location_scale(score[m & is_ref], min_scale)
            nref[m], basis[m] = k, "site"
        else:
            log.info("site %s: %d reference volumes < %d: site-aware score uses the pooled reference", s, k,
                     min_reference)
    z = (score - med) / scale
    # a row without a score has no site-aware score, so no reference statistics behind one either
    z[~ok], med[~ok], scale[~ok] = np.nan, np.nan, np.nan
    basis[~ok] = ""
    nref = pd.array(nref, dtype="Int64")
    nref[~ok] = pd.NA
    return pd.DataFrame({"score_site": z, "score_site_basis": basis, "score_site_n_ref": nref,
                         "score_site_median": med, "score_site_scale": scale}, index=df.index)


def site_summary(cohort, *, score_threshold: float = 1.0, site_col: str = "site", score_col: str = "score"):
    """One row per site of a cohort table: ``scans``, ``scored`` (status ok with a finite score), ``failed``,
    ``median_score`` of its scored volumes, ``above_threshold`` (share with ``score >= score_threshold``),
    ``flagged`` (count, when the table has the column), ``basis`` of its site-aware score (``site`` /
    ``pooled``, when computed) and ``site_review``: the site's median score is at or above the review
    threshold.

    ``site_review`` is the site-level view of the raw score. A site whose typical scan scores at the review
    threshold is either all bad (every scan corrupted) or acquired in a way the encoder reads as an artifact
    (a noisier protocol, a scanner it never saw). Per-scan flags cannot tell the two apart, and a site-aware
    rule (``site``) hides both. One site-level line is what a reviewer needs: look at a few of its scans.
    Sorted by ``median_score``, highest first."""
    import pandas as pd

    for c in (site_col, score_col):
        if c not in cohort.columns:
            raise ValueError(f"site summary needs column {c!r}; the table has {list(cohort.columns)[:12]}")
    df = cohort.copy()
    df["_score"] = pd.to_numeric(df[score_col], errors="coerce")
    df["_ok"] = df["_score"].notna() & np.isfinite(df["_score"])
    if "status" in df.columns:
        df["_ok"] &= df["status"].astype(str) == "ok"
    rows = []
    for site, g in df.groupby(df[site_col].astype(str), sort=False):
        sc = g.loc[g["_ok"], "_score"].to_numpy(dtype=np.float64)
        med = float(np.median(sc)) if sc.size else float("nan")
        row = {"site": site, "scans": len(g), "scored": int(sc.size), "failed": int(len(g) - sc.size),
               "median_score": med,
               "above_threshold": float(np.mean(sc >= score_threshold)) if sc.size else float("nan"),
               "site_review": bool(sc.size and med >= score_threshold)}
        if "flagged" in g.columns:
            row["flagged"] = int(g["flagged"].fillna(False).astype(bool).sum())
        if "score_site_basis" in g.columns:
            b = g.loc[g["_ok"], "score_site_basis"].astype(str)
            row["basis"] = b.mode().iat[0] if len(b) else ""
        rows.append(row)
    return pd.DataFrame(rows).sort_values("median_score", ascending=False, na_position="last").reset_index(drop=True)


def read_reference_ids(path) -> list[str]:
    """The ``volume_id`` column of a reference manifest TSV (``results/flows/<id>/reference.tsv``)."""
    import pandas as pd

    ref = pd.read_csv(path, sep="\t", dtype=str)
    if "volume_id" not in ref.columns:
        raise ValueError(f"{path}: reference manifest needs a 'volume_id' column (found {list(ref.columns)})")
    return ref["volume_id"].tolist()


def add_site_scores(cohort, *, reference: str = "manifest", reference_ids: Iterable[str] | None = None,
                    min_reference: int = 20, min_scale: float = 0.1, rule: str | None = None,
                    score_threshold: float = 1.0, site_threshold: float = 3.0):
    """Add the :data:`COLUMN_DOCS` columns to a cohort table; with a ``rule`` that has a ``site`` term,
    (re)compute ``flagged`` from it (the shards leave it empty for such rules). ``reference="manifest"``
    needs ``reference_ids`` (the flow's reference manifest); ``"all"`` uses every scored volume. Returns a new
    DataFrame."""
    from .density.flags import combine_flags, rule_uses_site

    if reference not in SITE_REFERENCES:
        raise ValueError(f"site_score.reference must be one of {SITE_REFERENCES}, got {reference!r}")
    if reference == "manifest" and reference_ids is None:
        raise ValueError("site_score.reference = manifest needs the reference manifest's volume ids")
    out = cohort.copy()
    ss = site_scores(out, reference_ids if reference == "manifest" else None, min_reference=min_reference,
                     min_scale=min_scale)
    for c in ss.columns:
        out[c] = ss[c].to_numpy()
    if rule is not None and rule_uses_site(rule):
        out["flagged"] = combine_flags(out, rule, score_threshold=score_threshold, site_threshold=site_threshold)
    return out


def gather_options(config: dict, reference_manifest, *, rule: str, score_threshold: float) -> dict:
    """Keyword arguments of :func:`add_site_scores` from the config section ``site_score`` and the flow's
    reference manifest (read only when ``site_score.reference`` is ``manifest``)."""
    ref = config.get("reference", "manifest")
    return {"reference": ref, "reference_ids": read_reference_ids(reference_manifest) if ref == "manifest" else None,
            "min_reference": int(config["min_reference"]), "min_scale": float(config["min_scale"]),
            "site_threshold": float(config["threshold"]), "rule": rule, "score_threshold": float(score_threshold)}
