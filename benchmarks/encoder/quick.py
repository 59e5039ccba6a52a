"""Fast model comparison on the quality step's simulated volumes (session 3).

``run.py quality`` simulates 7 held-out volumes x 5 types x 5 severities (+ clean) and scores them. The slices
of those simulated volumes do not depend on the model (the slice geometry is fixed by ``SliceConfig``), so
this script extracts them once into a cache (same volumes, same seeds as ``run.py quality``; ~1 min on a free
machine) and then evaluates any number of models and volume aggregations in seconds:

    .venv/bin/python benchmarks/encoder/quick.py --cache /tmp/encq/quality_slices.npz MODEL_DIR [MODEL_DIR ...]

With ``--match-ssim`` the cache holds rows simulated with ``simulate_volume(match_ssim=True)`` (run.py quality's
``quality_matched``). Prints Pearson r(SS, score), Spearman per type and argmax accuracy (SS >= 0.5) for several aggregations of the
slice outputs (trimmed mean = the scorer's for models without a volume head) and for the volume head if the
model has one (then the scorer's, and the tables below use it), the mean score per type and severity, the clean
scores and the per-volume Pearson r. With the v3 model and the trimmed mean it reproduces results.md (r 0.609);
with v9 and its volume head, r 0.711.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build_cache(data: Path, path: Path, match_ssim: bool = False) -> None:
    import run as R

    from artifactqc import io
    from artifactqc.simulate import simulate_volume
    from artifactqc.encoder.slices import SliceConfig, extract_from_array

    cfg = SliceConfig()
    sevs = [0.2, 0.4, 0.6, 0.8, 1.0]
    X, meta = [], []
    for k, (rel, contrast) in enumerate(R.HELD_OUT.items()):
        d, a = R._canon_norm(data / rel)
        spacing = tuple(float(z) for z in io.voxel_sizes(a))
        s, _ = extract_from_array(d, a, cfg)
        X.append(s.astype(np.float16))
        meta.append((rel, contrast, "none", 0.0))
        for t in R.TYPES:
            for sv in sevs:
                c, _ = simulate_volume(d, t, sv, seed=1000 * k + int(100 * sv), spacing=spacing,
                                       match_ssim=match_ssim)
                s, _ = extract_from_array(c, a, cfg)
                X.append(s.astype(np.float16))
                meta.append((rel, contrast, t, sv))
        print("cached", rel, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=np.stack(X), meta=np.array(meta, dtype=object))


def evaluate(model_dir: str, X: np.ndarray, meta: np.ndarray) -> None:
    import pandas as pd
    from scipy.stats import pearsonr, spearmanr, trim_mean

    from artifactqc.encoder.network import HEADS
    from artifactqc.encoder.checkpoint import load_model
    from artifactqc.encoder.score import predict_slices, volume_outputs

    import run as R

    types, head_of = R.TYPES, R.HEAD_OF
    m = load_model(model_dir, device="cpu")
    P = [predict_slices(m, x.astype(np.float32)) for x in X]
    art = np.array([r[2] for r in meta])
    ss = np.array([float(r[3]) for r in meta])
    vol = np.array([r[0] for r in meta])
    n = X.shape[1] // 3

    def metrics(sc, sev):
        r = pearsonr(ss, sc).statistic
        sp = [spearmanr(ss[(art == t) | (art == "none")], sc[(art == t) | (art == "none")]).statistic for t in types]
        hi = np.nonzero((art != "none") & (ss >= 0.5))[0]
        acc = np.mean([HEADS[int(np.argmax(sev[i]))] == head_of[art[i]] for i in hi])
        return (f"r {r:.3f} | spearman " + " ".join(f"{t[:5]} {x:.3f}" for t, x in zip(types, sp))
                + f" | min {min(sp):.3f} | argmax {acc:.3f}")

    aggs = {
        "trim10 (scorer)": lambda a: trim_mean(a, 0.1, axis=0),
        "mean": lambda a: a.mean(0),
        "median": lambda a: np.median(a, 0),
        "trim25": lambda a: trim_mean(a, 0.25, axis=0),
        "max over orientations": lambda a: np.max([trim_mean(a[i * n:(i + 1) * n], 0.1, axis=0) for i in range(3)], 0),
        "q75": lambda a: np.quantile(a, 0.75, axis=0),
    }
    print(f"== {model_dir}")
    for k, f in aggs.items():
        sc = np.array([f(p["score"]) for p in P])
        sev = np.array([f(p["severity"]) for p in P])
        print(f"{k:22s}", metrics(sc, sev))
    sev = np.array([trim_mean(p["severity"], 0.1, axis=0) for p in P])
    print(f"{'2 x max head':22s}", metrics(2 * sev.max(1), sev))
    print(f"{'sum of heads':22s}", metrics(sev.sum(1), sev))
    sc = np.array([trim_mean(p["score"], 0.1) for p in P])
    if m.volume_head is not None:  # the scorer uses the volume head: tables below are its scores
        rows = [volume_outputs(m, p) for p in P]
        sc = np.array([r["score"] for r in rows])
        sev = np.array([[r[f"severity_{h}"] for h in HEADS] for r in rows])
        print(f"{'volume head (scorer)':22s}", metrics(sc, sev))
    df = pd.DataFrame({"volume": vol, "artifact": art, "ss": ss, "score": sc})
    print(df.groupby(["artifact", "ss"]).score.mean().unstack().round(2).to_string())
    print(df[df.artifact == "none"].set_index("volume").score.round(3).to_string())
    print("per-volume Pearson r:")
    print(df.groupby("volume")[["ss", "score"]].apply(lambda g: pearsonr(g.ss, g.score).statistic).round(3).to_string())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--cache", default="/tmp/artifactqc_encoder_quality_slices.npz")
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--match-ssim", action="store_true",
                    help="build the cache with per-sample SSIM-matched severities (use another --cache file)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if not cache.is_file():
        import run as R

        build_cache(R.data_dir(args.data), cache, args.match_ssim)
    z = np.load(cache, allow_pickle=True)
    for m in args.models:
        evaluate(m, z["X"], z["meta"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
