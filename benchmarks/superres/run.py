"""Benchmark: super-resolution of simulated 2D acquisitions vs cubic-spline and trilinear interpolation.

Protocol (independent of the method's own code: the degradation, the baselines and the metrics are
written here, with scipy):

1. real isotropic ~1 mm volumes from ``../shared/data`` (T1w, T2w, FLAIR), canonical (RAS) orientation,
   cropped to the head (``io.foreground_mask`` bounding box + 4 voxels);
2. a 2D acquisition of axial slices (inferior-superior axis) of thickness = spacing = ``k`` voxels
   (k = 2, 3, 4, 5), slice centres placed as a scanner places them: ``n_slices = floor(n / k)`` contiguous
   slices whose slab is centred on the volume; each slice integrates the fine voxels with a **box** profile
   (width k) or a **Gaussian** profile (FWHM k), computed exactly per fine voxel;
3. the thick-slice volume gets its affine (slice spacing k voxels, origin at the first slice centre) and is
   restored onto the fine voxels of the slab by
   - ``cubic``: the not-a-knot cubic spline through the acquired slice centres (scipy CubicSpline),
   - ``trilinear``: linear interpolation between the slice centres (constant beyond the first/last),
   - ``sr``: ``artifactqc.preprocess.superres.superres(method="learned")``, from the array + affine only;
4. PSNR (peak = max of the truth in the mask) and SSIM (Gaussian window sigma 1.5 voxels) against the
   1 mm truth inside a head mask (``io.foreground_mask``, closed and hole-filled) over the slab; the SR's
   own wall and CPU time.

    .venv/bin/python benchmarks/superres/run.py [--quick] [--threads 2] [--data ../shared/data]
    .venv/bin/python benchmarks/superres/run.py --from-tsv benchmarks/superres/results.tsv   # tables only
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.special import erf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/_harness.py
import _harness as H  # noqa: E402

H.use_package()

from artifactqc import io as aq_io  # noqa: E402
from artifactqc.preprocess import superres as slicesr  # noqa: E402

#: (contrast, path under the data root): whole-head 1 mm 3D acquisitions first, then the stroke trio
VOLUMES = [
    ("T1w", "volumes/niivue-images/chris_t1.nii.gz"),
    ("T2w", "volumes/T2lesion/arc_M2265_T2w.nii.gz"),
    ("FLAIR", "volumes/py_synthsr/synthsr_example_FLAIR.nii.gz"),
    ("T1w", "volumes/VolumeRenderingData/stroke_T1.nii.gz"),
    ("T2w", "volumes/VolumeRenderingData/stroke_T2.nii.gz"),
    ("FLAIR", "volumes/VolumeRenderingData/stroke_FLAIR.nii.gz"),
]
FACTORS = [2, 3, 4, 5]
PROFILES = ["box", "gaussian"]
AXIS = 2  # inferior-superior after canonical reordering: axial slices


# ---------------------------------------------------------------------------------------------
# protocol steps
# ---------------------------------------------------------------------------------------------


def load_truth(path: Path) -> tuple[np.ndarray, float]:
    """Canonical, head-cropped volume and its (isotropic) voxel size."""
    vol = aq_io.load_volume(path)
    data, aff = aq_io.to_canonical(vol.data, vol.affine)
    box = aq_io.mask_box(aq_io.foreground_mask(data), margin=4)
    return np.ascontiguousarray(data[box], np.float32), float(np.mean(aq_io.voxel_sizes(aff)))


def acquire(truth: np.ndarray, k: int, profile: str) -> tuple[np.ndarray, int, np.ndarray]:
    """Thick slices along AXIS: ``(low, first, centres)``; the slab covers fine voxels
    ``first .. first + n_slices*k - 1``, slice j is centred at fine position ``centres[j]``."""
    n = truth.shape[AXIS]
    m = n // k
    first = (n - m * k) // 2
    centres = first + k * np.arange(m) + (k - 1) / 2.0
    i = np.arange(n, dtype=np.float64)
    lo, hi = i[None, :] - 0.5 - centres[:, None], i[None, :] + 0.5 - centres[:, None]
    if profile == "box":
        w = np.clip(np.minimum(hi, k / 2) - np.maximum(lo, -k / 2), 0, None)
    else:
        s = k / (2 * math.sqrt(2 * math.log(2))) * math.sqrt(2)
        w = 0.5 * (erf(hi / s) - erf(lo / s))
    w /= w.sum(1, keepdims=True)
    low = np.tensordot(truth.astype(np.float64), w, axes=([AXIS], [1]))  # slices on the last axis
    return low.astype(np.float32), first, centres


def baseline(low: np.ndarray, centres: np.ndarray, fine: np.ndarray, kind: str) -> np.ndarray:
    """Cubic spline / linear interpolation through the slice centres, evaluated at ``fine``."""
    x = np.clip(fine, centres[0], centres[-1])
    if kind == "cubic":
        return CubicSpline(centres, low, axis=AXIS, bc_type="not-a-knot")(x).astype(np.float32)
    j = np.clip(np.searchsorted(centres, x, side="right") - 1, 0, len(centres) - 2)
    a = ((x - centres[j]) / (centres[j + 1] - centres[j]))[None, None, :]
    return (low[:, :, j] * (1 - a) + low[:, :, j + 1] * a).astype(np.float32)


def head_mask(truth: np.ndarray) -> np.ndarray:
    m = ndimage.binary_closing(aq_io.foreground_mask(truth), iterations=2)
    return ndimage.binary_fill_holes(m)


def psnr(ref, test, mask) -> float:
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    mse = float(np.mean((ref[mask] - test[mask]) ** 2))
    return 10 * math.log10(float(ref[mask].max()) ** 2 / mse)


def ssim(ref, test, mask, sigma: float = 1.5) -> float:
    x, y = ref.astype(np.float64), test.astype(np.float64)
    L = float(x[mask].max() - x[mask].min())
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    g = lambda a: ndimage.gaussian_filter(a, sigma, truncate=3.5)  # noqa: E731
    mx, my = g(x), g(y)
    vx, vy, cxy = g(x * x) - mx * mx, g(y * y) - my * my, g(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[mask].mean())


def run_sr(low: np.ndarray, k: int, spacing: float, centres: np.ndarray, params: dict):
    """The package's super-resolution, seeing only the thick-slice array and its affine."""
    aff = np.diag([spacing, spacing, k * spacing, 1.0])
    aff[2, 3] = centres[0] * spacing
    (sr, new_aff, info), cpu, wall = H.timed(slicesr.superres, low, aff, **params)
    # the output grid must be the slab's fine voxels (same spacing, first centre = first slab voxel)
    z0 = (centres[0] - (k - 1) / 2.0) * spacing
    assert abs(new_aff[2, 2] - spacing) < 1e-6 and abs(new_aff[2, 3] - z0) < 1e-6, new_aff
    return sr, info, cpu, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_data_arg(ap)
    H.add_threads_arg(ap, default=2)
    ap.add_argument("--quick", action="store_true", help="first 3 volumes, factors 3 and 5")
    ap.add_argument("--volumes", type=int, default=3, help="use the first n volumes of VOLUMES")
    ap.add_argument("--only", type=int, default=None, help="use only VOLUMES[i] (to run volumes in parallel)")
    ap.add_argument("--factors", default=None, help="comma-separated, default 2,3,4,5")
    ap.add_argument("--profiles", default="box,gaussian")
    ap.add_argument("--set", action="append", default=[], help="SR parameter override key=value")
    H.add_out_arg(ap, HERE)
    ap.add_argument("--tag", default="", help="suffix of the results files (e.g. quick)")
    ap.add_argument("--from-tsv", default=None, help="only rebuild results.md from results TSVs (comma-separated)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out = Path(args.out)
    if args.from_tsv:
        import pandas as pd

        tsv = out / f"results{args.tag}.tsv"
        rows = pd.concat([pd.read_csv(p, sep="\t") for p in args.from_tsv.split(",")], ignore_index=True)
        rows.to_csv(tsv, sep="\t", index=False, float_format="%.4f")
        settings = json.loads((out / f"results{args.tag}.json").read_text())["settings"]
        settings["volumes"] = sorted(set(rows["volume"]), key=[v for _, v in VOLUMES].index)
        (out / f"results{args.tag}.json").write_text(json.dumps({"settings": settings,
                                                                 "rows": rows.to_dict("records")}, indent=1))
        write_md(out, tsv, settings, tag=args.tag)
        return 0
    root = H.data_dir(args.data)
    factors = [int(f) for f in args.factors.split(",")] if args.factors else ([3, 5] if args.quick else FACTORS)
    params = {"method": "learned"}
    for kv in args.set:
        k, v = kv.split("=", 1)
        params[k] = type(getattr(slicesr.SRParams(), k))(v)
    volumes = [VOLUMES[args.only]] if args.only is not None else VOLUMES[: args.volumes]
    settings = {
        "sr_params": {**vars(slicesr.SRParams()), **params},
        "factors": factors,
        "profiles": args.profiles.split(","),
        "volumes": [v for _, v in volumes],
        "machine": f"{platform.machine()}, 2 cores shared with 5 other jobs (load average 12-19)",
    }
    rows = []
    tsv = out / f"results{args.tag}.tsv"
    for contrast, rel in volumes:
        truth, spacing = load_truth(root / rel)
        for profile in settings["profiles"]:
            for k in factors:
                low, first, centres = acquire(truth, k, profile)
                m = low.shape[AXIS]
                fine = np.arange(first, first + m * k, dtype=np.float64)
                ref = truth[:, :, first : first + m * k]
                mask = head_mask(ref)
                row = {"contrast": contrast, "volume": rel, "shape": "x".join(map(str, truth.shape)),
                       "profile": profile, "factor": k}
                for kind in ("cubic", "trilinear"):
                    est = baseline(low, centres, fine, "cubic" if kind == "cubic" else "linear")
                    row[f"psnr_{kind}"], row[f"ssim_{kind}"] = psnr(ref, est, mask), ssim(ref, est, mask)
                sr, info, cpu, wall = run_sr(low, k, spacing, centres, params)
                assert sr.shape == ref.shape, (sr.shape, ref.shape)
                row["psnr_sr"], row["ssim_sr"] = psnr(ref, sr, mask), ssim(ref, sr, mask)
                row["dpsnr"] = row["psnr_sr"] - row["psnr_cubic"]
                row.update(sr_wall_s=wall, sr_cpu_s=cpu, train_s=info.train_seconds, apply_s=info.apply_seconds,
                           est_profile=info.profile, est_width=info.profile_width / k if k else 0.0)
                rows.append(row)
                print(json.dumps({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
                import pandas as pd

                pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False, float_format="%.4f")
    (out / f"results{args.tag}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    write_md(out, tsv, settings, tag=args.tag)
    return 0


def write_md(out: Path, tsv, settings: dict, tag: str = "") -> None:
    """results.md: per-volume table and the mean by profile and factor, with the target check."""
    import pandas as pd

    df = pd.read_csv(tsv, sep="\t")
    cols = ["psnr_sr", "psnr_cubic", "psnr_trilinear", "dpsnr", "ssim_sr", "ssim_cubic", "ssim_trilinear", "sr_wall_s",
            "sr_cpu_s"]
    mean = df.groupby(["profile", "factor"])[cols].mean().reset_index()
    worst = df.groupby(["profile", "factor"])["dpsnr"].min().rename("dpsnr_min").reset_index()
    mean = mean.merge(worst, on=["profile", "factor"])
    target = mean[mean.factor >= 3]
    met = bool((target.dpsnr >= 1.0).all())
    per = df[["contrast", "volume", "profile", "factor", "psnr_sr", "psnr_cubic", "psnr_trilinear", "dpsnr",
              "ssim_sr", "ssim_cubic", "ssim_trilinear", "est_profile", "est_width", "sr_wall_s", "sr_cpu_s"]]
    md = [
        f"# Super-resolution benchmark results{(' (' + tag.strip('_') + ')') if tag else ''}",
        "",
        "Protocol: see README.md. SR settings: `" + json.dumps(settings["sr_params"]) + "`.",
        f"Machine: {settings['machine']}. Times are wall/CPU seconds of the SR call (training + application).",
        "",
        "## Mean over volumes, by slice profile and factor (PSNR dB / SSIM in the head mask)",
        "",
        mean.to_markdown(index=False, floatfmt=".3f"),
        "",
        f"Target (mean SR - cubic >= 1.0 dB at every factor >= 3, both profiles): {'met' if met else 'NOT met'}.",
        "",
        "## Per volume",
        "",
        "`est_profile`/`est_width`: the slice profile the method estimated from the data (width in slice spacings;",
        "truth: box 1.0 or gaussian FWHM 1.0).",
        "",
        per.to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    (out / f"results{tag}.md").write_text("\n".join(md))
    print(mean.to_string())
    print("target met:", met)


if __name__ == "__main__":
    sys.exit(main())
