"""Import of MRIQC group TSVs and per-image JSONs, joined on bids_name."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from artifactqc.qc import mriqc


def _write_inputs(tmp_path):
    (tmp_path / "group_T1w.tsv").write_text(
        "bids_name\tcjv\tcnr\tefc\tfber\n"
        "sub-01_T1w\t0.40\t3.1\t0.55\t1500.0\n"
        "sub-02_ses-1_T1w\t0.65\t2.0\tn/a\t900.0\n"
    )
    d = tmp_path / "sub-03" / "anat"
    d.mkdir(parents=True)
    (d / "sub-03_T2w.json").write_text(json.dumps({
        "bids_meta": {"RepetitionTime": 3.2}, "provenance": {"version": "24.0.2"},
        "cjv": 0.5, "cnr": 1.5, "efc": 0.6, "fber": 700.0, "snr_total": 9.0,
        "summary_wm_median": 1000.0,
    }))
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "x"}))


def test_read_group_and_json(tmp_path):
    _write_inputs(tmp_path)
    df = mriqc.read_mriqc(tmp_path).set_index("bids_name")
    assert sorted(df.index) == ["sub-01_T1w", "sub-02_ses-1_T1w", "sub-03_T2w"]
    assert df.loc["sub-01_T1w", "mriqc_cjv"] == pytest.approx(0.40)
    assert pd.isna(df.loc["sub-02_ses-1_T1w", "mriqc_efc"])
    assert df.loc["sub-03_T2w", "mriqc_fber"] == pytest.approx(700.0)
    assert df.loc["sub-03_T2w", "mriqc_summary_wm_median"] == pytest.approx(1000.0)
    assert "mriqc_bids_meta_RepetitionTime" not in df.columns


def test_join_status(tmp_path):
    _write_inputs(tmp_path)
    vols = pd.DataFrame({
        "volume_id": ["a", "b", "c", "d", "e"],
        "path": ["/x/sub-01_T1w.nii.gz", "/x/sub-02_ses-1_T1w.nii", "/x/sub-03_T2w.nii.gz",
                 "/x/sub-04_T1w.nii.gz", "/x/sub-05_FLAIR.nii.gz"],
        "contrast": ["T1w", "T1w", "T2w", "T1w", "FLAIR"],
    })
    out = mriqc.join_mriqc(vols, mriqc.read_mriqc(tmp_path)).set_index("volume_id")
    assert out["mriqc_status"].to_dict() == {"a": "ok", "b": "ok", "c": "ok", "d": "failed", "e": "unsupported"}
    assert out.loc["b", "mriqc_cnr"] == pytest.approx(2.0)
    assert out.loc["b", "bids_name"] == "sub-02_ses-1_T1w"
    assert len(out) == 5


def test_bids_name_of():
    assert mriqc.bids_name_of("/a/b/sub-1_run-2_T1w.nii.gz") == "sub-1_run-2_T1w"
    assert mriqc.bids_name_of("sub-1_T2w.json") == "sub-1_T2w"
