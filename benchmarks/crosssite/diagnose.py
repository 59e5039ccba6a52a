"""Diagnostics of the leave-site-out models (issue 16): where their error on held-out sites comes from, and
whether aligning a model to a new site's clean scans at scoring time removes it. Scoring only: the fold
models and evaluation caches of ``run.py`` are reused (run its ``fold`` steps first).

    python benchmarks/crosssite/diagnose.py offsets --thick-pixels 1.5 --thick-min-pixel 1.0   # -> offsets.md
    python benchmarks/crosssite/diagnose.py adapt --mode vh_shift --thick-pixels 1.5 --thick-min-pixel 1.0
    python benchmarks/crosssite/diagnose.py adapt --mode bn_align --seeds 0 1 --thick-pixels 1.5 --thick-min-pixel 1.0
    python benchmarks/crosssite/diagnose.py adapt-table --thick-pixels 1.5 --thick-min-pixel 1.0  # -> adapt.md

``offsets``: per fold and seed run, over the type-mean simulated rows of the evaluation volumes, how much of
the learned score's variance the simulated type x severity explains (R^2), and how much a per-volume offset
adds; the Spearman correlation of severity (0 = the clean volume, 0.25 ... 1) with the score within one volume
and type; and how well two seed runs agree on the clean held-out volumes' scores (Pearson r): a low
agreement means the offsets are run-to-run noise, a high one that they are systematic.

``adapt``: test-time alignment to the held-out sites, leave-one-volume-out. For each held-out volume v, the
model is aligned with the fold's *other* clean held-out volumes (a new site's delivery), and v's rows (clean,
corrupted, unseen kinds, benign changes) are scored with it. ``--mode``:

* ``bn_align``: every BatchNorm layer in turn (earlier layers already aligned) gets running statistics that map
  the site's clean-slice input statistics onto those of the fold's clean training volumes (per channel: the
  same normalised mean and variance);
* ``bn_full``: AdaBN (Li et al. 2016): the running statistics become the site's clean-slice statistics;
* ``vh_shift``: the volume head's input standardisation is shifted by the difference between the mean pooled
  features of the site's clean volumes and those of the clean training volumes.

Metrics go to ``<run folder>/metrics-adapt-<mode>[-thickpx...].json``; ``adapt-table`` pairs them with the same
models' plain metrics (``run.py fold``) into ``adapt.md``.

``bias``: is a "clean" held-out volume free of intensity non-uniformity? No model involved: the spread (sd of
the log field inside the head mask) of the field that N4 (``artifactqc.preprocess.n4``, the workflow's
settings) estimates on every held-out volume, beside the same measure on one clean volume (chris_t1) corrupted
with the simulator's bias at SS 0.25 ... 1, which puts the real fields on the simulated severity scale
(``bias.md``; about 20 s per volume).

    python benchmarks/crosssite/diagnose.py bias
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as R  # noqa: E402

log = logging.getLogger("bench.crosssite.diagnose")
MODES = ("bn_align", "bn_full", "vh_shift")
PAIRED = ("auroc_typemean", "auroc_matched", "auroc_unseen", "pearson_typemean", "argmax", "clean_below_0.5",
          "resample_max_x_range")


def _runs(fold: str, budget: str, tag: str, seeds: list[int] | None = None) -> list[Path]:
    """The finished seed-run folders of a fold variant (seed 0 first; only ``seeds`` when given)."""
    return [d for k, d in R.seed_dirs(fold, budget, tag).items()
            if (d / "model" / "model.json").is_file() and (seeds is None or k in seeds)]


def _model(run_dir: Path, override: dict | None, optimize: bool = True):
    from artifactqc.encoder.checkpoint import load_model

    model = load_model(run_dir / "model", device="cpu", optimize=optimize)
    if override:
        model.slice_cfg = dataclasses.replace(model.slice_cfg, **override)
    return model


# ------------------------------------------------------------------------------------------- offsets
def offset_stats(meta: list[dict], scores: list[float]) -> dict:
    """R^2 of the type x severity cell means and with a per-volume offset added, over the type-mean simulated
    rows, and the within-volume Spearman correlations of severity with score (clean row included)."""
    from scipy.stats import spearmanr

    sim = [(m, s) for m, s in zip(meta, scores) if m["kind"] == "simulated" and m["definition"] == "mean"]
    clean = {m["volume"]: s for m, s in zip(meta, scores) if m["kind"] == "clean"}
    y = np.array([s for _, s in sim])
    cells = [f"{m['artifact']}{m['severity']}" for m, _ in sim]
    vols = [m["volume"] for m, _ in sim]
    cell_mean = {c: y[[i for i, k in enumerate(cells) if k == c]].mean() for c in set(cells)}
    res = y - np.array([cell_mean[c] for c in cells])
    vol_mean = {v: res[[i for i, k in enumerate(vols) if k == v]].mean() for v in set(vols)}
    res_v = res - np.array([vol_mean[v] for v in vols])
    tot = ((y - y.mean()) ** 2).sum()
    rho = []
    for v in sorted(set(vols)):
        for t in R.TYPES:
            pts = sorted((m["severity"], s) for m, s in sim if m["volume"] == v and m["artifact"] == t)
            if v in clean and len(pts) >= 3:
                rho.append(float(spearmanr([0.0] + [a for a, _ in pts], [clean[v]] + [b for _, b in pts])[0]))
    return {"r2_cells": float(1 - (res ** 2).sum() / tot), "r2_cells_volume": float(1 - (res_v ** 2).sum() / tot),
            "within_spearman_median": float(np.nanmedian(rho)), "within_spearman_mean": float(np.nanmean(rho)),
            "n_curves": len(rho)}


def cmd_offsets(args, data: Path) -> dict:
    override = R.geometry_override(args)
    out = {}
    for fold in R.FOLDS:
        runs = _runs(fold, args.budget, args.tag)
        ev = set(R.fold_split(data, fold)["eval"])
        clean_scores = []
        for d in runs:
            model = _model(d, override)
            X, meta = R.load_eval_cache(data, fold, R.BUDGETS[args.budget]["eval_volumes"], R.thick_geometry(model.slice_cfg))
            idx = [i for i, m in enumerate(meta) if (m["kind"] == "simulated" and m["definition"] == "mean")
                   or m["kind"] == "clean"]
            rows = R.score_cache(model, [X[i] for i in idx], R.row_voxel_mm(data, [meta[i] for i in idx]))
            M = [meta[i] for i in idx]
            s = [r["score_learned"] for r in rows]
            keep = [j for j, m in enumerate(M) if m["kind"] == "simulated" or m["volume"] in ev]
            st = offset_stats([M[j] for j in keep], [s[j] for j in keep])
            out[f"{fold}/{d.name}"] = st
            clean_scores.append({m["volume"]: v for m, v in zip(M, s) if m["kind"] == "clean"})
            log.info("%s %s: %s", fold, d.name, st)
        if len(clean_scores) >= 2:
            vols = sorted(clean_scores[0])
            C = np.array([[c[v] for v in vols] for c in clean_scores])
            r = np.corrcoef(C)[np.triu_indices(len(C), 1)]
            out[f"{fold}/clean_between_seeds"] = {"pearson_mean": float(r.mean()), "n_pairs": int(r.size),
                                                  "n_volumes": len(vols)}
    (HERE / "offsets.json").write_text(json.dumps(out, indent=2))
    L = ["# Where the held-out error comes from: per-volume offsets", "",
         f"Models: `{args.budget}` budget, tag `{args.tag}`, every seed run; thick-slice geometry {override or 'as the model samples'}. "
         "Rows: the type-mean simulated rows of each fold's evaluation volumes and their clean scores (learned score, "
         "no clipping check). Made by `diagnose.py offsets` (see its docstring).", "",
         "| fold | run | R² type × severity | R² + per-volume offset | within-volume Spearman median / mean (curves) |",
         "|---|---|---|---|---|"]
    for k, v in out.items():
        if "r2_cells" in v:
            f, r = k.split("/")
            L.append(f"| {f} | {r} | {v['r2_cells']:.2f} | {v['r2_cells_volume']:.2f} | "
                     f"{v['within_spearman_median']:.2f} / {v['within_spearman_mean']:.2f} ({v['n_curves']}) |")
    L += ["", "Agreement of the seed runs on the clean held-out volumes' scores (mean Pearson r over run pairs):", "",
          "| fold | r | volumes | run pairs |", "|---|---|---|---|"]
    L += [f"| {k.split('/')[0]} | {v['pearson_mean']:.2f} | {v['n_volumes']} | {v['n_pairs']} |"
          for k, v in out.items() if "pearson_mean" in v]
    (HERE / "offsets.md").write_text("\n".join(L) + "\n")
    return out


# ----------------------------------------------------------------------------------------------- bias
BIAS_REFERENCE = "volumes/niivue-images/chris_t1.nii.gz"


def field_spread(data: np.ndarray, affine: np.ndarray) -> float:
    """The sd of N4's log bias field inside the head mask (0 for a flat field)."""
    from artifactqc.preprocess.n4 import head_mask, n4

    mask = head_mask(data)
    _, field = n4(data, affine, mask=mask)
    return float(np.log(field[mask]).std())


def cmd_bias(data: Path) -> dict:
    import nibabel as nib

    from artifactqc import io
    from artifactqc.simulate.volume import simulate_volume

    img = nib.load(str(data / BIAS_REFERENCE))
    ref = np.asarray(img.dataobj, dtype=np.float32)
    ref = ref / np.percentile(ref, 99.5)
    scale = {}
    for ss in (0.0, 0.25, 0.5, 0.75, 1.0):
        corrupted, _ = simulate_volume(ref, "bias", ss, seed=3, spacing=tuple(io.voxel_sizes(img.affine)))
        scale[ss] = field_spread(corrupted, img.affine)
        log.info("simulated bias SS %.2f on %s: field sd %.3f", ss, BIAS_REFERENCE, scale[ss])
    vols = {}
    for fold in R.FOLDS:
        for r in R.fold_split(data, fold)["test"]:
            v = nib.load(str(data / r["file"]))
            x = np.asarray(v.dataobj, dtype=np.float32)
            vols[r["file"]] = {"fold": fold, "site": r["site"], "field_sd": field_spread(x[..., 0] if x.ndim > 3 else x, v.affine)}
            log.info("%s: field sd %.3f", r["file"], vols[r["file"]]["field_sd"])
    out = {"simulated_scale": scale, "reference": BIAS_REFERENCE, "volumes": vols}
    (HERE / "bias.json").write_text(json.dumps(out, indent=2))
    L = ["# Intensity non-uniformity of the clean held-out volumes (N4 field spread)", "",
         "Made by `diagnose.py bias`: the sd of the log bias field that N4 estimates inside the head mask. The "
         f"simulated scale: {BIAS_REFERENCE} corrupted with the simulator's bias (seed 3) at each SS, measured the same way.", "",
         "| simulated SS | " + " | ".join(f"{k:g}" for k in scale) + " |", "|---|" + "---|" * len(scale),
         "| field sd | " + " | ".join(f"{v:.3f}" for v in scale.values()) + " |", "",
         "| fold | volume | field sd | simulated SS of the same spread (interpolated) |", "|---|---|---|---|"]
    ss, sd = np.array(list(scale)), np.array(list(scale.values()))
    for f, v in sorted(vols.items(), key=lambda kv: -kv[1]["field_sd"]):
        L.append(f"| {v['fold']} | {f} | {v['field_sd']:.3f} | {float(np.interp(v['field_sd'], sd, ss)):.2f} |")
    (HERE / "bias.md").write_text("\n".join(L) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- adapt
def _bns(model):
    from torch import nn

    return [m for m in model.features if isinstance(m, nn.BatchNorm2d)]


def _scored_slices(x: np.ndarray, voxel_mm) -> np.ndarray:
    """The slices the scorer grades a volume on (a thick-slice scan's acquisition planes; else all)."""
    from artifactqc.encoder.score import acquisition_axis

    ax = acquisition_axis(voxel_mm)
    if ax is None:
        return x
    n = len(x) // 3
    return x[ax * n:(ax + 1) * n]


def bn_input_stats(model, stacks: list[np.ndarray]) -> list[tuple]:
    """Per BatchNorm layer of the conv stack: the per-channel mean and variance of its input over every slice
    and pixel of ``stacks`` (float64)."""
    import torch

    layers = _bns(model)
    acc = [[0.0, 0.0, 0] for _ in layers]

    def hook(i):
        def f(_mod, inp):
            x = inp[0].double()
            acc[i][0] = acc[i][0] + x.sum((0, 2, 3))
            acc[i][1] = acc[i][1] + (x * x).sum((0, 2, 3))
            acc[i][2] += x.shape[0] * x.shape[2] * x.shape[3]
        return f

    hooks = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    model.eval()
    with torch.no_grad():
        for s in stacks:
            model(torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))[:, None])
    for h in hooks:
        h.remove()
    return [(s / n, ss / n - (s / n) ** 2) for s, ss, n in acc]


def align_bn(model, site: list[np.ndarray], train_stats: list[tuple] | None):
    """A copy of ``model`` whose BatchNorm running statistics are aligned to ``site`` layer by layer:
    onto ``train_stats`` (bn_align), or replaced by the site's own statistics when it is None (AdaBN)."""
    import torch

    m2 = copy.deepcopy(model)
    orig = [(b.running_mean.double(), b.running_var.double()) for b in _bns(model)]
    for i, bn in enumerate(_bns(m2)):  # one pass per layer: each layer's input depends on the ones aligned before
        mu_s, var_s = bn_input_stats(m2, site)[i]
        if train_stats is None:
            new_m, new_v = mu_s, var_s
        else:
            (m, v), (mu_t, var_t) = orig[i], train_stats[i]
            ratio = torch.sqrt(var_s.clamp_min(1e-8) / var_t.clamp_min(1e-8))
            new_m, new_v = mu_s - (mu_t - m) * ratio, v * ratio ** 2
        bn.running_mean.copy_(new_m.float())
        bn.running_var.copy_(new_v.float())
    return m2


def pooled_features(model, stacks: list[np.ndarray], voxel_mm: list) -> np.ndarray:
    """The volume head's input (pooled per-slice hidden vectors) of each volume, as the scorer forms it."""
    import torch

    from artifactqc.encoder.network import pool_volume_features
    from artifactqc.encoder.score import predict_slices, slice_axes

    out = []
    for s, vm in zip(stacks, voxel_mm):
        part = _scored_slices(s, vm)
        h = predict_slices(model, part)["hidden"]
        if len(part) < len(s):  # a thick-slice scan's acquisition planes, pooled as if every orientation
            h = np.concatenate([h] * 3)
        out.append(pool_volume_features(torch.from_numpy(h), torch.from_numpy(slice_axes(len(h)))).numpy())
    return np.array(out)


def adapt_run(data: Path, fold: str, run_dir: Path, mode: str, override: dict | None, n_eval: int) -> dict:
    """One fold model's metrics with leave-one-volume-out test-time alignment (module docstring)."""
    import torch

    from artifactqc.encoder.score import score_slices
    from artifactqc.encoder.slices import extract_slices

    model = _model(run_dir, override, optimize=False)
    X, meta = R.load_eval_cache(data, fold, n_eval, R.thick_geometry(model.slice_cfg))
    vox = R.row_voxel_mm(data, meta)
    train = [extract_slices(data / f, model.slice_cfg)[0] for f in R.fold_split(data, fold)["train"]]
    train_stats = bn_input_stats(model, train) if mode == "bn_align" else None
    train_pool = pooled_features(model, train, [[1.0, 1.0, 1.0]] * len(train)) if mode == "vh_shift" else None
    clean = {m["volume"]: i for i, m in enumerate(meta) if m["kind"] == "clean"}
    # the unaligned model's pooled features of every clean held-out volume, once (vh_shift leaves them as they are)
    clean_pool = (dict(zip(clean, pooled_features(model, [X[j] for j in clean.values()], [vox[j] for j in clean.values()])))
                  if mode == "vh_shift" else None)
    rows: list = [None] * len(meta)
    for v in clean:
        others = [j for w, j in clean.items() if w != v]
        if mode == "vh_shift":
            mv = copy.deepcopy(model)
            site = np.mean([f for w, f in clean_pool.items() if w != v], axis=0)
            mv.volume_head.feat_mean += torch.from_numpy(site - train_pool.mean(0)).float()
        else:
            mv = align_bn(model, [_scored_slices(X[j], vox[j]) for j in others], train_stats)
        mv.eval()
        for i, m in enumerate(meta):
            if m["volume"] == v:
                rows[i] = score_slices(mv, np.asarray(X[i], dtype=np.float32), voxel_mm=vox[i])
    return R.fold_metrics(meta, rows) | {"fold": fold, "adapt": mode, "run": run_dir.name,
                                         "thick_geometry": R.thick_geometry(model.slice_cfg)}


def adapt_name(mode: str, override: dict | None) -> str:
    return f"metrics-adapt-{mode}{R.scoring_suffix('acquisition', 'head', override)}.json"


def cmd_adapt(args, data: Path) -> None:
    import torch

    torch.set_num_threads(args.threads)
    override = R.geometry_override(args)
    for fold in R.FOLDS:
        for d in _runs(fold, args.budget, args.tag, args.seeds):
            res = adapt_run(data, fold, d, args.mode, override, R.BUDGETS[args.budget]["eval_volumes"])
            (d / adapt_name(args.mode, override)).write_text(json.dumps(res, indent=2))
            log.info("%s %s %s: AUROC %.3f, clean below 0.5 %.2f", fold, d.name, args.mode,
                     res["quality_mean"]["auroc_ss_ge_0.5_vs_clean"], res["clean"]["fraction_below_0.5"])


def cmd_adapt_table(args) -> None:
    override = R.geometry_override(args)
    plain = R.metrics_name("acquisition", "head", override)
    L = ["# Test-time alignment to a new site's clean scans (scoring only)", "",
         "Each fold model scored with leave-one-volume-out alignment (`diagnose.py adapt`, modes in its docstring), "
         f"paired with the same model's plain scoring (`{plain}`): mean over the runs, paired difference mean ± sd. "
         f"Models: `{args.budget}` budget, tag `{args.tag}`, every seed run.", "",
         "| mode | runs | " + " | ".join(PAIRED) + " |", "|---|---|" + "---|" * len(PAIRED)]
    for mode in MODES:
        diffs, vals = {k: [] for k in PAIRED}, {k: [] for k in PAIRED}
        for fold in R.FOLDS:
            for d in _runs(fold, args.budget, args.tag):
                a, b = d / plain, d / adapt_name(mode, override)
                if not (a.is_file() and b.is_file()):
                    continue
                ha = R.headline(json.loads(a.read_text()))
                hb = R.headline(json.loads(b.read_text()))
                for k in PAIRED:
                    diffs[k].append(hb[k] - ha[k])
                    vals[k].append(hb[k])
        n = len(diffs[PAIRED[0]])
        if n:
            L.append(f"| `{mode}` | {n} | " + " | ".join(
                f"{np.mean(vals[k]):.3f} ({np.mean(diffs[k]):+.3f} ± {np.std(diffs[k], ddof=1) if n > 1 else 0:.3f})"
                for k in PAIRED) + " |")
    (HERE / "adapt.md").write_text("\n".join(L) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["offsets", "adapt", "adapt-table", "bias"])
    R.H.add_data_arg(ap, default=None)
    ap.add_argument("--budget", choices=list(R.BUDGETS), default="full")
    ap.add_argument("--tag", default="baseline")
    ap.add_argument("--mode", choices=MODES, default="vh_shift")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="adapt: only these seed runs (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thick-pixels", type=float, default=None)
    ap.add_argument("--thick-min-pixel", type=float, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.step == "adapt-table":
        cmd_adapt_table(args)
        return 0
    data = R.H.data_dir(args.data)
    if args.step == "offsets":
        cmd_offsets(args, data)
    elif args.step == "bias":
        cmd_bias(data)
    else:
        cmd_adapt(args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
