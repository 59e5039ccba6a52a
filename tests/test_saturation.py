"""Intensity-clipping check (encoder.saturation) and its place in the score rows."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from artifactqc import io
from artifactqc.encoder import saturation as S
from artifactqc.encoder.checkpoint import load_model, save_model
from artifactqc.encoder.network import SCORE_SCALE, ArtifactEncoder, EncoderConfig
from artifactqc.encoder.score import score_columns, score_volume, score_volumes
from artifactqc.encoder.slices import SliceConfig, scale_for_simulation
from artifactqc.simulate import head_mask

torch.set_num_threads(1)

# a 2 mm IXI T1w (uint8 with scaling) and an 8-bit skull-stripped stroke T1w, both in FIXTURES.txt
REAL = ("volumes/NiChart/IXI012-HH-1211_T1.nii.gz", "volumes/VolumeRenderingData/stroke_T1.nii.gz")


# ------------------------------------------------------------------------------- the pure function
def _smooth_stack(seed=0, n=6, size=64):
    """Slices like the scorer's: background 0, a head whose intensities spread smoothly up to 1.5."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    r = np.hypot(yy, xx)
    base = np.where(r < 0.8, 0.3 + 0.6 * (1 - r / 0.8), 0.0)
    x = base[None] + rng.normal(0, 0.15, (n, size, size)) * (r < 0.8)
    return np.clip(x, 0, 1.5).astype(np.float32)


def test_clean_like_slices_have_no_plateau():
    x = _smooth_stack()
    f = S.saturation_fraction(x)
    assert f < S.SAT_CLEAN_MAX
    assert S.clipping_severity(f) == 0.0


def test_clipped_slices_sit_on_the_plateau_and_the_fraction_is_exact():
    x = _smooth_stack()
    head = x > S.HEAD_THRESHOLD
    c = np.quantile(x[head], 0.8)
    clipped = np.minimum(x, c) / c  # what the scorer's rescaling does: the clip value becomes 1.0
    frac = S.saturation_fraction(clipped)
    expected = np.count_nonzero(np.abs(clipped - 1) < S.PLATEAU_TOL) / np.count_nonzero(clipped > S.HEAD_THRESHOLD)
    assert frac == pytest.approx(expected)
    assert 0.15 < frac < 0.3
    assert S.clipping_severity(frac) == 1.0
    # the float16 cache of the same slices gives the same answer (1.0 is exact in float16)
    assert S.saturation_fraction(clipped.astype(np.float16)) == pytest.approx(frac, abs=2e-3)


def test_severity_mapping_is_monotone_and_bounded():
    fr = [0.0, S.SAT_CLEAN_MAX, 0.005, 0.01, 0.03, S.SAT_FULL, 0.5, 1.0]
    sev = [S.clipping_severity(f) for f in fr]
    assert sev[0] == sev[1] == 0.0
    assert sev[-3] == sev[-2] == sev[-1] == 1.0
    assert all(a < b for a, b in zip(sev[1:6], sev[2:6]))
    assert np.isnan(S.clipping_severity(float("nan")))
    assert S.saturation_fraction(np.zeros((3, 8, 8), np.float32)) == 0.0  # no head pixels: nothing saturated


def test_combined_score_is_the_larger_of_learned_and_clipping():
    assert S.combined_score(0.3, 0.0) == 0.3
    assert S.combined_score(0.3, 0.8) == pytest.approx(SCORE_SCALE * 0.8)
    assert S.combined_score(1.9, 0.8) == 1.9
    assert S.combined_score(0.4, float("nan")) == 0.4


# -------------------------------------------------------------------------- real volumes, scoring
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small untrained encoder with the default slice geometry (the check does not depend on the weights)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    m = ArtifactEncoder(EncoderConfig(widths=(8, 16), extra=(False, False), stem_width=4, hidden=16, latent_dim=2))
    save_model(m, d, SliceConfig(), {"model_id": "t"})
    return load_model(d, device="cpu")


def _clipped(data: np.ndarray, q: float) -> np.ndarray:
    """The leave-site-out benchmark's clipping: intensities above the q-th head percentile set to it."""
    d = scale_for_simulation(data)
    return np.minimum(d, np.float32(np.percentile(d[head_mask(d)], q)))


def _save(tmp_path, name, data, affine):
    p = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(p))
    return p


@pytest.mark.parametrize("rel", REAL)
def test_real_volume_clipped_is_flagged_and_clean_is_not(shared_data, tmp_path, model, rel):
    v = io.load_volume(shared_data / rel)
    clean = score_volume(model, shared_data / rel)
    clipped = score_volume(model, _save(tmp_path, "clip775", _clipped(v.data, 77.5), v.affine))
    for r in (clean, clipped):
        assert r["status"] == "ok", r["error"]
        assert r["score"] == pytest.approx(max(r["score_learned"], SCORE_SCALE * r["severity_clipping"]))
    assert clean["severity_clipping"] == 0.0
    assert clean["saturation"] < S.SAT_CLEAN_MAX
    assert clean["score"] == clean["score_learned"]
    assert clipped["severity_clipping"] > 0.5
    assert clipped["saturation"] > 10 * clean["saturation"]
    assert clipped["score"] >= SCORE_SCALE * clipped["severity_clipping"] >= 1.0  # at or above the review threshold


@pytest.mark.parametrize("rel", REAL)
def test_benign_changes_of_a_clean_volume_stay_at_zero(shared_data, tmp_path, model, rel):
    from scipy.ndimage import affine_transform

    v = io.load_volume(shared_data / rel)
    d = np.asarray(v.data, np.float32)
    i16 = np.round(d / d.max() * 30000.0).astype(np.int16)  # int16 x1000-style rescale
    old = io.voxel_sizes(v.affine)
    scale = 1.5 / old
    shape = tuple(np.maximum(1, np.round(np.array(d.shape) * old / 1.5)).astype(int))
    res = affine_transform(d, np.diag(scale), output_shape=shape, order=1, mode="nearest")  # 1.5 mm trilinear
    aff = v.affine.copy()
    aff[:3, :3] = v.affine[:3, :3] @ np.diag(scale)
    df = score_volumes(model, [_save(tmp_path, "i16", i16, v.affine), _save(tmp_path, "res", res, aff)])
    assert (df.status == "ok").all()
    assert (df.severity_clipping == 0.0).all(), df[["path", "saturation"]]
    assert (df.score == df.score_learned).all()


def test_failed_rows_carry_nan_checks_and_every_column(tmp_path, model):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    df = score_volumes(model, [bad])
    assert list(df.columns) == score_columns(2)
    assert df.status.iloc[0] == "failed"
    assert df[["score", "score_learned", "severity_clipping", "saturation"]].isna().all(axis=None)


# ------------------------------------------------------------------ consumers of the score tables
def _table(with_check: bool):
    import pandas as pd

    heads = ("noise", "ghosting", "motion", "bias", "resolution")
    rows = []
    for i, (sc, clip) in enumerate([(0.3, 0.0), (1.6, 0.8), (0.2, 0.0)]):
        r = {"volume_id": f"v{i}", "site": "A", "subject": f"s{i}", "session": "", "contrast": "T1w",
             "path": f"/x/v{i}.nii.gz", "bids_name": f"sub-{i:02d}_T1w", "status": "ok", "error": "", "score": sc,
             "flagged": sc > 1, "density_pct": 50.0, "flag_tau5": False, "flag_tau3": False,
             **{f"severity_{h}": 0.1 for h in heads}}
        if with_check:
            r |= {"score_learned": 0.25, "severity_clipping": clip, "saturation": 0.05 if clip else 0.0001}
        rows.append(r)
    return pd.DataFrame(rows)


def test_review_page_shows_clipping_and_reads_older_tables():
    import pandas as pd

    from artifactqc.report import review

    recs = {r["id"]: r for r in review.page_records(_table(True), pd.DataFrame())}
    assert recs["v1"]["sev"]["clipping"] == pytest.approx(0.8)
    assert recs["v1"]["top"] == "clipping"
    assert recs["v0"]["top"] != "clipping"
    old = review.page_records(_table(False), pd.DataFrame())  # a table written before the check existed
    assert len(old) == 3 and all(r["sev"]["clipping"] is None for r in old)


def test_derivatives_export_the_check_and_read_older_tables():
    from artifactqc import derivatives

    new = derivatives.metric_columns(_table(True))
    assert {"score", "score_learned", "severity_clipping", "saturation"} <= set(new)
    old = derivatives.metric_columns(_table(False))
    assert "severity_clipping" not in old and "score" in old


def test_calibration_features_use_the_check_only_when_present_and_varying():
    from artifactqc.qc.calibrate import workflow_features

    _, feats, _ = workflow_features(_table(True))
    assert "severity_clipping" in feats
    _, feats_old, _ = workflow_features(_table(False))
    assert "severity_clipping" not in feats_old
