"""End-to-end runs of the workflow's ingest stage on generated volumes, in a temporary directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


#: Targets of the ingest-stage tests (the full DAG would also train an encoder).
INGEST_TARGETS = ("results/cohort/volumes.parquet", "results/cohort/failures.parquet")


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        str(SNAKEMAKE),
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(REPO / "config" / "config.yaml"),
        "--config",
        f"cohort={{sheet: {workdir / 'sheet.tsv'}}}",
        "--cores",
        "2",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def planned_jobs(workdir: Path, *args: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job a dry-run would execute."""
    res = run_snakemake(workdir, "-n", *args)
    jobs, rule = [], None
    for line in (res.stdout + res.stderr).splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
            jobs.append((rule, ""))
        m = re.match(r"^\s+wildcards: (.*)$", line)
        if m and rule:
            jobs[-1] = (rule, m.group(1))
    return jobs


def write_sheet(workdir: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(workdir / "sheet.tsv", sep="\t", index=False)


def make_volume(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 20, size=(16, 18, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.5, 1.0])), str(path))
    return path


@pytest.fixture()
def cohort_dir(tmp_path):
    rows = []
    for site in ("A", "B"):
        for i in range(3):
            p = make_volume(tmp_path / f"{site}{i}.nii.gz", seed=10 * ord(site) + i)
            rows.append(dict(volume_id=f"{site}-{i}", site=site, subject=f"{site}{i}", contrast="T1w", path=str(p)))
    write_sheet(tmp_path, rows)
    return tmp_path, rows


def test_ingest_runs_and_new_site_reruns_only_its_shards(cohort_dir):
    workdir, rows = cohort_dir
    run_snakemake(workdir, *INGEST_TARGETS)
    vols = pd.read_parquet(workdir / "results/cohort/volumes.parquet")
    assert sorted(vols["volume_id"]) == sorted(r["volume_id"] for r in rows)
    assert planned_jobs(workdir, *INGEST_TARGETS) == []

    # a new site delivers: only its shard and the cohort gather must run
    p = make_volume(workdir / "C0.nii.gz", seed=99)
    rows.append(dict(volume_id="C-0", site="C", subject="C0", contrast="FLAIR", path=str(p)))
    write_sheet(workdir, rows)
    jobs = planned_jobs(workdir, *INGEST_TARGETS)
    shard_jobs = [wc for rule, wc in jobs if rule == "ingest_shard"]
    assert shard_jobs == ["site=C, part=0"], jobs
    assert {rule for rule, _ in jobs} == {"ingest_shard", "ingest"}

    # more volumes for an existing site: only that site's shards
    p = make_volume(workdir / "A3.nii.gz", seed=98)
    rows.append(dict(volume_id="A-3", site="A", subject="A3", contrast="T1w", path=str(p)))
    write_sheet(workdir, rows)
    shard_jobs = sorted(wc for rule, wc in planned_jobs(workdir, *INGEST_TARGETS) if rule == "ingest_shard")
    assert shard_jobs == ["site=A, part=0", "site=C, part=0"]


def test_corrupted_volume_gives_failure_row_and_site_is_ingested(cohort_dir):
    workdir, rows = cohort_dir
    bad = workdir / "A1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncate one of site A's files
    run_snakemake(workdir, *INGEST_TARGETS)
    vols = pd.read_parquet(workdir / "results/cohort/volumes.parquet")
    fails = pd.read_parquet(workdir / "results/cohort/failures.parquet")
    assert sorted(vols.loc[vols.site == "A", "volume_id"]) == ["A-0", "A-2"]
    assert fails[["volume_id", "stage", "error_type"]].values.tolist() == [["A-1", "ingest", "truncated"]]
    assert str(bad) in fails["path"].iloc[0]


def test_sheet_error_is_reported_with_file_and_column(tmp_path):
    write_sheet(tmp_path, [dict(volume_id="x", site="A", subject="s", contrast="T1", path="x.nii")])
    res = run_snakemake(tmp_path, "-n", check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "sheet.tsv" in out and "contrast" in out and "FLAIR" in out


def test_shards_hold_a_sites_remainder_and_their_runtime_scales(tmp_path):
    """Issue 8: a site's last shard takes its remainder (fewer jobs than one per partial shard), its runtime
    grows with it, and a shard never mixes sites. Placeholder files: a dry-run never opens them."""
    rows = []
    for site, n in (("A", 5), ("B", 2)):
        for i in range(n):
            (tmp_path / f"{site}{i}.nii.gz").touch()
            rows.append(dict(volume_id=f"{site}-{i}", site=site, subject=f"{site}{i}", contrast="T1w",
                             path=str(tmp_path / f"{site}{i}.nii.gz")))
    write_sheet(tmp_path, rows)
    (tmp_path / "shards.yaml").write_text(f"cohort:\n  sheet: {tmp_path / 'sheet.tsv'}\n  shard_size: 2\n")
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
           str(REPO / "config" / "config.yaml"), str(tmp_path / "shards.yaml"), "--cores", "1", "-n",
           *INGEST_TARGETS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    runtimes = {}
    for block in (res.stdout + res.stderr).split("rule ")[1:]:
        if block.startswith("ingest_shard:"):
            wc = re.search(r"wildcards: (.*)", block).group(1)
            runtimes[wc] = int(re.search(r"runtime=(\d+)", block).group(1))
    # A: 5 volumes -> shards of 2 and 3; B: 2 volumes -> one shard; ceil(7/2) = 4 would be the bound
    assert runtimes == {"site=A, part=0": 60, "site=A, part=1": 90, "site=B, part=0": 60}
