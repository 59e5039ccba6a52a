"""Tests of the flow density stage: accuracy against analytical densities, standardisation log-det,
determinism, safetensors round trip, percentile / flag / rule logic on hand-made arrays."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import multivariate_normal as mvn
from scipy.stats import percentileofscore

from artifactqc.density import fit as FIT
from artifactqc.density import flags as FLAGS
from artifactqc.density import flow as FLOW

torch.set_num_threads(1)

# a 2D mixture of two Gaussians, in "raw" latent units (scaled and shifted so the standardisation matters)
M1, M2 = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
C1, C2 = np.array([[1.0, 0.5], [0.5, 1.0]]), np.array([[0.5, 0.0], [0.0, 0.3]])
SCALE, SHIFT = np.array([10.0, 0.2]), np.array([5.0, -3.0])
FAST = dict(hidden=(32, 32), epochs=150, patience=25, batch_size=256)


def _mixture_sample(n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.random(n) < 0.5
    u = np.where(w[:, None], rng.multivariate_normal(M1, C1, n), rng.multivariate_normal(M2, C2, n))
    return u * SCALE + SHIFT


def _mixture_logpdf(x):
    u = (x - SHIFT) / SCALE
    return np.log(0.5 * mvn(M1, C1).pdf(u) + 0.5 * mvn(M2, C2).pdf(u)) - np.log(SCALE).sum()


@pytest.fixture(scope="module")
def mixture_flow():
    x = _mixture_sample(1200, seed=0)
    return x, FIT.fit_flow(x, seed=0, **FAST)


def test_mixture_log_density_matches_analytical(mixture_flow):
    _, f = mixture_flow
    u = np.stack(np.meshgrid(np.linspace(-4, 4, 40), np.linspace(-2, 3, 40)), -1).reshape(-1, 2)
    g = u * SCALE + SHIFT
    true = _mixture_logpdf(g)
    est = f.log_density(g)
    # compare where the true density is within e^-4 of its mode (where the data are)
    sel = true > true.max() - 4
    assert sel.sum() > 200
    r = np.corrcoef(true[sel], est[sel])[0, 1]
    mae = np.abs(true[sel] - est[sel]).mean()
    assert r > 0.9, r
    assert mae < 0.45, mae


def test_density_integrates_to_one_in_original_space(mixture_flow):
    # independent check of the standardisation log-det: without -Σlog sd the integral would be ~ 1/(10·0.2·…)
    _, f = mixture_flow
    ax0 = np.linspace(-8, 8, 161) * SCALE[0] + SHIFT[0]
    ax1 = np.linspace(-5, 6, 161) * SCALE[1] + SHIFT[1]
    g = np.stack(np.meshgrid(ax0, ax1, indexing="ij"), -1).reshape(-1, 2)
    dens = np.exp(f.log_density(g)).reshape(161, 161)
    integral = np.trapezoid(np.trapezoid(dens, ax1, axis=1), ax0)
    assert abs(integral - 1.0) < 0.05, integral
    assert f.log_standardisation_det() == pytest.approx(-np.log(f.sd).sum())
    assert np.allclose(f.sd, SCALE * _mixture_sample(1200, 0).std(0) / SCALE)


def test_affine_change_of_latents_shifts_log_density_by_log_det():
    # an affine map of the latents leaves the standardised data (hence the fit) nearly unchanged,
    # so log p must change by exactly -Σ log|a| up to float32 training noise
    x = _mixture_sample(300, seed=3)
    a, b = np.array([3.0, 0.25]), np.array([-7.0, 100.0])
    f1 = FIT.fit_flow(x, seed=1, hidden=(16, 16), epochs=30, patience=30)
    f2 = FIT.fit_flow(x * a + b, seed=1, hidden=(16, 16), epochs=30, patience=30)
    q = x[:50]
    diff = f2.log_density(q * a + b) - f1.log_density(q)
    assert np.allclose(diff, -np.log(a).sum(), atol=0.05), (diff.mean(), -np.log(a).sum())


def test_deterministic_for_a_seed_and_global_rng_untouched():
    x = np.random.default_rng(5).normal(size=(30, 4))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    f1 = FIT.fit_flow(x, seed=7, hidden=(16, 16), epochs=40)
    after = torch.rand(1)
    assert torch.equal(before, after)  # fit did not consume the global torch RNG
    f2 = FIT.fit_flow(x, seed=7, hidden=(16, 16), epochs=40)
    f3 = FIT.fit_flow(x, seed=8, hidden=(16, 16), epochs=40)
    np.testing.assert_array_equal(f1.log_density(x), f2.log_density(x))
    assert f1.flow_id == f2.flow_id
    assert not np.array_equal(f1.log_density(x), f3.log_density(x))


def test_small_cohort_ranks_planted_outlier_lowest():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(24, 4))
    f = FIT.fit_flow(x, seed=0, epochs=200)
    assert f.metrics["n_val"] >= 2 and f.metrics["noise_std_used"] > 0
    ld_in = f.log_density(rng.normal(size=(200, 4)))
    ld_out = f.log_density(np.full((1, 4), 5.0))
    assert np.isfinite(ld_in).all()
    assert ld_out[0] < np.percentile(ld_in, 1)
    # held-out NLL should be in the same range as that of the true N(0, I) (≈ 5.68 nats for k=4)
    true_nll = -mvn(np.zeros(4), np.eye(4)).logpdf(rng.normal(size=(2000, 4))).mean()
    est_nll = -f.log_density(rng.normal(size=(2000, 4))).mean()
    assert est_nll < true_nll + 1.5


def test_refuses_nan_latents_and_tiny_reference():
    x = np.random.default_rng(0).normal(size=(20, 3))
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match="status != 'ok'"):
        FIT.fit_flow(x)
    with pytest.raises(ValueError, match="at least"):
        FIT.fit_flow(np.zeros((3, 2)))


def test_save_load_round_trip(tmp_path):
    x = np.random.default_rng(2).normal(size=(40, 3)) * 4 + 1
    f = FIT.fit_flow(x, seed=0, hidden=(16, 16), epochs=20, reference_sha256="ab" * 32, latent_columns=["latent_0", "latent_1", "latent_2"])
    f.save(tmp_path / "flow")
    meta = json.loads((tmp_path / "flow" / "flow.json").read_text())
    for key in ("flow_id", "config", "standardisation", "reference_manifest_sha256", "training_metrics",
                "reference_log_density_quantiles", "artifactqc_version", "weights_sha256"):
        assert key in meta, key
    import hashlib

    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "flow" / "flow.safetensors").read_bytes()).hexdigest()
    g = FLOW.load_flow(tmp_path / "flow")
    q = np.random.default_rng(3).normal(size=(100, 3))
    np.testing.assert_array_equal(f.log_density(q), g.log_density(q))
    np.testing.assert_array_equal(f.reference_log_density, g.reference_log_density)
    assert g.flow_id == f.flow_id and g.sha256 == meta["weights_sha256"]
    assert g.latent_columns == ["latent_0", "latent_1", "latent_2"]
    assert meta["reference_log_density_quantiles"]["q50"] == pytest.approx(np.median(f.reference_log_density))
    # tampering is detected
    b = bytearray((tmp_path / "flow" / "flow.safetensors").read_bytes())
    b[-1] ^= 0xFF
    (tmp_path / "flow" / "flow.safetensors").write_bytes(bytes(b))
    with pytest.raises(ValueError, match="sha256"):
        FLOW.load_flow(tmp_path / "flow")


def test_load_refuses_pickle(tmp_path):
    d = tmp_path / "pk"
    d.mkdir()
    torch.save({"a": torch.zeros(2)}, d / "flow.pt")
    with pytest.raises(ValueError, match="pickle"):
        FLOW.load_flow(d / "flow.pt")
    with pytest.raises(FileNotFoundError, match="pickle"):
        FLOW.load_flow(d)


def test_density_percentiles_hand_made():
    ref = [3.0, 1.0, 4.0, 2.0]
    v = [0.0, 1.0, 2.5, 4.0, 5.0, np.nan]
    got = FLOW.density_percentiles(ref, v)
    np.testing.assert_allclose(got[:5], [0.0, 12.5, 50.0, 87.5, 100.0])
    assert np.isnan(got[5])
    # ties count half: identical to scipy's percentileofscore(kind="mean")
    ref2 = np.array([1, 2, 2, 2, 3, 5, 5, 8], float)
    for s in (0, 1, 2, 2.5, 5, 8, 9):
        assert FLOW.density_percentiles(ref2, [s])[0] == pytest.approx(percentileofscore(ref2, s, kind="mean"))


def test_tau_flags_hand_made():
    fl = FLAGS.tau_flags([2.0, 3.0, 4.9, 5.0, np.nan, 50.0], taus=(5, 3, 2.5))
    assert set(fl) == {"flag_tau5", "flag_tau3", "flag_tau2.5"}
    assert fl["flag_tau5"].tolist() == [True, True, True, False, False, False]
    assert fl["flag_tau3"].tolist() == [True, False, False, False, False, False]
    assert fl["flag_tau2.5"].tolist() == [True, False, False, False, False, False]
    with pytest.raises(ValueError):
        FLAGS.tau_flags([1.0], taus=(0,))


def test_site_percentiles_with_pooled_fallback():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 25)
    b = rng.normal(-3, 1, 4)
    df = pd.DataFrame({"site": ["A"] * 25 + ["B"] * 4 + ["A"], "log_density": np.r_[a, b, np.nan]})
    df["in_reference"] = True
    df.loc[3, "in_reference"] = False  # a non-reference volume of A
    out = FLAGS.site_percentiles(df, "site", min_site_reference=20)
    ref_a = np.delete(a, 3)
    for i in range(25):
        assert out["density_pct_site"][i] == pytest.approx(percentileofscore(ref_a, a[i], kind="mean"))
        assert out["pct_scope"][i] == "site"
    pooled = np.r_[ref_a, b]
    for j in range(4):
        assert out["density_pct_site"][25 + j] == pytest.approx(percentileofscore(pooled, b[j], kind="mean"))
        assert out["pct_scope"][25 + j] == "pooled"
    assert np.isnan(out["density_pct_site"][29])


def test_combine_flags_rules():
    df = pd.DataFrame(
        {
            "score": [0.5, 1.5, 0.5, 1.5, np.nan, 1.0],
            "flag_tau5": [False, False, True, True, False, True],
            "flag_tau3": [False, False, False, True, False, False],
        }
    )
    truth = {
        "score": [0, 1, 0, 1, 0, 0],
        "tau5": [0, 0, 1, 1, 0, 1],
        "tau3": [0, 0, 0, 1, 0, 0],
        "score_or_tau5": [0, 1, 1, 1, 0, 1],
        "score_and_tau5": [0, 0, 0, 1, 0, 0],
        "score_or_tau3": [0, 1, 0, 1, 0, 0],
        "score_and_tau3": [0, 0, 0, 1, 0, 0],
    }
    assert set(truth) == set(FLAGS.FLAG_RULES)
    for rule, want in truth.items():
        got = FLAGS.combine_flags(df, rule)
        assert got.dtype == bool and got.tolist() == [bool(w) for w in want], rule
    assert FLAGS.combine_flags(df).tolist() == [bool(w) for w in truth["score_or_tau5"]]
    with pytest.raises(ValueError, match="allowed: score, tau5"):
        FLAGS.combine_flags(df, "score_or_tau")
    with pytest.raises(ValueError, match="flag_tau10"):
        FLAGS.combine_flags(df, "tau10")


def test_score_table_and_cli(tmp_path):
    rng = np.random.default_rng(4)
    n = 30
    df = pd.DataFrame({"volume_id": [f"v{i:02d}" for i in range(n)], "site": ["S1"] * 15 + ["S2"] * 15,
                       "status": ["ok"] * (n - 1) + ["failed"], "score": rng.uniform(0, 1.2, n)})
    lat = rng.normal(size=(n, 3))
    lat[-1] = np.nan
    for j in range(3):
        df[f"latent_{j}"] = lat[:, j]
    src = tmp_path / "scores.parquet"
    df.to_parquet(src)
    from artifactqc.cli import main

    assert main(["fit-flow", "--scores", str(src), "--out", str(tmp_path / "flow"), "--epochs", "20"]) == 0
    f = FLOW.load_flow(tmp_path / "flow")
    assert len(f.reference_log_density) == n - 1
    out = FLAGS.score_table(df, f, taus=(5, 3))
    assert np.isnan(out.loc[n - 1, "log_density"]) and not out.loc[n - 1, "flagged"]
    ok = out.iloc[: n - 1]
    np.testing.assert_allclose(ok["density_pct"], FLOW.density_percentiles(ok["log_density"], ok["log_density"]))
    # the reference ranked against itself: exactly the volumes below the 5th percentile are flagged
    expect5 = (np.argsort(np.argsort(ok["log_density"].to_numpy())) + 0.5) / (n - 1) * 100 < 5
    assert ok["flag_tau5"].tolist() == expect5.tolist()
    assert out["flagged"].tolist() == ((out["score"] > 1) | out["flag_tau5"]).where(out["status"] == "ok", False).tolist()
    assert (out["flow_sha256"] == f.sha256).all()
    per_site = FLAGS.score_table(df, f, per_site=True, min_site_reference=10)
    assert set(per_site["pct_scope"]) == {"site"}
