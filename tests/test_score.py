"""Batch scoring: one row per input, failures as rows, aggregation, CLI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from artifactqc import cli
from artifactqc.encoder import slices
from artifactqc.encoder.network import HEADS, ArtifactEncoder, EncoderConfig
from artifactqc.encoder.checkpoint import load_model, save_model
from artifactqc.encoder.score import aggregate, predict_slices, read_path_list, score_columns, score_volumes, trimmed_mean

torch.set_num_threads(1)


def _vol(seed=0, shape=(36, 40, 32)):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    v = np.where(zz**2 + yy**2 + xx**2 < 0.8, 100.0, 0.0) + rng.normal(0, 2, shape)
    return np.clip(v, 0, None).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    m = ArtifactEncoder(EncoderConfig(latent_dim=3)).eval()
    save_model(m, d, slices.SliceConfig(image_size=32, pixel_mm=4.0, slices_per_axis=3), {"model_id": "t"})
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vols")
    good = []
    for i in range(2):
        p = d / f"g{i}.nii.gz"
        nib.save(nib.Nifti1Image(_vol(i), np.diag([3.0, 3.0, 3.0, 1.0])), str(p))
        good.append(str(p))
    notnifti = d / "bad.nii.gz"
    notnifti.write_bytes(b"hello")
    nan = d / "nan.nii.gz"
    v = _vol(5)
    v[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(v, np.eye(4)), str(nan))
    return good, [str(notnifti), str(d / "missing.nii.gz"), str(nan)]


def test_one_row_per_input_and_failures_never_crash(model_dir, inputs):
    good, bad = inputs
    paths = [good[0], bad[0], good[1], bad[1], bad[2]]
    df = score_volumes(model_dir, paths, batch_size=4, device="auto")
    assert list(df["path"]) == paths
    assert list(df.columns) == score_columns(3)
    assert {f"severity_{h}" for h in HEADS} <= set(df.columns)
    assert list(df["status"]) == ["ok", "failed", "ok", "failed", "failed"]
    failed = df[df["status"] == "failed"]
    assert failed["error"].str.startswith("not_nifti: ").iloc[0]
    assert failed["error"].iloc[1].startswith("missing_file: ")
    assert failed["error"].iloc[2].startswith("nonfinite_voxels: ")
    assert failed[["score", "severity_noise", "latent_0"]].isna().all().all()
    ok = df[df["status"] == "ok"]
    assert ok["score"].notna().all() and (ok["score"] >= 0).all()
    assert ((ok[[f"severity_{h}" for h in HEADS]] >= 0) & (ok[[f"severity_{h}" for h in HEADS]] <= 1)).all().all()
    assert (ok["n_slices"] == 9).all() and (df["seconds"] > 0).all()


def test_volume_values_are_trimmed_means_of_slice_predictions(model_dir, inputs):
    """Recompute the row independently: extract slices, run the model, scipy trim_mean."""
    from scipy.stats import trim_mean

    good, _ = inputs
    model = load_model(model_dir, device="cpu")
    s, _ = slices.extract_slices(good[0], model.slice_cfg)
    with torch.no_grad():
        o = model(torch.from_numpy(s)[:, None])
    row = score_volumes(model, [good[0]], device="cpu").iloc[0]
    assert row["score"] == pytest.approx(float(trim_mean(o["score"].numpy(), 0.1)), rel=1e-5)
    sev = torch.sigmoid(o["severity_logits"]).numpy()
    for j, h in enumerate(HEADS):
        assert row[f"severity_{h}"] == pytest.approx(float(trim_mean(sev[:, j], 0.1)), rel=1e-5, abs=1e-7)
    assert row["latent_2"] == pytest.approx(float(trim_mean(o["latent"].numpy()[:, 2], 0.1)), rel=1e-4, abs=1e-6)


def test_trimmed_mean_ignores_outlier_slices():
    x = np.array([1.0] * 18 + [100.0, -100.0])
    assert trimmed_mean(x) == pytest.approx(1.0)
    pred = {"score": x, "severity": np.tile(x[:, None], (1, 5)), "latent": np.zeros((20, 2))}
    agg = aggregate(pred)
    assert agg["score"] == pytest.approx(1.0) and agg["severity_bias"] == pytest.approx(1.0)


def test_predict_slices_batches_do_not_change_results(model_dir):
    model = load_model(model_dir, device="cpu")
    x = np.random.default_rng(0).random((7, 32, 32), dtype=np.float32)
    a = predict_slices(model, x, batch_size=2)
    b = predict_slices(model, x, batch_size=7)
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6)


def test_read_path_list_formats(tmp_path):
    t = tmp_path / "l.txt"
    t.write_text("# comment\n/a.nii.gz\n\n/b.nii.gz\n")
    assert read_path_list(t) == ["/a.nii.gz", "/b.nii.gz"]
    tsv = tmp_path / "m.tsv"
    pd.DataFrame({"path": ["/x", "/y", "/z"], "status": ["ok", "failed", "ok"]}).to_csv(tsv, sep="\t", index=False)
    assert read_path_list(tsv) == ["/x", "/z"]


def test_cli_score_writes_parquet(model_dir, inputs, tmp_path):
    good, bad = inputs
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([good[1], bad[0]]) + "\n")
    out = tmp_path / "s" / "scores.parquet"
    rc = cli.main(["score", "--model", str(model_dir), "--out", str(out), good[0], "--list", str(lst)])
    assert rc == 0
    df = pd.read_parquet(out)
    assert list(df["path"]) == [good[0], good[1], bad[0]]
    assert list(df["status"]) == ["ok", "ok", "failed"]


def test_cli_score_refuses_pickle_model(tmp_path, inputs):
    good, _ = inputs
    d = tmp_path / "pm"
    d.mkdir()
    torch.save(ArtifactEncoder().state_dict(), d / "encoder.pt")
    with pytest.raises(Exception, match="pickle|safetensors|model.json"):
        cli.main(["score", "--model", str(d / "encoder.pt"), "--out", str(tmp_path / "o.parquet"), good[0]])


# ------------------------------------------------------------------ thick-slice scans: acquisition planes
def test_acquisition_axis_is_the_one_thick_voxel_side():
    from artifactqc.io import acquisition_axis

    assert acquisition_axis([1.0, 1.0, 5.0]) == 2
    assert acquisition_axis([0.45, 0.45, 3.0]) == 2
    assert acquisition_axis([4.0, 0.9, 0.9]) == 0
    assert acquisition_axis([1.0, 1.0, 1.5]) is None  # 1.5 mm slices: a 3D protocol
    assert acquisition_axis([1.0, 5.0, 5.0]) is None  # two thick sides: no acquisition plane
    assert acquisition_axis([1.0, 1.0, 1.0]) is None
    assert acquisition_axis([1.0, 0.0, 3.0]) is None


def _thick(tmp_path, name, thick_axis):
    """A phantom stored with a 12 mm voxel side along ``thick_axis`` (3 mm in-plane)."""
    shape = [24, 24, 24]
    shape[thick_axis] = 6
    zooms = [3.0, 3.0, 3.0]
    zooms[thick_axis] = 12.0
    v = np.clip(_vol(7, tuple(shape)), 0, None)
    p = tmp_path / name
    nib.save(nib.Nifti1Image(v, np.diag([*zooms, 1.0])), str(p))
    return str(p)


def test_thick_slice_scan_is_scored_on_its_acquisition_planes(model_dir, tmp_path):
    """Recompute independently: the slices normal to the thick axis, scored as a whole volume, give the score
    and the non-resolution severities; severity_resolution and the latent are the all-orientation values."""
    from artifactqc.encoder.score import ORIENTATIONS, predict_volume

    model = load_model(model_dir, device="cpu")
    for axis in (2, 0):
        path = _thick(tmp_path, f"thick{axis}.nii.gz", axis)
        row = score_volumes(model, [path], device="cpu").iloc[0]
        assert row["status"] == "ok" and row["score_planes"] == ORIENTATIONS[axis]
        s, _ = slices.extract_slices(path, model.slice_cfg)
        n = len(s) // 3
        block = s[axis * n:(axis + 1) * n]
        planes = predict_volume(model, np.concatenate([block] * 3))
        everything = predict_volume(model, s)
        assert row["score_learned"] == pytest.approx(planes["score"], rel=1e-5)
        for h in HEADS:
            want = everything if h == "resolution" else planes
            assert row[f"severity_{h}"] == pytest.approx(want[f"severity_{h}"], rel=1e-5, abs=1e-7)
        assert row["latent_1"] == pytest.approx(everything["latent_1"], rel=1e-4, abs=1e-6)
        every = score_volumes(model, [path], device="cpu", planes="all").iloc[0]
        assert every["score_planes"] == "all"
        assert every["score_learned"] == pytest.approx(everything["score"], rel=1e-5)


def test_isotropic_scan_uses_every_orientation_and_bad_policy_is_refused(model_dir, inputs):
    good, _ = inputs
    a = score_volumes(model_dir, [good[0]], device="cpu").iloc[0]
    b = score_volumes(model_dir, [good[0]], device="cpu", planes="all").iloc[0]
    assert a["score_planes"] == b["score_planes"] == "all" and a["score"] == b["score"]
    with pytest.raises(ValueError, match="planes must be one of"):
        score_volumes(model_dir, [good[0]], device="cpu", planes="inplane")


def test_cli_score_planes_option(model_dir, tmp_path):
    path = _thick(tmp_path, "thick.nii.gz", 2)
    for planes, want in (("acquisition", "axial"), ("all", "all")):
        out = tmp_path / f"{planes}.parquet"
        assert cli.main(["score", path, "--model", str(model_dir), "--out", str(out), "--planes", planes]) == 0
        assert pd.read_parquet(out)["score_planes"].tolist() == [want]


def test_canonical_voxel_sizes_follow_the_scorer_axis_order():
    """io.canonical_voxel_sizes (used to find a file's acquisition axis without extracting slices) agrees with
    the voxel sizes the slice extraction reports, for a permuted and flipped grid."""
    from artifactqc import io

    aff = np.array([[0.0, 0.0, -1.0, 90], [-2.0, 0.0, 0.0, 100], [0.0, 5.0, 0.0, -60], [0, 0, 0, 1]])
    assert io.canonical_voxel_sizes(aff).tolist() == [1.0, 2.0, 5.0]
    _, info = slices.extract_from_array(_vol(3, (24, 20, 28)), aff, slices.SliceConfig(image_size=32, pixel_mm=4.0,
                                                                                         slices_per_axis=3))
    assert info["voxel_mm"] == [1.0, 2.0, 5.0]
