"""Fault injection for the workflow: run snakemake, SIGKILL it when a job starts, rerun until it exits 0.

Shared by tests/workflow/test_kill_reruns.py and benchmarks/faults/run.py. A run is killed as a user's
`kill -9` or a lost node would: the whole process group (snakemake and the job it runs), or snakemake alone
(the job is then orphaned and must stop by itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

#: Ten small real volumes of the development data (FIXTURES.txt and its neighbours), one site (one job per
#: stage: the runs are dominated by each job's start-up); the first two (2 mm isotropic) are the training set.
COHORT = [
    ("A", "volumes/NiChart/IXI012-HH-1211_T1.nii.gz", "T1w"),
    ("A", "volumes/NiChart/IXI015-HH-1258_T1.nii.gz", "T1w"),
    ("A", "phantom/dcm_qa_xa30i/anat-T1w_acq-tfl_5001.nii.gz", "T1w"),
    ("A", "templates/spm12_avg152T1.nii.gz", "T1w"),
    ("A", "volumes/nibabel/anatomical.nii.gz", "T1w"),
    ("A", "volumes/VolumeRenderingData/stroke_T2.nii.gz", "T2w"),
    ("A", "volumes/VolumeRenderingData/stroke_FLAIR.nii.gz", "FLAIR"),
    ("A", "volumes/niivue-demo-images/register_T1_head_ext2.nii.gz", "T1w"),
    ("A", "phantom/dcm_qa_xa30i/anat-T1w_acq-tfl_6001.nii.gz", "T1w"),
    ("A", "volumes/dcm_qa_canon_61/3000_DTI_PA-ortho_cl_b0.nii.gz", "T2w"),
]
TRAINING_IDS = ("v0", "v1")

#: A tiny but complete configuration: every stage runs, training takes seconds (step budget, no clock).
TINY_CONFIG = {
    "model": {"id": "tiny", "pretrained": ""},
    "training": {"include_list": "train_ids.txt"},
    "train": {
        "device": "cpu", "threads": 1, "seed": 0, "epochs": 2, "steps_per_epoch": 2, "batch_size": 4,
        "pool_refresh": 1,
        "settings": {"image_size": 32, "pixel_mm": 4.0, "train_slices_per_axis": 3, "val_severities": [0.5],
                     "pool_size": 4, "pool_init_per_volume": 1, "bn_recalib_batches": 1},
    },
    "preprocess": {"n4": {"iters": [5], "threads": 1}},
    "flow": {"id": "f1", "fit": {"epochs": 20, "seed": 0, "device": "cpu", "hidden": [16, 16]}},
    "score": {"threads": 1, "device": "cpu"},
    "compare": {"enabled": False},
    "iqm": {"enabled": False},
}

#: Final tables compared between runs (bit-identical scores expected).
TABLES = ("results/scores/cohort.parquet", "results/cohort/volumes.parquet", "results/cohort/failures.parquet",
          "results/scores/failures.parquet")


def setup(workdir: Path, data: Path, threads: int = 1, extra: dict | None = None) -> Path:
    """Sheet + config of the fault cohort in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [dict(volume_id=f"v{i}", site=s, subject=f"s{i}", contrast=c, path=str(data / p), note=f"n{i}")
            for i, (s, p, c) in enumerate(COHORT)]
    pd.DataFrame(rows).to_csv(workdir / "sheet.tsv", sep="\t", index=False)
    (workdir / "train_ids.txt").write_text("\n".join(TRAINING_IDS) + "\n")
    cfg = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    cfg["cohort"] = {"sheet": str(workdir / "sheet.tsv")}
    cfg["train"]["threads"] = cfg["score"]["threads"] = threads
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v)
    (workdir / "faults.yaml").write_text(yaml.safe_dump(cfg))
    return workdir


#: What the fault runs ask for: every table, the model and the flow (the report figures, which add a
#: minute and read only these tables, are left out).
TARGETS = ("results/scores/cohort.parquet", "results/scores/cohort.tsv", "results/scores/failures.parquet",
           "results/cohort/volumes.parquet", "results/cohort/failures.parquet")


def command(workdir: Path, *args: str, cores: int = 1) -> list[str]:
    return [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(REPO / "config/config.yaml"), str(workdir / "faults.yaml"),
            "--cores", str(cores), "--rerun-incomplete", *(args or TARGETS)]


@dataclass
class Attempt:
    returncode: int
    killed: bool
    seconds: float
    output: str = field(repr=False, default="")
    trigger: str | None = None  # the kill_when path that fired


def run(workdir: Path, *args: str, kill_when: Path | list[Path] | None = None, group: bool | dict = True,
        cores: int = 1, timeout: float = 900) -> Attempt:
    """One snakemake invocation; with ``kill_when`` (paths relative to ``workdir``), SIGKILL as soon as one
    of them is written during this invocation: the process group (``group``, or ``group[path]``) or
    snakemake alone."""
    t0 = time.time()
    log = workdir / f"attempt-{time.time_ns()}.log"
    watch = [] if kill_when is None else [kill_when] if isinstance(kill_when, (str, Path)) else list(kill_when)
    fired = None
    with open(log, "w") as out:
        p = subprocess.Popen(command(workdir, *args, cores=cores), stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        while p.poll() is None and time.time() - t0 < timeout:
            fired = next((str(w) for w in watch if _written_since(workdir / w, t0)), None)
            if fired:
                if group.get(fired, True) if isinstance(group, dict) else group:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        if p.poll() is None and not fired:
            os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
    return Attempt(rc, fired is not None, time.time() - t0, log.read_text(), fired)


def _written_since(path: Path, t0: float) -> bool:
    try:
        return path.stat().st_mtime >= t0 - 1.0
    except FileNotFoundError:
        return False


def unlock(workdir: Path) -> None:
    subprocess.run(command(workdir, "--unlock"), capture_output=True, check=True)


def targets_present(workdir: Path) -> list[str]:
    """The default target's files that are missing (from a dry-run's view of the DAG: the final tables)."""
    need = ["results/scores/cohort.parquet", "results/scores/cohort.tsv", "results/cohort/volumes.parquet",
            "results/cohort/failures.parquet", "results/scores/failures.parquet", "results/models/tiny/model.json",
            "results/flows/tiny/f1/flow.json"]
    return [f for f in need if not (workdir / f).exists()]


def rerun_until_done(workdir: Path, max_reruns: int = 4, **kw) -> tuple[int, list[Attempt]]:
    """Unlock and rerun until an attempt exits 0; returns (reruns needed, attempts). Every attempt that
    exits 0 must leave every target present: that is checked by the caller with :func:`targets_present`."""
    attempts = []
    for i in range(1, max_reruns + 1):
        unlock(workdir)
        a = run(workdir, **kw)
        attempts.append(a)
        if a.returncode == 0:
            return i, attempts
    return -1, attempts


def orphans(workdir: Path) -> list[int]:
    """Pids of processes still running a job script of this working directory."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(workdir / ".snakemake" / "scripts") in cmd:
                found.append(int(d.name))
    return found
