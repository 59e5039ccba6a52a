"""Interrupted runs finish (issue 17, item 2) and workflow training is reproducible (item 4).

Real runs of the whole workflow on ten real volumes with a tiny training budget are killed with SIGKILL
at each frozen-manifest job and during training, each followed by `--unlock` and a rerun. Every attempt
that exits 0 must leave every target present, and the final tables must equal, bit for bit, those of a
run that was never interrupted (which also shows that training in the workflow is deterministic).

Before the fix, a rerun after the kill at reference_manifest (or select_training) ran that job alone,
said "1 of 1 steps (100%) done" and exited 0 without the flow and the cohort tables (or the model).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from . import faults

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

#: job -> (file written while it runs, kill the process group?); False kills snakemake alone, orphaning the
#: running job, which must then stop by itself. Each attempt is killed at whichever point it reaches first.
KILL_POINTS = {
    "training_selection": ("results/training/selection.tsv", True),
    "reference_manifest": ("results/flows/tiny/f1/reference.tsv", True),
    "select_training": ("results/training/manifest.tsv", True),
    "train_encoder": ("logs/models/tiny/train.log", False),
}

SCORE_COLUMNS = ["volume_id", "site", "subject", "contrast", "status", "error", "score", "severity_noise",
                 "severity_ghosting", "severity_motion", "severity_bias", "severity_resolution", "latent_0",
                 "log_density", "density_pct", "flagged", "model_sha256", "flow_sha256", "note"]


def _scores(workdir: Path) -> pd.DataFrame:
    return pd.read_parquet(workdir / "results/scores/cohort.parquet")[SCORE_COLUMNS].sort_values("volume_id")


def assert_same_results(a: Path, b: Path) -> None:
    """Same encoder and flow bytes, bit-identical score rows."""
    for name in ("results/models/tiny/encoder.safetensors", "results/flows/tiny/f1/flow.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = _scores(a), _scores(b)
    assert len(sa) == len(faults.COHORT) and sa["note"].str.startswith("n").all()
    pd.testing.assert_frame_equal(sa.reset_index(drop=True), sb.reset_index(drop=True), check_exact=True)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, shared_data) -> Path:
    """An uninterrupted run of the fault cohort."""
    workdir = faults.setup(tmp_path_factory.mktemp("clean"), shared_data)
    attempt = faults.run(workdir)
    assert attempt.returncode == 0, attempt.output[-3000:]
    assert faults.targets_present(workdir) == []
    return workdir


def test_killed_runs_finish_with_the_same_results(tmp_path, shared_data, clean_run):
    killed_dir = faults.setup(tmp_path / "killed", shared_data)
    hit = []
    while len(hit) < len(KILL_POINTS):
        todo = {trigger: (job, group) for job, (trigger, group) in KILL_POINTS.items() if job not in hit}
        attempt = faults.run(killed_dir, kill_when=list(todo), group={t: g for t, (_, g) in todo.items()})
        if not attempt.killed:  # the run got past the remaining points: it must be complete
            assert attempt.returncode == 0, attempt.output[-3000:]
            assert faults.targets_present(killed_dir) == [], attempt.output[-3000:]
            break
        job, group = todo[attempt.trigger]
        hit.append(job)
        if not group:  # the orphaned job must stop by itself within seconds
            deadline = time.time() + 15
            while faults.orphans(killed_dir) and time.time() < deadline:
                time.sleep(0.2)
            assert faults.orphans(killed_dir) == [], f"orphaned job still running after killing snakemake at {job}"
        faults.unlock(killed_dir)
        # the next attempt (killed at the next point, or the final rerun) must not report success early
    assert {"reference_manifest", "select_training", "train_encoder"} <= set(hit), hit
    reruns, attempts = faults.rerun_until_done(killed_dir)
    assert reruns == 1, [a.output[-2000:] for a in attempts]
    assert faults.targets_present(killed_dir) == [], attempts[-1].output[-3000:]
    assert not list((killed_dir / "results/models/tiny").glob(".partial-*"))
    assert_same_results(killed_dir, clean_run)


def test_workflow_training_is_bit_identical(tmp_path, shared_data, clean_run):
    """Two from-scratch runs with training, same seed and config (one thread): the same encoder bytes,
    flow bytes and score rows (item 4)."""
    again = faults.setup(tmp_path / "again", shared_data)
    attempt = faults.run(again)
    assert attempt.returncode == 0, attempt.output[-3000:]
    assert_same_results(again, clean_run)


def _dry_run(workdir: Path, *config: str) -> subprocess.CompletedProcess:
    return subprocess.run(faults.command(workdir, "-n", "--config", *config), capture_output=True, text=True,
                          timeout=600)


def test_new_encoder_plans_a_new_flow_and_bad_pretrained_is_refused(clean_run, tmp_path):
    """Item 1: after a finished run, a new model.id plans the training *and* a flow fitted on the new
    encoder's latents (it used to plan train_encoder only and reuse the old flow). Item 3: an unusable
    model.pretrained stops the workflow when it loads, naming the path."""
    res = _dry_run(clean_run, "model={id: tiny2, pretrained: ''}")
    assert res.returncode == 0, res.stderr[-3000:]
    plan = res.stdout + res.stderr
    for rule in ("train_encoder", "fit_flow", "score_shard", "density_shard", "cohort_scores"):
        assert re.search(rf"^(local)?rule {rule}:", plan, re.M), (rule, plan[-3000:])
    assert "results/flows/tiny2/f1/flow.json" in plan
    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    (only_pt / "encoder.pt").write_bytes(b"not a model")
    for folder, message in ((tmp_path / "nowhere", "no such folder"), (only_pt, "no model.json")):
        res = _dry_run(clean_run, f"model={{id: other, pretrained: '{folder}'}}")
        assert res.returncode != 0 and f"model.pretrained '{folder}': {message}" in res.stdout + res.stderr


def test_rerun_of_ingest_reaches_the_tables_but_not_the_frozen_manifests(clean_run):
    """A rerun of the ingest gather (after a kill, or forced) must reach the cohort tables, while the frozen
    manifests behind their ancient() edges stay as they are. Before frozen_input(), ancient() had flagged
    ingest's output object itself, every edge out of ingest was ancient, and the rerun ran `ingest` alone."""
    res = subprocess.run(faults.command(clean_run, "-n", "--forcerun", "ingest", "--", *faults.TARGETS),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    planned = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", res.stdout + res.stderr, re.M))
    assert {"ingest", "cohort_scores"} <= planned, planned
    assert not planned & {"training_selection", "reference_manifest", "train_encoder", "fit_flow"}, planned
