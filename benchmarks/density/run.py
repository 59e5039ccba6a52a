"""Benchmark of artifactqc.density: τ-flag sensitivity/specificity on synthetic latents with 5 % planted
outliers, and flow fit time for N = 1k, 10k, 100k on CPU.

Inliers: a k-dimensional, non-Gaussian cloud (mixture of three correlated Gaussians, one curved "banana"
component). Outliers (5 %): two kinds, half each — "far" (inlier-like draws pushed 4–6 sd out along a
random direction) and "broad" (draws from an isotropic Gaussian 2.5× wider than the cloud; some land
inside it, as real mild artifacts do). The reference is the whole contaminated set (as in the workflow,
where the reference manifest is not curated), so τ = 5 can at best flag about 5 % of all volumes.
For context the same metrics are reported for an oracle that ranks by the true inlier density.

Usage:  python benchmarks/density/run.py [--quick] [--threads 1] [--out benchmarks/density]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import multivariate_normal as mvn

from artifactqc.density import fit as FIT
from artifactqc.density import flags as FLAGS
from artifactqc.density import flow as FLOW


def make_inliers(n, k, rng):
    comps = []
    means = [np.r_[-2.0, 0.0, np.zeros(k - 2)], np.r_[2.0, 1.0, np.zeros(k - 2)], np.r_[0.0, -2.5, np.ones(k - 2)]]
    covs = []
    for j in range(3):
        a = rng.normal(size=(k, k)) * 0.3
        covs.append(np.eye(k) * 0.6 + a @ a.T)
    w = np.array([0.4, 0.35, 0.25])
    lab = rng.choice(3, size=n, p=w)
    x = np.empty((n, k))
    for j in range(3):
        m = lab == j
        x[m] = rng.multivariate_normal(means[j], covs[j], m.sum())
    # banana twist on component 0: x1 += 0.3 * x0^2
    m = lab == 0
    x[m, 1] += 0.3 * (x[m, 0] + 2.0) ** 2 - 0.6
    params = (means, covs, w)
    return x, params


def inlier_logpdf(x, params):
    means, covs, w = params
    x = x.copy()
    # undo the banana for component 0 (volume preserving: Jacobian 1)
    x0 = x.copy()
    x0[:, 1] -= 0.3 * (x0[:, 0] + 2.0) ** 2 - 0.6
    p = w[0] * mvn(means[0], covs[0]).pdf(x0)
    p += w[1] * mvn(means[1], covs[1]).pdf(x) + w[2] * mvn(means[2], covs[2]).pdf(x)
    return np.log(p + 1e-300)


def make_outliers(n, k, inl, rng):
    n_far = n // 2
    mu, sd = inl.mean(0), inl.std(0)
    d = rng.normal(size=(n_far, k))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    far = inl[rng.choice(len(inl), n_far)] + d * sd * rng.uniform(4, 6, (n_far, 1))
    broad = mu + rng.normal(size=(n - n_far, k)) * sd * 2.5
    return np.vstack([far, broad])


def sens_spec(flag, is_out):
    tp = np.sum(flag & is_out)
    tn = np.sum(~flag & ~is_out)
    return float(tp / is_out.sum()), float(tn / (~is_out).sum())


def detection(n, k, seed, fit_kw):
    rng = np.random.default_rng(seed)
    n_out = max(1, int(round(0.05 * n)))
    inl, params = make_inliers(n - n_out, k, rng)
    out = make_outliers(n_out, k, inl, rng)
    x = np.vstack([inl, out])
    is_out = np.r_[np.zeros(len(inl), bool), np.ones(n_out, bool)]
    t0 = time.perf_counter()
    f = FIT.fit_flow(x, seed=seed, **fit_kw)
    fit_s = time.perf_counter() - t0
    ld = f.log_density(x)
    pct = FLOW.density_percentiles(ld, ld)
    oracle = FLOW.density_percentiles(inlier_logpdf(x, params), inlier_logpdf(x, params))
    row = {"n": n, "k": k, "seed": seed, "fit_seconds": round(fit_s, 2), "epochs_run": f.metrics["epochs_run"],
           "steps": f.metrics["steps"], "noise_std": round(f.metrics["noise_std_used"], 4)}
    for tau in (5, 3):
        fl = FLAGS.tau_flags(pct, (tau,))[FLAGS.tau_column(tau)]
        fo = FLAGS.tau_flags(oracle, (tau,))[FLAGS.tau_column(tau)]
        row[f"sens_tau{tau}"], row[f"spec_tau{tau}"] = sens_spec(fl, is_out)
        row[f"oracle_sens_tau{tau}"], row[f"oracle_spec_tau{tau}"] = sens_spec(fo, is_out)
    # rank agreement with the true inlier density on inliers (how well the flow learnt the shape)
    from scipy.stats import spearmanr

    row["spearman_vs_true_logpdf"] = float(spearmanr(ld[~is_out], inlier_logpdf(x, params)[~is_out])[0])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    rows = []
    det_cases = [(30, 4, s) for s in range(5)] + [(1000, 4, 0), (1000, 8, 0), (10000, 4, 0)]
    time_cases = [(1000, 4), (10000, 4), (100000, 4)]
    if a.quick:
        det_cases, time_cases = [(30, 4, 0), (1000, 4, 0)], [(1000, 4)]
    for n, k, s in det_cases:
        r = detection(n, k, s, {})
        r["kind"] = "detection"
        print(json.dumps(r), flush=True)
        rows.append(r)
    for n, k in time_cases:
        if any(r["n"] == n and r["k"] == k and r["seed"] == 0 for r in rows):
            continue
        r = detection(n, k, 0, {})
        r["kind"] = "timing"
        print(json.dumps(r), flush=True)
        rows.append(r)
    meta = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": a.threads,
            "machine": platform.machine(), "note": "measured on a shared, loaded 2-core machine",
            "fit_defaults": {k: v for k, v in FLOW.FlowConfig(features=0).__dict__.items() if k != "features"}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| N | k | seed | fit s | epochs | steps | sens τ5 | spec τ5 | sens τ3 | spec τ3 | oracle sens/spec τ5 | oracle sens/spec τ3 | ρ(flow, true) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['k']} | {r['seed']} | {r['fit_seconds']} | {r['epochs_run']} | {r['steps']} | "
            f"{r['sens_tau5']:.3f} | {r['spec_tau5']:.3f} | {r['sens_tau3']:.3f} | {r['spec_tau3']:.3f} | "
            f"{r['oracle_sens_tau5']:.3f}/{r['oracle_spec_tau5']:.3f} | {r['oracle_sens_tau3']:.3f}/{r['oracle_spec_tau3']:.3f} | "
            f"{r['spearman_vs_true_logpdf']:.3f} |"
        )
    (out / "results_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
