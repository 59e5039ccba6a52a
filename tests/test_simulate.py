"""Tests of artifactqc.simulate: identity at 0, determinism, physics of each artifact, CLI output."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from artifactqc import simulate as S
from artifactqc.simulate import bias as sim_bias
from artifactqc.simulate import matching as sim_matching

torch.set_num_threads(1)
KINDS = S.ARTIFACTS + ("mix",)


def phantom(shape=(36, 48, 24), seed=0, floor=0.0):
    """Ellipsoidal 'head' with smooth internal texture, intensities in ~[0, 1]."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum((g / 0.75) ** 2 for g in grids)
    tex = gaussian_filter(rng.standard_normal(shape), 1.5)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    vol = np.where(r2 < 1, 0.4 + 0.6 * tex, 0.0) + floor
    return gaussian_filter(vol, 0.7).astype(np.float32)


@pytest.fixture(scope="module")
def vol():
    return phantom()


# --- identity, determinism, sanity ---------------------------------------------------------------------
@pytest.mark.parametrize("artifact", KINDS)
def test_identity_at_zero(vol, artifact):
    out, params = S.simulate_volume(vol, artifact, 0.0, seed=3)
    assert np.array_equal(out, vol) and out is not vol
    assert params["severity"] == 0.0
    x = torch.from_numpy(vol[:, :, 10:14].transpose(2, 0, 1)[:, None].copy())
    y = S.simulate_slices(x, [artifact] * 4, torch.zeros(4), torch.Generator().manual_seed(0))
    assert torch.equal(x, y)


def test_none_and_mixed_batch_leaves_untouched_slices():
    x = torch.from_numpy(phantom((32, 32, 8))[:, :, :6].transpose(2, 0, 1)[:, None].copy())
    arts = ["none", "noise", "ghosting", "bias", "anisotropy", "motion"]
    y = S.simulate_slices(x, arts, torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5, 0.5]), torch.Generator().manual_seed(1))
    assert torch.equal(y[0], x[0])
    for i in range(1, 6):
        assert not torch.equal(y[i], x[i]), arts[i]


@pytest.mark.parametrize("artifact", KINDS)
def test_deterministic_finite_and_recorded(vol, artifact):
    a, pa = S.simulate_volume(vol, artifact, 1.0, seed=7)
    b, pb = S.simulate_volume(vol, artifact, 1.0, seed=7)
    assert np.array_equal(a, b) and pa == pb
    # another seed gives other draws (a few seeds: anisotropy has few discrete draws: axis and offset)
    assert any(not np.array_equal(a, S.simulate_volume(vol, artifact, 1.0, seed=sd)[0]) for sd in (8, 9, 10))
    assert a.dtype == np.float32 and a.shape == vol.shape
    assert np.isfinite(a).all()
    assert not np.allclose(a, vol, atol=1e-3)
    json.dumps(pa)  # JSON-serialisable
    assert pa["artifact"] == artifact and pa["severity"] == 1.0
    assert set(pa["head_severities"]) == set(S.HEAD_ORDER)
    if artifact != "mix":
        assert pa[S.PARAM_NAMES[artifact]] == pytest.approx(S.severity_to_param(artifact, 1.0))
        assert pa["component_severities"][artifact] == 1.0


@pytest.mark.parametrize("artifact", KINDS)
def test_slices_deterministic_finite(artifact):
    x = torch.from_numpy(phantom((40, 40, 8))[:, :, :8].transpose(2, 0, 1)[:, None].copy())
    sev = torch.linspace(0.1, 1.0, 8)
    y1 = S.simulate_slices(x, [artifact] * 8, sev, torch.Generator().manual_seed(5))
    y2 = S.simulate_slices(x, [artifact] * 8, sev, torch.Generator().manual_seed(5))
    y3 = S.simulate_slices(x, [artifact] * 8, sev, torch.Generator().manual_seed(6))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert torch.isfinite(y1).all() and y1.shape == x.shape


def test_non_square_slices():
    x = torch.from_numpy(phantom((36, 48, 8))[:, :, :8].transpose(2, 0, 1)[:, None].copy())
    for a in KINDS:
        y = S.simulate_slices(x, [a] * 8, torch.full((8,), 0.6), torch.Generator().manual_seed(0))
        assert y.shape == x.shape and torch.isfinite(y).all()


# --- targets and mixtures -------------------------------------------------------------------------------
def test_targets_follow_head_names():
    x = torch.rand(6, 1, 16, 16)
    arts = ["noise", "ghosting", "bias", "anisotropy", "motion", "none"]
    _, t = S.simulate_slices(x, arts, torch.full((6,), 0.7), torch.Generator().manual_seed(0), return_targets=True)
    assert t.shape == (6, 5)
    expect = torch.zeros(6, 5)
    for i, a in enumerate(arts[:5]):
        expect[i, S.HEAD_ORDER.index(S.HEAD_NAMES[a])] = 0.7
    assert torch.allclose(t, expect)
    assert S.HEAD_NAMES["anisotropy"] == "resolution"


def _combined(sevs):  # independent restatement of the documented rule
    d = S.TARGET_SSIM_DROP
    p = 1.0
    for s in sevs:
        p *= 1 - d * s
    return (1 - p) / d


def test_mixture_components_and_combined_severity(vol):
    for seed in range(4):
        out, p = S.simulate_volume(vol, "mix", 0.6, seed=seed)
        comps = p["components"]
        assert 2 <= len(comps) <= 3
        names = [c["artifact"] for c in comps]
        assert len(set(names)) == len(names)
        assert names == sorted(names, key=S.APPLY_ORDER.index)  # acquisition order
        sevs = [c["severity"] for c in comps]
        assert all(0 < s <= 0.6 + 1e-9 for s in sevs)
        assert _combined(sevs) == pytest.approx(0.6, abs=1e-9)
        nz = {k: v for k, v in p["component_severities"].items() if v > 0}
        assert set(nz) == set(names)
    x = torch.rand(16, 1, 16, 16)
    _, t = S.simulate_slices(x, ["mix"] * 16, torch.full((16,), 0.8), torch.Generator().manual_seed(2), return_targets=True)
    for row in t:
        nz = row[row > 0].tolist()
        assert 2 <= len(nz) <= 3
        assert _combined(nz) == pytest.approx(0.8, abs=1e-5)


def test_combine_severities_properties():
    assert S.combine_severities([0.3]) == pytest.approx(0.3)
    assert S.combine_severities([0.3, 0.2]) > 0.3
    assert S.combine_severities([1.0, 1.0, 1.0]) == 1.0


def test_calibration_maps_are_monotone_and_start_at_identity():
    for cal in (S.CALIBRATION_3D, S.CALIBRATION_2D):
        for a, v in cal.items():
            assert len(v) == len(S.SEVERITY_KNOTS)
            assert np.all(np.diff(v) >= 0), a
            assert v[0] == (1.0 if a == "anisotropy" else 0.0)
            assert v[-1] > v[0]


# --- what each artifact changes --------------------------------------------------------------------------
def test_noise_std_matches_sigma():
    flat = np.full((24, 24, 24), 0.8, np.float32)  # high SNR: Rician ~ Gaussian
    sigma = S.severity_to_param("noise", 0.5)
    for seed in range(3):
        out, p = S.simulate_volume(flat, "noise", 0.5, seed=seed)
        assert np.std(out - flat) == pytest.approx(sigma, rel=0.15), p["variant"]
        assert abs(np.mean(out - flat)) < 0.2 * sigma


def test_ghosting_adds_kspace_energy_at_ghost_lines_and_image_ghosts(vol):
    for seed in range(3):
        out, p = S.simulate_volume(vol, "ghosting", 0.8, seed=seed)
        n, ax = p["num_ghosts"], p["axis"]
        L = vol.shape[ax]
        k0 = np.fft.fftshift(np.fft.fftn(vol), axes=ax)
        k1 = np.fft.fftshift(np.fft.fftn(out), axes=ax)
        e = np.abs(k1 - k0) ** 2
        e_lines = e.sum(axis=tuple(a for a in range(3) if a != ax))
        hit = (np.arange(L) % n) == 0
        hit[L // 2] = False
        assert e_lines[hit].sum() > 0
        assert e_lines[~hit].sum() < 1e-6 * e_lines[hit].sum()
        # image domain: the object reappears shifted by L/n along the axis, in the former background
        bg = vol < 1e-3
        diff = out - vol
        shifted = np.roll(vol, L // n, axis=ax)
        corr = np.corrcoef(np.abs(diff[bg]), shifted[bg])[0, 1]
        assert corr > 0.5


def test_bias_changes_low_frequencies_only():
    v = phantom(floor=0.2)  # strictly positive: the field is out/in everywhere
    out, p = S.simulate_volume(v, "bias", 1.0, seed=4)
    logf = np.log(out / v)
    assert logf.std() > 0.1  # it does something
    # the multiplicative field is smooth: removing a 1-voxel gaussian blur leaves almost nothing of it,
    # whereas the same high-pass keeps a large part of the image's own structure
    interior = (slice(4, -4),) * 3

    def highpass_ratio(a):
        return float(np.std((a - gaussian_filter(a, 1.0))[interior]) / np.std(a[interior]))

    assert highpass_ratio(logf) < 0.01
    assert highpass_ratio(np.log(v)) > 0.05
    # the log field has the requested std inside the foreground and zero mean there
    from artifactqc.io import foreground_mask

    m = foreground_mask(v)
    assert logf[m].std() == pytest.approx(p["log_field_std"], rel=1e-3)
    assert abs(logf[m].mean()) < 1e-3


def test_anisotropy_blurs_only_along_its_axis():
    v = phantom((36, 36, 36))
    out, p = S.simulate_volume(v, "anisotropy", 0.8, seed=1)
    ax = p["axis"]
    assert p["thickness_factor"] > 2

    def hf(a, axis):
        spec = np.abs(np.fft.fft(a, axis=axis)) ** 2
        f = np.abs(np.fft.fftfreq(a.shape[axis]))
        shp = [1, 1, 1]
        shp[axis] = -1
        return float((spec * (f.reshape(shp) > 0.2)).sum())

    ratio = hf(out, ax) / hf(v, ax)
    assert ratio < 0.5, ratio
    # a volume constant along the axis is unchanged (slice averaging of a constant is the constant)
    const = np.repeat(np.take(v, [18], axis=ax), v.shape[ax], axis=ax)
    out_c, _ = S.simulate_volume(const, "anisotropy", 0.8, seed=1)
    np.testing.assert_allclose(out_c, const, atol=1e-5)


def test_motion_is_rigid_segments_and_monotone(vol):
    ssim = []
    for s in (0.2, 0.6, 1.0):
        out, p = S.simulate_volume(vol, "motion", s, seed=2)
        assert p["achieved_rms_mm"] == pytest.approx(p["rms_displacement"], rel=1e-3)
        assert len(p["times"]) == p["num_moves"] == len(p["degrees"])
        ssim.append(S.ssim_masked(vol, out))
    assert ssim[0] > ssim[1] > ssim[2]


def test_ladder_fixed_draws_and_monotone(vol):
    lad = S.severity_ladder(vol, "noise", severities=(0, 0.3, 0.6, 1.0), seed=1)
    assert np.array_equal(lad[0][1], vol)
    ss = [S.ssim_masked(vol, im) for _, im in lad]
    assert all(a > b for a, b in zip(ss, ss[1:]))
    sl = vol[:, :, 12]
    lad2 = S.severity_ladder(sl, "motion", severities=(0, 0.5, 1.0), seed=1)
    assert np.array_equal(lad2[0][1], sl) and lad2[2][1].shape == sl.shape


def test_ssim_independent_reference():
    """Our SSIM equals the textbook formula for constant images (no window effect)."""
    a = np.full((16, 16, 16), 0.5, np.float32)
    b = np.full((16, 16, 16), 0.3, np.float32)
    c1 = 0.01**2
    expect = (2 * 0.5 * 0.3 + c1) / (0.5**2 + 0.3**2 + c1)
    assert S.ssim_masked(a, b, mask=np.ones(a.shape, bool)) == pytest.approx(expect, rel=1e-4)
    t = S.ssim_slices(torch.from_numpy(a[:2, None]), torch.from_numpy(b[:2, None]))
    assert torch.allclose(t, torch.full((2,), expect, dtype=t.dtype), rtol=1e-4)


# --- per-sample SSIM matching (match_ssim=True) ----------------------------------------------------------
def test_ssim_loss_on_the_mask_box_equals_ssim_masked(vol):
    vol = np.pad(vol, 12)  # background around the head, as in a real scan
    out, _ = S.simulate_volume(vol, "ghosting", 0.7, seed=1)
    loss = sim_matching._SSIMLoss(vol)
    assert loss.ref.size < vol.size  # really cropped
    assert 1.0 - loss(out) == pytest.approx(S.ssim_masked(vol, out), abs=1e-6)


@pytest.mark.parametrize("artifact", S.ARTIFACTS)
def test_matched_sample_has_the_target_ssim_and_the_same_draws(vol, artifact):
    for sev in (0.3, 0.6):
        out, p = S.simulate_volume(vol, artifact, sev, seed=4, match_ssim=True)
        achieved = S.ssim_masked(vol, out)  # measured independently of the matcher
        target = float(S.target_ssim(sev))
        assert p["ssim_target"] == pytest.approx(target)
        assert p["ssim"] == pytest.approx(achieved, abs=1e-6)
        assert abs(achieved - target) <= max(S.MATCH_TOLERANCE * (1 - target), S.MATCH_ABS_TOLERANCE) + 1e-6
        _, q = S.simulate_volume(vol, artifact, sev, seed=4)  # type-mean calibration, same seed
        assert p["param_mean_calibrated"] == pytest.approx(q[S.PARAM_NAMES[artifact]])
        if artifact == "bias":  # the same field shape, scaled
            a, b = np.array(p["coefficients"][1:]), np.array(q["coefficients"][1:])
            np.testing.assert_allclose(a / np.linalg.norm(a), b / np.linalg.norm(b), atol=1e-6)
        else:
            draws = {k: v for k, v in q.items() if k in ("axis", "num_ghosts", "variant", "phase_encode_axis",
                                                          "times", "anchor_voxel", "num_moves")}
            assert draws and all(p[k] == v for k, v in draws.items())


def test_matching_removes_the_spread_of_fidelity_at_one_severity():
    vols = [phantom(seed=k) for k in range(3)]
    for artifact in ("ghosting", "bias", "anisotropy"):
        plain = [S.ssim_masked(v, S.simulate_volume(v, artifact, 0.5, seed=sd)[0]) for v in vols for sd in (1, 2)]
        matched = [S.ssim_masked(v, S.simulate_volume(v, artifact, 0.5, seed=sd, match_ssim=True)[0])
                   for v in vols for sd in (1, 2)]
        assert np.ptp(matched) < 0.5 * np.ptp(plain), artifact
        assert np.mean(matched) == pytest.approx(float(S.target_ssim(0.5)), abs=0.01)


def test_matched_mixture_matches_each_component_against_its_input(vol):
    out, p = S.simulate_volume(vol, "mix", 0.8, seed=2, match_ssim=True)
    assert p["severity"] == 0.8 and 2 <= len(p["components"]) <= 3
    for c in p["components"]:
        assert c["ssim_target"] == pytest.approx(float(S.target_ssim(c["severity"])))
        tol = max(S.MATCH_TOLERANCE * (1 - c["ssim_target"]), S.MATCH_ABS_TOLERANCE)
        assert abs(c["ssim"] - c["ssim_target"]) <= tol + 1e-6
    assert p["ssim"] == pytest.approx(S.ssim_masked(vol, out), abs=1e-6)
    assert p["severity_definition"].startswith("per-sample")
    same, _ = S.simulate_volume(vol, "mix", 0.8, seed=2, match_ssim=True)
    assert np.array_equal(out, same)  # deterministic
    zero, _ = S.simulate_volume(vol, "mix", 0.0, seed=2, match_ssim=True)
    assert np.array_equal(zero, vol)


# --- CLI ---------------------------------------------------------------------------------------------------
def test_cli_writes_nifti_with_same_affine_and_sidecar(tmp_path):
    from artifactqc.cli import main

    v = (phantom((30, 36, 24)) * 800).astype(np.int16)
    aff = np.array([[0.9, 0.1, 0.0, -40.0], [-0.1, 0.95, 0.05, -60.0], [0.0, -0.05, 2.0, 10.0], [0, 0, 0, 1]])
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(v, aff), src)
    dst = tmp_path / "out" / "sim.nii.gz"
    assert main(["simulate", "--artifact", "mix", "--severity", "0.5", "--seed", "3", str(src), str(dst)]) == 0
    img = nib.load(dst)
    np.testing.assert_allclose(img.affine, nib.load(src).affine, atol=1e-5)
    assert img.shape == v.shape
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32 and np.isfinite(data).all()
    side = json.loads((tmp_path / "out" / "sim.json").read_text())
    assert side["artifact"] == "mix" and side["severity"] == 0.5 and side["seed"] == 3
    assert 2 <= len(side["components"]) <= 3
    assert side["spacing"] == pytest.approx(np.linalg.norm(aff[:3, :3], axis=0).tolist(), abs=1e-4)


@pytest.mark.realdata
def test_real_volume_all_types(shared_data):
    from artifactqc.io import load_volume, normalize_intensity

    v = load_volume(shared_data / "volumes/nibabel/anatomical.nii.gz")
    d = normalize_intensity(v.data)
    for a in KINDS:
        lo, _ = S.simulate_volume(d, a, 0.3, seed=0, spacing=v.zooms)
        hi, _ = S.simulate_volume(d, a, 1.0, seed=0, spacing=v.zooms)
        assert np.isfinite(hi).all()
        assert S.ssim_masked(d, lo) > S.ssim_masked(d, hi), a


def test_bias_equals_torchio_biasfield_with_recorded_coefficients(vol):
    import torchio as tio

    out, p = S.simulate_volume(vol, "bias", 0.7, seed=11)
    ref = tio.BiasField(coefficients=p["coefficients"], order=p["order"])(torch.from_numpy(vol)[None]).numpy()[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)


# --- continuous anisotropy (fractional slice spacing = thickness) ---------------------------------------------
def _thick_slices_reference(x, factor, offset):
    """Independent restatement: the linearly interpolated profile (edges replicated) integrated against a
    Gaussian slice profile (FWHM = factor, minus the native voxel's FWHM of 1) by dense quadrature at slice
    centres offset + k*factor (k running past both ends), then linearly interpolated back to the grid."""
    L = len(x)
    sig = np.sqrt(max(factor**2 - 1.0, 0.0)) / (2 * np.sqrt(2 * np.log(2)))
    centres = offset + factor * np.arange(-2, int(np.ceil(L / factor)) + 3)
    t = np.linspace(-12 * sig, 12 * sig, 4001)
    g = np.exp(-0.5 * (t / sig) ** 2)
    g /= g.sum()
    vals = np.array([np.sum(g * np.interp(c + t, np.arange(L), x)) for c in centres])
    return np.interp(np.arange(L), centres, vals)


@pytest.mark.parametrize("factor,offset", [(2.3, 0.7), (1.37, 0.0), (3.9, 3.1), (1.02, 0.5)])
def test_thick_slices_match_independent_quadrature(factor, offset):
    rng = np.random.default_rng(0)
    x = gaussian_filter(rng.standard_normal(57), 1.0) + np.linspace(0, 1, 57)
    ref = _thick_slices_reference(x, factor, offset)
    got = S.thick_slices_lastdim(torch.from_numpy(x)[None], torch.tensor([factor]), torch.tensor([offset]))[0]
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-3 * np.ptp(x))


def test_thick_slices_identity_at_unit_thickness_and_finite_at_extremes():
    x = torch.rand(3, 5, 21, dtype=torch.float64)
    one = torch.ones(3, dtype=torch.float64)
    y = S.thick_slices_lastdim(x, one, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    # a unit-thickness acquisition anchored on any voxel is the identity in the 3D path too
    v = phantom((20, 22, 18))
    for seed in range(3):
        out, p = S.apply_artifact(v, "anisotropy", 1.0, np.random.default_rng(seed))
        assert p["offset_voxels"] == 0.0
        np.testing.assert_allclose(out, v, atol=1e-6)
    # thickness far beyond the axis length, and tiny factors: finite and within the input's range
    for f in (1.0001, 30.0):
        z = S.thick_slices_lastdim(x, one * f, torch.rand(3, dtype=torch.float64) * f)
        assert torch.isfinite(z).all()
        assert z.min() >= x.min() - 1e-9 and z.max() <= x.max() + 1e-9


def test_anisotropy_is_continuous_and_blurs_monotonically():
    v = phantom((40, 40, 40))
    m = S.head_mask(v)
    seed = 5  # fixed axis and anchor: only the thickness changes
    factors = (1.0, 1.001, 1.05, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
    outs = [S.apply_artifact(v, "anisotropy", f, np.random.default_rng(seed))[0] for f in factors]
    axes = {S.apply_artifact(v, "anisotropy", f, np.random.default_rng(seed))[1]["axis"] for f in factors}
    assert len(axes) == 1
    ax = axes.pop()
    # continuity at the identity: a thickness 0.1 % above the native one changes almost nothing
    assert np.abs(outs[1] - v).max() < 0.01
    # SSIM and high-frequency energy along the axis fall monotonically with the thickness
    ss = [S.ssim_masked(v, o, m) for o in outs]
    assert ss[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(ss, ss[1:])), np.round(ss, 4)

    def hf(a):
        d = np.diff(a, axis=ax)
        return float((d * d).sum())

    e = [hf(o) for o in outs]
    assert all(a > b for a, b in zip(e, e[1:])), e
    # continuity in the factor away from 1 as well: nearby factors give nearby images
    a1 = S.apply_artifact(v, "anisotropy", 2.5, np.random.default_rng(seed))[0]
    a2 = S.apply_artifact(v, "anisotropy", 2.501, np.random.default_rng(seed))[0]
    assert np.abs(a1 - a2).max() < 0.01


def test_anisotropy_slices_continuous_near_zero_severity():
    x = torch.from_numpy(phantom((48, 48, 6))[:, :, :6].transpose(2, 0, 1)[:, None].copy())
    g = torch.Generator().manual_seed(3)
    y = S.simulate_slices(x, ["anisotropy"] * 6, torch.full((6,), 1e-4), g)
    assert (y - x).abs().max() < 0.01
    ss = [float(S.ssim_slices(x, S.simulate_slices(x, ["anisotropy"] * 6, torch.full((6,), s),
                                                   torch.Generator().manual_seed(3))).mean()) for s in (0.1, 0.4, 0.7, 1.0)]
    assert all(a > b for a, b in zip(ss, ss[1:])), ss


def test_cli_anisotropy_preserves_affine_and_records_fractional_spacing(tmp_path):
    v = (phantom((30, 36, 24)) * 800).astype(np.int16)
    aff = np.array([[0.0, 0.0, 1.2, -30.0], [-0.9, 0.0, 0.0, 50.0], [0.0, 1.1, 0.0, -20.0], [0, 0, 0, 1]])
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(v, aff), src)
    dst = tmp_path / "aniso.nii.gz"
    p = S.simulate_file(src, dst, "anisotropy", 0.45, seed=2)
    img = nib.load(dst)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert img.shape == v.shape and np.isfinite(np.asarray(img.dataobj)).all()
    side = json.loads((tmp_path / "aniso.json").read_text())
    assert side["slice_spacing_voxels"] == pytest.approx(side["thickness_factor"])
    assert side["thickness_factor"] == pytest.approx(S.severity_to_param("anisotropy", 0.45))
    assert 0 <= side["offset_voxels"] < side["slice_spacing_voxels"]
    assert side == json.loads(json.dumps(p))


@pytest.mark.parametrize("shape", [(7, 8, 9), (10, 5, 6)])
def test_bias_log_field_equals_torchio_polynomial(shape):
    import torchio as tio

    c = np.random.default_rng(1).standard_normal(20) * 0.3
    ref = np.log(tio.BiasField.generate_bias_field(np.zeros((1, *shape)), 3, c.tolist()))
    np.testing.assert_allclose(sim_bias._bias_log_field(shape, 3, c), ref, atol=1e-6)


def test_mask_box_is_the_grown_bounding_box():
    from artifactqc.io import mask_box

    m = np.zeros((20, 30, 40), bool)
    m[5, 10:12, 3] = m[8, 11, 30] = True
    assert mask_box(m) == (slice(5, 9), slice(10, 12), slice(3, 31))
    assert mask_box(m, 4) == (slice(1, 13), slice(6, 16), slice(0, 35))  # clipped at 0


_AXIS_KEY = {"ghosting": "axis", "motion": "phase_encode_axis", "anisotropy": "axis"}


@pytest.mark.parametrize("artifact", sorted(_AXIS_KEY))
def test_thick_slice_volumes_get_artifacts_along_an_in_plane_axis(artifact):
    """A 2D multi-slice acquisition (one voxel side >= 1.9x the others) has no phase encoding across its
    slices: ghosting and motion run along an in-plane axis, and so does anisotropy (thicker slices along the
    thick axis would not show on the acquisition planes it is graded on). A 3D volume keeps all three axes."""
    v = phantom((24, 24, 24))
    axes = {sp: {S.simulate_volume(v, artifact, 0.5, seed=s, spacing=sp)[1][_AXIS_KEY[artifact]] for s in range(16)}
            for sp in ((1.0, 1.0, 1.0), (0.7, 0.7, 4.0), (4.8, 1.0, 1.0))}
    assert axes[(1.0, 1.0, 1.0)] == {0, 1, 2}
    assert axes[(0.7, 0.7, 4.0)] == {0, 1}
    assert axes[(4.8, 1.0, 1.0)] == {1, 2}


def test_ghosting_of_a_thick_slice_volume_stays_within_each_slice():
    """Ghosts of a 2D acquisition are replicas within each slice: changing one slice of the input changes
    only that slice of the output (the same draws, so the same phase-encode axis and ghost lines)."""
    v = phantom((32, 32, 10))
    sp = (0.9, 0.9, 4.0)
    out, _ = S.simulate_volume(v, "ghosting", 0.8, seed=5, spacing=sp)
    w = v.copy()
    w[..., 4] = np.flip(w[..., 4], axis=0) * 1.3
    out_w, _ = S.simulate_volume(w, "ghosting", 0.8, seed=5, spacing=sp)
    changed = np.abs(out_w - out).max(axis=(0, 1))
    assert changed[4] > 0.1
    np.testing.assert_allclose(np.delete(changed, 4), 0.0, atol=1e-5)
