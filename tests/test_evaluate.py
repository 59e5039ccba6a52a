"""Rating mapping, sensitivity/specificity, AUROC, bootstrap CIs and the severity table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from artifactqc.qc import evaluate as ev


def test_map_ratings_default_and_custom():
    s = pd.Series([-1, 0, 1, np.nan, "n/a", -1.0, 2])
    out = ev.map_ratings(s)
    assert out.tolist()[:3] == [True, False, False]
    assert out.isna().tolist() == [False, False, False, True, True, False, True]  # 2 is unmapped -> NA
    assert bool(out.iloc[5]) is True
    strict = ev.map_ratings(s, {-1: True, 0: True, 1: False})
    assert strict.tolist()[:3] == [True, True, False]
    words = ev.map_ratings(["Exclude", "accept", "DOUBTFUL"], {"exclude": 1, "doubtful": 0, "accept": 0})
    assert words.tolist() == [True, False, False]


def test_sens_spec_hand_confusion():
    # TP=3, FN=1, TN=4, FP=2
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    assert ev.confusion(y, p) == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
    r = ev.sens_spec(y, p)
    assert r["sensitivity"] == pytest.approx(0.75)
    assert r["specificity"] == pytest.approx(4 / 6)
    assert r["balanced_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)


def test_auroc_hand():
    # pairs (pos, neg): pos scores 0.8, 0.4; neg 0.5, 0.1 -> 3 of 4 pairs ordered -> 0.75
    assert ev.auroc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert np.isnan(ev.auroc([1, 1], [0.1, 0.2]))
    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.3
    x = np.round(rng.normal(size=200) + y, 1)  # with ties
    assert ev.auroc_rank(y, x) == pytest.approx(ev.auroc(y, x), abs=1e-12)


def test_bootstrap_ci_deterministic_contains_point_and_covers():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    x = np.r_[rng.normal(1, 1, 60), rng.normal(0, 1, 140)]
    a = ev.bootstrap_ci(ev.auroc_rank, y, x, n_boot=300, seed=7)
    b = ev.bootstrap_ci(ev.auroc_rank, y, x, n_boot=300, seed=7)
    assert a == b
    assert a[1] <= a[0] <= a[2]
    # coverage sanity: the true AUROC of N(1,1) vs N(0,1) is Phi(1/sqrt 2) = 0.7602
    from scipy.stats import norm

    true = norm.cdf(1 / np.sqrt(2))
    hits = 0
    for k in range(100):
        r = np.random.default_rng(100 + k)
        xs = np.r_[r.normal(1, 1, 60), r.normal(0, 1, 140)]
        lo, hi = ev._fast_cis(y, xs, "score", 500, k, 0.05)["auroc"]
        hits += lo <= true <= hi
    assert 88 <= hits <= 100  # nominal 95 of 100; allow Monte-Carlo slack
    # the fast CI agrees with the generic bootstrap to Monte-Carlo precision
    lo_f, hi_f = ev._fast_cis(y, x, "score", 2000, 1, 0.05)["auroc"]
    _, lo_g, hi_g = ev.bootstrap_ci(ev.auroc_rank, y, x, n_boot=300, seed=1)
    assert abs(lo_f - lo_g) < 0.03 and abs(hi_f - hi_g) < 0.03


def test_auroc_weighted_equals_expanded_resample():
    rng = np.random.default_rng(5)
    xp = np.round(rng.normal(1, 1, 7), 1)
    xn = np.round(rng.normal(0, 1, 9), 1)
    C = rng.multinomial(7, np.full(7, 1 / 7), size=5).astype(float)
    D = rng.multinomial(9, np.full(9, 1 / 9), size=5).astype(float)
    got = ev.auroc_weighted(xp, xn, C, D)
    for b in range(5):
        pos = np.repeat(xp, C[b].astype(int))
        neg = np.repeat(xn, D[b].astype(int))
        y = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
        assert got[b] == pytest.approx(ev.auroc(y, np.r_[pos, neg]), abs=1e-12)


def test_evaluate_flags_table():
    df = pd.DataFrame({
        "fail": pd.array([True, True, True, True, False, False, False, False, False, False, None], dtype="boolean"),
        "flag": [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        "cnr": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0],
    })
    out = ev.evaluate_flags(df, "fail", ["flag"], ["cnr"], n_boot=200, seed=1).set_index("metric")
    assert out.loc["flag", "n"] == 10 and out.loc["flag", "n_fail"] == 4
    assert out.loc["flag", "sensitivity"] == pytest.approx(0.75)
    assert out.loc["flag", "specificity"] == pytest.approx(4 / 6)
    assert out.loc["cnr", "auroc"] == pytest.approx(0.0)  # low CNR = fail, perfectly
    assert out.loc["cnr", "auroc_oriented"] == pytest.approx(1.0)
    assert out.loc["cnr", "direction"] == "low=fail"
    for m in ("flag", "cnr"):
        assert out.loc[m, "auroc_lo"] <= out.loc[m, "auroc"] <= out.loc[m, "auroc_hi"]


def test_roc_curves():
    df = pd.DataFrame({"y": [1, 0, 1, 0], "s": [0.9, 0.1, 0.8, 0.3]})
    r = ev.roc_curves(df, "y", ["s"])
    assert r["tpr"].iloc[-1] == 1.0 and r["fpr"].iloc[0] == 0.0


def test_compare_with_severity_table_and_markdown():
    sev = np.tile(np.linspace(0, 1, 11), 2)
    art = ["noise"] * 11 + ["motion"] * 11
    df = pd.DataFrame({"artifact": art, "severity": sev, "score": 2 * sev + 1, "cjv": -sev})
    t = ev.compare_with_severity(df, ["score", "cjv"], "severity", "artifact")
    row = t[(t.artifact == "noise") & (t.severity_bin == "all") & (t.metric == "score")].iloc[0]
    assert row.pearson_r == pytest.approx(1.0) and row.spearman_r == pytest.approx(1.0)
    row = t[(t.artifact == "all") & (t.severity_bin == "all") & (t.metric == "cjv")].iloc[0]
    assert row.pearson_r == pytest.approx(-1.0) and row.n == 22
    # first bin [0, 0.25): severities 0, 0.1, 0.2 -> score 1, 1.2, 1.4
    b = t[(t.artifact == "noise") & (t.metric == "score")].iloc[0]
    assert b.n == 3 and b["mean"] == pytest.approx(1.2) and b.sd == pytest.approx(0.2)
    md = ev.to_markdown(t)
    assert "| noise | Pearson r | | 1 | -1 |" in md
