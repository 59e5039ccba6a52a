"""IQM formulas on hand-computed inputs, masks and tissue order on synthetic volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from artifactqc.qc import iqm


def test_snr_hand():
    # 100 / (10 * sqrt(5/4)) = 100 / 11.1803...
    assert iqm.snr(100.0, 10.0, 5) == pytest.approx(8.94427191, rel=1e-8)


def test_snr_dietrich_branches():
    f = 1.0 / math.sqrt(2.0 / (4.0 - math.pi))  # 0.655136...
    assert f == pytest.approx(0.6551364, rel=1e-6)
    assert iqm.snr_dietrich(1000.0, mad_air=4.0, sigma_air=9.0) == pytest.approx(f * 250.0)
    assert iqm.snr_dietrich(1000.0, mad_air=0.5, sigma_air=8.0) == pytest.approx(f * 125.0)
    assert iqm.snr_dietrich(1000.0, mad_air=0.0, sigma_air=0.0) == -1.0  # no crash on mad_air = 0


def test_cnr_cjv_hand():
    # |1000-700| / sqrt(3^2 + 4^2 + 12^2) = 300 / 13
    assert iqm.cnr(1000.0, 700.0, 3.0, 4.0, 12.0) == pytest.approx(300.0 / 13.0)
    # (50 + 70) / |1000 - 700|
    assert iqm.cjv(1000.0, 700.0, 50.0, 70.0) == pytest.approx(0.4)
    assert iqm.cjv(700.0, 1000.0, 50.0, 70.0) == pytest.approx(0.4)


def test_efc_constant_image_is_one_and_delta_is_zero():
    assert iqm.efc(np.full((4, 4, 4), 7.0)) == pytest.approx(1.0)
    d = np.zeros((4, 4, 4))
    d[1, 2, 3] = 5.0
    assert iqm.efc(d) == pytest.approx(0.0, abs=1e-12)


def test_efc_two_values_hand():
    # x = [3, 4]: B = 5, E = 0.6 ln 0.6 + 0.8 ln 0.8; Emax = 2 * 2^-1/2 * ln 2^-1/2
    x = np.array([3.0, 4.0]).reshape(1, 1, 2)
    e = 0.6 * math.log(0.6) + 0.8 * math.log(0.8)
    emax = 2 * (1 / math.sqrt(2)) * math.log(1 / math.sqrt(2))
    assert iqm.efc(x) == pytest.approx(e / emax)
    # frame voxels are excluded
    xf = np.array([3.0, 4.0, 100.0]).reshape(1, 1, 3)
    assert iqm.efc(xf, framemask=np.array([0, 0, 1]).reshape(1, 1, 3)) == pytest.approx(e / emax)


def test_fber_hand_and_zero_background():
    img = np.array([10.0, 20.0, 30.0, 1.0, 2.0, 3.0]).reshape(1, 1, 6)
    head = np.array([1, 1, 1, 0, 0, 0]).reshape(1, 1, 6)
    assert iqm.fber(img, head) == pytest.approx(400.0 / 4.0)
    rot = np.array([0, 0, 0, 0, 0, 1]).reshape(1, 1, 6)  # background now {1, 2}: median energy 2.5
    assert iqm.fber(img, head, rot) == pytest.approx(400.0 / 2.5)
    img0 = img.copy()
    img0[~head.astype(bool)] = 0
    assert iqm.fber(img0, head) == -1.0


def test_wm2max_and_qi1_hand():
    img = np.arange(1, 10001, dtype=float).reshape(10, 10, 100)
    p9995 = np.percentile(np.arange(1, 10001), 99.95)
    assert iqm.wm2max(img, 5000.0) == pytest.approx(5000.0 / p9995)
    air = np.zeros((4, 4, 4), bool)
    air[:2] = True  # 32 voxels
    art = np.zeros((4, 4, 4), bool)
    art[3, 0, :2] = True  # 2 voxels
    assert iqm.art_qi1(air, art) == pytest.approx(2 / 34)
    assert iqm.art_qi1(np.zeros_like(air), art) == -1.0  # no air: undefined, MRIQC's sentinel


def test_volume_fraction_hand():
    pv = [np.array([0.5, 0.5, 0.0]), np.array([0.5, 0.5, 1.0]), np.array([0.0, 0.0, 1.0])]
    vf = iqm.volume_fraction(pv)
    assert vf == pytest.approx({"csf": 0.25, "gm": 0.5, "wm": 0.25})


def test_rpve_hand():
    # One tissue map of 100 voxels: 50 zeros, values 0.01..0.5 (step .01) -> with trimming
    p = np.concatenate([np.zeros(50), np.linspace(0.02, 1.0, 50)])
    pos = p[p > 0]
    lo, hi = np.percentile(pos, 2), np.percentile(pos, 98)
    q = np.where((p < lo) | (p > hi), 0.0, p)
    expected = (q[q > 0.5].sum() + (1 - q[q <= 0.5]).sum()) / pos.size
    out = iqm.rpve([p, p, p])
    assert out["csf"] == pytest.approx(expected)
    # independent arithmetic: q zeroes the 0.02 and 1.0 entries (2nd/98th pct) -> 52 zeros,
    # >0.5: 0.52..0.98 (24 values), <=0.5 nonzero: 0.04..0.5 (24 values)
    gt = np.arange(26, 50) * 0.02
    le = np.arange(2, 26) * 0.02
    assert expected == pytest.approx((gt.sum() + (1 - le).sum() + 52) / 50)


def test_weighted_stats_binary_mask_equals_plain_stats():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 10, size=(11, 11, 11))
    w = np.zeros_like(x)
    w[2:9, 2:9, 2:9] = 1.0
    sel = x[w > 0]
    s = iqm.tissue_stats(x, w)
    assert s["mean"] == pytest.approx(sel.mean())
    assert s["stdv"] == pytest.approx(sel.std())
    assert s["n"] == pytest.approx(sel.size)
    # 343 values: SAS weighted median = the 172nd smallest value
    assert s["median"] == pytest.approx(np.sort(sel)[171])
    assert s["mad"] == pytest.approx(1.4826 * np.median(np.abs(sel - np.sort(sel)[171])))
    from scipy.stats import kurtosis

    assert s["k"] == pytest.approx(kurtosis(sel))


def test_weighted_quantile_exact_hit_midpoint():
    # weights 1,1,1,1 on 1,2,3,4: median target 2 hits cumulative weight exactly -> (2+3)/2
    q = iqm._weighted_quantiles(np.array([4.0, 1.0, 3.0, 2.0]), np.ones(4), [0.5])
    assert q[0] == pytest.approx(2.5)
    # weights pull the median: value 4 holds most of the mass
    q = iqm._weighted_quantiles(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 1, 1, 5.0]), [0.5])
    assert q[0] == pytest.approx(4.0)


def _phantom(contrast: str, shape=(40, 40, 40), seed=0):
    """Sphere head in noisy air: WM core, GM shell, CSF shell, 'skull' (dark) and 'scalp' layers."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    r = np.sqrt((g**2).sum(0))
    inten = {"T1w": (300, 650, 1000), "T2w": (1500, 900, 600), "FLAIR": (150, 1000, 700)}[contrast]  # csf, gm, wm
    img = np.zeros(shape)
    img[r < 17] = 700  # scalp
    img[r < 15] = 40  # skull
    img[r < 13] = inten[0]
    img[r < 11] = inten[1]
    img[r < 7] = inten[2]
    img += rng.normal(0, 20, shape)
    return np.abs(img).astype(np.float32), r


@pytest.mark.parametrize("contrast", ["T1w", "T2w", "FLAIR"])
def test_segmentation_tissue_order(contrast):
    img, r = _phantom(contrast)
    brain = r < 13
    seg, pv = iqm.segment_tissues(img, brain, contrast)
    assert np.mean(seg[r < 5] == 3) > 0.95  # WM core
    assert np.mean(seg[(r > 8) & (r < 10)] == 2) > 0.95  # GM shell
    assert np.mean(seg[(r > 11.5) & (r < 12.5)] == 1) > 0.9  # CSF shell
    assert np.allclose(sum(pv)[brain], 1.0, atol=1e-5)


def test_masks_and_compute_iqms_on_phantom():
    img, r = _phantom("T1w", shape=(48, 48, 48))
    head = iqm.head_mask(img)
    assert np.mean(head[r < 16]) > 0.99 and np.mean(head[r > 19]) < 0.01
    brain = iqm.brain_mask(img, head)
    assert np.mean(brain[r < 12]) > 0.95 and np.mean(brain[(r > 15.5) & (r < 17)]) < 0.05
    out = iqm.compute_iqms(img, "T1w", zooms=(1, 1, 1), use_n4=False)
    assert out["summary_wm_median"] == pytest.approx(1000.0, rel=0.02)  # harmonised
    assert 0 < out["cjv"] < 0.5 and out["cnr"] > 3
    assert set(iqm.IQM_COLUMNS) <= set(out)


def test_iqms_respond_to_noise_and_ghost():
    img, r = _phantom("T1w", shape=(48, 48, 48))
    clean = iqm.compute_iqms(img, "T1w", zooms=(1, 1, 1), use_n4=False)
    noisy = iqm.compute_iqms(np.abs(img + np.random.default_rng(9).normal(0, 120, img.shape)).astype(np.float32),
                             "T1w", zooms=(1, 1, 1), use_n4=False)
    assert noisy["cjv"] > clean["cjv"] and noisy["cnr"] < clean["cnr"] and noisy["snr_total"] < clean["snr_total"]
    ghost = img.copy()
    ghost[1:6, 1:6, 20:28] += 400.0  # bright structured signal in the air, > 10 mm from the head
    g = iqm.compute_iqms(ghost, "T1w", zooms=(1, 1, 1), use_n4=False)
    assert clean["qi_1"] == 0.0 and g["qi_1"] > 0.0


def test_artifact_mask_finds_blob_far_from_head():
    rng = np.random.default_rng(1)
    img = np.abs(rng.normal(0, 10, (40, 40, 40)))
    head = np.zeros(img.shape, bool)
    head[15:25, 15:25, 15:25] = True
    img[1:5, 1:5, 30:34] = 500.0  # 64-voxel ghost far from the head
    air = ~head
    art = iqm.artifact_mask(img, air, head)
    blob = np.zeros(img.shape, bool)
    blob[1:5, 1:5, 30:34] = True
    # the opening (6-connected) trims the cube's edges but keeps its core; nothing outside it
    assert art[2:4, 2:4, 31:33].all() and not (art & ~blob).any()
    head_far = np.zeros(img.shape, bool)
    head_far[1:5, 1:5, 20:29] = True  # head now within 10 mm of the blob -> ignored
    assert not iqm.artifact_mask(img, ~head_far, head_far).any()


def test_iqm_table_bad_file_is_failed_row(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    df = iqm.iqm_table([bad, tmp_path / "missing.nii.gz"], "T1w")
    assert list(df["status"]) == ["failed", "failed"]
    assert list(df["error_type"]) == ["not_nifti", "missing_file"]


@pytest.mark.slow
@pytest.mark.realdata
def test_real_t1_plausible(shared_data):
    """One real 2 mm T1w: tissue order and IQM ranges plausible (values of MRIQC on good T1w scans)."""
    out = iqm.compute_iqms(shared_data / "volumes/NiChart/IXI012-HH-1211_T1.nii.gz", "T1w")
    assert out["summary_csf_median"] < out["summary_gm_median"] < out["summary_wm_median"]
    assert 0.2 < out["cjv"] < 1.0 and out["cnr"] > 1.0
    assert 0.3 < out["efc"] < 0.9 and 0.9 < out["inu_med"] < 1.1
    assert abs(sum(out[f"icvs_{t}"] for t in iqm.TISSUES) - 1) < 1e-6


@pytest.mark.parametrize("zooms", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 1.2, 3.0)])
def test_distance_morphology_equals_structuring_element(zooms):
    """The distance-transform dilation/erosion equal scipy's with the explicit ellipsoidal ball."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    mask = ndi.gaussian_filter(rng.random((40, 36, 30)), 2.0) > 0.5
    r = [int(round(5.0 / z)) for z in zooms]
    grids = np.ogrid[tuple(slice(-v, v + 1) for v in r)]
    ball = sum((g / max(v, 1)) ** 2 for g, v in zip(grids, r)) <= 1.0
    assert np.array_equal(iqm._dilate_mm(mask, 5.0, zooms), ndi.binary_dilation(mask, structure=ball))
    assert np.array_equal(iqm._erode_mm(mask, 5.0, zooms), ndi.binary_erosion(mask, structure=ball))
