"""Encoder benchmark: train on a subset of ../shared/data, evaluate on held-out volumes.

Steps (each writes into ``--out``, default ``benchmarks/encoder``):

* ``train``   train the benchmark model (training subset below, whole volumes held out for validation
              by the trainer) -> ``<out>/model/`` (encoder.safetensors + model.json, not committed).
* ``head``    fit a volume head on the frozen encoder of ``--base`` with ``--entries`` new corrupted training
              volumes -> ``<out>/model/`` (new models get one from ``train`` already).
* ``quality`` simulate each artifact type at severities 0..1 onto held-out volumes (T1w, T2w, FLAIR),
              score them -> Pearson r(SS, score), Spearman per type, argmax-head accuracy for SS >= 0.5.
* ``robust``  clean volumes x1000 stored as int16, reoriented (axes permuted/flipped, consistent
              affine) and resampled to 1.5 mm: score change vs the clean-score spread.
* ``thick``   real thick-slice scans vs 3D scans of the same contrast.
* ``speed``   seconds to score a 1 mm volume vs nibabel load time (same run), and model throughput vs a
              re-implementation of the published architecture (224 x 224, no downsampling).
* ``simcheck`` 2D vs 3D simulation at the same severity after slice extraction (SSIM, model score).
* ``all``     everything after ``train``; writes ``results.json`` and ``results.md``.

Usage: ``python benchmarks/encoder/run.py train [--minutes 20]``; ``python benchmarks/encoder/run.py all``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/_harness.py
log = logging.getLogger("bench.encoder")

HELD_OUT = {  # never used for training or for the trainer's validation
    "volumes/VolumeRenderingData/stroke_T1.nii.gz": "T1w",
    "volumes/VolumeRenderingData/stroke_T2.nii.gz": "T2w",
    "volumes/VolumeRenderingData/stroke_FLAIR.nii.gz": "FLAIR",
    "volumes/NiChart_IXI/IXI296-HH-1970_T1.nii.gz": "T1w",
    "volumes/NiChart_IXI/IXI316-HH-1862_T1.nii.gz": "T1w",
    "volumes/NiChart_IXI/IXI329-HH-1908_T1.nii.gz": "T1w",
    "volumes/NiChart_IXI/IXI334-HH-1907_T1.nii.gz": "T1w",
}
TEMPLATES = [
    "templates/mricron_ch2.nii.gz",
    "templates/mricron_ch2bet.nii.gz",
    "templates/nilearn_mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "templates/spm12_avg152T1.nii.gz",
    "templates/spm12_avg152T2.nii.gz",
    "templates/spm12_avg152PD.nii.gz",
    "templates/spm12_single_subj_T1.nii.gz",
]
OTHER_TRAIN = [
    "volumes/niivue-images/chris_t1.nii.gz",
    "volumes/VolumeRenderingData/seg3D_MR.nii.gz",
    "volumes/niivue-demo-images/register_T1_head_ext2.nii.gz",
]
THICK = {  # real thick-slice scans -> contrast
    "volumes/dcm_qa_decubitus/HFP/t1_fl2d_sag_2.nii.gz": "T1w",
    "volumes/dcm_qa_decubitus/HFS/t1_fl2d_sag_3.nii.gz": "T1w",
    "volumes/niivue-images/chris_PD.nii.gz": "PD",
    "volumes/niivue-demo-images/register_T2w.nii.gz": "T2w",
}
THREE_D = {  # 3D scans of the same contrasts
    "volumes/VolumeRenderingData/stroke_T1.nii.gz": "T1w",
    "volumes/niivue-images/chris_t1.nii.gz": "T1w",
    "volumes/VolumeRenderingData/seg3D_MR.nii.gz": "T1w",
    "volumes/NiChart_IXI/IXI296-HH-1970_T1.nii.gz": "T1w",
    "volumes/NiChart_IXI/IXI316-HH-1862_T1.nii.gz": "T1w",
    "volumes/VolumeRenderingData/stroke_T2.nii.gz": "T2w",
    "templates/spm12_avg152T2.nii.gz": "T2w",
    "templates/spm12_avg152PD.nii.gz": "PD",
}
SPEED_1MM = [
    "volumes/VolumeRenderingData/stroke_T1.nii.gz",
    "volumes/VolumeRenderingData/seg3D_MR.nii.gz",
    "volumes/niivue-images/chris_t1.nii.gz",
]
TYPES = ("noise", "ghosting", "bias", "anisotropy", "motion")
HEAD_OF = {"noise": "noise", "ghosting": "ghosting", "bias": "bias", "anisotropy": "resolution", "motion": "motion"}


def data_dir(arg: str | None) -> Path:
    d = Path(arg) if arg else (REPO.parent / "shared" / "data")
    if not (d / "MANIFEST.tsv").is_file():
        sys.exit(f"development data not found at {d} (pass --data DIR); nothing to benchmark")
    return d


# The trainer's validation volumes (held out from training): the split seed 0 drew for v3/v4, fixed since session 4
# so that --seed varies only initialisation and pool draws (seed 1's own split took avg152T2 and avg152PD, the
# only real T2w/PD training volumes, out of training and gave r 0.56).
VALIDATION = [
    "templates/spm12_avg152T1.nii.gz",
    "volumes/NiChart_IXI/IXI174-HH-1571_T1.nii.gz",
    "volumes/NiChart_IXI/IXI239-HH-2296_T1.nii.gz",
    "volumes/NiChart_IXI/IXI252-HH-1693_T1.nii.gz",
]


def training_list(data: Path) -> list[str]:
    ixi = sorted(str(p) for p in (data / "volumes").glob("NiChart*/*.nii.gz"))
    ixi = [p for p in ixi if str(Path(p).relative_to(data)) not in HELD_OUT]
    return ixi + [str(data / t) for t in TEMPLATES + OTHER_TRAIN]


def cmd_train(args, data: Path) -> dict:
    from artifactqc.training.loop import train_encoder

    vols = training_list(data)
    metrics = train_encoder(
        vols, Path(args.out) / "model", val_volumes=[str(data / v) for v in VALIDATION], epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="auto", patience=args.patience,
        steps_per_epoch=args.steps,
        train_slices_per_axis=12, val_severities=(0.3, 0.6, 0.9), threads=args.threads, max_minutes=args.minutes,
        pool_size=args.pool_size, sim_time_fraction=args.sim_fraction, slice_group=args.slice_group,
        encoder=json.loads(args.encoder) if args.encoder else None, model_id="bench-encoder",
        **(json.loads(args.train) if args.train else {}),
    )
    return metrics


def _score_array(model, data: np.ndarray, affine: np.ndarray) -> dict:
    from artifactqc.encoder.score import predict_volume
    from artifactqc.encoder.slices import extract_from_array

    s, info = extract_from_array(data, affine, model.slice_cfg)
    return predict_volume(model, s)


def _canon_norm(path: Path):
    """Canonical volume scaled to ~[0, 1] for the simulator by a pure scale (``model.scale_for_simulation``),
    so its clean slices are exactly those of the raw file. (Results before 2026-11-23 14:30 used
    ``io.normalize_intensity`` here, whose offset+clip is not idempotent under the scorer's normalisation.)"""
    from artifactqc import io
    from artifactqc.encoder.slices import scale_for_simulation

    v = io.load_volume(path)
    d, a = io.to_canonical(v.data, v.affine)
    return scale_for_simulation(d), a


def cmd_quality(args, data: Path, model) -> dict:
    """Both severity definitions of the simulator: ``quality`` = the type-mean calibration (the default of
    ``simulate_volume``; results before session 7 report only this) and ``quality_matched`` = per-sample
    SSIM matching (``match_ssim=True``: each row's masked SSIM is 1 - 0.25 SS within 5 %). Same volumes,
    seeds and random draws; rows of both in ``quality_rows.tsv`` (column ``severity_definition``)."""
    import pandas as pd

    from artifactqc import io
    from artifactqc.simulate import head_mask, simulate_volume, ssim_masked

    sevs = [float(s) for s in np.round(np.arange(0.0, 1.0001, args.sev_step), 2)]
    rows = []
    for k, (rel, contrast) in enumerate(list(HELD_OUT.items())[: args.max_volumes]):
        d, a = _canon_norm(data / rel)
        spacing = tuple(float(z) for z in io.voxel_sizes(a))
        mask = head_mask(d)
        clean = _score_array(model, d, a)
        for definition in ("mean", "matched"):
            rows.append({"severity_definition": definition, "volume": rel, "contrast": contrast,
                         "artifact": "none", "severity": 0.0, "ssim": 1.0, **clean})
            for t in TYPES:
                for s in sevs:
                    if s == 0:
                        continue
                    t0 = time.perf_counter()
                    corrupted, p = simulate_volume(d, t, s, seed=1000 * k + int(100 * s), spacing=spacing,
                                                   match_ssim=definition == "matched")
                    r = _score_array(model, corrupted, a)
                    ssim = p["ssim"] if definition == "matched" else ssim_masked(d, corrupted, mask)  # same measure
                    rows.append({"severity_definition": definition, "volume": rel, "contrast": contrast,
                                 "artifact": t, "severity": s, "ssim": ssim, **r})
                    log.info("%s %s %s %.1f -> %.3f (%.1fs)", definition, rel, t, s, r["score"],
                             time.perf_counter() - t0)
    pd.DataFrame(rows).to_csv(Path(args.out) / "quality_rows.tsv", sep="\t", index=False, float_format="%.4f")
    res = {}
    for definition, key in (("mean", "quality"), ("matched", "quality_matched")):
        res[key] = quality_metrics([r for r in rows if r["severity_definition"] == definition]) | {
            "severities": sevs, "severity_definition": definition}
    return res


def quality_metrics(rows: list[dict]) -> dict:
    """The issue's quality numbers for one set of rows (clean rows have artifact "none")."""
    from scipy.stats import pearsonr, spearmanr

    ss = np.array([r["severity"] for r in rows])
    sc = np.array([r["score"] for r in rows])
    res = {"n": len(rows), "pearson_overall": float(pearsonr(ss, sc).statistic)}
    # ceiling: an oracle that measures each row's masked SSIM loss against its clean volume
    res["pearson_ss_vs_ssim_loss"] = float(pearsonr(ss, [1.0 - r["ssim"] for r in rows]).statistic)
    per_type = {}
    for t in TYPES:
        m = np.array([r["artifact"] in (t, "none") for r in rows])
        per_type[t] = float(spearmanr(ss[m], sc[m]).statistic)
    res["spearman_by_type"] = per_type
    per_contrast = {}
    for c in sorted({r["contrast"] for r in rows}):
        m = np.array([r["contrast"] == c for r in rows])
        per_contrast[c] = float(pearsonr(ss[m], sc[m]).statistic)
    res["pearson_by_contrast"] = per_contrast
    hi = [r for r in rows if r["artifact"] != "none" and r["severity"] >= 0.5]
    heads = ["noise", "ghosting", "motion", "bias", "resolution"]
    correct = [heads[int(np.argmax([r[f"severity_{h}"] for h in heads]))] == HEAD_OF[r["artifact"]] for r in hi]
    res["argmax_accuracy_ss_ge_0.5"] = float(np.mean(correct))
    res["argmax_accuracy_by_type"] = {
        t: float(np.mean([c for c, r in zip(correct, hi) if r["artifact"] == t])) for t in TYPES
    }
    res["clean_scores"] = {r["volume"]: r["score"] for r in rows if r["artifact"] == "none"}
    res["score_at_0.5_by_type"] = {
        t: float(np.mean([r["score"] for r in rows if r["artifact"] == t and abs(r["severity"] - 0.5) < 0.11]))
        for t in TYPES
    }
    return res


def _resample(data: np.ndarray, affine: np.ndarray, new_mm: float):
    from scipy.ndimage import affine_transform

    from artifactqc import io

    old = io.voxel_sizes(affine)
    shape = np.maximum(1, np.round(np.array(data.shape) * old / new_mm)).astype(int)
    scale = new_mm / old
    out = affine_transform(data, np.diag(scale), output_shape=tuple(shape), order=1, mode="nearest")
    new_aff = affine.copy()
    new_aff[:3, :3] = affine[:3, :3] @ np.diag(scale)
    return out.astype(np.float32), new_aff


def _reorient(data: np.ndarray, affine: np.ndarray):
    """Permute axes (0,1,2)->(1,2,0) and flip the new first axis; affine updated consistently."""
    perm = (1, 2, 0)
    t = np.transpose(data, perm)
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3][:, list(perm)]
    # flip stored axis 0
    n = t.shape[0]
    t = t[::-1]
    flip = np.eye(4)
    flip[0, 0] = -1
    flip[0, 3] = n - 1
    return np.ascontiguousarray(t), aff @ flip


def cmd_robust(args, data: Path, model) -> dict:
    from artifactqc import io

    vols = list(dict.fromkeys([*HELD_OUT, *[p for p, c in THREE_D.items() if p not in HELD_OUT]]))[: args.max_volumes]
    rows = []
    for rel in vols:
        v = io.load_volume(data / rel)
        base = _score_array(model, v.data, v.affine)["score"]
        scaled = np.round(v.data / max(float(v.data.max()), 1e-6) * 30.0 * 1000.0).astype(np.int16).astype(np.float32)
        s_int = _score_array(model, scaled, v.affine)["score"]
        rd, ra = _reorient(v.data, v.affine)
        s_re = _score_array(model, rd, ra)["score"]
        r15d, r15a = _resample(v.data, v.affine, 1.5)
        s_15 = _score_array(model, r15d, r15a)["score"]
        rows.append({"volume": rel, "clean": base, "int16_x1000": s_int, "reoriented": s_re, "resampled_1.5mm": s_15})
        log.info("robust %s %s", rel, {k: round(v, 3) for k, v in rows[-1].items() if k != "volume"})
    clean = np.array([r["clean"] for r in rows])
    spread_sd = float(clean.std(ddof=1))
    spread_range = float(clean.max() - clean.min())
    out = {"clean_score_sd": spread_sd, "clean_score_range": spread_range, "rows": rows}
    for k in ("int16_x1000", "reoriented", "resampled_1.5mm"):
        d = np.array([abs(r[k] - r["clean"]) for r in rows])
        out[f"max_abs_change_{k}"] = float(d.max())
        out[f"max_change_over_sd_{k}"] = float(d.max() / spread_sd)
        out[f"max_change_over_range_{k}"] = float(d.max() / spread_range)
    return out


def cmd_thick(args, data: Path, model) -> dict:
    from artifactqc.encoder.score import score_volumes

    paths = [str(data / p) for p in [*THICK, *THREE_D]]
    df = score_volumes(model, paths)
    df["rel"] = [str(Path(p).relative_to(data)) for p in df["path"]]
    res = {"rows": df[["rel", "score", "severity_resolution"]].to_dict("records"), "comparisons": []}
    for rel, c in THICK.items():
        s = float(df.loc[df.rel == rel, "score"].iloc[0])
        same = df[df.rel.isin([p for p, cc in THREE_D.items() if cc == c])]
        res["comparisons"].append(
            {"thick": rel, "contrast": c, "score": s, "max_3d_score": float(same["score"].max()),
             "above_all_3d": bool(s > same["score"].max())}
        )
    res["all_above"] = all(c["above_all_3d"] for c in res["comparisons"])
    return res


def cmd_speed(args, data: Path, model) -> dict:
    from _harness import PublishedEncoder
    from artifactqc.encoder.score import score_volume
    from artifactqc.encoder.slices import extract_slices

    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "volumes": []}
    for rel in SPEED_1MM:
        p = data / rel
        loads, scores = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            score_volume(model, p)
            scores.append(time.perf_counter() - t0)
        res["volumes"].append({"volume": rel, "nibabel_load_s": float(np.median(loads)),
                               "score_s": float(np.median(scores)),
                               "ratio": float(np.median(scores) / np.median(loads))})
    # model throughput on the same slices: ours at its input size, the published network at 224 x 224
    s, _ = extract_slices(data / SPEED_1MM[0], model.slice_cfg)
    x = torch.from_numpy(s)[:, None]
    x224 = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    pub = PublishedEncoder().eval()

    def rate(m, inp, reps):
        with torch.inference_mode():
            m(inp[:4])
            t0 = time.perf_counter()
            for _ in range(reps):
                m(inp)
            return reps * len(inp) / (time.perf_counter() - t0)

    ours = rate(model, x, args.repeats)
    theirs = rate(pub, x224, 1)
    res["slices_per_volume"] = int(len(x))
    res["ours_slices_per_s"] = ours
    res["published_224_slices_per_s"] = theirs
    res["throughput_ratio"] = ours / theirs
    return res


SIMCHECK_VOLUMES = [
    "volumes/VolumeRenderingData/stroke_T1.nii.gz",
    "volumes/NiChart_IXI/IXI296-HH-1970_T1.nii.gz",
    "volumes/VolumeRenderingData/stroke_T2.nii.gz",
]


def cmd_simcheck(args, data: Path, model) -> dict:
    """Do the 2D (``simulate_slices``) and 3D (``simulate_volume`` at native resolution) simulators agree
    *after slice extraction*? Same held-out volume, same severity: 3D = corrupt the volume, then the scorer's
    slices; 2D = the scorer's clean slices corrupted by the 2D simulator. Compared by the mean masked SSIM to
    the clean slices (head mask of the clean slice > 0.1) and by the model's mean slice score."""
    from artifactqc import io
    from artifactqc.encoder.score import predict_slices
    from artifactqc.simulate import simulate_slices, simulate_volume, ssim_slices
    from artifactqc.encoder.slices import extract_from_array

    sevs = (0.25, 0.5, 0.75, 1.0)
    acc: dict = {}
    for k, rel in enumerate(SIMCHECK_VOLUMES):
        d, a = _canon_norm(data / rel)
        spacing = tuple(float(z) for z in io.voxel_sizes(a))
        clean, _ = extract_from_array(d, a, model.slice_cfg)
        ct = torch.from_numpy(clean)[:, None]
        mask = ct > 0.1
        for t in TYPES:
            for s in sevs:
                corr, _ = simulate_volume(d, t, s, seed=500 + 10 * k, spacing=spacing)
                s3, _ = extract_from_array(corr, a, model.slice_cfg)
                t3 = torch.from_numpy(s3)[:, None]
                g = torch.Generator().manual_seed(500 + 10 * k)
                t2 = simulate_slices(ct, [t] * len(ct), torch.full((len(ct),), s), generator=g)
                r = acc.setdefault(f"{t}@{s}", {"ssim_3d": [], "ssim_2d": [], "score_3d": [], "score_2d": []})
                r["ssim_3d"].append(float(ssim_slices(ct, t3, mask).mean()))
                r["ssim_2d"].append(float(ssim_slices(ct, t2.clamp(0, 1.5), mask).mean()))
                r["score_3d"].append(float(predict_slices(model, s3)["score"].mean()))
                r["score_2d"].append(float(predict_slices(model, t2[:, 0].numpy())["score"].mean()))
                log.info("simcheck %s %s %.2f: %s", rel, t, s, {kk: round(v[-1], 3) for kk, v in r.items()})
    rows = [{"type": key.split("@")[0], "severity": float(key.split("@")[1]),
             **{kk: float(np.mean(v)) for kk, v in r.items()}} for key, r in acc.items()]
    return {"volumes": SIMCHECK_VOLUMES, "rows": rows,
            "target_ssim": "1 - 0.25 * severity (simulate.target_ssim, defined on the native grid)"}


def write_md(out: Path, res: dict) -> None:
    L = ["# Encoder benchmark results", ""]
    L.append("Measured on a 2-core machine (load: see README.md findings); "
             "speeds are indicative. Reproduce: see README.md.")
    L.append("")
    if "train" in res:
        t = res["train"]
        L += ["## Training", "", f"- best epoch {t.get('best_epoch')} of {t.get('epochs_run')} "
              f"({t.get('stop_reason')}), {t.get('train_seconds', 0) / 60:.1f} min", ""]
    titles = {"quality": "type-mean calibrated severities (`simulate_volume` default)",
              "quality_matched": "per-sample SSIM-matched severities (`simulate_volume(match_ssim=True)`)"}
    for key in ("quality", "quality_matched"):
        if key not in res:
            continue
        q = res[key]
        L += [f"## Quality (held-out volumes, simulated artifacts): {titles[key]}", "",
              f"- volumes: {', '.join(HELD_OUT)}",
              f"- Pearson r(SS, score) overall: **{q['pearson_overall']:.3f}** (target >= 0.92); n = {q['n']}",
              "- ceiling: Pearson r(SS, 1 - masked SSIM of the row to its clean volume) = "
              f"{q['pearson_ss_vs_ssim_loss']:.3f}",
              "- Spearman by type: " + ", ".join(f"{k} {v:.3f}" for k, v in q["spearman_by_type"].items())
              + " (target >= 0.9)",
              "- Pearson by contrast: " + ", ".join(f"{k} {v:.3f}" for k, v in q["pearson_by_contrast"].items()),
              f"- argmax-head accuracy for SS >= 0.5: **{q['argmax_accuracy_ss_ge_0.5']:.3f}** (target >= 0.85); "
              "by type: " + ", ".join(f"{k} {v:.2f}" for k, v in q["argmax_accuracy_by_type"].items()),
              "- mean score at SS 0.4-0.6 by type (target ~1): " + ", ".join(f"{k} {v:.2f}" for k, v in q["score_at_0.5_by_type"].items()),
              ""]
    if "robust" in res:
        r = res["robust"]
        L += ["## Robustness (clean volumes)", "",
              f"- clean-score spread: sd {r['clean_score_sd']:.3f}, range {r['clean_score_range']:.3f}"]
        for k in ("int16_x1000", "reoriented", "resampled_1.5mm"):
            L.append(f"- {k}: max |change| {r[f'max_abs_change_{k}']:.3f} = {r[f'max_change_over_sd_{k}']:.2f} sd "
                     f"= {r[f'max_change_over_range_{k}']:.2f} range (target < 0.25)")
        L.append("")
    if "thick" in res:
        th = res["thick"]
        L += ["## Real thick-slice scans vs 3D scans", ""]
        for c in th["comparisons"]:
            L.append(f"- {c['thick']} ({c['contrast']}): {c['score']:.3f} vs max 3D {c['max_3d_score']:.3f} -> "
                     f"{'above' if c['above_all_3d'] else 'NOT above'}")
        L.append("")
    if "simcheck" in res:
        sc = res["simcheck"]
        L += ["## 2D vs 3D simulation after slice extraction (issue 3 question)", "",
              f"Volumes: {', '.join(sc['volumes'])}. Mean masked SSIM of the scorer's slices to the clean slices, "
              "and the model's mean slice score; 3D = `simulate_volume` at native resolution then slice "
              "extraction, 2D = `simulate_slices` on the clean extracted slices. Target SSIM (native grid) = "
              "1 - 0.25 SS.", "",
              "| type | SS | SSIM 3D | SSIM 2D | score 3D | score 2D |", "|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            L.append(f"| {r['type']} | {r['severity']:.2f} | {r['ssim_3d']:.3f} | {r['ssim_2d']:.3f} | "
                     f"{r['score_3d']:.2f} | {r['score_2d']:.2f} |")
        L.append("")
    if "speed" in res:
        s = res["speed"]
        L += ["## Speed", ""]
        for v in s["volumes"]:
            L.append(f"- {v['volume']}: nibabel load {v['nibabel_load_s'] * 1000:.0f} ms, score "
                     f"{v['score_s'] * 1000:.0f} ms, ratio {v['ratio']:.2f} (target <= 2)")
        L.append(f"- model throughput ({s['slices_per_volume']} slices/volume): ours {s['ours_slices_per_s']:.0f} "
                 f"slices/s vs published 224x224 {s['published_224_slices_per_s']:.1f} slices/s -> "
                 f"{s['throughput_ratio']:.1f}x (target >= 10)")
    (out / "results.md").write_text("\n".join(L) + "\n")


def cmd_head(args, data: Path) -> dict:
    """Fit a volume head (``model.fit_volume_head``) on the frozen encoder of ``--base`` (default
    ``<out>/model``) with ``--entries`` freshly corrupted training volumes; writes ``<out>/model``."""
    import dataclasses

    from artifactqc.encoder import checkpoint as CKPT
    from artifactqc.training import pool as POOL
    from artifactqc.training import validate as VAL
    from artifactqc.training import volume_head as VHEAD
    from artifactqc.training import volumes as TVOL

    src = Path(args.base) if args.base else Path(args.out) / "model"
    enc = CKPT.load_model(src, device="cpu", optimize=False)
    info = enc.model_info
    hp = info["training"]["hyperparameters"]
    train_cfg = dataclasses.replace(enc.slice_cfg, slices_per_axis=int(hp["train_slices_per_axis"]))
    val = [str(data / v) for v in VALIDATION]
    tr = [TVOL._load_clean_volume(p, train_cfg, True) for p in training_list(data) if p not in val]
    va = [TVOL._load_clean_volume(p, train_cfg, False) for p in val]
    items = VAL._val_items(va, enc.slice_cfg, tuple(hp["val_severities"]), int(hp["seed"]), None)
    aug = {"contrast": hp["contrast_augment"], "mask": hp["mask_augment"], "resample": hp["resample_augment"]}
    pool = POOL._Pool(tr, train_cfg, args.entries, args.seed + 1, None, aug)
    t0 = time.perf_counter()
    pool.fill(args.entries)
    log.info("%d corrupted training volumes in %.0f s", len(pool.entries), time.perf_counter() - t0)
    res = VHEAD.fit_volume_head(enc, pool.entries, items, seed=args.seed)
    training = dict(info["training"], volume_head=res | {"base_model": str(src)})
    CKPT.save_model(enc, Path(args.out) / "model", enc.slice_cfg, {"model_id": info["model_id"], "training": training})
    return {k: v for k, v in res.items() if k != "history"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["train", "head", "quality", "robust", "thick", "speed", "simcheck", "all"])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--pool-size", type=int, default=300, help="corrupted volumes kept in the training pool")
    ap.add_argument("--sim-fraction", type=float, default=0.45, help="share of training wall time spent simulating")
    ap.add_argument("--slice-group", type=int, default=1,
                    help="triplets per corrupted volume in a batch; >1 puts the severity losses on group means")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed: initialisation and the pool's draws (validation volumes are fixed)")
    ap.add_argument("--encoder", default=None,
                    help="architecture overrides as JSON (EncoderConfig fields), "
                         "e.g. '{\"widths\": [24, 48, 96, 128]}'")
    ap.add_argument("--train", default=None,
                    help='train: JSON of further train_encoder arguments, e.g. \'{"resample_augment": 0.3}\'')
    ap.add_argument("--base", default=None, help="head: the encoder to add a volume head to (default <out>/model)")
    ap.add_argument("--entries", type=int, default=400, help="head: corrupted training volumes to fit it on")
    ap.add_argument("--sev-step", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-volumes", type=int, default=None, help="debug: fewer volumes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    data = data_dir(args.data)
    out = Path(args.out)
    res_path = out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if args.step == "train":
        m = cmd_train(args, data)
        res["train"] = {k: v for k, v in m.items() if k != "final"} | {"final_epoch_metrics": m.get("final")}
    elif args.step == "head":
        res["head"] = cmd_head(args, data)
    else:
        from artifactqc.encoder.checkpoint import load_model

        model = load_model(out / "model", device="cpu")
        steps = ["quality", "robust", "thick", "speed", "simcheck"] if args.step == "all" else [args.step]
        for st in steps:
            t0 = time.perf_counter()
            out_st = globals()[f"cmd_{st}"](args, data, model)
            if st == "quality":  # two keys: quality, quality_matched
                res.update(out_st)
            else:
                res[st] = out_st
            log.info("%s done in %.0f s", st, time.perf_counter() - t0)
            res_path.write_text(json.dumps(res, indent=2))
    res_path.write_text(json.dumps(res, indent=2))
    write_md(out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
