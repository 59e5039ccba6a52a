"""Tests for artifactqc.preprocess: geometry helpers, N4 and self-supervised super-resolution.

Expectations are computed independently (scipy/nibabel/ANTs readers, closed forms, known simulated
fields); settings are tiny so the whole file runs in well under a minute on a CPU.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

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


def test_needs_superres():
    assert SR.needs_superres((1, 1, 1)) is False
    assert SR.needs_superres((1, 1, 1.4)) is False
    assert SR.needs_superres((0.9, 0.9, 4.8)) is True
    assert SR.needs_superres((2.0, 1.0, 1.0), ratio=2.5) is False


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
    # the input's units: N4's arbitrary field scale is removed (geometric mean 1 in the head), recorded
    import json

    side = json.loads((tmp_path / "out.json").read_text())
    src_data = np.asarray(img.dataobj, np.float32)
    head = clean > 0
    corrected = np.asarray(o.dataobj)
    ratio = np.exp(np.mean(np.log(corrected[head] / src_data[head])))
    assert ratio == pytest.approx(1.0, rel=1e-3) and side["bias_scale"] > 0
    assert side["params"]["spline_distance_mm"] == 40 and side["output_range"][1] == pytest.approx(corrected.max())


# ----------------------------------------------------------------------------- super-resolution

def _acquire(hr: np.ndarray, k: int, profile: str):
    """Independent thick-slice acquisition along the last axis (as benchmarks/superres does it): the slab of
    ``n // k`` slices centred on the volume, each slice the mean of its k voxels (box) or the exact Gaussian
    (FWHM k) integral over every voxel. Returns ``(low, first, centres)``."""
    from scipy.special import erf

    n = hr.shape[-1]
    m = n // k
    first = (n - m * k) // 2
    centres = first + k * np.arange(m) + (k - 1) / 2
    if profile == "box":
        low = hr[..., first : first + m * k].reshape(*hr.shape[:-1], m, k).mean(-1)
    else:
        s = k / (2 * math.sqrt(2 * math.log(2))) * math.sqrt(2)
        i = np.arange(n)[None, :]
        w = 0.5 * (erf((i + 0.5 - centres[:, None]) / s) - erf((i - 0.5 - centres[:, None]) / s))
        low = np.tensordot(hr, w / w.sum(1, keepdims=True), axes=([-1], [1]))
    return low.astype(np.float32), first, centres


def _psnr(ref, test, mask):
    return 10 * math.log10(float(ref[mask].max()) ** 2 / float(np.mean((ref[mask] - test[mask]) ** 2)))


def test_profile_weights_box_mean_and_gaussian_width():
    w = SR.profile_weights(20, np.array([5.5]), 4.0, "box")[0]
    np.testing.assert_allclose(w[4:8], 0.25) and np.testing.assert_allclose(np.delete(w, range(4, 8)), 0)
    g = SR.profile_weights(61, np.array([30.0]), 6.0, "gaussian")[0]
    x = np.arange(61) - 30.0
    sigma2 = float((g * x**2).sum()) - 1 / 12  # voxel integration adds the variance of a unit box
    assert math.sqrt(sigma2) * 2 * math.sqrt(2 * math.log(2)) == pytest.approx(6.0, rel=0.01)
    assert g.sum() == pytest.approx(1.0)


def test_interp_matrix_is_the_not_a_knot_cubic_spline_held_at_the_ends():
    from scipy.interpolate import CubicSpline

    y = np.random.default_rng(0).random(9)
    q = np.array([-0.7, 0.0, 0.3, 2.5, 7.99, 8.0, 8.6])
    np.testing.assert_allclose(SR.interp_matrix(9, q) @ y, CubicSpline(np.arange(9), y)(np.clip(q, 0, 8)), atol=1e-9)
    np.testing.assert_allclose(SR.interp_matrix(9, q, "linear") @ y, np.interp(q, np.arange(9), y))


def test_cubic_output_tiles_the_slab_in_world_coordinates():
    from scipy.interpolate import CubicSpline

    hr = _phantom((30, 28, 40), seed=1)
    k = 4
    low, first, centres = _acquire(hr, k, "box")
    # an oblique affine: thick axis 2 with spacing 3.6 mm = 4 x 0.9 mm, origin at the first slice centre
    rot = np.array([[0.0, -1.0, 0.0], [0.96, 0.0, 0.28], [-0.28, 0.0, 0.96]])
    aff = np.eye(4)
    aff[:3, :3] = rot * np.array([0.9, 0.9, 3.6])
    aff[:3, 3] = [10.0, -5.0, 7.0]
    out, new_aff, info = SR.superres(low, aff, method="cubic")
    assert info.through_axis == 2 and info.factor == pytest.approx(4.0) and out.shape == (30, 28, low.shape[2] * k)
    np.testing.assert_allclose(np.linalg.norm(new_aff[:3, :3], axis=0), [0.9, 0.9, 0.9])
    # output voxel j lies where fine voxel (first + j) lies: k*(j' ) offsets from the first slice centre
    fine_aff = aff.copy()
    fine_aff[:3, 2] /= k
    fine_aff[:3, 3] = aff[:3, 3] - fine_aff[:3, 2] * (centres[0] - first)  # fine voxel 0 of the slab
    np.testing.assert_allclose(new_aff, fine_aff, atol=1e-9)
    fine = np.arange(first, first + low.shape[2] * k)
    expect = CubicSpline(centres, low, axis=2)(np.clip(fine, centres[0], centres[-1]))
    np.testing.assert_allclose(out, np.maximum(expect, 0), atol=1e-3)


@pytest.mark.parametrize("k,profile", [(3, "box"), (4, "gaussian")])
def test_learned_beats_cubic_keeps_units_and_is_deterministic(k, profile):
    hr = _phantom((40, 40, 48), seed=2) * 7.0 + 3.0 * (_phantom((40, 40, 48), seed=2) > 0)
    low, first, _ = _acquire(hr, k, profile)
    aff = np.diag([1.0, 1.0, float(k), 1.0])
    ref = hr[:, :, first : first + low.shape[2] * k]
    head = ref > 0
    cub, _, _ = SR.superres(low, aff, method="cubic")
    sr, _, info = SR.superres(low, aff, method="learned", seed=1)
    again, _, _ = SR.superres(low, aff, method="learned", seed=1)
    np.testing.assert_array_equal(sr, again)
    assert info.profile in SR.PROFILE_KINDS and info.profile_estimated and info.train_samples > 1000
    assert _psnr(ref, sr, head) > _psnr(ref, cub, head) + 0.2
    assert sr.mean() == pytest.approx(ref.mean(), rel=0.02)  # the input's units, not ~[0, 1]
    assert sr.dtype == np.float32 and sr.min() >= 0


def test_superres_file_copies_isotropic_and_writes_the_sidecar(tmp_path):
    import json

    iso = tmp_path / "iso.nii.gz"
    vol = _phantom((24, 24, 24))
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1, 1, 1])), str(iso))
    out = tmp_path / "iso_out.nii.gz"
    assert cli_main(["superres", str(iso), str(out)]) == 0
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(), vol)
    assert json.loads((tmp_path / "iso_out.json").read_text())["superresolved"] is False

    thick = tmp_path / "thick.nii.gz"
    low, _, _ = _acquire(_phantom((32, 32, 40)) * 9.0, 4, "box")
    aff = np.diag([0.9, 0.9, 3.6, 1.0])
    nib.save(nib.Nifti1Image((low * 10).astype(np.int16), aff), str(thick))  # int16: a scaled integer input
    out2 = tmp_path / "thick_sr.nii.gz"
    assert cli_main(["superres", str(thick), str(out2), "--method", "learned"]) == 0
    img = nib.load(str(out2))
    np.testing.assert_allclose(img.header.get_zooms(), (0.9, 0.9, 0.9), rtol=1e-5)
    assert img.shape == (32, 32, 4 * low.shape[2]) and img.get_data_dtype() == np.float32
    data = np.asarray(img.dataobj)
    src = np.asarray(nib.load(str(thick)).dataobj).astype(np.float32)
    assert data.mean() == pytest.approx(src.mean(), rel=0.05) and data.max() <= 1.5 * src.max()  # input units
    side = json.loads((tmp_path / "thick_sr.json").read_text())
    assert side["superresolved"] and side["method"] == "learned" and side["factor"] == pytest.approx(4.0)
    assert side["params"]["method"] == "learned" and side["intensity_scale"] > 0 and side["profile"] in ("box", "gaussian")


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
