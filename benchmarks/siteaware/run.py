"""Site-aware score benchmark (issue 16, item 4): raw vs site-aware flag rules on a simulated multi-site cohort.

The cohort is built from real volumes of ``../shared/data`` (deterministic, seed 0); each site has its own
"scanner" (an intensity/contrast transfer, a noise floor, a resolution) and every scan a small draw of its
own (gamma, noise), and about 10 % of the scans of sites A-D are corrupted with the simulator (a random type of
the five, SS U(0.5, 1), type-mean calibration):

* ``A_hammersmith``: the 20 IXI T1w volumes as stored + 10 redraws (30 scans)
* ``B_noisyscanner``: IXI volumes through a noisier, softer protocol (Rician noise floor, slight blur,
  gamma 0.8): 30 scans whose clean scores sit above A's
* ``C_clinical2d``: the 21 clinical 2D scans (Ljubljana, 3-4 mm slices) + 9 redraws (30 scans): clean scores
  well above the 3D sites'
* ``D_mixed3d``: 12 3D volumes of 12 other sources: fewer than ``min_reference`` = 20, so the pooled basis
* ``E_allbad``: 24 IXI-based scans (its own basis), every one corrupted (SS U(0.5, 1)): must still be flagged, through the raw
  score (relative to itself the site looks normal)

Every scan is scored with an encoder (``--model``), a density flow is fit on the latents of every scan (the
workflow's default reference manifest = every ingested volume) and the flag rules are evaluated as the
workflow does (``density.score_table``, ``sitescore.add_site_scores``). Reported: sensitivity / specificity of
each rule overall, per site, and the share of E flagged; the AUROC of the raw and the site-aware score.

    python benchmarks/siteaware/run.py --model benchmarks/crosssite/cache/ixi/proxy/model

The scored cohort is cached (``cache/cohort-<model sha>.parquet``, gitignored); results.md/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/_harness.py, benchmarks/encoder_eval.py
import _harness as H  # noqa: E402
from encoder_eval import TYPES, auroc, canon_norm, score_array  # noqa: E402

log = logging.getLogger("bench.siteaware")
SITE_MIN_REFERENCE = 20
SITE_MIN_SCALE = 0.1
SITE_THRESHOLD = 3.0
SCORE_THRESHOLD = 1.0
RULES = ("score", "score_or_tau5", "site", "score_or_site", "score_or_site_or_tau5", "site_or_tau5")
OTHER_3D = ["volumes/VolumeRenderingData/stroke_T1.nii.gz", "volumes/VolumeRenderingData/stroke_T2.nii.gz",
            "volumes/VolumeRenderingData/stroke_FLAIR.nii.gz", "volumes/py_synthsr/synthsr_example_FLAIR.nii.gz",
            "volumes/T2lesion/arc_M2265_T2w.nii.gz", "volumes/coreg_qa/coreg_qa_highres_brain.nii.gz",
            "volumes/niivue-images/chris_t1.nii.gz", "volumes/VolumeRenderingData/seg3D_MR.nii.gz",
            "volumes/dcm_qa_xa30/xa30_s5_anat-T1w_acq-tfl.nii.gz", "volumes/dcm_qa_xa30/xa30_s6_anat-T1w_acq-tfl.nii.gz",
            "volumes/niivue-demo-images/register_T1_head_ext2.nii.gz", "templates/mricron_ch2.nii.gz"]



def cohort_plan(data: Path, seed: int = 0) -> list[dict]:
    """One dict per scan: site, base volume, scanner, redraw seed, corruption (or none)."""
    rng = np.random.default_rng(seed)
    ixi = sorted(str(p.relative_to(data)) for p in (data / "volumes").glob("NiChart*/*.nii.gz"))
    oms = sorted(str(p.relative_to(data)) for p in (data / "volumes" / "open_ms_data").glob("*.nii.gz"))
    plan = []

    def site(name, bases, scanner, n, frac_bad):
        picks = list(bases) + [bases[i] for i in rng.integers(0, len(bases), max(0, n - len(bases)))]
        picks = picks[:n]
        bad = set(rng.choice(n, size=int(round(frac_bad * n)), replace=False).tolist()) if frac_bad < 1 else set(range(n))
        for i, b in enumerate(picks):
            plan.append({"site": name, "volume_id": f"{name}-{i:02d}", "base": b, "scanner": scanner,
                         "draw_seed": int(rng.integers(1 << 30)), "artifact": str(rng.choice(TYPES)) if i in bad else "none",
                         "severity": float(np.round(rng.uniform(0.5, 1.0), 2)) if i in bad else 0.0})

    site("A_hammersmith", ixi, "as_stored", 30, 0.1)
    site("B_noisyscanner", ixi, "noisy_soft", 30, 0.1)
    site("C_clinical2d", oms, "as_stored", 30, 0.1)
    site("D_mixed3d", OTHER_3D, "as_stored", 12, 0.1)
    site("E_allbad", ixi, "bright", 24, 1.0)
    return plan


def render(d: np.ndarray, scanner: str, rng: np.random.Generator, redraw: bool) -> np.ndarray:
    """The site's protocol and the scan's own draw on a ~[0, 1] volume."""
    from scipy.ndimage import gaussian_filter

    x = np.clip(d, 0, None).astype(np.float32)
    if scanner == "noisy_soft":
        x = gaussian_filter(x, 0.5) ** 0.8
        s = 0.025
        x = np.sqrt((x + s * rng.standard_normal(x.shape)) ** 2 + (s * rng.standard_normal(x.shape)) ** 2)
    elif scanner == "bright":
        x = x ** 1.2
    if redraw:  # another scan of the protocol: its own gamma and a faint noise floor
        x = np.clip(x, 0, None) ** rng.uniform(0.9, 1.1)
        s = rng.uniform(0.0, 0.006)
        if s > 0:
            x = np.sqrt((x + s * rng.standard_normal(x.shape)) ** 2 + (s * rng.standard_normal(x.shape)) ** 2)
    return x.astype(np.float32)


def score_cohort(data: Path, model_dir: Path, threads: int):
    import pandas as pd
    import torch

    from artifactqc import io
    from artifactqc.encoder.checkpoint import load_model
    from artifactqc.simulate import simulate_volume

    torch.set_num_threads(threads)
    model = load_model(model_dir, device="cpu")
    rows, seen = [], set()
    t0 = time.perf_counter()
    for p in cohort_plan(data):
        rng = np.random.default_rng(p["draw_seed"])
        d, a = canon_norm(data / p["base"])
        key = (p["site"], p["base"])
        x = render(d, p["scanner"], rng, redraw=key in seen)
        seen.add(key)
        if p["artifact"] != "none":
            x, _ = simulate_volume(x, p["artifact"], p["severity"], seed=p["draw_seed"] % 100000,
                                   spacing=tuple(float(z) for z in io.voxel_sizes(a)))
        rows.append(p | {"status": "ok"} | score_array(model, x, a))
        log.info("%s %s %s %.1f -> %.3f (%.0f s)", p["volume_id"], Path(p["base"]).name, p["artifact"],
                 p["severity"], rows[-1]["score"], time.perf_counter() - t0)
    return pd.DataFrame(rows)


def evaluate(df) -> dict:
    from artifactqc import sitescore as S
    from artifactqc.density import flags as D
    from artifactqc.density.fit import fit_flow_from_table

    flow = fit_flow_from_table(df, seed=0, device="cpu")
    scored = D.score_table(df, flow, taus=(5, 3), rule="score", score_threshold=SCORE_THRESHOLD)
    scored = S.add_site_scores(scored, reference="all", min_reference=SITE_MIN_REFERENCE, min_scale=SITE_MIN_SCALE)
    bad = (scored["artifact"] != "none").to_numpy()
    res = {"settings": {"score_threshold": SCORE_THRESHOLD, "site_threshold": SITE_THRESHOLD,
                        "min_reference": SITE_MIN_REFERENCE, "min_scale": SITE_MIN_SCALE, "reference": "all",
                        "taus": [5, 3]},
           "n": int(len(scored)), "n_bad": int(bad.sum()),
           "n_bad_allbad_site": int((bad & (scored["site"] == "E_allbad").to_numpy()).sum()),
           "basis_by_site": scored.groupby("site")["score_site_basis"].first().to_dict(),
           "clean_median_by_site": scored[~bad].groupby("site")["score"].median().round(3).to_dict(),
           "rules": {}}
    notE = (scored["site"] != "E_allbad").to_numpy()
    for rule in RULES:
        f = D.combine_flags(scored, rule, score_threshold=SCORE_THRESHOLD, site_threshold=SITE_THRESHOLD).to_numpy()
        per_site = {}
        for s in sorted(scored["site"].unique()):
            m = (scored["site"] == s).to_numpy()
            per_site[s] = {"sensitivity": float(f[m & bad].mean()) if (m & bad).any() else None,
                           "specificity": float((~f[m & ~bad]).mean()) if (m & ~bad).any() else None,
                           "flagged": int(f[m].sum()), "n": int(m.sum())}
        res["rules"][rule] = {"sensitivity": float(f[bad].mean()), "specificity": float((~f[~bad]).mean()),
                              "sensitivity_sites_A_D": float(f[bad & notE].mean()),
                              "allbad_site_flagged": float(f[~notE].mean()), "n_flagged": int(f.sum()),
                              "per_site": per_site}
    res["auroc"] = {
        "raw_score": auroc(scored.score[bad], scored.score[~bad]),
        "score_site": auroc(scored.score_site[bad], scored.score_site[~bad]),
        "raw_score_sites_A_D": auroc(scored.score[bad & notE], scored.score[~bad & notE]),
        "score_site_sites_A_D": auroc(scored.score_site[bad & notE], scored.score_site[~bad & notE]),
        "neg_log_density": auroc(-scored.log_density[bad], -scored.log_density[~bad]),
    }
    # the report's per-site table (flags: the raw score rule), and which sites it sends to site-wide review
    res["site_summary"] = S.site_summary(scored, score_threshold=SCORE_THRESHOLD).round(4).to_dict("records")
    res["rows"] = scored[["volume_id", "site", "base", "artifact", "severity", "score", "score_site",
                          "score_site_basis", "density_pct"]].round(4).to_dict("records")
    return res


def write_md(res: dict, model: str) -> None:
    L = ["# Site-aware score on a simulated multi-site cohort", "",
         f"Model: `{model}` (see README.md). Cohort: see README.md; {res['n']} scans, {res['n_bad']} corrupted "
         f"({res['n_bad_allbad_site']} of them the all-bad site E). Settings: {res['settings']}.",
         "", "Clean-score median by site: " + ", ".join(f"{k} {v:.2f}" for k, v in res["clean_median_by_site"].items())
         + "; basis: " + ", ".join(f"{k} {v}" for k, v in res["basis_by_site"].items()), "",
         "| rule | sensitivity | specificity | sensitivity sites A-D | all-bad site E flagged | flagged |",
         "|---|---|---|---|---|---|"]
    for r, v in res["rules"].items():
        L.append(f"| `{r}` | {v['sensitivity']:.2f} | {v['specificity']:.2f} | {v['sensitivity_sites_A_D']:.2f} | "
                 f"{v['allbad_site_flagged']:.2f} | {v['n_flagged']} |")
    L += ["", "Per site (sensitivity / specificity):", "", "| rule | " + " | ".join(res["basis_by_site"]) + " |",
          "|---|" + "---|" * len(res["basis_by_site"])]
    fmt = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    for r, v in res["rules"].items():
        L.append(f"| `{r}` | " + " | ".join(f"{fmt(p['sensitivity'])} / {fmt(p['specificity'])}"
                                            for p in v["per_site"].values()) + " |")
    a = res["auroc"]
    L += ["", f"AUROC corrupted vs clean: raw score {a['raw_score']:.3f}, score_site {a['score_site']:.3f}; "
          f"sites A-D only: raw {a['raw_score_sites_A_D']:.3f}, score_site {a['score_site_sites_A_D']:.3f}; "
          f"-log density {a['neg_log_density']:.3f}.", ""]
    import pandas as pd

    from artifactqc.report.stage import site_markdown

    L += ["## The report's per-site table (`results/report/sites.md`; flagged: rule `score`)", "",
          site_markdown(pd.DataFrame(res["site_summary"]), SCORE_THRESHOLD)]
    (HERE / "results.md").write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="encoder directory (encoder.safetensors + model.json)")
    H.add_data_arg(ap, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = H.data_dir(args.data)
    sha = hashlib.sha256((Path(args.model) / "encoder.safetensors").read_bytes()).hexdigest()[:12]
    cache = HERE / "cache" / f"cohort-{sha}.parquet"
    if cache.is_file():
        df = pd.read_parquet(cache)
    else:
        df = score_cohort(data, Path(args.model), args.threads)
        cache.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(cache)
    res = evaluate(df) | {"model": str(args.model), "model_sha256_12": sha}
    (HERE / "results.json").write_text(json.dumps(res, indent=2))
    write_md(res, args.model)
    print((HERE / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
