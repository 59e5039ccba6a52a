"""Encoder architecture, losses, slices, training loop and checkpoint I/O (small settings, CPU)."""

from __future__ import annotations

import json
import math
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from artifactqc import io, slices
from artifactqc.model import (
    HEADS,
    ArtifactEncoder,
    EncoderConfig,
    ModelLoadError,
    encoder_loss,
    info_nce,
    load_model,
    resolve_device,
    save_model,
    train_encoder,
)

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
def _toy_sim(x, arts, sev, gen):
    """Test-only corruption (independent of artifactqc.simulate): additive noise ~ severity."""
    noise = torch.randn(x.shape, generator=gen)
    out = x + sev.view(-1, 1, 1, 1) * 0.5 * noise * (torch.tensor([a != "none" for a in arts]).view(-1, 1, 1, 1))
    tgt = torch.zeros(x.shape[0], 5)
    tgt[:, 0] = sev
    return out.clamp(0, 1.5), tgt


@pytest.fixture(scope="module")
def toy_cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    paths = [_write(d, f"v{i}.nii.gz", _phantom(seed=i)) for i in range(4)]
    bad = d / "broken.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    return paths, bad


def _train(out, paths, seed=0, **kw):
    args = dict(val_fraction=0.25, epochs=3, batch_size=6, lr=3e-3, seed=seed, device="auto", patience=5,
                image_size=32, pixel_mm=4.0, steps_per_epoch=2, train_slices_per_axis=3, val_slices=24,
                threads=1, simulate_fn=_toy_sim)
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


def test_validation_set_is_fresh_not_training_batches(tmp_path, toy_cohort):
    """The validation severities come from their own seeded draw: changing the training seed's batches
    (batch size) does not change the validation targets, so the first-epoch val metrics of an untrained
    model differ only through the weights."""
    paths, _ = toy_cohort
    seen = []

    def spy(x, arts, sev, gen):
        seen.append(sev.clone())
        return _toy_sim(x, arts, sev, gen)

    _train(tmp_path / "v1", paths, epochs=1, simulate_fn=spy, val_volumes=[str(paths[0])])
    val_sev = seen[0]
    train_sevs = torch.cat(seen[1:])
    assert len(val_sev) == 24
    assert not any(torch.isclose(v, train_sevs).any() for v in val_sev)


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
    torch.manual_seed(0)
    m = ArtifactEncoder(EncoderConfig(latent_dim=2)).eval()
    save_model(m, tmp_path / "r", slices.SliceConfig(image_size=64), {"model_id": "r"})
    m2 = load_model(tmp_path / "r", device="cpu")
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        a, b = m(x), m2(x)
    for k in ("score", "severity_logits", "latent"):
        torch.testing.assert_close(a[k], b[k])


def test_percentile_from_counts_equals_numpy():
    rng = np.random.default_rng(1)
    for _ in range(50):
        v = rng.integers(0, 40, rng.integers(10, 200))
        c = np.bincount(v, minlength=40)
        for q in (1, 50, 99):
            assert slices._percentile_from_counts(c, q) == pytest.approx(np.percentile(v, q), abs=1e-9)
