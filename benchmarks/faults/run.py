"""Fault injection: kill a small real workflow run with SIGKILL at 12 points, rerun until it exits 0, and
compare the final tables with those of an uninterrupted run.

    nice -n 10 .venv/bin/python benchmarks/faults/run.py --out /tmp/faults   # ~40 min on 2 busy cores

Writes benchmarks/faults/results.md (the table of the README) and results.json. The cohort, the tiny
training budget and the kill/rerun helpers are those of tests/workflow/faults.py. Every run uses --cores 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.workflow import faults  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class KillPoint:
    stage: str
    job: str
    trigger: str  # file whose writing (during the attempt) triggers the kill
    when: str  # in words
    start_from: str  # snapshot the attempt starts from: "empty", "ingested", "trained"
    group: bool = True  # kill the process group (snakemake + job); False: snakemake alone


KILL_POINTS = [
    KillPoint("ingest", "ingest_shard A", "logs/ingest/site=A/part-0.log", "job running", "empty"),
    KillPoint("ingest", "ingest (gather)", "results/cohort/volumes.parquet", "output written", "empty"),
    KillPoint("training", "training_selection", "results/training/selection.tsv", "output written", "ingested"),
    KillPoint("training", "n4 v0", "logs/preprocessed/n4/v0.log", "job running", "ingested"),
    KillPoint("training", "select_training", "results/training/manifest.tsv", "output written", "ingested"),
    KillPoint("training", "train_encoder", "logs/models/tiny/train.log", "job running", "ingested"),
    KillPoint("training", "train_encoder", "logs/models/tiny/train.log", "job running; snakemake alone", "ingested",
              group=False),
    KillPoint("scoring", "score_shard A", "logs/score/site=A/part-0.log", "job running", "trained"),
    KillPoint("flow", "reference_manifest", "results/flows/tiny/f1/reference.tsv", "output written", "trained"),
    KillPoint("flow", "fit_flow", "logs/flows/tiny/f1/fit.log", "job running", "trained"),
    KillPoint("scoring", "density_shard A", "logs/density/site=A/part-0.log", "job running", "trained"),
    KillPoint("gathers", "cohort_scores", "results/scores/cohort.parquet", "output written", "trained"),
]

#: Snapshots the kill points start from: real runs stopped cleanly with --until.
SNAPSHOTS = {"ingested": "ingest", "trained": "train_encoder"}

SCORE_COLUMNS = ["volume_id", "site", "subject", "contrast", "status", "error", "score", "severity_noise",
                 "severity_ghosting", "severity_motion", "severity_bias", "severity_resolution", "latent_0",
                 "latent_1", "log_density", "density_pct", "flag_tau5", "flag_tau3", "flagged", "input_sha256",
                 "model_id", "model_sha256", "flow_id", "flow_sha256", "config_sha256", "note"]


def copy_workdir(src: Path, dst: Path) -> Path:
    """A copy of a working directory (mtimes kept, attempt logs dropped) whose config names its own sheet."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("attempt-*.log"))
    cfg = yaml.safe_load((dst / "faults.yaml").read_text())
    cfg["cohort"]["sheet"] = str(dst / "sheet.tsv")
    (dst / "faults.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def make_snapshots(out: Path, data: Path, needed: set[str]) -> dict[str, Path]:
    snaps = {"empty": faults.setup(out / "snap-empty", data)}
    for name, until in SNAPSHOTS.items():
        if name not in needed:
            continue
        d = faults.setup(out / f"snap-{name}", data)
        a = faults.run(d, "--until", until, *faults.TARGETS)
        if a.returncode != 0:
            raise RuntimeError(f"snapshot {name} failed:\n{a.output[-3000:]}")
        snaps[name] = d
    return snaps


def tables_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Bit-identical score rows (all score, density, flag and provenance columns), ingest tables and
    model/flow bytes."""
    diffs = []
    for name in ("results/models/tiny/encoder.safetensors", "results/flows/tiny/f1/flow.safetensors"):
        if (a / name).read_bytes() != (b / name).read_bytes():
            diffs.append(Path(name).name)
    ka, kb = [pd.read_parquet(d / "results/scores/cohort.parquet")[SCORE_COLUMNS].sort_values("volume_id")
              .reset_index(drop=True) for d in (a, b)]
    if not ka.equals(kb):
        diffs.append("cohort.parquet")
    for name in ("results/cohort/volumes.parquet", "results/cohort/failures.parquet", "results/scores/failures.parquet"):
        ta, tb = (pd.read_parquet(d / name) for d in (a, b))
        if not ta.drop(columns=["path"], errors="ignore").equals(tb.drop(columns=["path"], errors="ignore")):
            diffs.append(Path(name).name)
    return not diffs, ", ".join(diffs)


def run_point(i: int, kp: KillPoint, snaps: dict[str, Path], out: Path, clean: Path) -> dict:
    work = copy_workdir(snaps[kp.start_from], out / f"kill-{i:02d}")
    t0 = time.time()
    first = faults.run(work, kill_when=Path(kp.trigger), group=kp.group)
    orphan_left = None
    if first.killed and not kp.group:
        deadline = time.time() + 15
        while faults.orphans(work) and time.time() < deadline:
            time.sleep(0.2)
        orphan_left = bool(faults.orphans(work))
    reruns, attempts = (0, [first]) if not first.killed else faults.rerun_until_done(work)
    missing = faults.targets_present(work)
    equal, diff = tables_equal(work, clean) if not missing else (False, "targets missing")
    row = {"#": i, "stage": kp.stage, "job": kp.job, "killed when": kp.when, "start": kp.start_from,
           "killed": first.killed, "reruns to exit 0": reruns,
           "false success (exit 0, target missing)": any(a.returncode == 0 for a in attempts) and bool(missing),
           "all targets present": not missing, "tables equal to uninterrupted run": equal, "differences": diff,
           "orphan left running": orphan_left, "seconds": round(time.time() - t0)}
    print(json.dumps(row), flush=True)
    shutil.rmtree(work / "results" / "preprocessed", ignore_errors=True)
    return row


def write_results(rows: list[dict], clean_seconds: float, out_md: Path) -> None:
    df = pd.DataFrame(rows)
    lines = ["# Fault injection: results", "",
             f"Ten real volumes (tests/workflow/faults.py), tiny training budget, `--cores 1`, `nice -n 10`, on a shared",
             f"2-core machine. Uninterrupted run: {clean_seconds:.0f} s. Each kill point: SIGKILL when the named file is",
             "written, then `--unlock` + the same command (with `--rerun-incomplete`) until exit 0.", "",
             "| # | stage | job | killed when | starts from | reruns to exit 0 | all targets present | tables equal to uninterrupted run | false success | orphan left |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['#']} | {r['stage']} | {r['job']} | {r['killed when']} | {r['start']} | "
                     f"{r['reruns to exit 0'] if r['killed'] else 'not killed'} | {'yes' if r['all targets present'] else 'NO'} | "
                     f"{'yes' if r['tables equal to uninterrupted run'] else 'NO: ' + r['differences']} | "
                     f"{'YES' if r['false success (exit 0, target missing)'] else 'no'} | "
                     f"{'' if r['orphan left running'] is None else ('YES' if r['orphan left running'] else 'no')} |")
    n = len(df)
    lines += ["", f"{int(df['tables equal to uninterrupted run'].sum())} of {n} kill points end with tables bit-identical to "
              f"the uninterrupted run; {int(df['false success (exit 0, target missing)'].sum())} silently incomplete."]
    out_md.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="scratch folder (several GB free)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--points", type=str, default="", help="comma-separated kill point numbers (default: all)")
    ap.add_argument("--table-from", type=Path, nargs="*", default=None,
                    help="only write results.md/json from the JSON rows printed by earlier runs (logs); a later "
                         "row of the same kill point replaces an earlier one")
    ap.add_argument("--clean-seconds", type=float, default=float("nan"), help="with --table-from")
    args = ap.parse_args(argv)
    if args.table_from is not None:
        rows = {}
        for log in args.table_from:
            for line in log.read_text().splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    rows[row["#"]] = row
        rows = [rows[k] for k in sorted(rows)]
        write_results(rows, args.clean_seconds, HERE / "results.md")
        (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    clean = faults.setup(args.out / "clean", args.data)
    first = faults.run(clean)
    if first.returncode != 0 or faults.targets_present(clean):
        raise SystemExit(f"uninterrupted run failed:\n{first.output[-3000:]}")
    clean_seconds = time.time() - t0
    print(f"uninterrupted run: {clean_seconds:.0f} s", flush=True)
    pick = {int(x) for x in args.points.split(",") if x} or set(range(1, len(KILL_POINTS) + 1))
    snaps = make_snapshots(args.out, args.data, {kp.start_from for i, kp in enumerate(KILL_POINTS, 1) if i in pick})
    rows = [run_point(i, kp, snaps, args.out, clean) for i, kp in enumerate(KILL_POINTS, 1) if i in pick]
    if args.points:  # a partial run: rows only, the committed table is left alone
        (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    else:
        write_results(rows, clean_seconds, HERE / "results.md")
        (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["tables equal to uninterrupted run"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
