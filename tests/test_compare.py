"""artifactqc.qc.compare: the simulated evaluation set and the Table-2 analogue."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr

from artifactqc.qc import compare
from artifactqc.encoder.checkpoint import load_model
from artifactqc.encoder.score import score_volume

from .conftest import save_tiny_model
from .test_iqm import _phantom


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), seed=2, pixel_mm=3.0,
                           meta={"model_id": "t", "training": {"train_volumes": ["/data/train1.nii.gz"],
                                                               "val_volumes": ["/data/val1.nii.gz"]}})


def _scores(paths):
    return pd.DataFrame({
        "volume_id": ["a", "b", "c", "d", "e"], "site": "s",
        "contrast": ["T1w", "T1w", "T1w", "T2w", "T2w"],
        "path": paths, "status": ["ok", "ok", "ok", "ok", "failed"],
        "score": [0.2, 0.1, 0.05, 0.4, np.nan], "flagged": [False, False, True, False, False],
    })


def test_reference_volumes_skip_training_and_flagged_volumes():
    s = _scores(["/x/a.nii", "/x/b.nii", "/x/c.nii", "/x/d.nii", "/x/e.nii"])
    refs = compare.reference_volumes(s, per_contrast=1, exclude_paths=["/x/b.nii"])
    # c has the lowest score but is flagged; b is cleaner than a but was used for training
    assert refs.set_index("contrast")["volume_id"].to_dict() == {"T1w": "a", "T2w": "d"}
    assert not refs["used_for_training"].any()
    # a contrast whose only clean volume was trained on still gets a reference, marked as such
    refs = compare.reference_volumes(s, per_contrast=2, exclude_paths=["/x/d.nii"])
    assert refs[refs.contrast == "T1w"]["volume_id"].tolist() == ["b", "a"]
    assert refs[refs.contrast == "T2w"]["used_for_training"].tolist() == [True]


def test_training_paths_from_model_json_and_selection(model_dir, tmp_path):
    sel = tmp_path / "selection.tsv"
    pd.DataFrame({"volume_id": ["x"], "raw_path": ["/raw/x.nii.gz"]}).to_csv(sel, sep="\t", index=False)
    assert compare.training_paths(model_dir, [sel]) == ["/data/train1.nii.gz", "/data/val1.nii.gz", "/raw/x.nii.gz"]


def test_simulated_rows_and_table(model_dir, tmp_path):
    torch.set_num_threads(1)
    img, _ = _phantom("T1w", shape=(44, 44, 44))
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(img, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    s = pd.DataFrame({"volume_id": ["v"], "site": ["s"], "contrast": ["T1w"], "path": [str(path)],
                      "status": ["ok"], "score": [0.1], "flagged": [False]})
    # as the workflow does: one simulate_contrast job per contrast, summarise gathers
    part = compare.simulate_contrast(s, model_dir, "T1w", artifacts=("noise", "bias"), severities=(0.0, 0.5, 1.0),
                                     use_n4=False, device="cpu")
    assert compare.simulate_contrast(s, model_dir, "FLAIR").empty  # no FLAIR volume: no rows, no model load
    rows, table, md = compare.summarise([part])
    with pytest.raises(ValueError, match="no contrast"):
        compare.summarise([part.iloc[:0]])
    assert len(rows) == 6 and set(rows["artifact"]) == {"noise", "bias"}
    # the clean rung is measured once and is the score the cohort table has for the file
    clean = rows[rows.severity == 0]
    assert clean["score"].nunique() == 1
    model = load_model(model_dir, device="cpu")
    assert clean["score"].iloc[0] == pytest.approx(score_volume(model, path)["score"], rel=1e-4)
    # noise lowers the SNR of the phantom's tissue, severity by severity
    noise = rows[rows.artifact == "noise"].sort_values("severity")
    assert (noise["iqm_status"] == "ok").all()
    assert np.all(np.diff(noise["snr_total"].to_numpy()) < 0)
    assert json.loads(noise["params"].iloc[-1])["artifact"] == "noise"
    # the table's r is the plain Pearson r of the rows of that artifact
    r = table[(table.artifact == "noise") & (table.metric == "snr_total") & (table.severity_bin == "all")]
    assert r["pearson_r"].iloc[0] == pytest.approx(pearsonr(noise["severity"], noise["snr_total"])[0])
    cell = table[(table.artifact == "bias") & (table.metric == "score") & (table.severity_bin == "0.5")]
    assert cell["mean"].iloc[0] == pytest.approx(rows[(rows.artifact == "bias") & (rows.severity == 0.5)]["score"].mean())
    assert "inu_med" not in set(table["metric"])  # no N4: no bias field, column left out rather than empty
    assert "| noise | Pearson r |" in md and "v (T1w)" in md
