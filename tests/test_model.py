"""Encoder architecture, losses, slices, training loop and checkpoint I/O (small settings, CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from artifactqc import io
from artifactqc.encoder import slices
from artifactqc.encoder.network import HEADS, ArtifactEncoder, EncoderConfig, pool_volume_features, resolve_device
from artifactqc.encoder.checkpoint import ModelLoadError, load_model, save_model
from artifactqc.training.losses import encoder_loss, info_nce
from artifactqc.training.volume_head import fit_volume_head
from artifactqc.training.loop import train_encoder

torch.set_num_threads(1)


def _phantom(shape=(40, 48, 36), seed=0) -> np.ndarray:
    """An ellipsoid 'head' with an inner structure and mild texture, background 0."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = zz**2 / 0.8 + yy**2 / 0.9 + xx**2 / 0.7
    vol = np.where(r < 1, 100.0, 0.0)
    vol += np.where(r < 0.4, 60.0, 0.0) + np.where((np.abs(xx) < 0.1) & (r < 0.8), -40.0, 0.0)
    vol += (r < 1) * rng.normal(0, 3, shape)
    return vol.astype(np.float32)


def _write(tmp_path, name, data, affine=None, dtype=np.float32):
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(p))
    return p


# ------------------------------------------------------------------------------------------- slices
def test_slices_geometry_and_range(tmp_path):
    cfg = slices.SliceConfig(image_size=48, pixel_mm=3.0, slices_per_axis=5)
    p = _write(tmp_path, "a.nii.gz", _phantom())
    s, info = slices.extract_slices(p, cfg)
    assert s.shape == (15, 48, 48) and s.dtype == np.float32
    assert s.min() >= 0.0 and s.max() <= 1.5
    # planes lie within the middle 60% of the head box along each axis
    lo, hi = (np.asarray(v) for v in info["head_box_mm"])
    for axis, pos in info["planes"]:
        ext = hi[axis] - lo[axis]
        assert lo[axis] + 0.2 * ext - 1e-6 <= pos <= hi[axis] - 0.2 * ext + 1e-6


def test_thick_slice_volumes_are_sampled_finer_with_thick_pixel_ratio():
    """With ``thick_pixel_ratio``, a thick-slice volume is sampled at that multiple of its in-plane voxel size
    (clipped to [min_pixel_mm, pixel_mm]) over the same field of view; 3D volumes and the default keep the
    fixed grid."""
    cfg = slices.SliceConfig(image_size=32, pixel_mm=4.0, slices_per_axis=3, thick_pixel_ratio=1.5, min_pixel_mm=1.0)
    thick = np.diag([1.0, 1.0, 5.0, 1.0])
    vol = _phantom((120, 110, 24))
    s, info = slices.extract_from_array(vol, thick, cfg)
    size = info["image_size"]
    assert size == 88 and s.shape == (9, size, size)  # 1.5 mm wanted: 128 mm / 1.5 = 85.3 -> 88 pixels
    assert info["pixel_mm"] * size == pytest.approx(32 * 4.0) and info["pixel_mm"] < 1.5
    coarse, cinfo = slices.extract_from_array(vol, thick, dataclasses.replace(cfg, thick_pixel_ratio=0.0))
    assert coarse.shape == (9, 32, 32) and cinfo["pixel_mm"] == 4.0
    # the same field of view: the head fills the same share of each slice on both grids
    assert (s > 0.1).mean() == pytest.approx((coarse > 0.1).mean(), abs=0.03)
    assert slices.extract_from_array(_phantom((40, 48, 36)), np.diag([2.0, 2.0, 2.0, 1.0]), cfg)[0].shape[-1] == 32
    assert slices.volume_geometry(cfg, [0.3, 0.3, 3.0]) == (1.0, 128)  # clipped to min_pixel_mm
    assert slices.volume_geometry(cfg, [3.0, 3.0, 9.0]) == (4.0, 32)  # never coarser than pixel_mm


@pytest.mark.parametrize("kind", ["uint8", "int16_signed", "wide", "few_levels", "no_positive", "float"])
def test_robust_range_counting_equals_percentiles(kind):
    """Integer-valued volumes take the counting path; it must equal io.foreground_mask + np.percentile."""
    rng = np.random.default_rng(3)
    base = _phantom((30, 34, 28))
    data = {
        "uint8": np.round(base / base.max() * 255),
        "int16_signed": np.round(base / base.max() * 3000) - 200,
        "wide": np.round(base / base.max() * 400_000),
        "few_levels": np.round(base / base.max() * 3),
        "no_positive": -np.round(base / base.max() * 100) - 1,
        "float": base + rng.normal(0, 0.01, base.shape),
    }[kind].astype(np.float32)
    assert (slices._integer_counts(data) is not None) == (kind != "float")
    lo, hi, step = slices.robust_range(data, max_voxels=10**9)
    mask = io.foreground_mask(data)
    want = np.percentile(data[mask] if mask.any() else data.ravel(), [0.5, 99.5])
    if want[1] <= want[0]:
        want[1] = want[0] + 1.0
    assert step == 1 and (lo, hi) == pytest.approx(tuple(want), rel=1e-6, abs=1e-6)


def test_counting_path_gives_the_sorting_paths_slices(monkeypatch):
    """Slices (and box, range) of an integer-valued volume are identical with the counting path and with
    the generic percentile path (forced by disabling the counts)."""
    cfg = slices.SliceConfig(image_size=40, pixel_mm=2.5, slices_per_axis=3, max_stats_voxels=20_000)
    data = np.round(_phantom() * 7.3).astype(np.float32)
    aff = np.diag([-1.0, 1.2, 2.0, 1.0])
    assert slices._integer_counts(data[::2, ::2, ::2]) is not None
    a, ia = slices.extract_from_array(data, aff, cfg)
    monkeypatch.setattr(slices, "_integer_counts", lambda sub: None)
    b, ib = slices.extract_from_array(data, aff, cfg)
    assert ia == ib and np.array_equal(a, b)


def test_head_mask_by_value_threshold_equals_normalised_threshold():
    """The counting path's head mask (raw values >= the first value that passes) equals normalise-then-
    threshold, including ranges that put the 0.1 threshold exactly on an integer value."""
    sub = np.random.default_rng(5).integers(-5, 200, size=(20, 21, 22)).astype(np.float32)
    counted = slices._integer_counts(sub)
    assert counted is not None
    for lo, hi in [(0.0, 100.0), (5.0, 95.0), (0.5, 120.3), (-3.0, 47.0), (150.0, 151.0), (250.0, 300.0)]:
        want = slices.normalize(sub, lo, hi) > 0.1
        assert np.array_equal(slices._head_mask(sub, lo, hi, counted), want), (lo, hi)


def test_slices_match_direct_trilinear_sampling(tmp_path):
    """Independent check: sample the normalised canonical volume with scipy at the documented coordinates."""
    from scipy.ndimage import map_coordinates

    cfg = slices.SliceConfig(image_size=40, pixel_mm=2.5, slices_per_axis=3, max_stats_voxels=10**9)
    data = _phantom()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    s, info = slices.extract_from_array(data, aff, cfg)
    lo, hi = info["intensity_lo"], info["intensity_hi"]
    # percentiles equal io.normalize_intensity's definition on the full volume
    ref = io.normalize_intensity(data)
    mask = io.foreground_mask(data)
    plo, phi = np.percentile(data[mask], [0.5, 99.5])
    assert lo == pytest.approx(plo, rel=1e-5) and hi == pytest.approx(phi, rel=1e-5)
    norm = np.clip((data - lo) / (hi - lo), 0, 1.5)
    np.testing.assert_allclose(norm, ref, atol=1e-5)
    box_lo, box_hi = (np.asarray(v) for v in info["head_box_mm"])
    centre = (box_lo + box_hi) / 2
    offs = (np.arange(40) - 19.5) * 2.5
    k = 0
    for axis, pos in info["planes"]:
        u, v = [b for b in range(3) if b != axis]
        coords = np.zeros((3, 40, 40))
        coords[axis] = pos / 2.0
        coords[u] = (centre[u] + offs[None, :]) / 2.0
        coords[v] = (centre[v] - offs[:, None]) / 2.0
        want = map_coordinates(data - lo, coords, order=1, mode="constant", cval=0.0)
        want = np.clip(want / (hi - lo), 0, 1.5)
        np.testing.assert_allclose(s[k], want, atol=2e-3)
        k += 1


def test_slices_invariant_to_orientation_and_int16_scaling(tmp_path):
    cfg = slices.SliceConfig(image_size=40, pixel_mm=2.5, slices_per_axis=4)
    data = _phantom()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    a = _write(tmp_path, "ras.nii.gz", data, aff)
    # reorient: permute axes (0,1,2)->(2,0,1) and flip the new first axis, with a consistent affine
    perm = np.transpose(data, (2, 0, 1))[::-1]
    # perm[i, j, k] = data[j, k, n2-1-i]  ->  world = (2j, 2k, 2(n2-1) - 2i)
    aff2 = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [-2.0, 0, 0, 2.0 * (data.shape[2] - 1)], [0, 0, 0, 1]])
    b = _write(tmp_path, "rot.nii.gz", perm.copy(), aff2)
    c = _write(tmp_path, "i16.nii.gz", np.round(data * 1000 / data.max() * 30), aff, dtype=np.int16)
    sa, _ = slices.extract_slices(a, cfg)
    sb, _ = slices.extract_slices(b, cfg)
    sc, _ = slices.extract_slices(c, cfg)
    np.testing.assert_allclose(sa, sb, atol=1e-4)
    assert np.abs(sa - sc).mean() < 0.01


# --------------------------------------------------------------------------------------- architecture
def test_encoder_outputs_and_ranges():
    m = ArtifactEncoder(EncoderConfig(latent_dim=3)).eval()
    with torch.no_grad():
        o = m(torch.rand(5, 1, 64, 64))
    assert o["score"].shape == (5,) and (o["score"] >= 0).all()
    assert o["severity_logits"].shape == (5, len(HEADS))
    sev = torch.sigmoid(o["severity_logits"])
    assert ((sev >= 0) & (sev <= 1)).all()
    assert o["latent"].shape == (5, 3)
    assert HEADS == ("noise", "ghosting", "motion", "bias", "resolution")


def test_receptive_field_reaches_far_pixels():
    """A perturbation 40 px away from the centre still changes the centre feature (the published
    network's receptive field is 11 px)."""
    m = ArtifactEncoder().eval()
    x = torch.zeros(1, 1, 128, 128, requires_grad=True)
    f = m.features(x)
    c = f.shape[-1] // 2
    f[0, :, c, c].sum().backward()
    g = x.grad[0, 0].abs()
    ys, xs = torch.nonzero(g > 0, as_tuple=True)
    assert (ys.max() - ys.min()) >= 80 and (xs.max() - xs.min()) >= 80


def test_resolve_device_auto_falls_back_to_cpu():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


# --------------------------------------------------------------------------------------------- losses
def _outs(scores, b=4):
    return {
        "score": torch.tensor(scores, dtype=torch.float32),
        "severity_logits": torch.zeros(b, 5),
        "latent": torch.eye(b, 4),
        "latent_pred": torch.zeros(b, 6),
    }


def test_triplet_margin_is_per_sample_not_batch_mean():
    sev = torch.tensor([0.0, 0.0, 0.0, 1.0])
    tg = torch.zeros(4, 5)
    clean = _outs([0.0] * 4)
    # negatives at exactly their per-sample target 2*SS: per-sample margins (SS) are all met -> zero triplet
    neg = _outs([0.0, 0.0, 0.0, 2.0])
    _, parts = encoder_loss(clean, clean, neg, neg, sev, tg)
    assert parts["triplet"] == pytest.approx(0.0, abs=1e-7)
    # a batch-mean margin (mean SS = 0.25 -> m = 0.25) would penalise the three clean-level negatives:
    # 3 samples * 2 views * 0.25 / 4 = 0.375. Ours must not.
    # raising the severe sample's score deficit: S_n = 0.5 < S_a + m_i = 1.0 -> 0.5 per view
    neg2 = _outs([0.0, 0.0, 0.0, 0.5])
    _, parts2 = encoder_loss(clean, clean, neg2, neg2, sev, tg)
    assert parts2["triplet"] == pytest.approx(2 * 0.5 / 4)


def test_clean_term_is_squared_l2():
    sev = torch.zeros(4)
    tg = torch.zeros(4, 5)
    a = _outs([0.5, 0.5, 0.5, 0.5])
    p = _outs([1.5, 1.5, 1.5, 1.5])
    _, parts = encoder_loss(a, p, a, p, sev, tg)
    assert parts["clean"] == pytest.approx(0.25 + 2.25)


def test_head_loss_is_bce_against_simulator_targets():
    sev = torch.tensor([0.8, 0.2, 0.5, 0.0])
    tg = torch.tensor([[0.8, 0, 0, 0, 0], [0, 0.2, 0, 0, 0], [0, 0, 0.5, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    clean = _outs([0.0] * 4)
    logits = torch.logit(tg.clamp(1e-4, 1 - 1e-4))
    n = _outs([0.0] * 4)
    n["severity_logits"] = logits
    _, parts = encoder_loss(clean, clean, n, n, sev, tg)
    ent = -(tg * torch.log(tg.clamp(1e-4)) + (1 - tg) * torch.log((1 - tg).clamp(1e-4))).mean()
    want = (2 * float(ent) + 0.5 * 2 * math.log(2)) / 3
    assert parts["heads"] == pytest.approx(want, rel=1e-3)


def test_info_nce_prefers_matching_pairs():
    z = torch.randn(8, 4)
    good = info_nce(z, z + 0.01 * torch.randn(8, 4))
    bad = info_nce(z, z[torch.randperm(8)])
    assert good < bad
    assert good < math.log(8)


# ------------------------------------------------------------------------------------------ training
def _toy_sim(data, artifact, severity, seed, spacing):
    """Test-only 3D corruption (independent of artifactqc.simulate): additive noise ~ severity, with the
    per-head targets the trainer expects in ``params["head_severities"]``."""
    rng = np.random.default_rng(seed)
    out = data + severity * 0.5 * rng.standard_normal(data.shape).astype(np.float32) * (artifact != "none")
    heads = {h: 0.0 for h in HEADS}
    heads["noise"] = float(severity)
    return np.clip(out, 0, 1.5).astype(np.float32), {"head_severities": heads}


@pytest.fixture(scope="module")
def toy_cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    paths = [_write(d, f"v{i}.nii.gz", _phantom(shape=(40 + 2 * i, 48, 36), seed=i)) for i in range(4)]
    bad = d / "broken.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    return paths, bad


def _train(out, paths, seed=0, **kw):
    args = dict(val_fraction=0.25, epochs=3, batch_size=6, lr=3e-3, seed=seed, device="auto", patience=5,
                image_size=32, pixel_mm=4.0, steps_per_epoch=2, train_slices_per_axis=3, val_severities=(0.5, 1.0),
                threads=1, simulate_fn=_toy_sim, pool_init_per_volume=1, pool_refresh=1, bn_recalib_batches=1)
    args.update(kw)
    return train_encoder([str(p) for p in paths], out, **args)


def test_train_writes_checkpoint_and_is_deterministic(tmp_path, toy_cohort):
    paths, bad = toy_cohort
    man = tmp_path / "manifest.tsv"
    man.write_text("path\n" + "\n".join(str(p) for p in paths) + "\n")
    m1 = _train(tmp_path / "m1", list(paths) + [bad], manifest=man)
    m2 = _train(tmp_path / "m2", list(paths) + [bad], manifest=man)
    info = json.loads((tmp_path / "m1" / "model.json").read_text())
    assert info["weights_sha256"] == io.sha256_file(tmp_path / "m1" / "encoder.safetensors")
    assert info["training"]["manifest_sha256"] == io.sha256_file(man)
    tr, va = set(info["training"]["train_volumes"]), set(info["training"]["val_volumes"])
    assert tr and va and not (tr & va)  # split by whole volume
    assert str(bad) in {s["path"] for s in info["training"]["skipped_volumes"]}
    assert len(info["training"]["epochs"]) == m1["epochs_run"] >= 1
    assert {"val_loss", "val_pearson", "train_loss"} <= set(info["training"]["epochs"][0])
    assert info["artifactqc_version"] and info["architecture"]["latent_dim"] == 4
    # corrupted volumes: initial pool (one per training volume) + one per epoch
    assert m1["n_corrupted_volumes"] == len(tr) + m1["epochs_run"]
    # same seed -> identical weights
    assert m1["best_val_loss"] == pytest.approx(m2["best_val_loss"], rel=1e-6)
    assert io.sha256_file(tmp_path / "m1" / "encoder.safetensors") == io.sha256_file(
        tmp_path / "m2" / "encoder.safetensors"
    )
    model = load_model(tmp_path / "m1", device="auto")
    assert model.slice_cfg.image_size == 32 and not model.training


def test_early_stopping_stops_before_max_epochs(tmp_path, toy_cohort):
    paths, _ = toy_cohort
    m = _train(tmp_path / "es", paths, epochs=30, patience=1, lr=1e-9)
    assert m["epochs_run"] < 30 and "early stopping" in m["stop_reason"]


def test_validation_is_3d_simulated_held_out_volumes_only(tmp_path, toy_cohort):
    """Validation = the held-out volume corrupted in 3D at the fixed severity grid (every single type plus a
    mixture), simulated once before training; training simulations never see the held-out volume."""
    paths, _ = toy_cohort
    calls = []

    def spy(data, artifact, severity, seed, spacing):
        calls.append((data.shape, artifact, severity))
        return _toy_sim(data, artifact, severity, seed, spacing)

    val_shape = _phantom(shape=(40, 48, 36)).shape  # v0 (the crop keeps the whole phantom)
    _train(tmp_path / "v1", paths, epochs=2, simulate_fn=spy, val_volumes=[str(paths[0])], resample_augment=0.0,
           val_severities=(0.25, 0.75))
    n_val = 5 * 2 + 1
    val_calls, train_calls = calls[:n_val], calls[n_val:]
    assert all(c[0] == val_shape for c in val_calls)
    assert sorted((a, s) for _, a, s in val_calls if a != "mix") == sorted(
        (a, s) for a in ("noise", "ghosting", "bias", "anisotropy", "motion") for s in (0.25, 0.75))
    assert train_calls and not any(c[0] == val_shape for c in train_calls)
    assert {a for _, a, _ in train_calls} <= {"noise", "ghosting", "bias", "anisotropy", "motion", "mix"}


def test_pool_entry_normalises_after_corruption_like_the_scorer():
    """A corruption that only scales intensities (×3) must vanish after the scorer's percentile normalisation;
    the corrupted slices of a real corruption are exactly the scorer's slices of the corrupted volume."""
    from artifactqc.training.volumes import _CleanVolume
    from artifactqc.training.pool import make_pool_entry

    cfg = slices.SliceConfig(image_size=32, pixel_mm=4.0, slices_per_axis=3)
    data = io.normalize_intensity(_phantom())
    v = _CleanVolume("toy", data, (2.0, 2.0, 2.0))

    def gain(d, a, s, seed, spacing):
        return d * 3.0, {"head_severities": {"noise": s}}

    e = make_pool_entry(v, "noise", 0.7, 1, cfg, gain, contrast=0, mask=0, resample=0, dtype=torch.float32)
    np.testing.assert_allclose(e["corrupt"].numpy(), e["clean"].numpy(), atol=1e-5)
    assert e["targets"].tolist() == pytest.approx([0.7, 0, 0, 0, 0])
    seen = []

    def keep(d, a, s, seed, spacing):
        out = _toy_sim(d, a, s, seed, spacing)
        seen.append(out[0])
        return out

    e2 = make_pool_entry(v, "noise", 0.7, 1, cfg, keep, contrast=0, mask=0, resample=0, dtype=torch.float32)
    want, _ = slices.extract_from_array(seen[0], np.diag([2.0, 2.0, 2.0, 1.0]), cfg)
    assert np.abs(want - slices.extract_from_array(data, np.diag([2.0, 2.0, 2.0, 1.0]), cfg)[0]).mean() > 0.01
    np.testing.assert_allclose(e2["corrupt"][:, 0].numpy(), want[: len(e2["corrupt"])], atol=1e-5)
    assert set(e2["axis"].tolist()) == {0, 1, 2}


def test_too_small_training_volume_is_named_and_skipped(tmp_path, toy_cohort, caplog):
    from artifactqc.training.volumes import TrainingVolumeError, _load_clean_volume

    paths, _ = toy_cohort
    tiny = _write(tmp_path, "tiny.nii.gz", np.ascontiguousarray(_phantom()[:, :, 16:19]))
    with pytest.raises(TrainingVolumeError, match="tiny.nii.gz.*too small"):
        _load_clean_volume(str(tiny), slices.SliceConfig(image_size=32, pixel_mm=4.0, slices_per_axis=3), False)
    m = _train(tmp_path / "sm", list(paths) + [tiny], epochs=1, val_volumes=[str(paths[0])])
    info = json.loads((tmp_path / "sm" / "model.json").read_text())
    sk = {s["path"]: s["error"] for s in info["training"]["skipped_volumes"]}
    assert "too small" in sk[str(tiny)] and m["epochs_run"] == 1
    assert any("tiny.nii.gz" in r.getMessage() for r in caplog.records)


def test_brain_mask_augmentation_strips_the_shell():
    """A head = bright shell (scalp/skull, 6 mm) around a brain: the mask keeps the brain centre and removes
    the shell."""
    from artifactqc.training.volumes import _brain_mask

    zz, yy, xx = np.meshgrid(*[np.arange(-40, 41)] * 3, indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)  # 1 mm voxels
    vol = np.where(r < 36, 0.5, 0.0) + np.where((r >= 30) & (r < 36), 0.5, 0.0)
    m = _brain_mask(vol.astype(np.float32), (1.0, 1.0, 1.0))
    assert m is not None and m[40, 40, 40]
    assert not m[r >= 30].any()  # the whole shell is gone
    assert m[r < 20].all()


def test_bn_recalibration_uses_exact_batch_statistics():
    from artifactqc.training.validate import _recalibrate_bn

    torch.manual_seed(0)
    m = ArtifactEncoder(EncoderConfig())
    bn = m.features[1]
    bn.running_mean.fill_(5.0)  # stale statistics must not survive
    xs = [torch.rand(4, 1, 32, 32), torch.rand(6, 1, 32, 32) * 2]
    _recalibrate_bn(m, xs, torch.device("cpu"))
    with torch.no_grad():
        feats = [m.features[0](x) for x in xs]  # the stem conv feeding the first BN
    want = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)  # cumulative average of batch means
    torch.testing.assert_close(bn.running_mean, want, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and m.training


# ------------------------------------------------------------------------------------------- loading
def test_load_model_refuses_pickle(tmp_path):
    m = ArtifactEncoder()
    d = tmp_path / "mdl"
    save_model(m, d, slices.SliceConfig(), {"model_id": "t"})
    pt = d / "encoder.pt"
    torch.save(m.state_dict(), pt)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(pt)
    # a directory with only the pickle (safetensors removed) is refused and the pickle is named
    (d / "encoder.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"encoder\.pt"):
        load_model(d)
    # model.json pointing at a pickle is refused
    info = json.loads((d / "model.json").read_text())
    info["weights_file"] = "encoder.pt"
    (d / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match="not a .safetensors"):
        load_model(d)


def test_load_model_detects_tampered_or_fake_weights(tmp_path):
    d = tmp_path / "mdl"
    save_model(ArtifactEncoder(), d, slices.SliceConfig(), {"model_id": "t"})
    w = d / "encoder.safetensors"
    w.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model(d)
    info = json.loads((d / "model.json").read_text())
    info["weights_sha256"] = io.sha256_file(w)
    (d / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_model(d)


def test_save_load_roundtrip_same_outputs(tmp_path):
    """The loaded model (BatchNorms folded into the convs, channels-last) gives the saved model's eval outputs."""
    torch.manual_seed(0)
    m = ArtifactEncoder(EncoderConfig(latent_dim=2)).eval()
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):  # non-trivial statistics to fold
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    save_model(m, tmp_path / "r", slices.SliceConfig(image_size=64), {"model_id": "r"})
    m2 = load_model(tmp_path / "r", device="cpu")
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        a, b = m(x), m2(x)
    for k in ("score", "severity_logits", "latent"):
        torch.testing.assert_close(a[k], b[k])
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m2.modules())


def test_percentile_from_counts_equals_numpy():
    rng = np.random.default_rng(1)
    for _ in range(50):
        v = rng.integers(0, 40, rng.integers(10, 200))
        c = np.bincount(v, minlength=40)
        for q in (1, 50, 99):
            assert slices._percentile_from_counts(c, q) == pytest.approx(np.percentile(v, q), abs=1e-9)


def test_scale_for_simulation_keeps_the_scorers_slices():
    """The simulator's input is a pure rescale of the raw volume: its slices equal the raw file's slices,
    whereas io.normalize_intensity (offset + clip) followed by the scorer's normalisation does not."""
    from artifactqc.encoder.slices import scale_for_simulation

    cfg = slices.SliceConfig(image_size=32, pixel_mm=4.0, slices_per_axis=3)
    raw = _phantom() * 7.0 + 5.0 * (_phantom() > 0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    want, _ = slices.extract_from_array(raw, aff, cfg)
    scaled = scale_for_simulation(raw)
    got, _ = slices.extract_from_array(scaled, aff, cfg)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert 0.9 < np.percentile(scaled[raw > 0], 99.5) < 1.1  # ~[0, 1] for the simulator
    twice, _ = slices.extract_from_array(io.normalize_intensity(raw), aff, cfg)
    assert np.abs(twice - want).max() > 1e-3


# ------------------------------------------------------------------------ session 3: group loss, augmentation
def test_group_loss_uses_group_means_for_severity_terms():
    """group=2: calibration and triplet act on the mean score of each group of two slices of one volume,
    computed here by hand; the clean term stays per slice."""
    sev = torch.tensor([0.5, 0.5, 1.0, 1.0])
    tg = torch.tensor([[0.5, 0, 0, 0, 0]] * 2 + [[0, 1.0, 0, 0, 0]] * 2)
    clean = _outs([0.0, 0.4, 0.0, 0.0])
    # group means of the negatives: (0.0 + 2.0)/2 = 1.0 (target 1.0), (1.0 + 1.0)/2 = 1.0 (target 2.0)
    neg = _outs([0.0, 2.0, 1.0, 1.0])
    _, parts = encoder_loss(clean, clean, neg, neg, sev, tg, group=2)
    # calib = 2 * mean over groups of (group mean - 2 SS)^2 = 2 * (0 + 1) / 2
    assert parts["calib"] == pytest.approx(1.0)
    # triplet per group: relu(mean(a) - mean(n) + SS) twice (a/n and p/n2): group 1: relu(0.2 - 1.0 + 0.5) = 0,
    # group 2: relu(0 - 1.0 + 1.0) = 0 -> 0; per-slice it would have been > 0 (slice 0: relu(0 - 0 + 0.5))
    assert parts["triplet"] == pytest.approx(0.0, abs=1e-7)
    _, per_slice = encoder_loss(clean, clean, neg, neg, sev, tg, group=1)
    assert per_slice["triplet"] > 0.1
    assert parts["clean"] == pytest.approx(2 * 0.16 / 4)
    with pytest.raises(ValueError, match="multiple"):
        encoder_loss(_outs([0.0] * 3), _outs([0.0] * 3), _outs([0.0] * 3), _outs([0.0] * 3), sev[:3], tg[:3], group=2)


def test_pool_sample_groups_come_from_one_entry():
    from artifactqc.training.pool import _Pool

    pool = _Pool([], None, 10, 0, None, {})
    for k in range(5):  # entries whose slices encode (entry, plane): value = 10 * entry + plane
        vals = torch.tensor([10.0 * k + j for j in range(6)])
        pool.entries.append({"clean": vals.view(6, 1, 1, 1).expand(6, 1, 2, 2).clone(),
                             "corrupt": vals.view(6, 1, 1, 1).expand(6, 1, 2, 2).clone() + 0.5,
                             "axis": np.array([0, 0, 1, 1, 2, 2]), "severity": k / 10, "targets": torch.zeros(5)})
    xa, xp, xn, xn2, sev, _ = pool.sample(12, torch.Generator().manual_seed(3), group=4)
    assert xa.shape[0] == 12
    ent = (xa[:, 0, 0, 0] // 10).view(3, 4)
    assert (ent == ent[:, :1]).all()  # one entry per group
    planes = (xa[:, 0, 0, 0] % 10).view(3, 4)
    assert all(len(set(r.tolist())) == 4 for r in planes)  # distinct planes within a group
    assert torch.equal(xn[:, 0, 0, 0], xa[:, 0, 0, 0] + 0.5)  # negative = same plane, corrupted
    assert torch.allclose(sev.view(3, 4), (ent / 10).float())
    # the positive comes from another orientation of the same entry
    ax = np.array([0, 0, 1, 1, 2, 2])
    for a, p in zip(xa[:, 0, 0, 0].tolist(), xp[:, 0, 0, 0].tolist()):
        assert a // 10 == p // 10 and ax[int(a % 10)] != ax[int(p % 10)]


def test_tissue_remap_keeps_background_and_limits_slope():
    from artifactqc.training.augment import _tissue_remap

    rng = np.random.default_rng(0)
    data = io.normalize_intensity(_phantom((30, 32, 28)))
    for seed in range(5):
        out, desc = _tissue_remap(data, np.random.default_rng(seed), max_slope=3.0)
        assert out.shape == data.shape and desc.startswith("remap")
        assert np.all(out[data == 0] == 0)
        # slope bound, checked on random pairs of voxels (the map is piecewise linear in the intensity)
        i, j = rng.integers(0, data.size, (2, 5000))
        a, b = data.ravel()[i], data.ravel()[j]
        far = np.abs(a - b) > 1e-3
        slope = np.abs(out.ravel()[i] - out.ravel()[j])[far] / np.abs(a - b)[far]
        assert slope.max() <= 3.0 + 1e-3
    # it is a different contrast, not the identity: tissue order changes for some seed
    inner, outer = data > 0.8, (data > 0.3) & (data < 0.5)
    orders = {bool(_tissue_remap(data, np.random.default_rng(s))[0][inner].mean()
                   > _tissue_remap(data, np.random.default_rng(s))[0][outer].mean()) for s in range(8)}
    assert orders == {True, False}


def test_resample_augmentation_keeps_physical_extent():
    """The resampled grid covers the same physical extent (first and last voxel centres fixed), at 1.0-1.7 mm,
    and 2 mm volumes are upsampled to at least 1.3 mm."""
    from artifactqc.training.augment import _augment_volume
    from artifactqc.training.volumes import _CleanVolume

    data = io.normalize_intensity(_phantom((30, 32, 28)))
    v = _CleanVolume("toy", data, (2.0, 2.0, 2.0))
    seen = set()
    for seed in range(6):
        out, spacing, desc = _augment_volume(v, np.random.default_rng(seed), 0.0, 0.0, 1.0)
        if "resample" not in desc:
            continue
        seen.add(desc)
        for n0, n1, s in zip(data.shape, out.shape, spacing):
            assert (n1 - 1) * s == pytest.approx((n0 - 1) * 2.0, rel=1e-6)
            assert 1.3 * 0.95 <= s <= 1.7 * 1.05  # target grid up to the rounding of the new shape
    assert len(seen) >= 3


def test_resample_augmentation_skips_thick_slice_volumes():
    """A volume with 5 mm slices has no 1.0-1.7 mm grid at 0.65 x its voxel size: the resampling step is
    skipped (it raised numpy's 'high - low < 0' and killed the training run), the other steps still run."""
    from artifactqc.training.augment import _augment_volume
    from artifactqc.training.volumes import _CleanVolume

    data = io.normalize_intensity(_phantom((30, 32, 12)))
    v = _CleanVolume("thick", data, (1.0, 1.0, 5.0))
    for seed in range(6):
        out, spacing, desc = _augment_volume(v, np.random.default_rng(seed), 1.0, 0.0, 1.0)
        assert "resample" not in desc and desc != "none"
        assert out.shape == data.shape and spacing == (1.0, 1.0, 5.0)


def _sphere(shape, spacing, radius_mm):
    """A binary sphere of ``radius_mm`` at the centre of a grid of ``spacing`` (mm)."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    g = np.meshgrid(*axes, indexing="ij")
    return (sum(x**2 for x in g) < radius_mm**2).astype(np.float32)


def _extent_mm(mask, spacing):
    """The physical extent (mm, voxel centres) of a mask along each axis."""
    out = []
    for ax, s in enumerate(spacing):
        idx = np.nonzero(mask.any(axis=tuple(i for i in range(3) if i != ax)))[0]
        out.append((idx[-1] - idx[0]) * s)
    return np.array(out)


def test_deform_anatomy_works_in_millimetres():
    """The deformation scales and rotates in millimetres on anisotropic grids: a sphere scaled by 1.1 has 1.1 x
    its diameter along every axis, and a rotated sphere stays a sphere of the same diameter (a rotation in voxel
    units on a 1 x 1 x 2 mm grid would turn it into a tilted ellipsoid); no parameter, no change."""
    from artifactqc.training.augment import deform_anatomy

    spacing = (1.0, 1.0, 2.0)
    ball = _sphere((64, 64, 32), spacing, 20.0)
    d0 = _extent_mm(ball > 0.5, spacing)
    same, _ = deform_anatomy(ball, spacing, np.random.default_rng(0), rotation_deg=0, scale=(1, 1), axis_scale=(1, 1),
                             elastic_mm=0)
    assert np.abs(same - ball).max() < 1e-4
    big, desc = deform_anatomy(ball, spacing, np.random.default_rng(0), rotation_deg=0, scale=(1.1, 1.1),
                               axis_scale=(1, 1), elastic_mm=0)
    assert "scale1.10,1.10,1.10" in desc
    np.testing.assert_allclose(_extent_mm(big > 0.5, spacing), 1.1 * d0, atol=2.01)
    for seed in range(3):
        rot, desc = deform_anatomy(ball, spacing, np.random.default_rng(seed), rotation_deg=45, scale=(1, 1),
                                   axis_scale=(1, 1), elastic_mm=0)
        np.testing.assert_allclose(_extent_mm(rot > 0.5, spacing), d0, atol=2.01)
        assert abs(float((rot > 0.5).sum()) / float(ball.sum()) - 1) < 0.03, desc


def test_deform_anatomy_keeps_sharpness_with_cubic_sampling():
    """Sub-voxel displacements with cubic B-spline sampling (the default) keep the texture's gradients; trilinear
    sampling blurs them (a synthesised item must not teach that blur is clean)."""
    from artifactqc.training.augment import deform_anatomy

    data = io.normalize_intensity(_phantom((40, 44, 36)))
    grad = lambda v: float(np.abs(np.diff(v, axis=0)).mean())  # noqa: E731
    kw = dict(rotation_deg=0, scale=(1, 1), axis_scale=(1, 1), elastic_mm=1.0)
    cubic, _ = deform_anatomy(data, (2.0, 2.0, 2.0), np.random.default_rng(0), **kw)
    linear, _ = deform_anatomy(data, (2.0, 2.0, 2.0), np.random.default_rng(0), order=1, **kw)
    assert 0.93 < grad(cubic) / grad(data) < 1.1  # neither blurred nor sharpened (noise amplified)
    assert grad(linear) / grad(data) < grad(cubic) / grad(data) - 0.05


def test_synthesize_volume_new_anatomy_and_contrast():
    """Label-map synthesis: reproducible for a seed, a new shape and new tissue intensities for another seed,
    background around the head; ``synth_augment`` items are made that way (and say so)."""
    from artifactqc.training.augment import _augment_volume, synthesize_volume
    from artifactqc.training.volumes import _CleanVolume

    data = io.normalize_intensity(_phantom((40, 44, 36)))
    a, da = synthesize_volume(data, (2.0, 2.0, 2.0), np.random.default_rng(1))
    a2, _ = synthesize_volume(data, (2.0, 2.0, 2.0), np.random.default_rng(1))
    b, db = synthesize_volume(data, (2.0, 2.0, 2.0), np.random.default_rng(2))
    np.testing.assert_array_equal(a, a2)
    assert a.shape == data.shape and "deform" in da and "render" in da and da != db
    head = data > 0.08
    grow = np.prod([float(x) for x in da.split("scale")[1].split("+")[0].split(",")])  # the drawn scales
    assert (a > 0.08).mean() == pytest.approx(head.mean() * grow, rel=0.1)  # the head scaled, background around it
    assert float(a[0].max()) < 0.08 and float(a[-1].max()) < 0.08
    assert ((a > 0.08) != head).mean() > 0.005  # the head moved
    core = _phantom((40, 44, 36)) > 130  # the bright inner structure: its contrast to the rest of the head changes
    ratios = [float(x[core].mean() / x[head & ~core & (x > 0.08)].mean()) for x in (a, b)]
    assert max(ratios) - min(ratios) > 0.1
    v = _CleanVolume("toy", data, (2.0, 2.0, 2.0))
    descs = {_augment_volume(v, np.random.default_rng(s), 1.0, 0.0, 0.0, synth=0.5)[2] for s in range(10)}
    assert any("deform" in d for d in descs) and any(d.startswith("remap") or d.startswith("gamma") for d in descs)


def test_thick_acquisition_keeps_extent_and_integrates_slabs():
    """The thick-slice acquisition keeps the in-plane grid, puts 3-6 mm slices on their own grid inside the
    volume's extent, and each slice integrates its slab: a step edge across the slice axis becomes a ramp at
    most two slices wide, and slices along the edge keep the volume's mean."""
    from artifactqc.training.augment import thick_acquisition

    data = np.zeros((20, 22, 60), np.float32)
    data[..., 30:] = 1.0  # step edge along the last axis at 29.5 mm
    seen = set()
    for seed in range(12):
        out, spacing, desc = thick_acquisition(data, (1.0, 1.0, 1.0), np.random.default_rng(seed))
        axis = int(desc[5])
        seen.add(axis)
        assert 3.0 <= spacing[axis] <= 6.0 and all(spacing[a] == 1.0 for a in range(3) if a != axis)
        assert [n for a, n in enumerate(out.shape) if a != axis] == [n for a, n in enumerate(data.shape) if a != axis]
        assert (out.shape[axis] - 1) * spacing[axis] <= data.shape[axis] - 1
        profile = out.mean(axis=tuple(a for a in range(3) if a != axis))
        if axis == 2:  # across the edge: monotone, at most two slices between 0 and 1
            assert np.all(np.diff(profile) >= -1e-6) and ((profile > 0.02) & (profile < 0.98)).sum() <= 2
        else:  # along the edge: every slice has the same mean as the volume
            np.testing.assert_allclose(profile, data.mean(), atol=1e-5)
    assert seen == {0, 1, 2}
    # 4 mm voxels are at least half of any drawn thickness (3-6 mm): unchanged
    same, spacing, desc = thick_acquisition(data, (1.0, 1.0, 4.0), np.random.default_rng(3))
    assert desc == "" and same is data and spacing == (1.0, 1.0, 4.0)


def test_thick_pool_entry_keeps_its_acquisition_planes():
    """A thick-slice training item keeps only the slices parallel to its acquisition planes (the scorer's
    planes for such a volume), never draws anisotropy alone, and ``thick=0`` makes no extra random draw."""
    from artifactqc.io import acquisition_axis
    from artifactqc.training.augment import _augment_volume
    from artifactqc.training.pool import make_pool_entry
    from artifactqc.training.volumes import _CleanVolume

    cfg = slices.SliceConfig(image_size=32, pixel_mm=2.0, slices_per_axis=4)
    data = io.normalize_intensity(_phantom((48, 52, 44)))
    v = _CleanVolume("toy", data, (1.0, 1.0, 1.0))
    arts = []

    def sim(d, a, s, seed, spacing):
        arts.append(a)
        return _toy_sim(d, a, s, seed, spacing)

    for seed in range(4):
        e = make_pool_entry(v, "anisotropy", 0.6, seed, cfg, sim, contrast=0, mask=0, resample=0, thick=1.0,
                            dtype=torch.float32)
        axis = int(e["augment"].split("thick")[1][0])
        assert set(e["axis"].tolist()) == {axis} and len(e["axis"]) >= 2
        assert arts[-1] != "anisotropy" and e["artifact"] == arts[-1]
        _, spacing, _ = _augment_volume(v, np.random.default_rng(seed), 0, 0, 0, 1.0)
        assert acquisition_axis(spacing) == axis
    plain = make_pool_entry(v, "anisotropy", 0.6, 5, cfg, sim, contrast=0, mask=0, resample=0, dtype=torch.float32)
    assert set(plain["axis"].tolist()) == {0, 1, 2} and arts[-1] == "anisotropy"
    # without a brain mask, the other steps draw exactly two numbers (contrast, resampling): thick=0 adds none,
    # so every run without the option keeps its random stream
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    _augment_volume(v, rng, 0.0, 0.0, 0.0, 0.0)
    ref.random(2)
    assert rng.random() == ref.random()


def test_zoom_items_are_sampled_finer_after_the_same_simulation():
    """A ``zoom`` item takes one of the finer pixel levels over the same field of view; the draw comes after the
    simulation, so the item gets the same simulator seed as without zoom."""
    from artifactqc.training.pool import ZOOM_PIXEL_FRACTIONS, make_pool_entry
    from artifactqc.training.volumes import _CleanVolume

    cfg = slices.SliceConfig(image_size=32, pixel_mm=2.0, slices_per_axis=3)
    v = _CleanVolume("toy", io.normalize_intensity(_phantom((48, 52, 44))), (1.0, 1.0, 1.0))
    seeds = []

    def sim(d, a, s, seed, spacing):
        seeds.append(seed)
        return _toy_sim(d, a, s, seed, spacing)

    sizes = {slices.fov_grid(cfg, 2.0 * f)[1] for f in ZOOM_PIXEL_FRACTIONS}
    assert min(sizes) > 32
    for seed in range(3):
        plain = make_pool_entry(v, "noise", 0.6, seed, cfg, sim, contrast=0, mask=0, resample=0, dtype=torch.float32)
        zoomed = make_pool_entry(v, "noise", 0.6, seed, cfg, sim, contrast=0, mask=0, resample=0, zoom=1.0,
                                 dtype=torch.float32)
        assert seeds[-1] == seeds[-2]  # the same simulation
        assert plain["clean"].shape[-1] == 32 and "zoom" not in plain["augment"]
        assert zoomed["clean"].shape[-1] in sizes and "zoom" in zoomed["augment"]
        assert zoomed["corrupt"].shape == zoomed["clean"].shape


def test_pool_batches_have_one_image_size():
    """A pool holding items of several image sizes (zoom) draws every batch from items of one size, and
    every size is drawn."""
    from artifactqc.training.pool import _Pool

    pool = _Pool([], None, 10, 0, None, {})
    for k in range(6):
        n = 2 if k % 2 else 3
        x = torch.full((6, 1, n, n), float(k))
        pool.entries.append({"clean": x, "corrupt": x + 0.5, "axis": np.array([0, 0, 1, 1, 2, 2]),
                             "severity": 0.1, "targets": torch.zeros(5)})
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for group in (1, 2):
        for _ in range(8):
            xa, xp, xn, xn2, _, _ = pool.sample(8, gen, group=group)
            assert xa.shape[0] == 8 and xn.shape == xa.shape == xp.shape == xn2.shape
            seen.add(xa.shape[-1])
            assert set((xa[:, 0, 0, 0] % 2).tolist()) == {1.0 if xa.shape[-1] == 2 else 0.0}
    assert seen == {2, 3}


def test_group_training_runs_and_is_recorded(tmp_path, toy_cohort):
    paths, _ = toy_cohort
    m = _train(tmp_path / "g", paths, epochs=1, batch_size=7, slice_group=2, val_volumes=[str(paths[0])])
    info = json.loads((tmp_path / "g" / "model.json").read_text())
    assert info["training"]["hyperparameters"]["slice_group"] == 2
    assert m["epochs_run"] == 1 and math.isfinite(m["best_val_loss"])
    with pytest.raises(ValueError, match="slice_group"):
        _train(tmp_path / "g2", paths, epochs=1, slice_group=2, slice_sim_fraction=0.5)


def test_zoom_training_with_thick_pixels_scores_a_thick_scan_on_its_finer_grid(tmp_path, toy_cohort):
    """Training with zoom items (several image sizes in one pool) runs end to end; the model keeps its
    thick-slice geometry in model.json, and scoring a thick-slice file uses it."""
    from artifactqc.encoder.score import score_volume

    paths, _ = toy_cohort
    m = _train(tmp_path / "z", paths, epochs=2, zoom_augment=1.0, thick_pixel_ratio=1.5,
               val_volumes=[str(paths[0])])
    assert m["epochs_run"] == 2 and math.isfinite(m["best_val_loss"])
    info = json.loads((tmp_path / "z" / "model.json").read_text())
    assert info["training"]["hyperparameters"]["zoom_augment"] == 1.0
    model = load_model(tmp_path / "z")
    assert model.slice_cfg.thick_pixel_ratio == 1.5
    thick = _write(tmp_path, "thick.nii.gz", _phantom((100, 110, 20)), np.diag([1.0, 1.0, 6.0, 1.0]))
    row = score_volume(model, thick)
    assert row["status"] == "ok" and math.isfinite(row["score"]) and row["score_planes"] == "axial"
    _, sinfo = slices.extract_slices(thick, model.slice_cfg)
    assert sinfo["image_size"] > 32 and sinfo["pixel_mm"] < 4.0
    with pytest.raises(ValueError, match="zoom_augment"):
        _train(tmp_path / "z2", paths, epochs=1, zoom_augment=0.5, rank_pairs=0.5)


def test_synth_training_runs_and_is_recorded(tmp_path, toy_cohort):
    """Training on label-map-synthesised items only runs end to end and records the setting; it cannot be
    combined with paired items (whose members must share one anatomy)."""
    paths, _ = toy_cohort
    m = _train(tmp_path / "sy", paths, epochs=1, synth_augment=1.0, val_volumes=[str(paths[0])])
    assert m["epochs_run"] == 1 and math.isfinite(m["best_val_loss"])
    info = json.loads((tmp_path / "sy" / "model.json").read_text())
    assert info["training"]["hyperparameters"]["synth_augment"] == 1.0
    with pytest.raises(ValueError, match="synth_augment"):
        _train(tmp_path / "sy2", paths, epochs=1, synth_augment=0.5, render_pairs=0.5)


def test_ssim_matched_training_uses_and_records_the_matched_simulator(tmp_path, toy_cohort):
    paths, _ = toy_cohort
    m = _train(tmp_path / "s", paths, epochs=1, simulate_fn=None, match_ssim=True, val_volumes=[str(paths[0])])
    info = json.loads((tmp_path / "s" / "model.json").read_text())["training"]
    assert info["hyperparameters"]["match_ssim"] is True
    assert info["simulator"] == "artifactqc.simulate.simulate_volume(match_ssim=True)"
    assert m["n_corrupted_volumes"] >= 1 and math.isfinite(m["best_val_loss"])


# ---------------------------------------------------------------------------------------- volume head
def test_volume_features_are_symmetric_in_orientations():
    torch.manual_seed(0)
    h = torch.randn(12, 5)
    ax = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    f = pool_volume_features(h, ax)
    assert f.shape == (15,)
    torch.testing.assert_close(f[:5], h.mean(0))
    means = torch.stack([h[:4].mean(0), h[4:8].mean(0), h[8:].mean(0)])
    torch.testing.assert_close(f[5:10], means.max(0).values)
    torch.testing.assert_close(f[10:], means.min(0).values)
    # relabelled orientations (a permuted volume) give the same features
    torch.testing.assert_close(pool_volume_features(h, torch.tensor([2, 0, 1])[ax]), f)
    # a missing orientation is left out of the max/min
    f2 = pool_volume_features(h[:8], ax[:8])
    torch.testing.assert_close(f2[5:10], torch.maximum(means[0], means[1]))


def _textured(rng, n, size=64):
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.random((n, size, size)), (0, 3, 3)).astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    return x


def _noise_entry(rng, sev, n=9, size=64):
    clean = _textured(rng, n, size)
    corrupt = np.clip(clean + sev * 0.4 * rng.standard_normal(clean.shape), 0, 1.5).astype(np.float32)
    tg = torch.zeros(len(HEADS))
    tg[0] = sev
    return clean, corrupt, tg


def test_volume_head_learns_the_volume_severity_from_frozen_features():
    """A frozen (random) encoder, noise of severity SS on whole 'volumes': the fitted head orders held-out
    volumes by SS, is attached to the model with its config flag, and leaves the encoder unchanged."""
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = ArtifactEncoder(EncoderConfig(latent_dim=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    axis = np.repeat(np.arange(3), 3)
    entries = []
    for _ in range(60):
        sev = float(rng.uniform(0, 1))
        c, n, tg = _noise_entry(rng, sev)
        entries.append({"clean": torch.from_numpy(c[:, None]), "corrupt": torch.from_numpy(n[:, None]),
                        "axis": axis, "severity": sev, "targets": tg})
    val = []
    for sev in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) * 2:
        c, n, tg = _noise_entry(rng, sev)
        val.append({"slices": torch.from_numpy((n if sev else c)[:, None]), "severity": sev,
                    "targets": tg})
    res = fit_volume_head(model, entries, val, seed=0, epochs=150, patience=150)
    assert model.volume_head is not None and model.config.volume_head
    for k, v in model.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k])
    assert res["best_epoch"] >= 1 and res["n_entries"] == 60
    from artifactqc.encoder.score import predict_volume

    scores = [predict_volume(model, it["slices"].numpy(), device="cpu")["score"] for it in val]
    rho = spearmanr([it["severity"] for it in val], scores).statistic
    assert rho > 0.8, (rho, scores)


def test_trained_model_scores_through_its_volume_head(tmp_path, toy_cohort):
    """train_encoder fits the head by default; it is saved, loaded and used by the scorer (not the trimmed
    mean of the slice scores); ``volume_head=False`` keeps the slice-mean model."""
    from artifactqc.encoder.score import aggregate, predict_slices, predict_volume, score_volume

    paths, _ = toy_cohort
    m = _train(tmp_path / "vh", paths, epochs=2)
    assert m["volume_head"]["best_epoch"] >= 1
    info = json.loads((tmp_path / "vh" / "model.json").read_text())
    assert info["architecture"]["volume_head"] is True
    assert info["training"]["volume_head"]["final"]["val_loss"] >= 0
    model = load_model(tmp_path / "vh", device="cpu")
    assert model.volume_head is not None and not model.volume_head.training
    sl, _ = slices.extract_slices(paths[0], model.slice_cfg)
    pred = predict_slices(model, sl)
    row = predict_volume(model, sl)
    feats = pool_volume_features(torch.from_numpy(pred["hidden"]), torch.from_numpy(np.repeat(np.arange(3), len(sl) // 3)))
    with torch.no_grad():
        want = float(model.volume_head(feats[None])["score"][0])
    assert row["score"] == pytest.approx(want, rel=1e-5)
    assert row["score"] != pytest.approx(aggregate(pred)["score"], rel=1e-3)
    assert score_volume(model, paths[0])["score"] == pytest.approx(row["score"], rel=1e-5)
    _train(tmp_path / "plain", paths, epochs=1, volume_head=False)
    plain = load_model(tmp_path / "plain", device="cpu")
    assert plain.volume_head is None
    sl2, _ = slices.extract_slices(paths[0], plain.slice_cfg)
    assert predict_volume(plain, sl2)["score"] == pytest.approx(aggregate(predict_slices(plain, sl2))["score"])


def test_time_capped_training_keeps_time_for_the_volume_head(tmp_path, toy_cohort):
    """With ``max_minutes`` in the time-shared mode (no fixed ``pool_refresh``) the epoch loop leaves time for
    the volume head, which is fitted and saved; the weights kept are the validated moving average
    (``ema_decay``). With a fixed ``pool_refresh`` the clock is only a safety stop: tests/test_reruns.py."""
    paths, _ = toy_cohort
    m = _train(tmp_path / "cap", paths, epochs=500, patience=500, max_minutes=0.15, pool_refresh=None)
    assert m["stop_reason"].startswith("time limit") and m["volume_head"]["best_epoch"] >= 1
    # the cap stopped a run of 500 epochs (minutes uncapped); the margin covers model set-up, the head fit
    # and a loaded machine (this is not a speed test: a CI run beside other jobs took > 24 s)
    assert m["train_seconds"] < 0.15 * 60 + 60
    info = json.loads((tmp_path / "cap" / "model.json").read_text())
    assert info["training"]["hyperparameters"]["ema_decay"] == pytest.approx(0.995)
    assert load_model(tmp_path / "cap", device="cpu").volume_head is not None

