"""artifactqc.report.stage: rulers on the cohort's score scale, rating mapping, failure tables."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from artifactqc.report import stage
from artifactqc.encoder.checkpoint import load_model
from artifactqc.encoder.score import score_volume
from artifactqc.encoder.slices import extract_slices

from .conftest import save_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_tiny_model(tmp_path_factory.mktemp("model"), seed=1, pixel_mm=3.0), device="cpu")


@pytest.fixture()
def head(tmp_path):
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 44, 36)], indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    data = (np.where(r < 0.8, 100 + 40 * np.cos(6 * g[0]) * np.sin(5 * g[1]), 0)
            + np.random.default_rng(0).normal(0, 2, r.shape)).astype(np.float32)
    p = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(p))
    return p


def test_ruler_rung_zero_is_the_cohort_score_and_image(model, head):
    torch.set_num_threads(1)
    rungs = stage.ruler_rungs(model, head, "noise", severities=(0.0, 0.5, 1.0), seed=3)
    assert [r[0] for r in rungs] == [0.0, 0.5, 1.0]
    # severity 0 leaves the slices unchanged: its score is the score the cohort table gets for the file
    assert rungs[0][2] == pytest.approx(score_volume(model, head)["score"], abs=1e-6)
    sl, _ = extract_slices(head, model.slice_cfg)
    axial_mid = sl[2 * 3 + 1]
    np.testing.assert_allclose(np.rot90(rungs[0][1]), np.clip(axial_mid, 0, 1), atol=1e-6)
    # a rung shows the volume corrupted in 3D at that severity with the ruler's seed, as the scorer sees it
    from artifactqc.io import load_volume
    from artifactqc.encoder.slices import scale_for_simulation
    from artifactqc.simulate import simulate_volume
    from artifactqc.encoder.slices import extract_from_array

    vol = load_volume(head)
    corrupted, params = simulate_volume(scale_for_simulation(vol.data), "noise", 0.5, seed=3, spacing=vol.zooms)
    assert params["severity"] == 0.5
    sl5, _ = extract_from_array(corrupted, vol.affine, model.slice_cfg)
    np.testing.assert_allclose(np.rot90(rungs[1][1]), np.clip(sl5[2 * 3 + 1], 0, 1), atol=1e-6)
    assert np.abs(rungs[1][1] - rungs[0][1]).mean() > 0.01 and np.abs(rungs[2][1] - rungs[1][1]).mean() > 0.01
    again = stage.ruler_rungs(model, head, "noise", severities=(0.5,), seed=3)
    np.testing.assert_array_equal(again[0][1], rungs[1][1])


def test_ruler_reference_prefers_unflagged_lowest_score():
    s = pd.DataFrame({"volume_id": list("abcde"), "contrast": ["T1w"] * 4 + ["T2w"],
                      "status": ["ok", "ok", "ok", "failed", "ok"], "score": [0.3, 0.1, 0.5, np.nan, 2.0],
                      "flagged": [False, True, False, False, True]})
    assert stage.ruler_reference(s, "T1w")["volume_id"] == "a"
    assert stage.ruler_reference(s, "T2w")["volume_id"] == "e"  # all flagged: still a reference
    assert stage.ruler_reference(s, "FLAIR") is None


def test_label_frame_mapping_and_flags():
    s = pd.DataFrame({"volume_id": list("abcdef"), "status": ["ok"] * 5 + ["failed"],
                      "label": ["FAIL", "-1", "1", "maybe", "", "fail"], "score": [1.5, 0.2, 0.9, 3.0, 0.1, np.nan],
                      "flag_tau5": [True, False, False, True, False, False], "flagged": [True, False, True, True, False, False]})
    df, flags = stage.label_frame(s, ["fail", -1, "0"], ["pass", 1], taus=(5, 3), threshold=1.0)
    assert flags == ["score>1", "flag_tau5", "flagged"]  # flag_tau3 not in the table
    assert list(df["volume_id"]) == ["a", "b", "c"]
    assert list(df["fail"]) == [True, True, False]
    assert list(df["score>1"]) == [True, False, False]
    with pytest.raises(ValueError, match="both fail and pass"):
        stage.rating_mapping(["fail", "0"], ["0"])


def test_evaluate_labels_matches_hand_counts():
    rng = np.random.default_rng(0)
    n = 40
    fail = rng.random(n) < 0.3
    score = np.where(fail, 1.4, 0.6) + rng.normal(0, 0.5, n)
    s = pd.DataFrame({"volume_id": [f"v{i}" for i in range(n)], "status": "ok", "label": np.where(fail, "fail", "pass"),
                      "score": score, "flag_tau5": rng.random(n) < 0.2, "flagged": score > 1.2})
    table, curves = stage.evaluate_labels(s, ["fail"], ["pass"], taus=(5,), n_boot=30)
    row = table.set_index("metric").loc["score>1"]
    pred = score > 1
    assert row["sensitivity"] == pytest.approx((pred & fail).sum() / fail.sum())
    assert row["specificity"] == pytest.approx((~pred & ~fail).sum() / (~fail).sum())
    assert table.set_index("metric").loc["score", "auroc"] == pytest.approx(
        np.mean([a > b for a in score[fail] for b in score[~fail]]))
    assert set(curves) == {"score>1", "flag_tau5", "flagged", "score"}
    md = stage.label_markdown(table)
    assert md.count("\n| ") == 1 + len(table)


def test_failures_table_concatenates_stages():
    ing = pd.DataFrame({"volume_id": ["x"], "path": ["p"], "stage": ["ingest"], "error_type": ["truncated"], "message": ["m"]})
    sc = pd.DataFrame({"volume_id": ["y"], "path": ["q"], "stage": ["score"], "error_type": ["nan"], "message": ["m"]})
    f = stage.failures_table(ing, sc, ing.iloc[:0], ing)
    assert sorted(f["volume_id"]) == ["x", "y"]
    assert len(stage.failures_table()) == 0


def test_overview_table_adds_failed_volumes():
    vols = pd.DataFrame({"volume_id": ["a", "b"], "site": ["S1", "S2"], "contrast": ["T1w", "T2w"], "status": ["ok", "ok"]})
    fails = pd.DataFrame({"volume_id": ["c", "d", "d"], "stage": ["ingest", "ingest", "score"],
                          "error_type": ["truncated", "all_zero", "nan"]})
    scores = pd.DataFrame({"volume_id": ["a", "b", "c", "d"], "site": ["S1", "S2", "S2", ""],
                           "contrast": ["T1w", "T2w", "T2w", ""]})
    t = stage.overview_table(vols, fails, scores).set_index("volume_id")
    assert list(t.index) == ["a", "b", "c", "d"]
    assert list(t["status"]) == ["ok", "ok", "failed", "failed"]
    assert t.loc["c", "site"] == "S2" and t.loc["d", "site"] == "?" and t.loc["d", "contrast"] == "unknown"
    assert len(stage.overview_table(vols, fails.iloc[:0])) == 2


def test_label_evaluation_includes_iqms_with_their_direction():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    n = 40
    fail = np.arange(n) < 12
    scores = pd.DataFrame({"volume_id": [f"v{i}" for i in range(n)], "status": "ok",
                           "label": np.where(fail, "fail", "pass"), "score": rng.normal(0.5, 0.3, n) + fail,
                           "flag_tau5": fail & (rng.random(n) < 0.8), "flagged": fail})
    cnr = rng.normal(3, 0.5, n) - 1.5 * fail  # low CNR = fail
    own = pd.DataFrame({"volume_id": scores["volume_id"], "status": ["failed"] + ["ok"] * (n - 1),
                        "cnr": cnr, "efc": np.nan})
    mq = pd.DataFrame({"volume_id": scores["volume_id"], "mriqc_status": "ok", "mriqc_cjv": rng.random(n) + fail})
    table, _ = stage.evaluate_labels(scores, ["fail"], ["pass"], taus=(5,), n_boot=200, iqm_tables=[own, mq])
    rows = table.set_index("metric")
    assert {"cnr", "mriqc_cjv", "score"} <= set(rows.index) and "efc" not in rows.index  # all-NaN IQM left out
    # the failed IQM row is not evaluated; orientation: low CNR goes with fail
    assert rows.loc["cnr", "n"] == n - 1
    assert rows.loc["cnr", "direction"] == "low=fail"
    assert rows.loc["cnr", "auroc_oriented"] == pytest.approx(1 - roc_auc_score(fail[1:], cnr[1:]))
    assert rows.loc["mriqc_cjv", "direction"] == "high=fail"
    md = stage.label_markdown(table)
    assert "| cnr | score | 39 |" in md and "low=fail" in md


def test_evaluate_labels_includes_the_site_aware_and_learned_scores():
    """The label table evaluates score_site and score_learned beside score when the table has them (a demo whose
    raw scores carry a site offset is judged by its site-aware score too); an empty p_fail_cv stays with n = 0."""
    rng = np.random.default_rng(1)
    n = 30
    fail = rng.random(n) < 0.4
    site_offset = np.where(np.arange(n) % 2 == 0, 0.0, 1.0)
    score_site = np.where(fail, 2.0, 0.0) + rng.normal(0, 0.3, n)
    s = pd.DataFrame({"volume_id": [f"v{i}" for i in range(n)], "status": "ok", "label": np.where(fail, "fail", "pass"),
                      "score": score_site * 0.1 + site_offset, "score_site": score_site, "score_learned": site_offset,
                      "p_fail_cv": np.nan, "flagged": site_offset > 0.5})
    table, curves = stage.evaluate_labels(s, ["fail"], ["pass"], taus=(5,), n_boot=30)
    t = table.set_index("metric")
    assert {"score_site", "score_learned", "p_fail_cv"} <= set(t.index) and t.loc["p_fail_cv", "n"] == 0
    assert t.loc["score_site", "auroc"] == pytest.approx(np.mean([a > b for a in score_site[fail] for b in score_site[~fail]]))
    assert {"score_site", "score_learned"} <= set(curves)
