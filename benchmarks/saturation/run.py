"""Calibration of the intensity-clipping check (``artifactqc.encoder.saturation``) on real volumes.

For every template and real brain volume of the development data (MANIFEST kinds ``TEMPLATE`` and
``real_brain*``: 3D and thick-slice 2D, uint8/int16/uint16/float files), the scorer's slices (default slice
geometry, :func:`artifactqc.encoder.slices.extract_from_array`) are extracted

* clean: as stored, after benign changes (int16 ×1000 rescale, trilinear resampling to 1.5 mm, reorientation,
  re-save as float32 NIfTI);
* clipped: the canonical volume scaled to ~[0, 1] (``benchmarks/encoder_eval.canon_norm``) with every intensity
  above its q-th head percentile set to that percentile, q = 95, 90, 85, 77.5, 60 (the definition of the
  leave-site-out benchmark's unseen ``clipping`` kind: mild = 77.5, strong = 60),

and the plateau fraction (:func:`saturation_fraction`) is measured on the float32 slices and on the same slices
stored as float16 (as the leave-site-out evaluation cache stores them), with the severity
(:func:`clipping_severity`) of each. results.md gives the largest clean fraction, the margin to the severity-0
threshold and the fractions/severities at each clip level; results.tsv every row.

    .venv/bin/python benchmarks/saturation/run.py [--data ../shared/data] [--threads 1]
    .venv/bin/python benchmarks/saturation/run.py --from-log LOG      # rebuild results.* from a run's rows
    ... --crosssite-cache benchmarks/crosssite/cache/<fold>/eval-<n>.npz ...   # also: the check on the
                                      # leave-site-out evaluation cache (float16 slices of every evaluation row)
    ... --crosssite-model benchmarks/crosssite/cache/<fold>/<budget>/model ...  # one per cache: AUROC vs the
                                      # fold's clean rows of score_learned and of the combined score
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import _harness as H  # noqa: E402

H.use_package()
from encoder_eval import canon_norm, int16_x1000, reorient, resample  # noqa: E402

log = logging.getLogger("bench.saturation")
CLIP_PERCENTILES = (95.0, 90.0, 85.0, 77.5, 60.0)
BENIGN = ("stored", "int16_x1000", "resampled_1.5mm", "reoriented", "resaved")


def volumes(data: Path):
    import pandas as pd

    m = pd.read_csv(data / "MANIFEST.tsv", sep="\t", dtype=str).fillna("")
    m = m[(m.kind == "TEMPLATE") | m.kind.str.startswith("real_brain")]
    return m[["file", "kind", "contrast", "voxel_mm"]].to_dict("records")


def clip_at(d: np.ndarray, q: float) -> np.ndarray:
    """Every intensity above the q-th percentile of the head set to it (benchmarks/crosssite ``clipping``)."""
    from artifactqc.simulate import head_mask

    c = float(np.percentile(d[head_mask(d)], q))
    return np.minimum(d, np.float32(c))


def at_maximum(data: np.ndarray) -> float:
    """Fraction of the file's foreground voxels (``io.foreground_mask``) at the file's largest value: a file
    already saturated when stored (an 8-bit export clipped at 255) has far more than one voxel there."""
    from artifactqc import io

    fg = io.foreground_mask(data)
    vals = data[fg] if fg.any() else data.ravel()
    return float(np.count_nonzero(vals == vals.max()) / vals.size)


def measure(slices: np.ndarray) -> dict:
    from artifactqc.encoder.saturation import clipping_severity, saturation_fraction

    f32 = saturation_fraction(slices)
    f16 = saturation_fraction(slices.astype(np.float16))
    return {"fraction": f32, "severity": clipping_severity(f32), "fraction_f16": f16,
            "severity_f16": clipping_severity(f16)}


def run(data: Path) -> list[dict]:
    import nibabel as nib

    from artifactqc import io
    from artifactqc.encoder.slices import SliceConfig, extract_from_array

    cfg = SliceConfig()
    rows = []
    t0 = time.perf_counter()
    for rec in volumes(data):
        v = io.load_volume(data / rec["file"])
        base = {"volume": rec["file"], "kind": rec["kind"], "contrast": rec["contrast"], "dtype": str(v.dtype),
                "voxel_mm": rec["voxel_mm"]}
        changed = {"stored": (v.data, v.affine), "int16_x1000": (int16_x1000(v.data), v.affine),
                   "resampled_1.5mm": resample(v.data, v.affine, 1.5), "reoriented": reorient(v.data, v.affine)}
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "resaved.nii"
            nib.save(nib.Nifti1Image(np.asarray(v.data, np.float32), v.affine), str(f))
            r = io.load_volume(f)
            changed["resaved"] = (r.data, r.affine)
        at_max = at_maximum(v.data)
        for name, (cd, ca) in changed.items():
            row = base | {"variant": name, "clip_percentile": float("nan"), "file_at_max": at_max} \
                | measure(extract_from_array(cd, ca, cfg)[0])
            rows.append(row)
            H.print_row(row, digits=6)
        d, a = canon_norm(data / rec["file"])
        for q in CLIP_PERCENTILES:
            row = base | {"variant": f"clip{q:g}", "clip_percentile": q, "file_at_max": float("nan")} | measure(extract_from_array(clip_at(d, q), a, cfg)[0])
            rows.append(row)
            H.print_row(row, digits=6)
        log.info("%s done (%.0f s)", rec["file"], time.perf_counter() - t0)
    return rows


def speed() -> dict:
    """Milliseconds per :func:`saturation_columns` call on a default slice stack (24 × 128 × 128)."""
    from artifactqc.encoder.saturation import saturation_columns

    x = np.random.default_rng(0).uniform(0, 1.5, (24, 128, 128)).astype(np.float32)
    ts = []
    for _ in range(50):
        t = time.perf_counter()
        saturation_columns(x)
        ts.append(time.perf_counter() - t)
    return {"ms_median": 1000 * float(np.median(ts))}


def summarise(rows: list[dict]) -> dict:
    import pandas as pd

    from artifactqc.encoder import saturation as S

    d = pd.DataFrame(rows)
    clean = d[d.variant.isin(BENIGN)]
    out = {"thresholds": {"PLATEAU_TOL": S.PLATEAU_TOL, "HEAD_THRESHOLD": S.HEAD_THRESHOLD,
                          "SAT_CLEAN_MAX": S.SAT_CLEAN_MAX, "SAT_FULL": S.SAT_FULL},
           "n_volumes": int(d.volume.nunique()),
           "max_abs_f32_f16_severity": float((d.severity - d.severity_f16).abs().max())}
    for col in ("fraction", "fraction_f16"):
        i = clean[col].idxmax()
        subj = clean[clean.kind != "TEMPLATE"]
        j = subj[col].idxmax()
        out[f"clean_{col}"] = {
            "max": float(clean[col].max()), "max_at": f"{clean.volume[i]} ({clean.variant[i]})",
            "max_subjects": float(subj[col].max()), "max_subjects_at": f"{subj.volume[j]} ({subj.variant[j]})",
            "median": float(clean[col].median()), "n_severity_above_0": int((clean[col.replace('fraction', 'severity')] > 0).sum()),
            "margin": S.SAT_CLEAN_MAX / float(clean[col].max()),
            "margin_subjects": S.SAT_CLEAN_MAX / float(subj[col].max()),
        }
    out["per_variant"] = {}
    for v, g in d.groupby("variant", sort=False):
        out["per_variant"][v] = {
            "n": int(len(g)),
            **{f"fraction_{k}": float(getattr(g.fraction_f16, k)()) for k in ("min", "median", "max")},
            **{f"severity_{k}": float(getattr(g.severity_f16, k)()) for k in ("min", "median", "max")},
            "severity_f32_min": float(g.severity.min()),
            "n_severity_gt_0.5": int((g.severity_f16 > 0.5).sum()), "n_severity_0": int((g.severity_f16 == 0).sum()),
            "lowest": str(g.volume[g.fraction_f16.idxmin()]),
            "lowest_3": [(str(r.volume), float(r.fraction_f16), float(r.severity_f16))
                         for r in g.nsmallest(3, "fraction_f16").itertuples()],
        }
    return out


def crosssite_rows(paths) -> list[dict]:
    """The check on the leave-site-out benchmark's cached evaluation slices (``X`` float16 ``[rows, N, S, S]``,
    ``meta`` JSON per row: kind, artifact, definition), one row per cached row."""
    import json

    from artifactqc.encoder.saturation import saturation_columns

    out = []
    for p in paths:
        z = np.load(p)
        for x, m in zip(z["X"], z["meta"]):
            m = json.loads(str(m))
            out.append({"cache": str(Path(p).parent.name), "kind": m["kind"], "artifact": m["artifact"],
                        "definition": m.get("definition", ""), **saturation_columns(x)})
    return out


def crosssite_auroc(caches, models) -> list[dict]:
    """Per fold (cache + the fold's model): AUROC vs the fold's clean rows of the encoder's ``score_learned`` and of
    the combined ``score`` (``encoder.score.score_slices`` on the cached slices), per unseen kind, over every unseen
    row and over the simulated rows with SS >= 0.5; and which rows the combination changed."""
    import json

    from encoder_eval import auroc

    from artifactqc.encoder.checkpoint import load_model
    from artifactqc.encoder.score import score_slices

    out = []
    for cache, mdir in zip(caches, models):
        z = np.load(cache)
        model = load_model(mdir, device="cpu")
        R = [json.loads(str(m)) | score_slices(model, x.astype(np.float32)) for x, m in zip(z["X"], z["meta"])]
        clean = [r for r in R if r["kind"] == "clean"]
        for key in ("score_learned", "score"):
            neg = [r[key] for r in clean]
            shown = str(mdir)[str(mdir).find("benchmarks/"):] if "benchmarks/" in str(mdir) else str(mdir)
            row = {"fold": Path(cache).parent.name, "model": shown, "score": key, "clean_max": max(neg)}
            for k in sorted({r["artifact"] for r in R if r["kind"] == "unseen"}):
                row[k] = auroc([r[key] for r in R if r["kind"] == "unseen" and r["artifact"] == k], neg)
            row["unseen_all"] = auroc([r[key] for r in R if r["kind"] == "unseen"], neg)
            row["simulated_ss_ge_0.5"] = auroc([r[key] for r in R if r["kind"] == "simulated" and r["severity"] >= 0.5], neg)
            row["changed_rows"] = sorted({f"{r['kind']} {r['artifact']} {r.get('definition', '')}".strip()
                                          for r in R if r["score"] != r["score_learned"]})
            out.append(row)
    return out


def crosssite_lines(rows: list[dict]) -> list[str]:
    import pandas as pd

    d = pd.DataFrame(rows)
    d["group"] = np.where(d.kind == "unseen", d.artifact + " " + d.definition, d.kind)
    L = ["", "## On the leave-site-out evaluation cache", "",
         "`--crosssite-cache benchmarks/crosssite/cache/{ixi,clinical2d}/eval-3.npz` (the proxy folds' caches).",
         f"Folds {', '.join(sorted(d.cache.unique()))} (the cached float16 slices the benchmark scores; simulated = the",
         "five types at every severity and both definitions; unseen = the kinds training never simulates):", "",
         "| rows | n | fraction max | severity_clipping min / max | rows with severity > 0 |", "|---|---|---|---|---|"]
    for gname, g in d.groupby("group", sort=True):
        L.append(f"| {gname} | {len(g)} | {g.saturation.max():.4f} | {g.severity_clipping.min():.2f} / "
                 f"{g.severity_clipping.max():.2f} | {int((g.severity_clipping > 0).sum())} |")
    return L


def _f(x: float, nd: int = 4) -> str:
    return f"{x:.{nd}f}"


def write_results(rows: list[dict], out: Path, sp: dict | None, cross: list[dict] | None = None,
                  cross_auc: list[dict] | None = None) -> None:
    import pandas as pd

    s = summarise(rows)
    H.write_tsv(out / "results.tsv", pd.DataFrame(rows), float_format="%.6f")
    H.write_json(out / "results.json", s | {"speed": sp}, indent=1, newline=True)
    t = s["thresholds"]
    c16, c32 = s["clean_fraction_f16"], s["clean_fraction"]
    L = [
        "# Intensity-clipping check: calibration on real volumes",
        "",
        "`python benchmarks/saturation/run.py` (default slice geometry 128 px × 1.5 mm, 24 slices; every TEMPLATE and",
        f"real_brain* volume of the development data: {s['n_volumes']} volumes). Per-row numbers: results.tsv.",
        "",
        f"Check (`artifactqc.encoder.saturation`): fraction of head pixels (slice value > {t['HEAD_THRESHOLD']}) with",
        f"|value − 1| < {t['PLATEAU_TOL']:g}; severity_clipping = 0 at fraction ≤ {t['SAT_CLEAN_MAX']:g}, 1 at ≥ {t['SAT_FULL']:g},",
        "linear in log(fraction) between; score = max(score_learned, 2 × severity_clipping).",
        "",
        "## Clean volumes (as stored, int16 ×1000, resampled to 1.5 mm, reoriented, re-saved)",
        "",
        "| slices | max fraction (where) | max over real subjects (where) | median | margin to severity 0 (all / subjects) | rows with severity > 0 |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in (("float32 (scoring)", c32), ("float16 (crosssite cache)", c16)):
        L.append(f"| {name} | {_f(c['max'], 5)} ({c['max_at']}) | {_f(c['max_subjects'], 5)} ({c['max_subjects_at']}) | "
                 f"{_f(c['median'], 5)} | ×{c['margin']:.1f} / ×{c['margin_subjects']:.1f} | {c['n_severity_above_0']} |")
    L += [
        "",
        f"## Per variant (float16 slices; float32 severities differ by at most {s['max_abs_f32_f16_severity']:.3f})",
        "",
        "| variant | n | fraction min / median / max | severity min / median / max | severity > 0.5 | severity 0 | lowest fraction |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, g in s["per_variant"].items():
        L.append(f"| {v} | {g['n']} | {_f(g['fraction_min'])} / {_f(g['fraction_median'])} / {_f(g['fraction_max'])} | "
                 f"{_f(g['severity_min'], 2)} / {_f(g['severity_median'], 2)} / {_f(g['severity_max'], 2)} | "
                 f"{g['n_severity_gt_0.5']} | {g['n_severity_0']} | {g['lowest']} |")
    mild = s["per_variant"].get("clip77.5")
    if mild:
        L += ["", "Lowest three at the 77.5th-percentile clip (the leave-site-out benchmark's mild clipping): "
              + "; ".join(f"{v} {f:.4f} (severity {sv:.2f})" for v, f, sv in mild["lowest_3"])
              + ". The lowest is a 58 × 58 × 24 EPI crop at 4 × 4 × 5 mm (excluded from the leave-site-out folds)."]
    st = pd.DataFrame(rows)
    st = st[(st.variant == "stored") & (st.file_at_max > 0.005)]
    L += ["", "## Files saturated as stored", "",
          "Files with more than 0.5 % of their foreground voxels at the file's largest value (their 99.5th percentile",
          "is that value, so nothing lies above 1.0 in their slices):", ""]
    L += [f"- {r.volume} ({r.dtype}): {100 * r.file_at_max:.2f} % of foreground voxels at the maximum; slice plateau "
          f"fraction {r.fraction_f16:.5f}, severity_clipping {r.severity_f16:.2f}" for r in st.itertuples()] or ["- none"]
    L += ["", "Such a file is saturated in its bright tissue, but over so few, scattered voxels that the check (which",
          "counts the interior of saturated regions) stays at severity 0. Low-end saturation is not checked: 0 is",
          "the background of every volume (and the floor of the scorer's scaling), so a plateau at 0 says nothing."]
    if cross:
        L += crosssite_lines(cross)
    if cross_auc:
        kinds = [k for k in cross_auc[0] if k not in ("fold", "model", "score", "clean_max", "changed_rows")]
        L += ["", "AUROC against the fold's clean held-out rows with each fold's model (`--crosssite-model`): the",
              "encoder's own `score_learned` and the combined `score` = max(score_learned, 2 × severity_clipping):", "",
              "| fold | score | clean max | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
        for r in cross_auc:
            L.append(f"| {r['fold']} | {r['score']} | {r['clean_max']:.2f} | " + " | ".join(f"{r[k]:.3f}" for k in kinds) + " |")
        L += ["", "Rows whose score the combination changed: "
              + "; ".join(f"{r['fold']}: {', '.join(r['changed_rows']) or 'none'}" for r in cross_auc if r["score"] == "score")
              + ". Models: " + ", ".join(sorted({r["model"] for r in cross_auc})) + "."]
    if sp:
        L += ["", f"Speed: {sp['ms_median']:.2f} ms per volume (median of 50 calls on a 24 × 128 × 128 float32 stack, "
              "one thread), beside ~30 ms to score a volume."]
    H.write_lines(out / "results.md", L, newline=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_data_arg(ap)
    H.add_threads_arg(ap)
    H.add_out_arg(ap, HERE)
    H.add_from_log_arg(ap)
    ap.add_argument("--crosssite-cache", nargs="*", default=[],
                    help="leave-site-out evaluation caches (eval-<n>.npz) to run the check on as well")
    ap.add_argument("--crosssite-model", nargs="*", default=[],
                    help="one model folder per --crosssite-cache (that fold's): AUROC of score_learned vs score")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(a.threads or 1)
    out = Path(a.out)
    if a.from_log:
        rows = H.rows_from_log(a.from_log)
    else:
        rows = run(H.data_dir(a.data))
    if a.crosssite_model and len(a.crosssite_model) != len(a.crosssite_cache):
        sys.exit("--crosssite-model needs one model folder per --crosssite-cache")
    write_results(rows, out, speed(), crosssite_rows(a.crosssite_cache) if a.crosssite_cache else None,
                  crosssite_auroc(a.crosssite_cache, a.crosssite_model) if a.crosssite_model else None)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
