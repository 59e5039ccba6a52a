"""Few-label calibration: ratings files (artifactqc.qc.ratings, and their errors), site-robust scaling, the
classifier, thresholds, out-of-fold evaluation and the JSON model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from artifactqc.qc import calibrate
from artifactqc.qc import ratings as aq_ratings
from artifactqc.qc.evaluate import auroc

HEADER = "volume_id\trating\tnote\trater\ttime\n"


def write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ ratings files
def test_ratings_keys_and_words(tmp_path):
    f = write(tmp_path / "r.tsv", HEADER + "a\t1\t\tx\tt\nb\t2\tblurry\tx\tt\nc\t3\t\tx\tt\nd\tExclude\t\tx\tt\n")
    r = aq_ratings.read_ratings([f], known_ids=["a", "b", "c", "d", "e"])
    assert dict(zip(r.volume_id, r.rating)) == {"a": "accept", "b": "doubtful", "c": "exclude", "d": "exclude"}
    assert r.set_index("volume_id").loc["b", "note"] == "blurry"
    assert r.set_index("volume_id").loc["c", "source"] == f"{f}:4"


@pytest.mark.parametrize(
    "body, expected",
    [
        ("", "is empty"),
        (HEADER, "no rated volume"),
        ("volume_id\tnote\na\tx\n", "r.tsv:1: missing column(s) ['rating']"),
        (HEADER + "a\t1\t\t\t\nzz\t1\t\t\t\n", "r.tsv:3: unknown volume_id 'zz'"),
        (HEADER + "a\tgood\t\t\t\n", "r.tsv:2: unknown rating 'good'"),
        (HEADER + "a\t4\t\t\t\n", "r.tsv:2: unknown rating '4'"),
        (HEADER + "a\t1\t\t\t\nb\t1\t\t\t\na\t3\t\t\t\n", "r.tsv:4: a rated twice in one file (first on line 2)"),
    ],
)
def test_bad_ratings_files_name_file_and_line(tmp_path, body, expected):
    f = write(tmp_path / "r.tsv", body)
    with pytest.raises(aq_ratings.RatingsError) as e:
        aq_ratings.read_ratings([f], known_ids=["a", "b"])
    assert expected in str(e.value)
    assert str(f) in str(e.value)


def test_missing_ratings_file(tmp_path):
    with pytest.raises(aq_ratings.RatingsError, match="not found"):
        aq_ratings.read_ratings([tmp_path / "nope.tsv"])


def test_latest_rating_wins_across_files(tmp_path, caplog):
    f1 = write(tmp_path / "day1.tsv", HEADER + "a\t1\t\tx\t2026-01-01T10:00:00Z\nb\t3\t\tx\t2026-01-01T10:00:00Z\n")
    f2 = write(tmp_path / "day2.tsv", HEADER + "a\t3\tghost\tx\t2026-01-02T10:00:00Z\nb\t3\t\tx\t2026-01-02T10:00:00Z\n")
    r = aq_ratings.read_ratings([f2, f1]).set_index("volume_id")  # order of files does not matter: time does
    assert r.loc["a", "rating"] == "exclude" and r.loc["a", "source"] == f"{f2}:2"
    assert "a rated differently" in caplog.text and "b rated differently" not in caplog.text


def test_merge_labels_file_overrides_sheet():
    cohort = pd.DataFrame({"volume_id": ["a", "b", "c"], "label": ["pass", "fail", ""]})
    ratings = pd.DataFrame({"volume_id": ["a", "c"], "rating": ["exclude", "doubtful"], "note": "", "rater": "r",
                            "time": "", "source": ["f:2", "f:3"]})
    m = aq_ratings.merge_labels(cohort, ratings, ["fail", "exclude"], ["pass", "accept"]).set_index("volume_id")
    assert list(m["label"]) == ["exclude", "fail", "doubtful"]
    assert list(m["label_source"]) == ["f:2", "sheet", "f:3"]
    assert m.loc["a", "fail"] == True and m.loc["b", "fail"] == True  # noqa: E712
    assert pd.isna(m.loc["c", "fail"])  # doubtful: in neither list, not used


def test_labels_to_ratings_round_trip(tmp_path):
    sheet = pd.DataFrame({"volume_id": ["a", "b", "c", "d"], "label": ["fail", "pass", "", "maybe"]})
    r = aq_ratings.labels_to_ratings(sheet, ["fail"], ["pass"], rater="gt", time="t")
    assert list(zip(r.volume_id, r.rating)) == [("a", "exclude"), ("b", "accept")]
    f = tmp_path / "r.tsv"
    r.to_csv(f, sep="\t", index=False)
    back = aq_ratings.read_ratings([f], known_ids=sheet.volume_id)
    assert list(back.rating) == ["exclude", "accept"]


# ------------------------------------------------------------------------------------------ scaling
def test_site_robust_scaling_removes_site_offset_and_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    df = pd.DataFrame({"site": ["A"] * 100 + ["B"] * 100, "f": np.concatenate([x[:100], 50 + 10 * x[100:]]),
                       "g": np.concatenate([x[:100], 50 + 10 * x[100:]])})
    sc = calibrate.robust_scalers(df, ["f", "g"], global_columns=["g"])
    X = calibrate.apply_scalers(df, ["f", "g"], sc)
    a, b = X[:100, 0], X[100:, 0]
    assert abs(np.median(a)) < 1e-9 and abs(np.median(b)) < 1e-9
    assert np.median(np.abs(a)) == pytest.approx(np.median(np.abs(b)), rel=0.25)
    assert np.median(X[100:, 1]) > 0.5  # pooled scaling keeps the site offset


def test_small_site_falls_back_to_pooled():
    df = pd.DataFrame({"site": ["A"] * 20 + ["B"] * 2, "f": list(range(20)) + [100.0, 101.0]})
    sc = calibrate.robust_scalers(df, ["f"], min_site_n=5)
    assert sc["sites"]["B"]["f"] == sc["pooled"]["f"]


def test_balanced_threshold():
    y = np.array([0, 0, 0, 1, 1], bool)
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.9])
    t = calibrate.balanced_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert np.isnan(calibrate.balanced_threshold(np.zeros(3, bool), p[:3]))


# ------------------------------------------------------------------------------------------ model
def site_cohort(seed=0, n=40, shifts=(("A", 0.0), ("B", 1.5), ("C", -1.0))):
    """Three sites whose scores are offset per site; fails are +1.2 above their site's clean level."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, shift in shifts:
        for i in range(n):
            fail = rng.random() < 0.3
            rows.append({"volume_id": f"{s}-{i}", "site": s, "fail": fail,
                         "score": shift + (1.2 if fail else 0.0) + 0.35 * rng.standard_normal(),
                         "noise_feature": rng.standard_normal()})
    return pd.DataFrame(rows)


def test_site_scaling_beats_raw_score_across_shifted_sites():
    df = site_cohort()
    cv = calibrate.cross_validate(df.assign(fail=df["fail"].astype("boolean")), ["score", "noise_feature"])
    y = df["fail"].to_numpy()
    assert auroc(y, cv["p_fail_cv"]) > 0.95
    assert auroc(y, df["score"]) < 0.85  # pooled raw score mixes the site offsets


def test_out_of_fold_is_not_in_sample():
    """Pure-noise features and labels: an almost unregularised model fits its training labels, but the
    out-of-fold predictions must be at chance."""
    rng = np.random.default_rng(1)
    n, k = 100, 60
    df = pd.DataFrame(rng.standard_normal((n, k)), columns=[f"f{i}" for i in range(k)])
    df["site"] = "A"
    df["fail"] = pd.array(rng.random(n) < 0.5, dtype="boolean")
    feats = [f"f{i}" for i in range(k)]
    cal = calibrate.fit(df, feats, C=1e4)
    assert auroc(df["fail"].astype(bool), cal.predict_proba(df)) > 0.95  # in sample: memorised
    cv = calibrate.cross_validate(df, feats, C=1e4)
    assert abs(auroc(df["fail"].astype(bool), cv["p_fail_cv"]) - 0.5) < 0.15
    assert cv["fold"].min() >= 0


def test_unrated_rows_are_ignored_by_fit_but_used_for_scaling():
    df = site_cohort()
    lab = df["fail"].astype("boolean")
    lab[df.index % 2 == 1] = pd.NA
    a = calibrate.fit(df.assign(fail=lab), ["score"])
    flipped = df["fail"].where(df.index % 2 == 0, ~df["fail"]).astype("boolean")
    flipped[df.index % 2 == 1] = pd.NA
    b = calibrate.fit(df.assign(fail=flipped), ["score"])
    assert a.coef == b.coef and a.scalers == b.scalers
    assert a.site_labels == {"A": {"n": 20, "n_fail": int(df.fail[(df.site == "A") & (df.index % 2 == 0)].sum())},
                             "B": a.site_labels["B"], "C": a.site_labels["C"]}


def test_too_few_labels():
    df = site_cohort().assign(fail=pd.NA)
    df.loc[:2, "fail"] = [True, False, False]
    with pytest.raises(ValueError, match="at least 2 fail and 2 pass"):
        calibrate.fit(df.assign(fail=df["fail"].astype("boolean")), ["score"])


def test_json_round_trip_no_pickle(tmp_path):
    df = site_cohort()
    cal = calibrate.fit(df.assign(fail=df["fail"].astype("boolean")), ["score", "noise_feature"], global_features=["score"])
    path = cal.save(tmp_path / "model.json", status="x")
    d = json.loads(path.read_text())
    assert d["format"] == "artifactqc-calibration/1" and d["features"] == ["score", "noise_feature"]
    back = calibrate.Calibration.load(path)
    np.testing.assert_allclose(back.predict_proba(df), cal.predict_proba(df))
    assert set(back.site_thresholds) == {"A", "B", "C"}


# ------------------------------------------------------------------------------------------ workflow function
def scores_table(seed=0):
    df = site_cohort(seed)
    rng = np.random.default_rng(seed)
    out = df.drop(columns=["noise_feature", "fail"]).assign(status="ok", contrast="T1w", label="", path="",
                                                            flagged=df["score"] > 1.0, density_pct=rng.random(len(df)) * 100)
    for s in ("noise", "ghosting", "motion", "bias", "resolution"):
        out[f"severity_{s}"] = rng.random(len(df))
    out.loc[0, "status"] = "failed"
    return out, df["fail"]


def test_write_calibration(tmp_path):
    scores, truth = scores_table()
    rated = scores.index[(scores.index % 3 == 0)]
    f = tmp_path / "ratings.tsv"
    pd.DataFrame({"volume_id": scores.loc[rated, "volume_id"], "rating": np.where(truth[rated], "3", "1"),
                  "note": "", "rater": "t", "time": ""}).to_csv(f, sep="\t", index=False)
    out = {k: tmp_path / k for k in ("model", "thresholds", "labels", "metrics", "markdown", "cohort", "tsv")}
    res = calibrate.write_calibration(scores, [f], out, fail_values=["exclude"], pass_values=["accept"], n_boot=100)
    assert res["status"].startswith("fitted on 39 rated volumes")  # 40 rated, one of them failed scoring
    c = pd.read_parquet(out["cohort"]).set_index("volume_id")
    ok = c[c.status == "ok"]
    assert ok["p_fail"].notna().all() and pd.isna(c.loc["A-0", "p_fail"])
    assert ok["flagged_calibrated"].notna().all()
    cv_rated = ok[ok["fail"].notna()]
    assert cv_rated["p_fail_cv"].notna().all() and ok[ok["fail"].isna()]["p_fail_cv"].isna().all()
    thr = pd.read_csv(out["thresholds"], sep="\t").set_index("site")
    assert thr.loc["A", "n_volumes"] == 39 and thr.loc["B", "n_rated"] == (scores.site[rated] == "B").sum()
    np.testing.assert_allclose(ok["p_fail_threshold"], ok["site"].map(thr["threshold"]), rtol=1e-5)
    m = pd.read_csv(out["metrics"], sep="\t")
    pooled = m[m.scope == "pooled"].set_index("metric")
    assert pooled.loc["p_fail_cv", "auroc"] > pooled.loc["score", "auroc"]
    assert json.loads(out["model"].read_text())["status"] == res["status"]
    assert "| pooled | flagged_calibrated_cv |" in out["markdown"].read_text()
    labels = pd.read_csv(out["labels"], sep="\t")
    assert len(labels) == len(rated) and set(labels["label"]) == {"accept", "exclude"}


def test_write_calibration_not_enough_labels(tmp_path):
    scores, _ = scores_table()
    f = write(tmp_path / "r.tsv", HEADER + "A-1\t3\t\t\t\nA-2\t1\t\t\t\n")
    out = {k: tmp_path / k for k in ("model", "thresholds", "labels", "metrics", "markdown", "cohort", "tsv")}
    res = calibrate.write_calibration(scores, [f], out, fail_values=["exclude"], pass_values=["accept"], n_boot=10)
    assert res["status"].startswith("not fitted: calibration needs at least 2 fail")
    c = pd.read_parquet(out["cohort"])
    assert c["p_fail"].isna().all() and c["flagged_calibrated"].isna().all()
    assert "not fitted" in out["markdown"].read_text()


def test_cli_check_ratings(tmp_path, capsys):
    from artifactqc.cli import main

    cohort = tmp_path / "cohort.tsv"
    pd.DataFrame({"volume_id": ["a", "b"]}).to_csv(cohort, sep="\t", index=False)
    good = write(tmp_path / "good.tsv", HEADER + "a\t3\t\t\t\nb\t1\t\t\t\n")
    assert main(["check-ratings", str(good), "--cohort", str(cohort)]) == 0
    assert "2 rated volumes" in capsys.readouterr().out
    bad = write(tmp_path / "bad.tsv", HEADER + "a\t3\t\t\t\nc\t1\t\t\t\n")
    assert main(["check-ratings", str(bad), "--cohort", str(cohort)]) == 1
    assert f"{bad}:3: unknown volume_id 'c'" in capsys.readouterr().err


def test_write_calibration_says_when_two_fails_cannot_be_cross_validated(tmp_path):
    """Two rated fails fit a model but no fold can (each fold's fit needs 2 fails of the other folds): the
    status and metrics.md say so instead of leaving the out-of-fold rows silently empty (as the demo did)."""
    scores, _ = scores_table()
    lines = "".join(f"A-{i}\t{3 if i in (1, 2) else 1}\t\t\t\n" for i in range(1, 11))
    f = write(tmp_path / "r.tsv", HEADER + lines)
    out = {k: tmp_path / k for k in ("model", "thresholds", "labels", "metrics", "markdown", "cohort", "tsv")}
    res = calibrate.write_calibration(scores, [f], out, fail_values=["exclude"], pass_values=["accept"], n_boot=10)
    assert res["status"].startswith("fitted on 10 rated volumes (2 fail)")
    assert "out-of-fold evaluation covers 0 of 10 rated volumes" in res["status"]
    assert "2 rated fails are too few" in out["markdown"].read_text()
