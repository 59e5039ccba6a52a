"""From log-densities to flags: the percentile of each volume's log-density within the reference, pooled or
per site (:func:`density_percentiles`, :func:`site_percentiles`), the τ flags (:func:`tau_flags`), the
documented config rule that makes the ``flagged`` column (:func:`combine_flags`), and :func:`score_table`,
which adds all of them to a scores table (``latent_0 … latent_{k-1}`` columns, see ``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence

import numpy as np

from .flow import FlowModel, _ok_rows, density_percentiles, latent_columns_of

log = logging.getLogger(__name__)


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
