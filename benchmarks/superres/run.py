"""Benchmark: self-supervised super-resolution vs cubic B-spline interpolation on simulated thick slices.

For each real isotropic volume: canonical orientation, crop to the head, simulate thick slices along
the inferior-superior axis at x2.4 and x4 (Gaussian slice profile with FWHM = slice thickness, then
decimation), then restore the fine grid with (a) cubic B-spline interpolation and (b)
``artifactqc.preprocess.superres`` at the demo setting. PSNR and SSIM against the original, inside a
head mask, on the common grid. Writes results.tsv, results.json and results.md beside this script.

    .venv/bin/python benchmarks/superres/run.py [--data ../shared/data] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "src"))

from artifactqc import io as aq_io  # noqa: E402
from artifactqc.preprocess import n4 as N4  # noqa: E402
from artifactqc.preprocess import superres as SR  # noqa: E402

VOLUMES = [
    "volumes/VolumeRenderingData/stroke_T1.nii.gz",
    "volumes/VolumeRenderingData/stroke_T2.nii.gz",
    "volumes/VolumeRenderingData/stroke_FLAIR.nii.gz",
    "volumes/VolumeRenderingData/seg3D_MR.nii.gz",
    "templates/mricron_ch2.nii.gz",
]
FACTORS = [2.4, 4.0]
AXIS = 2  # inferior-superior after canonical (RAS) reordering: axial thick slices


def crop_to_head(data: np.ndarray, margin: int = 4) -> np.ndarray:
    m = N4.head_mask(data)
    idx = np.argwhere(m)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, data.shape)
    return data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=len(VOLUMES), help="use the first n volumes")
    ap.add_argument("--iterations", type=int, default=None, help="override the demo setting")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--from-log", default=None, help="only rebuild the results files from the JSON rows of a log")
    args = ap.parse_args(argv)
    if args.from_log:
        rows = [json.loads(ln) for ln in open(args.from_log) if ln.startswith('{"volume"')]
        write_results(rows, SR.SRParams(threads=args.threads), args.threads, Path(args.out))
        return 0
    data_root = Path(args.data)
    if not (data_root / "MANIFEST.tsv").is_file():
        print(f"development data not found at {data_root} (pass --data)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    params = SR.SRParams(threads=args.threads)
    if args.iterations:
        params.iterations = args.iterations
    rows = []
    for rel in VOLUMES[: args.n]:
        vol = aq_io.load_volume(data_root / rel)
        data, _ = aq_io.to_canonical(vol.data, vol.affine)
        data = crop_to_head(data)
        for f in FACTORS:
            low, pos = SR.degrade_axis(data, f, AXIS, profile=params.profile)
            n_out = int(np.floor(pos[-1] + 1e-6)) + 1
            ref = data[:, :, :n_out]
            mask = N4.head_mask(ref)
            cub = SR.upsample_axis(low, f, AXIS, n_out=n_out)
            aff = np.diag([1.0, 1.0, f, 1.0])  # spacing ratios are what matter
            c0, w0 = time.process_time(), time.perf_counter()
            sr, new_aff, info = SR.superres(low, aff, params=SR.SRParams(**vars(params)))
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            assert sr.shape == ref.shape, (sr.shape, ref.shape)
            row = {
                "volume": rel,
                "shape": "x".join(map(str, data.shape)),
                "factor": f,
                "psnr_cubic": SR.psnr(ref, cub, mask),
                "psnr_sr": SR.psnr(ref, sr, mask),
                "ssim_cubic": SR.ssim(ref, cub, mask),
                "ssim_sr": SR.ssim(ref, sr, mask),
                "cpu_seconds": cpu,
                "wall_seconds": wall,
                "train_seconds": info.train_seconds,
                "apply_seconds": info.apply_seconds,
            }
            row["dpsnr"] = row["psnr_sr"] - row["psnr_cubic"]
            row["dssim"] = row["ssim_sr"] - row["ssim_cubic"]
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    write_results(rows, params, args.threads, Path(args.out))
    return 0


def write_results(rows: list[dict], params: SR.SRParams, threads: int, out: Path) -> None:
    """results.tsv/.json/.md from the per-run rows."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "results.tsv", sep="\t", index=False, float_format="%.4f")
    summ = (
        df.groupby("factor")[["psnr_cubic", "psnr_sr", "dpsnr", "ssim_cubic", "ssim_sr", "dssim", "cpu_seconds", "wall_seconds"]]
        .mean()
        .reset_index()
    )
    meets = {str(f): bool(r.dpsnr >= 1.0 and r.dssim > 0) for f, r in summ.set_index("factor").iterrows()}
    result = {
        "params": vars(params),
        "torch_threads": threads,
        "machine": f"{platform.processor() or platform.machine()}, shared and loaded 2-core machine",
        "per_volume": rows,
        "mean_by_factor": summ.to_dict("records"),
        "target_met": meets,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Super-resolution benchmark results",
        "",
        f"Settings (demo): `{json.dumps(vars(params))}`; torch threads {threads}.",
        "Times measured on a shared, heavily loaded 2-core machine (other jobs running); CPU seconds = process time.",
        "",
        "## Mean by factor",
        "",
        summ.to_markdown(index=False, floatfmt=".3f"),
        "",
        f"Target (SR >= cubic + 1.0 dB PSNR and higher SSIM, on average): {meets}",
        "",
        "## Per volume",
        "",
        df[["volume", "shape", "factor", "psnr_cubic", "psnr_sr", "dpsnr", "ssim_cubic", "ssim_sr", "cpu_seconds", "wall_seconds"]]
        .to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    print(json.dumps(result["mean_by_factor"], indent=1))
    print("target met:", meets)


if __name__ == "__main__":
    sys.exit(main())
