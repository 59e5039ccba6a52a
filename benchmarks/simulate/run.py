"""Calibrate and validate the artifact severities of artifactqc.simulate; measure slice-batch speed.

    python benchmarks/simulate/run.py calibrate [--data ../shared/data] [--workers 2]
        sweeps each artifact's physical parameter on real volumes (3D, SSIM in the head mask) and on slices
        of them (2D path), inverts the mean SSIM curve onto target_ssim(s) = 1 - D*s and rewrites the
        CALIBRATION block of src/artifactqc/simulate/calibration.py (+ calibration.json here).
    python benchmarks/simulate/run.py validate   -> results.json, results.md (severity -> SSIM table,
        Spearman per type per volume, band at severity 0.5, mixtures)
    python benchmarks/simulate/run.py report     -> results.md again from the json files + results_notes.md
    python benchmarks/simulate/run.py speed      -> speed_threads1.json (slices/s per type, 128x128, CPU)
    python benchmarks/simulate/run.py trainstep  -> trainstep_threads2.json (simulation vs encoder
        forward+backward per training step, 4 x 32 slices, 2 threads; 3D simulate_volume seconds per type)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "src"))

# >= 5 real volumes, 4 contrasts (T1w, T2w, FLAIR, PD), 1-2.4 mm voxels, skull-stripped and whole-head
VOLUMES = [
    "volumes/VolumeRenderingData/stroke_T1.nii.gz",
    "volumes/VolumeRenderingData/stroke_T2.nii.gz",
    "volumes/VolumeRenderingData/stroke_FLAIR.nii.gz",
    "volumes/NiChart/IXI012-HH-1211_T1.nii.gz",
    "volumes/NiChart/IXI015-HH-1258_T1.nii.gz",
    "volumes/niivue-demo-images/register_T2w.nii.gz",
    "volumes/niivue-images/chris_PD.nii.gz",
]

GRIDS = {  # physical parameter sweeps (3D and 2D)
    "noise": [0, 0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2],
    "ghosting": [0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "bias": [0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.3],
    "anisotropy": [1, 1.01, 1.03, 1.06, 1.1, 1.2, 1.35, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8],
    "motion": [0, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8],
}


def _load(data_dir: Path, rel: str):
    from artifactqc.io import load_volume, normalize_intensity, to_canonical
    from artifactqc.simulate import head_mask

    vol = load_volume(data_dir / rel)
    d, aff = to_canonical(vol.data, vol.affine)
    d = normalize_intensity(d)
    from artifactqc.io import voxel_sizes

    return d, head_mask(d), tuple(float(v) for v in voxel_sizes(aff))


def _ssim(d, c, m, margin: int = 6):
    """``simulate.ssim_masked`` computed on the mask's bounding box + margin (same values inside the mask:
    the gaussian window, sigma 1.5 truncated at 3.5 sd, reaches 5 voxels), to save time on large volumes."""
    from artifactqc.simulate import ssim_masked

    idx = np.nonzero(m)
    box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
    return ssim_masked(d[box], c[box], m[box])


def _sweep_volume(job):
    import torch

    torch.set_num_threads(1)
    from artifactqc.simulate import apply_artifact

    data_dir, vi, rel, artifact, k = job
    d, m, sp = _load(Path(data_dir), rel)
    out = []
    for val in GRIDS[artifact]:
        if (artifact == "anisotropy" and val == 1) or val == 0:
            out.append(1.0)
            continue
        c, _ = apply_artifact(d, artifact, val, np.random.default_rng(1000 + vi + 100 * k), sp)
        out.append(_ssim(d, c, m))
    return artifact, vi, k, out


def _slices(data_dir: Path, size: int = 128):
    """9 slices per volume (3 per axis at 35/50/65 % of the mask extent), padded square, resized to size."""
    import torch
    import torch.nn.functional as F

    xs, ms = [], []
    for rel in VOLUMES:
        d, m, _ = _load(data_dir, rel)
        for ax in range(3):
            idx = np.nonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))[0]
            for q in (0.35, 0.5, 0.65):
                k = int(idx[0] + q * (idx[-1] - idx[0]))
                sl = np.take(d, k, axis=ax)
                ml = np.take(m, k, axis=ax)
                h, w = sl.shape
                n = max(h, w)
                pad = ((n - h) // 2, n - h - (n - h) // 2), ((n - w) // 2, n - w - (n - w) // 2)
                sl = np.pad(sl, pad)
                ml = np.pad(ml, pad)
                t = torch.from_numpy(sl)[None, None]
                xs.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
                tm = torch.from_numpy(ml.astype(np.float32))[None, None]
                ms.append(F.interpolate(tm, size=(size, size), mode="nearest") > 0.5)
    return torch.cat(xs).clamp_min(0), torch.cat(ms)


def _sweep_2d(data_dir: Path, seeds=(0, 1, 2), types=None):
    import torch

    from artifactqc import simulate as S

    x, m = _slices(data_dir)
    res = {}
    for a in types or S.ARTIFACTS:
        j = S.ARTIFACTS.index(a)
        curves = []
        for val in GRIDS[a]:
            vals = torch.zeros(len(x), 5, dtype=torch.float64)
            if a == "anisotropy":
                vals[:, :] = 0
                vals[:, j] = val
            else:
                vals[:, j] = val
            ss = []
            for sd in seeds:
                y = S.apply_slices(x, vals, torch.Generator().manual_seed(sd))
                ss.append(S.ssim_slices(x, y, m))
            curves.append(torch.stack(ss).mean(0).numpy())  # [n_slices]
        res[a] = np.stack(curves, 1)  # [n_slices, n_grid]
    return res


def _invert(grid, ssim_curve, d, method: str = "linear"):
    """Parameter at each severity knot so that the mean SSIM equals 1 - d*s (monotone interpolation).

    ``method="pchip"`` interpolates the parameter as a monotone cubic (PCHIP) function of SSIM instead of
    piecewise-linearly: on a coarse grid a curved SSIM(parameter) (ghosting: ~quadratic; motion: flattening)
    otherwise biases the knots between grid points (validation SSIM below / above the target)."""
    from artifactqc.simulate import SEVERITY_KNOTS

    g = np.asarray(grid, dtype=np.float64)
    y = np.minimum.accumulate(np.asarray(ssim_curve, dtype=np.float64))  # enforce monotone decrease
    y = y - 1e-9 * np.arange(len(y))  # strictly decreasing for interp
    out, clipped = [], []
    for s in SEVERITY_KNOTS:
        t = 1.0 - d * s
        if t < y[-1]:
            clipped.append(s)
        if method == "pchip":
            from scipy.interpolate import PchipInterpolator

            out.append(float(PchipInterpolator(-y, g, extrapolate=False)(np.clip(-t, -y[0], -y[-1]))))
        else:
            out.append(float(np.interp(-t, -y, g)))
    out[0] = float(g[0])
    return [round(v, 5) for v in out], clipped


def _write_calibration(cal3, cal2, source):
    path = REPO / "src" / "artifactqc" / "simulate" / "calibration.py"
    text = path.read_text()

    def fmt(name, cal):
        lines = [f"{name} = {{"]
        for a, v in cal.items():
            lines.append(f'    "{a}": {json.dumps(v)},')
        lines.append("}")
        return "\n".join(lines)

    block = (
        "# BEGIN CALIBRATION (generated; do not edit by hand)\n"
        + fmt("CALIBRATION_3D", cal3)
        + "\n"
        + fmt("CALIBRATION_2D", cal2)
        + f"\nCALIBRATION_SOURCE = {json.dumps(source)}\n# END CALIBRATION"
    )
    new = re.sub(r"# BEGIN CALIBRATION.*?# END CALIBRATION", block, text, flags=re.S)
    path.write_text(new)


def calibrate(data_dir: Path, workers: int, types=None, seeds: int = 3):
    from artifactqc import simulate as S

    d = S.TARGET_SSIM_DROP
    types = tuple(types or S.ARTIFACTS)
    jobs = [(str(data_dir), vi, rel, a, k) for a in types for vi, rel in enumerate(VOLUMES) for k in range(seeds)]
    draws = {a: [[None] * seeds for _ in VOLUMES] for a in types}
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for a, vi, k, out in ex.map(_sweep_volume, jobs):
            draws[a][vi][k] = out
            print(f"[{time.time() - t0:6.0f}s] 3D {a:10s} {VOLUMES[vi].split('/')[-1]:32s} seed{k} "
                  f"{np.round(out, 3).tolist()}", flush=True)
    curves3 = {a: np.mean(np.array(draws[a]), 1) for a in types}  # per volume, mean over seeds
    c2 = _sweep_2d(data_dir, types=types)
    print(f"[{time.time() - t0:6.0f}s] 2D sweeps done", flush=True)
    cal3, cal2 = dict(S.CALIBRATION_3D), dict(S.CALIBRATION_2D)
    report = {"target_drop": d, "grids": GRIDS, "volumes": VOLUMES, "seeds_3d": seeds, "types": {}}
    if types != S.ARTIFACTS and (HERE / "calibration.json").is_file():  # partial re-calibration: merge
        report["types"] = json.loads((HERE / "calibration.json").read_text())["types"]
    for a in types:
        m3 = np.mean(np.array(curves3[a]), 0)
        m2 = c2[a].mean(0)
        cal3[a], clip3 = _invert(GRIDS[a], m3, d)
        cal2[a], clip2 = _invert(GRIDS[a], m2, d)
        report["types"][a] = {
            "param": S.PARAM_NAMES[a],
            "grid": GRIDS[a],
            "seeds_3d": seeds,
            "ssim3d_per_volume": np.round(np.array(curves3[a]), 4).tolist(),
            "ssim3d_per_draw": np.round(np.array(draws[a]), 4).tolist(),
            "ssim3d_mean": np.round(m3, 4).tolist(),
            "ssim2d_mean": np.round(m2, 4).tolist(),
            "map3d": cal3[a],
            "map2d": cal2[a],
            "severities_beyond_grid_3d": clip3,
            "severities_beyond_grid_2d": clip2,
        }
        print(a, "3D", cal3[a], "clipped", clip3)
        print(a, "2D", cal2[a], "clipped", clip2)
    (HERE / "calibration.json").write_text(json.dumps(report, indent=1))
    _write_calibration(cal3, cal2, "benchmarks/simulate/run.py calibrate (" + time.strftime("%Y-%m-%d") + ")")
    print("wrote calibration.json and the CALIBRATION block of simulate/calibration.py")


def refit(types, method: str = "pchip"):
    """Re-fit the 3D maps of ``types`` from the sweeps stored in calibration.json (no new simulation)."""
    from artifactqc import simulate as S

    rep_ = json.loads((HERE / "calibration.json").read_text())
    cal3, cal2 = dict(S.CALIBRATION_3D), dict(S.CALIBRATION_2D)
    for a in types:
        r = rep_["types"][a]
        grid = r.get("grid", rep_["grids"][a])
        cal3[a], clip = _invert(grid, r["ssim3d_mean"], S.TARGET_SSIM_DROP, method)
        r["map3d"], r["map3d_method"], r["severities_beyond_grid_3d"] = cal3[a], method, clip
        print(a, "3D", cal3[a], "clipped", clip)
    (HERE / "calibration.json").write_text(json.dumps(rep_, indent=1))
    src = S.CALIBRATION_SOURCE.split(";")[0] + f"; 3D {', '.join(types)} re-fitted ({method}) " + time.strftime("%Y-%m-%d")
    _write_calibration(cal3, cal2, src)


def _validate_volume(job):
    import torch

    torch.set_num_threads(1)
    from artifactqc.simulate import SEVERITY_KNOTS, simulate_volume

    data_dir, vi, rel, artifact, k = job
    d, m, sp = _load(Path(data_dir), rel)
    out = [1.0]
    for s in SEVERITY_KNOTS[1:]:  # severity 0 is the exact identity (tested): SSIM 1
        c, p = simulate_volume(d, artifact, float(s), seed=2000 + vi + 100 * k, spacing=sp)
        out.append(_ssim(d, c, m))
    return artifact, vi, k, out


def validate(data_dir: Path, workers: int, seeds: int = 3, types=None):
    import torch
    from scipy.stats import spearmanr

    from artifactqc import simulate as S

    kinds = tuple(types or (S.ARTIFACTS + ("mix",)))
    jobs = [(str(data_dir), vi, rel, a, k) for a in kinds for vi, rel in enumerate(VOLUMES) for k in range(seeds)]
    draws = {a: [[None] * seeds for _ in VOLUMES] for a in kinds}
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers) as ex:
        for a, vi, k, out in ex.map(_validate_volume, jobs):
            draws[a][vi][k] = out
            print(f"[{time.time() - t0:6.0f}s] {a:10s} {VOLUMES[vi].split('/')[-1]:32s} seed{k} "
                  f"{np.round(out, 3).tolist()}", flush=True)
    # 2D path: held-out seeds
    x, m = _slices(data_dir)
    res2 = {}
    for a in kinds:
        rows = []
        for s in S.SEVERITY_KNOTS:
            ss = []
            for sd in (10, 11, 12):
                y = S.simulate_slices(x, [a] * len(x), torch.full((len(x),), float(s)), torch.Generator().manual_seed(sd))
                ss.append(S.ssim_slices(x, y, m))
            rows.append(torch.stack(ss).mean(0).numpy())
        res2[a] = np.stack(rows, 1)  # [n_slices, n_sev]
    sev = np.array(S.SEVERITY_KNOTS)
    out = {"severities": sev.tolist(), "target": S.target_ssim(sev).round(4).tolist(), "volumes": VOLUMES,
           "seeds_3d": seeds, "calibration_source": S.CALIBRATION_SOURCE, "types": {}}
    for a in kinds:
        dr = np.array(draws[a])  # [n_vol, seeds, n_sev]
        arr = dr.mean(1)  # per volume, mean over seeds
        flat = dr.reshape(-1, dr.shape[-1])
        rhos = [float(spearmanr(sev, r).statistic) for r in arr]
        rhos_draw = [float(spearmanr(sev, r).statistic) for r in flat]
        rhos2 = [float(spearmanr(sev, r).statistic) for r in res2[a]]
        out["types"][a] = {
            "ssim3d_per_draw": dr.round(4).tolist(),
            "ssim3d_per_volume": arr.round(4).tolist(),
            "ssim3d_mean": arr.mean(0).round(4).tolist(),
            "ssim3d_sd": arr.std(0, ddof=1).round(4).tolist(),
            "ssim3d_sd_draws": flat.std(0, ddof=1).round(4).tolist(),
            "spearman3d_per_volume": np.round(rhos, 4).tolist(),
            "spearman3d_max_over_draws": float(np.max(rhos_draw)),
            "ssim2d_mean": res2[a].mean(0).round(4).tolist(),
            "ssim2d_sd": res2[a].std(0, ddof=1).round(4).tolist(),
            "spearman2d_min_over_slices": float(np.nanmin(rhos2)),
            "spearman2d_median_over_slices": float(np.nanmedian(rhos2)),
        }
    if types:  # partial re-validation: keep the other types' rows
        old = json.loads((HERE / "results.json").read_text())
        out["types"] = {a: out["types"].get(a, old["types"].get(a)) for a in S.ARTIFACTS + ("mix",)}
        out["revalidated"] = sorted(set(old.get("revalidated", [])) | set(kinds))
    at5 = [out["types"][a]["ssim3d_mean"][5] for a in S.ARTIFACTS]
    at5_2 = [out["types"][a]["ssim2d_mean"][5] for a in S.ARTIFACTS]
    out["band_at_0.5_3d"] = [min(at5), max(at5)]
    out["band_at_0.5_2d"] = [min(at5_2), max(at5_2)]
    (HERE / "results.json").write_text(json.dumps(out, indent=1))
    _write_md(out)
    print((HERE / "results.md").read_text())


def _write_md(out):
    sev = out["severities"]
    L = ["# Severity calibration: SSIM to the clean image (head/brain mask) vs severity", ""]
    L.append(f"Calibration: `{out['calibration_source']}`. Target curve: SSIM(s) = 1 - D*s, D = "
             f"{1 - out['target'][-1]:.2f}. Volumes ({len(out['volumes'])}): " + ", ".join(
                 v.split('/')[-1] for v in out["volumes"]) + ".")
    L.append("")
    n3 = out.get("seeds_3d", 1)
    for dim, key, sdkey in ((f"3D volumes (mean ± sd over volumes; each volume the mean of {n3} seeds)",
                             "ssim3d_mean", "ssim3d_sd"),
                            ("2D slice path (mean ± sd over 63 slices, 3 seeds averaged)", "ssim2d_mean", "ssim2d_sd")):
        L.append(f"## {dim}")
        L.append("")
        L.append("| type | " + " | ".join(f"{s:.1f}" for s in sev) + " |")
        L.append("|---|" + "---|" * len(sev))
        L.append("| target | " + " | ".join(f"{t:.3f}" for t in out["target"]) + " |")
        for a, r in out["types"].items():
            L.append(f"| {a} | " + " | ".join(f"{m:.3f}±{s:.3f}" for m, s in zip(r[key], r[sdkey])) + " |")
        L.append("")
    L.append("## Monotonicity (Spearman of SSIM vs severity 0, 0.1, …, 1)")
    L.append("")
    L.append("| type | 3D per volume (max) | 3D all volumes | 3D worst single draw | 2D median over slices "
             "| 2D worst slice |")
    L.append("|---|---|---|---|---|---|")
    for a, r in out["types"].items():
        rh = r["spearman3d_per_volume"]
        L.append(f"| {a} | {max(rh):.3f} | {' '.join(f'{v:.2f}' for v in rh)} | "
                 f"{r.get('spearman3d_max_over_draws', max(rh)):.3f} | "
                 f"{r['spearman2d_median_over_slices']:.3f} | {r['spearman2d_min_over_slices']:.3f} |")
    L.append("")
    b3, b2 = out["band_at_0.5_3d"], out["band_at_0.5_2d"]
    L.append(f"**Band at severity 0.5** (five single types, mean SSIM): 3D {b3[0]:.3f}–{b3[1]:.3f} "
             f"(centre {(b3[0] + b3[1]) / 2:.3f} ± {(b3[1] - b3[0]) / 2:.3f}); "
             f"2D {b2[0]:.3f}–{b2[1]:.3f} (centre {(b2[0] + b2[1]) / 2:.3f} ± {(b2[1] - b2[0]) / 2:.3f}); "
             f"target {out['target'][5]:.3f}.")
    L.append("")
    notes = HERE / "results_notes.md"  # hand-written findings, kept across re-runs
    if notes.is_file():
        L += [notes.read_text().rstrip(), ""]
    L += _speed_md()
    (HERE / "results.md").write_text("\n".join(L))


def _speed_md() -> list[str]:
    L = []
    sp = HERE / "speed_threads1.json"
    if sp.is_file():
        r = json.loads(sp.read_text())
        kinds = [k for k in ("noise", "ghosting", "bias", "anisotropy", "motion", "mix") if k in r]
        L += [f"## Slice-batch speed (2D path, `simulate_slices`, {r['n_slices']} slices of {r['size']}, "
              f"{r['torch_threads']} torch thread, CPU)", "",
              "Measured on a shared, loaded 2-core machine (other engineers' jobs running): best of 3, slices/s.", "",
              "| " + " | ".join(kinds) + " |", "|" + "---|" * len(kinds),
              "| " + " | ".join(f"{r[k]:.0f}" for k in kinds) + " |", "",
              "Reproduce: `.venv/bin/python benchmarks/simulate/run.py speed --threads 1`.", ""]
    ts = HERE / "trainstep_threads2.json"
    if ts.is_file():
        r = json.loads(ts.read_text())
        L += [f"## Simulation vs encoder training step ({r['batch']}, {r['torch_threads']} torch threads)", "",
              f"`ArtifactEncoder()` (default config) forward + backward + AdamW step on {r['batch']}: "
              f"**{r['train_step_s'] * 1000:.0f} ms** (median). 2D simulation of the same step's slices "
              "(negatives = half the batch; all = the whole batch). " + r["note"] +
              f" (load average {r['loadavg_start']:.1f} at the start, {r['loadavg_end']:.1f} at the end).", "",
              "| type | negatives (ms) | all slices (ms) | slices/s | negatives / train step |", "|---|---|---|---|---|"]
        for a, v in r["types"].items():
            L.append(f"| {a} | {v['sim_negatives_s'] * 1000:.0f} | {v['sim_all_s'] * 1000:.0f} | {v['slices_per_s']:.0f} "
                     f"| {v['fraction_of_train_step_negatives']:.2f} |")
        L.append("")
        L += ["### 3D `simulate_volume` seconds per call (severity 0.5, median of 3 seeds)", ""]
        kinds = ["noise", "ghosting", "bias", "anisotropy", "motion", "mix"]
        L += ["| volume | shape | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for name, v in r["volume_3d"].items():
            L.append(f"| {name} | {'×'.join(map(str, v['shape']))} | " + " | ".join(f"{v[k]:.2f}" for k in kinds) + " |")
        L += ["", "Reproduce: `.venv/bin/python benchmarks/simulate/run.py trainstep` (writes `trainstep_threads2.json`).", ""]
    return L


def speed(n: int = 512, reps: int = 3, threads: int = 1):
    import torch

    from artifactqc import simulate as S

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    head = ((yy**2 + xx**2) < 0.8).float()
    x = (head * (0.5 + 0.3 * torch.rand(n, 1, 128, 128, generator=g))).float()
    res = {"n_slices": n, "size": "128x128", "torch_threads": threads,
           "note": "measured on a shared, loaded 2-core machine (other jobs running)"}
    for a in S.ARTIFACTS + ("mix",):
        sev = torch.rand(n, generator=g) * 0.9 + 0.1
        S.simulate_slices(x[:32], [a] * 32, sev[:32], generator=g)  # warm-up
        best = 1e9
        for _ in range(reps):
            t = time.perf_counter()
            S.simulate_slices(x, [a] * n, sev, generator=g)
            best = min(best, time.perf_counter() - t)
        res[a] = round(n / best, 1)
        print(f"{a:10s} {n / best:8.0f} slices/s", flush=True)
    (HERE / f"speed_threads{threads}.json").write_text(json.dumps(res, indent=1))


def _step_loss(out):
    """A stand-in training loss touching every output (the real loss's cost is negligible next to the convs)."""
    return sum(v.float().square().mean() for v in out.values())


def trainstep(data_dir: Path, threads: int = 2, reps: int = 7, triplets: int = 32):
    """Simulation time of one training step's slices vs the encoder's forward+backward on the same batch.

    A training step feeds 4 x ``triplets`` slices of 128x128 (anchor, positive, two negatives) through
    ``artifactqc.encoder.network.ArtifactEncoder`` (default config, train mode, AdamW step). The 2D simulator corrupts
    the two negatives (2 x ``triplets`` slices); the worst case (all 4 x ``triplets`` slices) is timed too.
    Each repetition times the train step and every simulation back to back, so both see the same machine
    load; medians are reported. Then ``simulate_volume`` (3D, the pool of inference-path training volumes)
    is timed per type on a 1 mm volume and on a 0.88 mm whole-head volume cropped to the head.
    """
    import torch

    from artifactqc import simulate as S
    from artifactqc.encoder.network import ArtifactEncoder

    torch.set_num_threads(threads)
    n = 4 * triplets
    if (data_dir / "MANIFEST.tsv").is_file():
        x, _ = _slices(data_dir)
        x = x[torch.arange(n) % len(x)].contiguous()
        src = "real slices (the calibration slices, repeated)"
    else:
        sys.exit(f"development data not found at {data_dir} (pass --data)")
    g = torch.Generator().manual_seed(0)
    model = ArtifactEncoder()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        out = model(x)
        loss = _step_loss(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    kinds = S.ARTIFACTS + ("mix",)
    sev = torch.rand(n, generator=g) * 0.9 + 0.1
    timings = {"train_step": []}
    timings.update({f"sim_{a}_{k}": [] for a in kinds for k in (n // 2, n)})
    train_step()  # warm-up
    for a in kinds:
        S.simulate_slices(x[:8], [a] * 8, sev[:8], generator=g)
    for r in range(reps):
        t = time.perf_counter()
        train_step()
        timings["train_step"].append(time.perf_counter() - t)
        for a in kinds:
            for k in (n // 2, n):
                t = time.perf_counter()
                S.simulate_slices(x[:k], [a] * k, sev[:k], generator=g)
                timings[f"sim_{a}_{k}"].append(time.perf_counter() - t)
        print(f"rep {r}: train step {timings['train_step'][-1]:.3f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in timings.items()}
    res = {"torch_threads": threads, "batch": f"4 x {triplets} slices of 128x128", "slices": src,
           "note": "medians of interleaved repetitions on a shared, loaded 2-core machine",
           "loadavg_start": os.getloadavg()[0], "train_step_s": round(med["train_step"], 4), "types": {}}
    for a in kinds:
        s2, s4 = med[f"sim_{a}_{n // 2}"], med[f"sim_{a}_{n}"]
        res["types"][a] = {"sim_negatives_s": round(s2, 4), "sim_all_s": round(s4, 4),
                           "slices_per_s": round(n / s4, 1), "fraction_of_train_step_negatives": round(s2 / med["train_step"], 3)}
        print(f"{a:10s} negatives {s2 * 1000:7.1f} ms  all {s4 * 1000:7.1f} ms  ({s2 / med['train_step']:.2f} of a step)")
    # 3D simulate_volume per type
    from artifactqc.io import foreground_mask

    vols3 = {"stroke_T1 (1 mm, brain, 124x160x140)": "volumes/VolumeRenderingData/stroke_T1.nii.gz",
             "chris_t1 (0.88 mm, whole head, cropped to the head + 8 voxels)": "volumes/niivue-images/chris_t1.nii.gz"}
    res["volume_3d"] = {}
    for name, rel in vols3.items():
        d, _, sp = _load(data_dir, rel)
        idx = np.nonzero(foreground_mask(d))
        box = tuple(slice(max(int(i.min()) - 8, 0), int(i.max()) + 9) for i in idx)
        d = np.ascontiguousarray(d[box])
        row = {"shape": list(d.shape), "spacing_mm": [round(v, 3) for v in sp]}
        for a in kinds:
            ts = []
            for sd in range(3):
                t = time.perf_counter()
                S.simulate_volume(d, a, 0.5, seed=sd, spacing=sp)
                ts.append(time.perf_counter() - t)
            row[a] = round(float(np.median(ts)), 3)
        res["volume_3d"][name] = row
        print(name, row, flush=True)
    res["loadavg_end"] = os.getloadavg()[0]
    (HERE / f"trainstep_threads{threads}.json").write_text(json.dumps(res, indent=1))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["calibrate", "refit", "validate", "speed", "trainstep", "report"])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the speed test (default 1) / trainstep (default 2)")
    ap.add_argument("--types", nargs="*", default=None, help="calibrate only these types (merge with the rest)")
    ap.add_argument("--seeds", type=int, default=3, help="random draws per volume in the 3D sweeps")
    args = ap.parse_args()
    data_dir = Path(args.data).resolve()
    if args.mode not in ("speed", "report", "refit") and not (data_dir / "MANIFEST.tsv").is_file():
        sys.exit(f"development data not found at {data_dir} (pass --data)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.mode == "calibrate":
        calibrate(data_dir, args.workers, args.types, args.seeds)
    elif args.mode == "validate":
        validate(data_dir, args.workers, args.seeds, args.types)
    elif args.mode == "refit":
        refit(args.types or ["ghosting", "motion"])
    elif args.mode == "trainstep":
        trainstep(data_dir, threads=args.threads or 2)
    elif args.mode == "report":  # re-render results.md from results.json + speed/trainstep json + notes
        _write_md(json.loads((HERE / "results.json").read_text()))
    else:
        speed(threads=args.threads or 1)


if __name__ == "__main__":
    main()
