"""Tests for artifactqc.preprocess: geometry helpers, N4 and self-supervised super-resolution.

Expectations are computed independently (scipy/nibabel/ANTs readers, closed forms, known simulated
fields); settings are tiny so the whole file runs in well under a minute on a CPU.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from artifactqc.preprocess import n4 as N4
from artifactqc.preprocess import selection as SEL
from artifactqc.preprocess import superres as SR
from artifactqc.cli import main as cli_main


# ----------------------------------------------------------------------------- helpers


def _phantom(shape=(40, 40, 40), seed=0) -> np.ndarray:
    """A head-like phantom: an ellipsoid 'head' with two inner tissue classes and a few sharp blobs."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt((zz / 0.85) ** 2 + (yy / 0.8) ** 2 + (xx / 0.75) ** 2)
    vol = np.zeros(shape, np.float32)
    vol[r < 1.0] = 60.0  # "grey matter"
    vol[r < 0.6] = 100.0  # "white matter"
    for _ in range(12):  # sharp spheres of various sizes: self-similar structure in every direction
        c = rng.uniform(-0.5, 0.5, 3)
        rad = rng.uniform(0.06, 0.2)
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        vol[d < rad] = rng.choice([30.0, 140.0])
    vol[r >= 1.0] = 0.0
    return vol


def _smooth_field(shape, strength=0.4):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return np.exp(strength * (0.8 * xx + 0.5 * yy - 0.4 * zz**2)).astype(np.float32)


# ----------------------------------------------------------------------------- geometry


def test_resample_axis_matches_scipy_map_coordinates():
    rng = np.random.default_rng(1)
    x = rng.random((17, 18, 19)).astype(np.float32)
    pos = np.array([0.0, 0.25, 3.7, 8.0, 11.49, 16.0])
    for axis in range(3):
        moved = np.moveaxis(x, axis, 0)
        grids = np.meshgrid(pos, *[np.arange(s) for s in moved.shape[1:]], indexing="ij")
        expect = np.moveaxis(ndimage.map_coordinates(moved, grids, order=3, mode="mirror"), 0, axis)
        got = SR.resample_axis(x, pos, axis, order=3)
        np.testing.assert_allclose(got, expect, atol=1e-5)


def test_slice_profile_fwhm_and_mass():
    for fwhm in (2.4, 4.0, 6.0):
        k = SR.slice_profile(fwhm, "gaussian")
        assert k.sum() == pytest.approx(1.0)
        x = np.arange(k.size) - k.size // 2
        sigma = math.sqrt(float((k * x**2).sum()))
        assert sigma * 2 * math.sqrt(2 * math.log(2)) == pytest.approx(fwhm, rel=0.03)
        rect = SR.slice_profile(fwhm, "rect")
        assert rect.sum() == pytest.approx(1.0)
        # a box of width fwhm: (number of fine voxels it covers) / fwhm = peak weight
        assert rect.max() == pytest.approx(1.0 / fwhm, rel=1e-6)


def test_degrade_axis_keeps_linear_ramp_and_samples_positions():
    ramp = np.broadcast_to(np.arange(60, dtype=np.float32)[None, None, :], (3, 4, 60)).copy()
    low, pos = SR.degrade_axis(ramp, 4.0, axis=2)
    assert low.shape == (3, 4, 15)
    np.testing.assert_allclose(pos, 4.0 * np.arange(15))
    inner = (pos > 12) & (pos < 47)  # away from the edges a symmetric blur keeps a ramp
    np.testing.assert_allclose(low[0, 0, inner], pos[inner], atol=1e-3)


def test_needs_superres():
    assert SR.needs_superres((1, 1, 1)) is False
    assert SR.needs_superres((1, 1, 1.4)) is False
    assert SR.needs_superres((0.9, 0.9, 4.8)) is True
    assert SR.needs_superres((2.0, 1.0, 1.0), ratio=2.5) is False


def test_metrics_closed_forms():
    rng = np.random.default_rng(0)
    ref = rng.random((20, 20, 20)) * 100
    assert SR.ssim(ref, ref) == pytest.approx(1.0)
    peak = ref.max()
    assert SR.psnr(ref, ref + 2.0) == pytest.approx(10 * math.log10(peak**2 / 4.0))
    noisy = ref + rng.normal(0, 20, ref.shape)
    assert SR.ssim(ref, noisy) < 0.9


def test_otsu_threshold_separates_two_modes():
    rng = np.random.default_rng(0)
    low, high = rng.normal(10, 2, 5000), rng.normal(50, 4, 5000)
    thr = N4.otsu_threshold(np.concatenate([low, high]))
    errors = (low > thr).sum() + (high <= thr).sum()
    assert errors <= 5  # any threshold in the gap between the modes is optimal


# ----------------------------------------------------------------------------- N4


def test_ants_image_geometry_matches_ants_reader(tmp_path):
    """Our affine → ANTs conversion must agree with ANTs' own NIfTI reader."""
    import ants

    affine = np.array(
        [[0.0, 0.0, -1.2, 40.0], [-0.9, 0.0, 0.0, 30.0], [0.0, 2.5, 0.0, -12.0], [0, 0, 0, 1]]
    )
    data = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    path = tmp_path / "g.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    ref = ants.image_read(str(path))
    ours = N4._ants_image(data, affine)
    np.testing.assert_allclose(ours.spacing, ref.spacing, atol=1e-5)
    np.testing.assert_allclose(ours.origin, ref.origin, atol=1e-4)
    np.testing.assert_allclose(ours.direction, ref.direction, atol=1e-5)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-6)


def test_n4_recovers_a_known_smooth_field():
    clean = _phantom((40, 40, 40))
    truth = _smooth_field(clean.shape, 0.4)
    biased = clean * truth
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    corrected, bias = N4.n4(biased, affine, shrink_factor=2, iters=(40, 40), spline_distance_mm=40)
    assert corrected.shape == bias.shape == clean.shape
    np.testing.assert_allclose(corrected * bias, biased, rtol=1e-4, atol=1e-3)
    head = clean > 0
    # the estimate is defined up to a constant factor: compare log-fields after centring
    lt = np.log(truth[head]) - np.log(truth[head]).mean()
    le = np.log(bias[head]) - np.log(bias[head]).mean()
    assert np.corrcoef(lt, le)[0, 1] > 0.9
    wm = clean == 100.0
    cov = lambda v: float(v[wm].std() / v[wm].mean())  # noqa: E731
    assert cov(corrected) < 0.5 * cov(biased)


def test_n4_file_keeps_affine_and_header(tmp_path):
    clean = _phantom((32, 32, 24))
    affine = np.array([[-1.5, 0, 0, 20], [0, 1.5, 0, -10], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    src = tmp_path / "in.nii.gz"
    img = nib.Nifti1Image((clean * _smooth_field(clean.shape)).astype(np.int16), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(src))
    out, bias = tmp_path / "out.nii.gz", tmp_path / "bias.nii.gz"
    rc = cli_main(["n4", str(src), str(out), "--bias", str(bias), "--shrink-factor", "2", "--iters", "20,20",
                   "--spline-distance", "40"])
    assert rc == 0
    o = nib.load(str(out))
    np.testing.assert_allclose(o.affine, affine)
    assert o.shape == clean.shape and o.get_data_dtype() == np.float32
    assert o.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(nib.load(str(bias)).affine, affine)


# ----------------------------------------------------------------------------- super-resolution

_TINY = dict(iterations=200, patch_size=24, batch_size=8, channels=16, n_layers=4, threads=1, seed=3)


def test_superres_grid_affine_and_quality_beats_cubic():
    hr = _phantom((40, 40, 48), seed=2)
    f, axis = 3.0, 2
    low, pos = SR.degrade_axis(hr, f, axis)
    affine = np.array([[0, -1.0, 0, 10], [1.0, 0, 0, -5], [0, 0, f, 7], [0, 0, 0, 1]])
    sr, new_aff, info = SR.superres(low, affine, **_TINY)
    n_out = int(math.floor((low.shape[axis] - 1) * f)) + 1
    assert info.through_axis == axis and info.factor == pytest.approx(f)
    assert sr.shape == (40, 40, n_out)
    expect_aff = affine.copy()
    expect_aff[:3, axis] /= f
    np.testing.assert_allclose(new_aff, expect_aff)
    # the grids agree: fine voxel k sits where the original voxel k was
    ref = hr[:, :, :n_out]
    cub = SR.upsample_axis(low, f, axis, n_out=n_out)
    head = ref > 0
    assert SR.psnr(ref, sr, head) > SR.psnr(ref, cub, head)
    assert SR.ssim(ref, sr, head) > SR.ssim(ref, cub, head)


def test_superres_is_deterministic_and_picks_the_thick_axis():
    hr = _phantom((36, 30, 30), seed=5)
    low, _ = SR.degrade_axis(hr, 2.5, 0)
    affine = np.diag([2.5, 1.0, 1.0, 1.0])
    kw = dict(_TINY, iterations=20)
    a, aff_a, info = SR.superres(low, affine, **kw)
    b, aff_b, _ = SR.superres(low, affine, **kw)
    assert info.through_axis == 0 and info.device == "cpu"
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.sqrt((aff_a[:3, :3] ** 2).sum(0)), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(aff_a, aff_b)


def test_superres_file_copies_isotropic_and_saves_safetensors(tmp_path):
    from safetensors import safe_open

    iso = tmp_path / "iso.nii.gz"
    vol = _phantom((24, 24, 24))
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1, 1, 1])), str(iso))
    out = tmp_path / "iso_out.nii.gz"
    assert cli_main(["superres", str(iso), str(out)]) == 0
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(), vol)

    thick = tmp_path / "thick.nii.gz"
    low, _ = SR.degrade_axis(_phantom((32, 32, 40)), 4.0, 2)
    aff = np.diag([0.9, 0.9, 3.6, 1.0])
    nib.save(nib.Nifti1Image(low, aff), str(thick))
    out2, model = tmp_path / "thick_sr.nii.gz", tmp_path / "m.safetensors"
    rc = cli_main(["superres", str(thick), str(out2), "--model", str(model), "--iterations", "5",
                   "--patch-size", "16", "--batch-size", "4", "--channels", "8", "--n-layers", "3",
                   "--threads", "1", "--device", "auto"])
    assert rc == 0
    img = nib.load(str(out2))
    np.testing.assert_allclose(img.header.get_zooms(), (0.9, 0.9, 0.9), rtol=1e-5)
    assert img.shape == (32, 32, 4 * (low.shape[2] - 1) + 1)
    with safe_open(str(model), "pt") as fh:
        assert fh.metadata()["factor"].startswith("4.0")
        assert len(list(fh.keys())) == 6  # 3 conv layers: weight + bias each


@pytest.mark.realdata
def test_real_thick_slice_scan_is_flagged_for_superres(shared_data):
    from artifactqc import io as aq_io

    img = aq_io.inspect_header(shared_data / "volumes/dcm_qa_decubitus/HFS/t1_fl2d_sag_3.nii.gz")
    assert SR.needs_superres(img.header.get_zooms()[:3])
    iso = aq_io.inspect_header(shared_data / "volumes/VolumeRenderingData/stroke_T1.nii.gz")
    assert not SR.needs_superres(iso.header.get_zooms()[:3])


# ----------------------------------------------------------------------------- training selection


def _volumes_table():
    import pandas as pd

    rows = [
        ("A-1", "siteA", "T1w", "ok", "", "[1.0, 1.0, 1.0]"),
        ("A-2", "siteA", "T1w", "ok", "A-1", "[1.0, 1.0, 1.0]"),  # duplicate of A-1
        ("B-1", "siteB", "T2w", "ok", "", "[1.2, 1.2, 1.2]"),
        ("D-1", "siteD", "T1w", "ok", "", "[1.0, 1.0, 5.0]"),
        ("D-2", "siteD", "T1w", "failed", "", "[1.0, 1.0, 5.0]"),
        ("E-1", "siteE", "FLAIR", "ok", "", "[0.9, 0.9, 1.2]"),
    ]
    return pd.DataFrame(
        [dict(volume_id=v, site=s, subject=v[-1], contrast=c, status=st, duplicate_of=d, voxel_mm=z,
              path=f"/data/{v}.nii.gz") for v, s, c, st, d, z in rows]
    )


def test_select_training_filters(tmp_path):
    vols = _volumes_table()
    allsel = SEL.select_training(vols)
    assert list(allsel["volume_id"]) == ["A-1", "B-1", "D-1", "E-1"]  # no failed, no duplicate
    assert dict(zip(allsel["volume_id"], allsel["needs_superres"])) == {
        "A-1": False, "B-1": False, "D-1": True, "E-1": False}
    assert list(SEL.select_training(vols, include_sites=["siteA", "siteD"])["volume_id"]) == ["A-1", "D-1"]
    assert list(SEL.select_training(vols, exclude_contrasts=["T1w"])["volume_id"]) == ["B-1", "E-1"]
    ids = tmp_path / "ids.txt"
    ids.write_text("# chosen by hand\nB-1\nE-1\n")
    assert list(SEL.select_training(vols, include_list=str(ids), exclude_sites=["siteE"])["volume_id"]) == ["B-1"]
    assert list(SEL.select_training(vols, exclude_list=["A-1", "D-1"])["volume_id"]) == ["B-1", "E-1"]
    src = tmp_path / "volumes.parquet"
    vols.to_parquet(src)
    with pytest.raises(ValueError, match="empty"):
        SEL.select_training_file(src, tmp_path / "sel.tsv", include_sites=["nowhere"])
    assert SEL.select_training_file(src, tmp_path / "sel.tsv", include_contrasts=["T1w"]) == 2
    n = SEL.training_manifest(tmp_path / "sel.tsv", {"A-1": "pre/A-1.nii.gz", "D-1": "pre/D-1.nii.gz"},
                            tmp_path / "manifest.tsv")
    import pandas as pd

    man = pd.read_csv(tmp_path / "manifest.tsv", sep="\t")
    assert n == 2 and list(man["status"]) == ["ok", "ok"]
    assert man["path"].iloc[1].endswith("pre/D-1.nii.gz") and man["raw_path"].iloc[1] == "/data/D-1.nii.gz"
