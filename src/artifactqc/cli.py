"""Command-line interface: ``artifactqc <subcommand>``. Argument parsing only; logic lives in the modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__, progress


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artifactqc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"artifactqc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    # long commands (ingest, score, train, iqm): a progress bar on a terminal, a log line per N volumes elsewhere
    prog = argparse.ArgumentParser(add_help=False)
    prog.add_argument("-q", "--quiet", action="store_true", help="no progress bar or progress lines; warnings only")
    prog.add_argument("--progress-every", type=int, default=None, metavar="N",
                      help="off a terminal (SLURM logs, pipes): one progress line per N volumes or steps "
                           "(default $ARTIFACTQC_PROGRESS_EVERY, else 100)")

    # --- subcommands: each block adds one parser and sets func=_cmd_<name> ---
    p = sub.add_parser(
        "ingest",
        parents=[prog],
        help="validate and checksum a cohort (TSV sheet or BIDS root) into volumes.parquet and failures.parquet",
    )
    p.add_argument("source", help="cohort TSV sheet, or a BIDS root folder")
    p.add_argument("--out", required=True, help="output folder for volumes.parquet and failures.parquet")
    p.add_argument("--max-mem-mb", type=float, default=4096.0, help="skip volumes needing more memory (default 4096)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="processes (default 1)")
    p.add_argument("--site-column", default="site", help="BIDS: participants.tsv column naming the site")
    p.add_argument("--site-constant", default=None, help="BIDS: one site name for every volume")
    p.set_defaults(func=_cmd_ingest)
    p = sub.add_parser("fit-flow", help="fit the RealNVP density flow on reference latents (scores table)")
    p.add_argument("--scores", required=True, help="scores table (.parquet or .tsv) with latent_<i> columns")
    p.add_argument("--out", required=True, help="output directory for flow.safetensors + flow.json")
    p.add_argument("--reference", default=None, help="reference manifest (volume_id column or one id per line)")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-transforms", type=int, default=6)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_fit_flow)
    p = sub.add_parser("demo", help="build the embedded demo cohort (synthetic, from nilearn's MNI152 template)")
    p.add_argument("action", choices=["build", "spec"], help="build: write the volumes + sheet.tsv; spec: print the default spec")
    p.add_argument("--config", default=None, help="YAML config whose 'demo:' section is the spec (default: built-in)")
    p.add_argument("--out", default=None, help="build: output folder (volumes under <out>/<site>/, <out>/sheet.tsv)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="processes (default 1)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("simulate", help="corrupt a NIfTI with a simulated artifact of calibrated severity")
    p.add_argument("--artifact", required=True, choices=["noise", "ghosting", "bias", "anisotropy", "motion", "mix"])
    p.add_argument("--severity", type=float, required=True, help="severity in [0, 1] (0 = identity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sidecar", default=None, help="JSON sidecar path (default: OUT with .json)")
    p.add_argument("--noise-variant", default="rician", choices=["rician", "kspace", "gaussian"],
                   help="magnitude noise model (default rician; gaussian can go negative)")
    p.add_argument("--match-ssim", action="store_true",
                   help="search the parameter so that this volume's SSIM matches the severity's target")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("n4", help="N4 bias-field correction of one NIfTI volume (header/affine kept)")
    p.add_argument("input", help="input NIfTI")
    p.add_argument("output", help="corrected NIfTI (float32)")
    p.add_argument("--bias", default=None, help="also write the estimated bias field here")
    p.add_argument("--shrink-factor", type=int, default=4)
    p.add_argument("--iters", default="50,50,50,50", help="iterations per level, comma-separated")
    p.add_argument("--tol", type=float, default=1e-7)
    p.add_argument("--spline-distance", type=float, default=200.0, help="B-spline control-point spacing (mm)")
    p.add_argument("--mask-method", default="foreground", choices=["foreground", "otsu", "none"])
    p.add_argument("--sidecar", default=None, help="JSON sidecar path (default: OUT with .json)")
    p.set_defaults(func=_cmd_n4)
    p = sub.add_parser("superres", help="thick-slice volume -> isotropic grid tiling the slab (input's units)")
    p.add_argument("input", help="input NIfTI")
    p.add_argument("output", help="output NIfTI on an isotropic grid (a copy if the input is not anisotropic)")
    p.add_argument("--ratio", type=float, default=1.5, help="resample when max/min spacing exceeds this")
    p.add_argument("--method", default="cubic", choices=["cubic", "learned", "linear"],
                   help="cubic spline through the slice centres (default), self-supervised learned filters, linear")
    p.add_argument("--profile", default="auto", choices=["auto", "box", "gaussian"],
                   help="slice profile for --method learned (auto = estimated from the data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sidecar", default=None, help="JSON sidecar path (default: OUT with .json)")
    p.set_defaults(func=_cmd_superres)
    p = sub.add_parser("train", parents=[prog], help="train the artifact encoder on clean volumes (simulated artifacts on the fly)")
    p.add_argument("paths", nargs="*", help="training volumes (NIfTI)")
    p.add_argument("--list", dest="list_file", default=None,
                   help="text file with one path per line, or a .tsv/.csv/.parquet table with a 'path' column "
                        "(rows whose 'status' is not 'ok' are skipped)")
    p.add_argument("--out", required=True, help="model directory (encoder.safetensors + model.json)")
    p.add_argument("--demo", action="store_true", help="small CPU config (<= 10 min on 2 cores)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    p.add_argument("--model-id", default=None)
    p.add_argument("--init", default=None,
                   help="fine-tune: start from this model folder's weights, or builtin (the shipped model)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("model-info", help="id, sha256, training summary and model card of a model folder or 'builtin'")
    p.add_argument("model", nargs="?", default="builtin",
                   help="model folder (encoder.safetensors + model.json), or builtin (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_model_info)
    p = sub.add_parser("score", parents=[prog], help="score volumes with a trained encoder (one row per input, never stops)")
    p.add_argument("paths", nargs="*", help="volumes to score")
    p.add_argument("--list", dest="list_file", default=None,
                   help="text file with one path per line, or a .tsv/.csv/.parquet table with a 'path' column")
    p.add_argument("--model", required=True,
                   help="model directory (encoder.safetensors + model.json), or builtin (the shipped model)")
    p.add_argument("--out", required=True, help="output table (.parquet; .tsv/.csv by suffix)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--planes", choices=["acquisition", "all"], default="acquisition",
                   help="thick-slice (2D) scans graded on their acquisition planes (default), or all orientations")
    p.set_defaults(func=_cmd_score)

    p_iqm = sub.add_parser("iqm", parents=[prog], help="MRIQC-defined image-quality metrics of volumes -> table")
    p_iqm.add_argument("inputs", nargs="+", help="NIfTI files, or one volumes.parquet/.tsv with path and contrast columns")
    p_iqm.add_argument("--contrast", default="T1w", help="contrast of the NIfTI inputs (T1w, T2w, PD, FLAIR)")
    p_iqm.add_argument("--no-n4", action="store_true", help="skip N4 (INU metrics become NaN)")
    p_iqm.add_argument("-o", "--output", required=True, help="output .parquet or .tsv")
    p_iqm.set_defaults(func=_cmd_iqm)

    p_ev = sub.add_parser("evaluate", help="sensitivity/specificity/AUROC with bootstrap CIs of flags and scores vs labels")
    p_ev.add_argument("table", help="scores table (.parquet/.tsv) with a label column")
    p_ev.add_argument("--label", default="label", help="rating/label column")
    p_ev.add_argument("--fail-values", default="-1", help="comma-separated ratings that mean fail (others listed in --pass-values pass)")
    p_ev.add_argument("--pass-values", default="0,1", help="comma-separated ratings that mean pass")
    p_ev.add_argument("--flags", default="", help="comma-separated boolean flag columns")
    p_ev.add_argument("--scores", default="", help="comma-separated continuous score columns (higher = worse expected)")
    p_ev.add_argument("--n-boot", type=int, default=1000)
    p_ev.add_argument("--seed", type=int, default=0)
    p_ev.add_argument("-o", "--output", required=True, help="output .parquet/.tsv (a .md beside it is also written)")
    p_ev.set_defaults(func=_cmd_evaluate)

    p_rt = sub.add_parser("check-ratings", help="check ratings TSVs (review page exports) before a run")
    p_rt.add_argument("ratings", nargs="+", help="ratings files: volume_id, rating, note, rater, time")
    p_rt.add_argument("--cohort", default="", help="cohort table (.parquet/.tsv) whose volume_ids the ratings must name")
    p_rt.set_defaults(func=_cmd_check_ratings)

    # (add new subcommands above this line)
    return parser


def _cmd_train(args) -> int:
    from .training.loop import train_from_cli

    keys = ("epochs", "steps_per_epoch", "batch_size", "lr", "val_fraction", "patience", "image_size",
            "max_minutes", "threads", "init")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    metrics = train_from_cli(args.paths, args.list_file, args.out, demo=args.demo, seed=args.seed,
                             device=args.device, model_id=args.model_id, **overrides)
    print(f"model -> {args.out} (best epoch {metrics['best_epoch']}, val loss {metrics['best_val_loss']:.4f})")
    return 0


def _cmd_model_info(args) -> int:
    from .config_check import ConfigError, check_model_folder
    from .encoder.checkpoint import model_summary

    try:
        info = check_model_folder(args.model, "model")
    except ConfigError as exc:
        print(f"artifactqc model-info: {exc}", file=sys.stderr)
        return 1
    summary = model_summary(args.model, info)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:>18}: {v}")
    return 0


def _cmd_score(args) -> int:
    from .encoder.score import score_from_cli

    if not args.paths and not args.list_file:
        print("artifactqc score: give PATHS or --list FILE", file=sys.stderr)
        return 2
    df = score_from_cli(args.model, args.paths, args.list_file, args.out, batch_size=args.batch_size,
                        device=args.device, threads=args.threads, planes=args.planes)
    n_bad = int((df["status"] != "ok").sum())
    print(f"{len(df)} volumes scored ({n_bad} failed) -> {args.out}")
    return 0


def _cmd_simulate(args) -> int:
    from .simulate import simulate_file

    params = simulate_file(args.input, args.output, args.artifact, args.severity, seed=args.seed, sidecar=args.sidecar,
                           noise_variant=args.noise_variant, match_ssim=args.match_ssim)
    logging.getLogger("artifactqc.simulate").info(
        "wrote %s (%s, severity %.2f)", args.output, args.artifact, params["severity"]
    )
    return 0


def _cmd_fit_flow(args) -> int:
    from .density.fit import fit_flow_from_files

    out = fit_flow_from_files(
        args.scores,
        args.out,
        reference=args.reference,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        n_transforms=args.n_transforms,
        val_fraction=args.val_fraction,
        device=args.device,
    )
    print(out)
    return 0


def _cmd_ingest(args) -> int:
    from .cohort import CohortError, ingest

    try:
        volumes, failures = ingest(
            args.source,
            args.out,
            max_mem_mb=args.max_mem_mb,
            n_jobs=args.jobs,
            site_column=args.site_column,
            site_constant=args.site_constant,
        )
    except CohortError as exc:
        print(f"artifactqc ingest: {exc}", file=sys.stderr)
        return 2
    print(f"{len(volumes)} volumes ingested, {len(failures)} failures rows -> {args.out}")
    for kind, n in failures["error_type"].value_counts().items():
        print(f"  {kind}: {n}")
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    if args.action == "spec":
        print(demo.spec_yaml(demo.load_spec(args.config)), end="")
        return 0
    if not args.out:
        print("artifactqc demo build: --out is required", file=sys.stderr)
        return 2
    sheet = demo.build_demo_from_config(args.config, args.out, n_jobs=args.jobs)
    print(f"{len(sheet)} demo volumes -> {args.out} (sheet: {args.out}/sheet.tsv)")
    return 0

def _cmd_n4(args) -> int:
    from .preprocess.n4 import n4_file

    out = n4_file(
        args.input,
        args.output,
        bias_path=args.bias,
        shrink_factor=args.shrink_factor,
        iters=tuple(int(v) for v in args.iters.split(",")),
        tol=args.tol,
        spline_distance_mm=args.spline_distance,
        mask_method=args.mask_method,
    )
    Path(args.sidecar or _sidecar_of(args.output)).write_text(json.dumps(out, indent=2))
    print(out)
    return 0


def _cmd_superres(args) -> int:
    from .preprocess.superres import superres_file

    out = superres_file(args.input, args.output, ratio=args.ratio, sidecar=args.sidecar or _sidecar_of(args.output),
                        method=args.method, profile=args.profile, seed=args.seed)
    print(out)
    return 0


def _sidecar_of(image_path: str) -> str:
    """``<image without .nii/.nii.gz>.json``."""
    name = str(image_path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)] + ".json"
    return name + ".json"


def _read_table(path):
    import pandas as pd

    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path, sep="\t")


def _write_table(df, path) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, sep="\t", index=False)


def _cmd_iqm(args) -> int:
    from .qc.iqm import iqm_table

    if len(args.inputs) == 1 and args.inputs[0].endswith((".parquet", ".tsv")):
        vols = _read_table(args.inputs[0])
        ids = vols["volume_id"] if "volume_id" in vols else None
        df = iqm_table(vols["path"], vols["contrast"], ids=ids, use_n4=not args.no_n4)
    else:
        df = iqm_table(args.inputs, args.contrast, use_n4=not args.no_n4)
    _write_table(df, args.output)
    n_bad = int((df["status"] != "ok").sum())
    logging.getLogger("artifactqc").info("IQMs of %d volumes written to %s (%d failed)", len(df), args.output, n_bad)
    return 0


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from .qc.evaluate import evaluate_flags, map_ratings, to_markdown

    df = _read_table(args.table)
    mapping = {v.strip(): True for v in args.fail_values.split(",") if v.strip()}
    mapping.update({v.strip(): False for v in args.pass_values.split(",") if v.strip()})
    df["_fail"] = map_ratings(df[args.label], mapping)
    flags = [c for c in args.flags.split(",") if c]
    scores = [c for c in args.scores.split(",") if c]
    res = evaluate_flags(df, "_fail", flags, scores, n_boot=args.n_boot, seed=args.seed)
    _write_table(res, args.output)
    Path(args.output).with_suffix(".md").write_text(to_markdown(res))
    return 0


def _cmd_check_ratings(args) -> int:
    from .qc.ratings import RatingsError, read_ratings

    known = _read_table(args.cohort)["volume_id"].astype(str) if args.cohort else None
    try:
        r = read_ratings(args.ratings, known_ids=known)
    except RatingsError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{len(r)} rated volumes: " + ", ".join(f"{k} {v}" for k, v in r["rating"].value_counts().items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.WARNING if quiet else logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "progress_every", None) is not None and args.progress_every < 1:
        parser.error("--progress-every must be >= 1")
    progress.configure(quiet=quiet, every=getattr(args, "progress_every", None))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
