"""Paired training (``render_pairs`` twins with a consistency loss, ``rank_pairs`` with a ranking loss):
the tissue re-rendering, the pairs' shared artifact/anatomy, the loss terms and small training runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from artifactqc import io
from artifactqc.encoder import slices
from artifactqc.encoder.network import SCORE_SCALE
from artifactqc.encoder.slices import scale_for_simulation
from artifactqc.training.config import TrainConfig
from artifactqc.training.losses import consistency_loss, head_ranking_loss, ranking_loss
from artifactqc.training.pairs import _PairPool, make_rank_entries, make_twin_entries
from artifactqc.training.tissues import FOREGROUND, median3, render_tissues, tissue_classes
from artifactqc.training.volumes import _CleanVolume

from .test_model import _toy_sim, _train, toy_cohort  # noqa: F401  (toy_cohort is a fixture)

torch.set_num_threads(1)

_CFG = slices.SliceConfig(image_size=32, pixel_mm=4.0, slices_per_axis=3)


def _three_tissues(shape=(48, 52, 40), seed=0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A scaled head with three nested tissues of distinct T1w-like levels (dark < mid < bright), a faint noisy
    background, and the tissues' masks."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = zz**2 / 0.8 + yy**2 / 0.9 + xx**2 / 0.7
    masks = [(r < 1) & (r >= 0.6), (r < 0.6) & (r >= 0.25), r < 0.25]
    vol = np.abs(rng.normal(0, 2, shape))  # background
    for m, level in zip(masks, (30.0, 60.0, 100.0)):
        vol = np.where(m, level + rng.normal(0, 2.5, shape), vol)
    return scale_for_simulation(vol.astype(np.float32)), masks


# ------------------------------------------------------------------------------------------ rendering
def test_tissue_classes_find_the_tissues_and_merge_a_split_one():
    data, masks = _three_tissues()
    means, sds, _ = tissue_classes(data, k=5)
    assert len(means) == 3  # 5 clusters asked, the split single-tissue peaks merged back
    for mu, m in zip(means, masks):
        assert mu == pytest.approx(float(np.median(data[m])), abs=0.03)


def test_median3_keeps_a_step_edge_and_removes_voxel_noise():
    rng = np.random.default_rng(0)
    step = np.zeros((20, 20, 20), np.float32)
    step[:, :, 10:] = 1.0
    assert np.array_equal(median3(step), step)  # the edge stays where it is, unblurred
    noisy = step + rng.normal(0, 0.1, step.shape).astype(np.float32)
    assert np.std(median3(noisy)[:, :, 2:8]) < 0.6 * np.std(noisy[:, :, 2:8])
    line = rng.normal(0, 1, 20).astype(np.float32)  # varies along the last axis only: a 1D median of 3 there
    vol = np.broadcast_to(line, (5, 6, 20)).copy()
    expect = np.median(np.stack([line[:-2], line[1:-1], line[2:]]), 0)
    assert np.array_equal(median3(vol)[2, 3, 1:-1], expect)


def test_render_keeps_mask_and_geometry_changes_tissue_order_and_is_deterministic():
    data, masks = _three_tissues()
    orders, seen_nonmonotone = set(), False
    for seed in range(12):
        out, desc = render_tissues(data, np.random.default_rng(seed))
        assert out.shape == data.shape and out.dtype == np.float32 and desc.startswith("render")
        bg = data <= FOREGROUND
        nz = bg & (data > 0.001)
        c = out[nz] / data[nz]  # background: one scale factor (scale_for_simulation), values kept
        assert np.allclose(c, c[0], rtol=1e-4)
        assert (out[~bg] > FOREGROUND * c[0]).all()  # tissue stays tissue: the head mask is kept
        med = [float(np.median(out[m])) for m in masks]
        assert max(med) - min(med) > 0.3  # a contrast, not a flat image
        order = tuple(np.argsort(med))
        orders.add(order)
        seen_nonmonotone |= order != (0, 1, 2)
    assert seen_nonmonotone and len(orders) >= 3  # T1w-like order not kept: T2w/FLAIR-like orders occur
    a, _ = render_tissues(data, np.random.default_rng(3))
    b, _ = render_tissues(data, np.random.default_rng(3))
    c, _ = render_tissues(data, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_render_keeps_within_tissue_texture_without_amplifying_it():
    from scipy import ndimage as ndi

    data, masks = _three_tissues()
    inner = [ndi.binary_erosion(m, iterations=2) for m in masks]  # away from the partial-volume boundaries
    for seed in range(8):
        out, _ = render_tissues(data, np.random.default_rng(seed))
        for m in inner:
            # the per-voxel texture of a tissue is a scaled copy (correlation ~1, never folded), scaled by at most
            # the slope limit (the volume's own noise must not become a noise artifact)
            r = np.corrcoef(data[m], out[m])[0, 1]
            assert r > 0.95
            scale_ratio = out[m].std() / data[m].std()
            assert scale_ratio < 3.5


# ------------------------------------------------------------------------------------------ pairs
@pytest.mark.parametrize("artifact", ["noise", "ghosting", "bias", "anisotropy", "motion", "mix"])
def test_twins_carry_the_same_artifact_on_two_renderings(artifact):
    data, _ = _three_tissues()
    v = _CleanVolume("head", data, (2.0, 2.0, 2.0))
    ea, eb, info = make_twin_entries(v, artifact, 0.6, 5, _CFG)
    pa, pb = info["params"]
    assert pa["seed"] == pb["seed"] == info["sim_seed"] and pa["artifact"] == pb["artifact"] == artifact
    assert pa["severity"] == pb["severity"] == 0.6
    assert torch.equal(ea["targets"], eb["targets"]) and ea["severity"] == eb["severity"]
    # the physical parameters and random draws agree; they may differ by the simulator's normalisation over the
    # head mask (bias field std, motion rms), whose partial-volume border moves by a voxel between renderings
    for key in pa:
        if key in ("components", "achieved_rms_mm"):
            continue
        a, b = pa[key], pb[key]
        if isinstance(a, (int, float, list)) and not isinstance(a, bool):
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=0.02, atol=1e-6, err_msg=key)
        else:
            assert a == b, key
    assert [c["artifact"] for c in pa["components"]] == [c["artifact"] for c in pb["components"]]
    # same planes, different renderings
    assert np.array_equal(ea["axis"], eb["axis"]) and ea["clean"].shape == eb["clean"].shape
    assert not torch.equal(ea["clean"], eb["clean"]) and not torch.equal(ea["corrupt"], eb["corrupt"])
    assert "render" in ea["augment"] and ea["augment"] != eb["augment"]


def test_twin_artifact_is_the_same_field_on_both_renderings():
    """Bias is a multiplicative field: corrupted / clean must be the same field on both renderings."""
    data, masks = _three_tissues()
    v = _CleanVolume("head", data, (2.0, 2.0, 2.0))
    seen = {}

    def spy(d, artifact, severity, seed, spacing):
        from artifactqc import simulate

        out, p = simulate.simulate_volume(d, artifact, severity, seed=seed, spacing=spacing)
        seen.setdefault("fields", []).append(out / np.maximum(d, 1e-6))
        seen.setdefault("data", []).append(d)
        return out, p

    make_twin_entries(v, "bias", 0.8, 2, _CFG, sim_fn=spy, mask=0.0, resample=0.0)
    fa, fb = seen["fields"]
    inside = masks[1] | masks[2]
    assert not np.allclose(seen["data"][0][inside], seen["data"][1][inside], rtol=0.05)
    assert np.std(fa[inside]) > 0.02  # a real field
    np.testing.assert_allclose(fa[inside], fb[inside], rtol=0.02)


def test_rank_pairs_share_anatomy_and_differ_in_severity():
    data, _ = _three_tissues()
    v = _CleanVolume("head", data, (2.0, 2.0, 2.0))
    lo, hi, info = make_rank_entries(v, "ghosting", (0.7, 0.2), 4, _CFG)
    assert (lo["severity"], hi["severity"]) == (0.2, 0.7)
    assert torch.equal(lo["clean"], hi["clean"]) and np.array_equal(lo["axis"], hi["axis"])
    pa, pb = info["params"]
    assert pa["seed"] == pb["seed"] and pa["axis"] == pb["axis"] and pa["num_ghosts"] == pb["num_ghosts"]
    assert pa["ghost_amplitude"] < pb["ghost_amplitude"]
    d_lo = (lo["corrupt"].float() - lo["clean"].float()).abs().mean()
    d_hi = (hi["corrupt"].float() - hi["clean"].float()).abs().mean()
    assert 0 < d_lo < d_hi


def test_pair_pool_makes_pairs_and_samples_the_same_planes():
    data, _ = _three_tissues()
    vols = [_CleanVolume("a", data, (2.0, 2.0, 2.0)), _CleanVolume("b", data[:, :, ::-1].copy(), (2.0, 2.0, 2.0))]
    aug = {"contrast": 0.0, "mask": 0.0, "resample": 0.0}
    pool = _PairPool(vols, _CFG, 30, 0, _toy_sim, aug, render_pairs=0.5, rank_pairs=0.5)
    assert pool.fill(8) >= 8 and len(pool.entries) == pool.made
    kinds = {p[0] for p in pool.pairs}
    assert kinds == {"twin", "rank"} and 2 * len(pool.pairs) == len(pool.entries)
    x, sev, tgt = pool.sample_pairs("rank", 8, 4, torch.Generator().manual_seed(0))
    assert len(x) == 2 and x[0].shape[0] == 8 and (sev[:, 0] < sev[:, 1]).all()
    assert tgt.shape == (2, 2, 5) and (tgt[:, 0, 0] < tgt[:, 1, 0]).all()  # the toy simulator's noise head rises
    x, sev, _ = pool.sample_pairs("twin", 4, 4, torch.Generator().manual_seed(0))
    assert len(x) == 4 and all(t.shape[0] == 4 for t in x)
    assert (x[2] > 0.05).eq(x[3] > 0.05).float().mean() > 0.95  # clean A / B: the same planes (same head mask)
    # FIFO: beyond the capacity old pairs leave together with their entries
    small = _PairPool(vols, _CFG, 4, 1, _toy_sim, aug, render_pairs=1.0)
    small.fill(10)
    assert len(small.entries) == 4 and len(small.pairs) == 2
    assert all(any(e is p[1] for e in small.entries) for p in small.pairs)


# ------------------------------------------------------------------------------------------ losses
def _outs(score, logits):
    return {"score": score, "severity_logits": logits}


def test_consistency_loss_zero_when_equal_positive_otherwise_with_gradients():
    torch.manual_seed(0)
    s = torch.rand(6, requires_grad=True)
    lg = torch.randn(6, 5, requires_grad=True)
    assert float(consistency_loss(_outs(s, lg), _outs(s.detach().clone(), lg.detach().clone())).detach()) == 0.0
    s2 = (s.detach() + 0.3).requires_grad_(True)
    loss = consistency_loss(_outs(s, lg), _outs(s2, lg.detach() + 1.0))
    assert float(loss) == pytest.approx(0.09 + float((torch.sigmoid(lg + 1) - torch.sigmoid(lg)).pow(2).mean()),
                                        rel=1e-5)
    loss.backward()
    assert s.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0 and lg.grad.abs().sum() > 0


def test_ranking_loss_is_zero_when_ordered_by_the_margin_and_ignores_offsets():
    sev_lo, sev_hi = torch.tensor([0.2, 0.1]), torch.tensor([0.6, 0.9])
    need = SCORE_SCALE * (sev_hi - sev_lo) * 0.5  # 0.4, 0.8
    planes = 3
    base = torch.tensor([0.3, 1.7]).repeat_interleave(planes)  # per-volume offsets
    ok_hi = base + (need + 0.01).repeat_interleave(planes)
    assert float(ranking_loss(base, ok_hi, sev_lo, sev_hi, planes, 0.5)) == 0.0
    s_lo = base.clone().requires_grad_(True)
    s_hi = (base + 0.1).requires_grad_(True)  # ordered, but by less than the margin
    loss = ranking_loss(s_lo, s_hi, sev_lo, sev_hi, planes, 0.5)
    assert float(loss) == pytest.approx(float(((need - 0.1).clamp(min=0)).mean()), rel=1e-5)
    loss.backward()
    assert (s_hi.grad < 0).all() and (s_lo.grad > 0).all()
    # an offset common to both members changes nothing; reversed order costs more
    assert float(ranking_loss(base + 5, ok_hi + 5, sev_lo, sev_hi, planes, 0.5)) == 0.0
    assert float(ranking_loss(ok_hi, base, sev_lo, sev_hi, planes, 0.5)) > float(loss)


def test_head_ranking_counts_only_the_heads_whose_severity_rises():
    planes = 2
    t_lo = torch.tensor([[0.2, 0.0, 0.0, 0.0, 0.0]])
    t_hi = torch.tensor([[0.8, 0.0, 0.0, 0.0, 0.0]])  # only the first head's severity rises
    lo = torch.zeros(planes, 5)
    hi = torch.zeros(planes, 5)
    hi[:, 0] = 3.0  # p 0.5 -> 0.95: rises by more than 0.5 * 0.6
    hi[:, 1:] = -4.0  # the other heads fall: not ranked (their severity did not rise)
    assert float(head_ranking_loss(lo, hi, t_lo, t_hi, planes, 0.5)) == 0.0
    hi_bad = hi.clone().requires_grad_(True)
    with torch.no_grad():
        hi_bad[:, 0] = 0.2  # p rises by 0.05 only
    loss = head_ranking_loss(lo, hi_bad, t_lo, t_hi, planes, 0.5)
    assert float(loss) == pytest.approx(0.3 - (float(torch.sigmoid(torch.tensor(0.2))) - 0.5), rel=1e-5)
    loss.backward()
    assert hi_bad.grad[:, 0].lt(0).all() and hi_bad.grad[:, 1:].eq(0).all()
    assert float(head_ranking_loss(lo, hi, t_lo, t_lo, planes, 0.5)) == 0.0  # nothing rises: no term


def test_pair_settings_are_checked():
    with pytest.raises(ValueError, match="render_pairs"):
        TrainConfig(render_pairs=1.5)
    with pytest.raises(ValueError, match="at most 1"):
        TrainConfig(render_pairs=0.6, rank_pairs=0.6)
    with pytest.raises(ValueError, match="pair_planes"):
        TrainConfig(rank_pairs=0.3, pair_planes=0)
    assert not TrainConfig().pairs and TrainConfig(rank_pairs=0.2).pairs


# ------------------------------------------------------------------------------------------ training
def test_training_with_pairs_runs_records_and_is_deterministic(tmp_path, toy_cohort):  # noqa: F811
    paths, _ = toy_cohort
    kw = dict(epochs=2, val_volumes=[str(paths[0])], render_pairs=1.0, consistency=2.0, rank=1.5, rank_margin=0.7,
              pair_batch=0.5, pair_planes=2, pool_refresh=2)
    m1 = _train(tmp_path / "p1", paths, **kw)
    m2 = _train(tmp_path / "p2", paths, **kw)
    info = json.loads((tmp_path / "p1" / "model.json").read_text())["training"]
    hp = info["hyperparameters"]
    assert (hp["render_pairs"], hp["rank_pairs"], hp["consistency"], hp["rank"], hp["rank_margin"],
            hp["pair_batch"], hp["pair_planes"]) == (1.0, 0.0, 2.0, 1.5, 0.7, 0.5, 2)
    made = info["pairs"]
    assert made["twin"]["entries"] == m1["n_corrupted_volumes"] > 0 and made["single"]["entries"] == 0
    assert all(e["train_consistency"] > 0 and math.isfinite(e["train_loss"]) for e in info["epochs"])
    sha = lambda d: io.sha256_file(tmp_path / d / "encoder.safetensors")  # noqa: E731
    assert sha("p1") == sha("p2") and m1["best_val_loss"] == m2["best_val_loss"]
    # the paired loss reaches the weights: without its weight (same pool, same batches) they differ
    _train(tmp_path / "c0", paths, **{**kw, "consistency": 0.0})
    assert sha("c0") != sha("p1")


def test_training_with_ranking_pairs_uses_the_ranking_loss(tmp_path, toy_cohort):  # noqa: F811
    paths, _ = toy_cohort
    kw = dict(epochs=1, val_volumes=[str(paths[0])], rank_pairs=1.0, rank_margin=1.0, pool_refresh=2)
    m = _train(tmp_path / "r1", paths, **kw)
    _train(tmp_path / "r0", paths, **{**kw, "rank": 0.0})
    mh = _train(tmp_path / "rh", paths, **{**kw, "rank_heads": 1.0})
    info = json.loads((tmp_path / "r1" / "model.json").read_text())["training"]
    assert m["pairs"]["rank"]["entries"] == m["n_corrupted_volumes"] and info["hyperparameters"]["rank_pairs"] == 1.0
    assert "train_rank" in info["epochs"][0] and "train_consistency" not in info["epochs"][0]
    assert "train_rank_heads" not in info["epochs"][0] and mh["final"]["train_rank_heads"] >= 0
    sha = lambda d: io.sha256_file(tmp_path / d / "encoder.safetensors")  # noqa: E731
    assert sha("r1") != sha("r0") and sha("rh") != sha("r1")


def test_pairs_off_is_the_default_training(tmp_path, toy_cohort):  # noqa: F811
    """With both fractions 0 the weights are bit-identical to the default run, whatever the pair weights."""
    paths, _ = toy_cohort
    _train(tmp_path / "d", paths, epochs=2, val_volumes=[str(paths[0])])
    _train(tmp_path / "o", paths, epochs=2, val_volumes=[str(paths[0])], render_pairs=0.0, rank_pairs=0.0,
           consistency=3.0, rank=2.0, pair_batch=1.0)
    on = _train(tmp_path / "on", paths, epochs=2, val_volumes=[str(paths[0])], render_pairs=0.5)
    sha = lambda d: io.sha256_file(tmp_path / d / "encoder.safetensors")  # noqa: E731
    assert sha("d") == sha("o") and sha("on") != sha("d")
    assert "pairs" not in json.loads((tmp_path / "d" / "model.json").read_text())["training"]
    assert on["pairs"]["twin"]["entries"] > 0
