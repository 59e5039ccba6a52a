"""Site-aware score: robust z within the site's reference volumes, pooled fallback, flag rules with a site
term, and the cohort gather that computes it (hand-made tables, expected values computed independently)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from artifactqc.density import flags as D
from artifactqc import shards
from artifactqc import sitescore as S


def _cohort(seed=0):
    """Site A: 30 clean volumes around 0.2; site B (another scanner): 30 around 0.9, all below the raw
    threshold 1; site C: 5 volumes (too few for its own basis); site D: 25 volumes, all bad (~1.6)."""
    rng = np.random.default_rng(seed)
    a = 0.2 + 0.05 * rng.standard_normal(30)
    b = 0.9 + 0.02 * rng.standard_normal(30)
    c = np.array([0.3, 0.35, 0.4, 0.45, 1.4])
    d = 1.6 + 0.1 * rng.standard_normal(25)
    scores = np.concatenate([a, b, c, d])
    sites = ["A"] * 30 + ["B"] * 30 + ["C"] * 5 + ["D"] * 25
    df = pd.DataFrame({"volume_id": [f"v{i:03d}" for i in range(len(scores))], "site": sites, "score": scores,
                       "status": "ok"})
    return df


def _mad_z(x, ref, floor):
    med = np.median(ref)
    return (x - med) / max(1.482602218505602 * np.median(np.abs(ref - med)), floor)


def test_site_scores_own_site_and_pooled_basis():
    df = _cohort()
    out = S.site_scores(df, None, min_reference=20, min_scale=0.01)
    for s in ("A", "B", "D"):
        m = (df.site == s).to_numpy()
        np.testing.assert_allclose(out.score_site[m], _mad_z(df.score[m].to_numpy(), df.score[m].to_numpy(), 0.01))
        assert (out.score_site_basis[m] == "site").all() and (out.score_site_n_ref[m] == m.sum()).all()
    m = (df.site == "C").to_numpy()
    np.testing.assert_allclose(out.score_site[m], _mad_z(df.score[m].to_numpy(), df.score.to_numpy(), 0.01))
    assert (out.score_site_basis[m] == "pooled").all() and (out.score_site_n_ref[m] == len(df)).all()
    # site B sits far above site A in raw score, but not relative to itself
    assert abs(np.median(out.score_site[df.site == "B"])) < 1e-9


def test_reference_ids_restrict_the_statistics():
    df = _cohort()
    ref = df.volume_id[(df.site == "A") & (df.score < 0.2)].tolist()  # only the lower half of site A
    out = S.site_scores(df, ref, min_reference=10, min_scale=0.01)
    a = df[df.site == "A"]
    np.testing.assert_allclose(out.score_site[df.site == "A"], _mad_z(a.score.to_numpy(), a.score[a.score < 0.2].to_numpy(), 0.01))
    # B has no reference volumes in the manifest: pooled over the manifest only
    assert (out.score_site_basis[df.site == "B"] == "pooled").all()
    assert out.score_site_median[df.site == "B"].iloc[0] == pytest.approx(np.median(a.score[a.score < 0.2]))
    with pytest.raises(ValueError, match="no reference volume"):
        S.site_scores(df, ["nope"])


def test_min_scale_floor_and_failed_rows():
    df = pd.DataFrame({"volume_id": list("abcdef"), "site": "X", "score": [0.5, 0.5, 0.5, 0.5, 0.6, 0.9],
                       "status": ["ok"] * 5 + ["failed"]})
    out = S.site_scores(df, None, min_reference=3, min_scale=0.1)
    assert out.score_site_scale.iloc[0] == pytest.approx(0.1)  # MAD is 0
    np.testing.assert_allclose(out.score_site[:5], [0, 0, 0, 0, 1.0])
    assert np.isnan(out.score_site.iloc[5]) and out.score_site_basis.iloc[5] == ""
    assert out[["score_site_n_ref", "score_site_median", "score_site_scale"]].iloc[5].isna().all()
    with pytest.raises(ValueError, match="min_scale"):
        S.site_scores(df, None, min_scale=0)


def test_flag_rules_with_site_terms():
    df = pd.DataFrame({"score": [0.5, 1.5, 0.5, 1.5, np.nan], "score_site": [0.0, 0.0, 4.0, 4.0, np.nan],
                       "flag_tau5": [False, False, False, True, False]})
    want = {"site": [0, 0, 1, 1, 0], "score_or_site": [0, 1, 1, 1, 0], "site_or_tau5": [0, 0, 1, 1, 0],
            "score_or_site_or_tau5": [0, 1, 1, 1, 0], "site_and_tau5": [0, 0, 0, 1, 0]}
    assert set(want) == set(D.SITE_FLAG_RULES)
    for rule, w in want.items():
        assert D.combine_flags(df, rule).tolist() == [bool(x) for x in w], rule
        assert D.rule_uses_site(rule)
    assert D.combine_flags(df, "site", site_threshold=5.0).tolist() == [False] * 5
    assert not D.rule_uses_site("score_or_tau5")
    for bad in ("score_or_site_and_tau5", "score_or_score", "sites", "score_xor_site"):
        with pytest.raises(ValueError, match="unknown flag rule"):
            D.combine_flags(df, bad)
    with pytest.raises(ValueError, match="score_site"):
        D.combine_flags(df.drop(columns="score_site"), "score_or_site")


def test_all_bad_site_flagged_only_through_raw_score():
    df = _cohort()
    out = S.add_site_scores(df, reference="all", min_reference=20, min_scale=0.05, rule="site")
    d = (df.site == "D").to_numpy()
    assert out.flagged[d].mean() < 0.1  # relative to itself, a site of bad scans looks normal
    out = S.add_site_scores(df, reference="all", min_reference=20, min_scale=0.05, rule="score_or_site")
    assert out.flagged[d].all()
    # site B's scans are all below the raw threshold, so only the site term can flag B's outlier
    df.loc[45, "score"] = 0.99
    out = S.add_site_scores(df, reference="all", min_reference=20, min_scale=0.01, rule="score_or_site")
    assert out.flagged[45] and not out.flagged[(df.site == "B") & (df.index != 45)].any()
    with pytest.raises(ValueError, match="manifest"):
        S.add_site_scores(df, reference="manifest")


def test_site_summary_marks_the_sites_whose_typical_scan_is_at_the_threshold():
    """The all-bad site D (median ~1.6) gets the site-wide review line that a site rule hides from its scans;
    site B (median ~0.9) and the small site C (median 0.4 despite its one bad scan) do not; counts, medians
    and shares computed independently; a failed scan counts as a scan, not as scored."""
    from artifactqc.report.stage import site_markdown

    df = _cohort()
    df.loc[0, ["status", "score"]] = ["failed", np.nan]
    out = S.add_site_scores(df, reference="all", min_reference=20, min_scale=0.05, rule="site")
    summary = S.site_summary(out, score_threshold=1.0).set_index("site")
    assert list(summary.index) == ["D", "B", "C", "A"]  # by median score, highest first
    assert summary["site_review"].to_dict() == {"D": True, "B": False, "C": False, "A": False}
    a = df[df.site == "A"].score.dropna()
    assert (summary.loc["A", "scans"], summary.loc["A", "scored"], summary.loc["A", "failed"]) == (30, 29, 1)
    assert summary.loc["A", "median_score"] == pytest.approx(np.median(a))
    assert summary.loc["C", "above_threshold"] == pytest.approx(0.2)
    assert summary.loc["D", "flagged"] == out.flagged[(df.site == "D").to_numpy()].sum() < 3
    assert summary["basis"].to_dict() == {"D": "site", "B": "site", "C": "pooled", "A": "site"}
    md = site_markdown(summary.reset_index(), 1.0)
    assert "**Site-wide review: D.**" in md and md.count("**yes**") == 1
    assert "| D | 25 | 25 | 0 |" in md and "| A | 30 | 29 | 1 |" in md
    assert "Site-wide review:" not in site_markdown(S.site_summary(df[df.site != "D"]), 1.0)
    with pytest.raises(ValueError, match="'score'"):
        S.site_summary(df.drop(columns="score"))


def test_gather_sets_flagged_for_site_rules(tmp_path):
    df = _cohort()
    ref = tmp_path / "reference.tsv"
    df[["volume_id", "site"]].to_csv(ref, sep="\t", index=False)
    df["flag_tau5"] = False
    df["flagged"] = pd.array([pd.NA] * len(df), dtype="boolean")  # as a shard leaves it for a site rule
    parts = [df[df.site == s] for s in "ABCD"]
    cfg = {"reference": "manifest", "min_reference": 20, "min_scale": 0.05, "threshold": 3.0}
    opts = S.gather_options(cfg, ref, rule="score_or_site_or_tau5", score_threshold=1.0)
    cohort = shards.gather(parts, site_score=opts)
    assert cohort.flagged.dtype == bool
    want = (cohort.score > 1.0) | (cohort.score_site > 3.0)
    assert (cohort.flagged == want).all() and cohort.flagged.sum() > 25
    assert set(cohort.score_site_basis) == {"site", "pooled"}
    assert set(S.COLUMN_DOCS) <= set(shards.COLUMN_DOCS)
