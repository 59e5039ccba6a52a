"""End-to-end scoring stage: shards, frozen flow, reruns touching only a new site, identical reruns.

The encoder here is randomly initialised (saved through the real checkpoint code): these tests are
about the workflow's plumbing and determinism, not about score quality (benchmarks/encoder is).
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from ..conftest import save_tiny_model
from .test_ingest_workflow import REPO, make_volume, planned_jobs, run_snakemake, write_sheet

pytestmark = pytest.mark.slow

SCORE_COLUMNS = [
    "score", "score_learned", "severity_noise", "severity_ghosting", "severity_motion", "severity_bias",
    "severity_resolution", "severity_clipping", "saturation", "latent_0", "latent_1", "log_density", "density_pct", "flag_tau5", "flag_tau3", "flagged",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), meta={"model_id": "wf-test"})


def setup_cohort(workdir, model_dir, sites=("A", "B", "C"), n=4):
    rows = []
    for site in sites:
        for i in range(n):
            p = make_volume(workdir / f"{site}{i}.nii.gz", seed=10 * ord(site) + i)
            rows.append(dict(volume_id=f"{site}-{i}", site=site, subject=f"{site}{i}", contrast="T1w", path=str(p)))
    write_sheet(workdir, rows)
    cfg = {
        "model": {"id": "wf-test", "pretrained": str(model_dir)},
        "flow": {"id": "wf-flow", "fit": {"epochs": 20, "seed": 0, "device": "cpu", "hidden": [16, 16]}},
        "score": {"threads": 1},
    }
    (workdir / "test.yaml").write_text(yaml.safe_dump(cfg))
    return rows


def config_args(workdir):
    return ["--configfile", str(REPO / "config/config.yaml"), str(workdir / "test.yaml")]


def run(workdir, *args):
    return run_snakemake(workdir, *config_args(workdir), *args)


def add_site_d_only_its_shards_planned(workdir, rows, contrast):
    """Add a one-volume site D to the sheet; assert that only D's shard jobs are planned; return the jobs."""
    p = make_volume(workdir / "D0.nii.gz", seed=77)
    rows.append(dict(volume_id="D-0", site="D", subject="D0", contrast=contrast, path=str(p)))
    write_sheet(workdir, rows)
    jobs = planned_jobs(workdir, *config_args(workdir))
    # the MRIQC comparison is a report built on the cohort table, like the figures: it reruns per contrast
    per_shard = {(rule, wc) for rule, wc in jobs if wc and rule != "compare_simulate"}
    # (and the review page's mosaics of that shard only)
    assert per_shard == {(r, "site=D, part=0") for r in ("ingest_shard", "score_shard", "density_shard",
                                                         "review_mosaics")}, jobs
    return jobs


def test_scores_failures_identical_reruns_and_new_site(tmp_path, model_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    rows = setup_cohort(first, model_dir)
    bad = first / "B1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])  # a corrupted volume in site B
    run(first)
    cohort = pd.read_parquet(first / "results/scores/cohort.parquet")
    assert sorted(cohort["volume_id"]) == sorted(r["volume_id"] for r in rows)
    by_id = cohort.set_index("volume_id")
    assert by_id.loc["B-1", "status"] == "failed" and by_id.loc["B-1", "error"].startswith("ingest: truncated:")
    assert not by_id.loc["B-1", "flagged"]
    assert (cohort.loc[cohort.volume_id != "B-1", "status"] == "ok").all()  # the rest of site B is scored
    cohort = cohort[cohort.status == "ok"].reset_index(drop=True)
    for col in ("input_sha256", "model_id", "model_sha256", "flow_id", "flow_sha256", "config_sha256",
                "artifactqc_version"):
        assert cohort[col].astype(str).str.len().min() > 0, col
    assert (first / "results/scores/cohort.tsv").is_file()
    assert list((first / "results/provenance").glob("*.json"))

    # the same inputs in a second folder give bit-identical score columns
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("results", ".snakemake", "logs"))
    sheet = pd.read_csv(second / "sheet.tsv", sep="\t")
    sheet["path"] = sheet["path"].str.replace(str(first), str(second))
    sheet.to_csv(second / "sheet.tsv", sep="\t", index=False)
    run(second)
    again = pd.read_parquet(second / "results/scores/cohort.parquet")
    again = again[again.status == "ok"].reset_index(drop=True)
    pd.testing.assert_frame_equal(cohort[SCORE_COLUMNS], again[SCORE_COLUMNS], check_exact=True)

    # a new site: only its ingest/score/density shards and the gathers run; no refit, no retrain
    jobs = add_site_d_only_its_shards_planned(first, rows, "FLAIR")
    rules = {rule for rule, _ in jobs}
    assert {"ingest", "cohort_scores"} <= rules  # the cohort gathers (and the report built on them) rerun
    assert not rules & {"fit_flow", "reference_manifest", "train_encoder", "select_training", "n4", "superres"}, rules
    run(first)
    grown = pd.read_parquet(first / "results/scores/cohort.parquet").set_index("volume_id")
    # existing rows unchanged; the new site is scored against the same flow
    old = cohort.set_index("volume_id")
    pd.testing.assert_frame_equal(old[SCORE_COLUMNS], grown.loc[old.index, SCORE_COLUMNS], check_exact=True)
    assert np.isfinite(grown.loc["D-0", "log_density"])


def test_site_aware_score_at_the_gather(tmp_path, model_dir):
    """score_site and a site flag rule: computed at the cohort gather from the frozen reference manifest; a
    change of site_score or a new site reruns no other site's shards; the new site falls back to pooled."""
    from artifactqc import sitescore

    rows = setup_cohort(tmp_path, model_dir, sites=("A", "B"), n=4)
    cfg = yaml.safe_load((tmp_path / "test.yaml").read_text())
    cfg["flags"] = {"rule": "score_or_site_or_tau5"}
    cfg["site_score"] = {"min_reference": 4, "min_scale": 0.01}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(cfg))
    run(tmp_path)
    cohort = pd.read_parquet(tmp_path / "results/scores/cohort.parquet")
    assert (cohort.score_site_basis == "site").all() and (cohort.score_site_n_ref == 4).all()
    want = sitescore.site_scores(cohort, None, min_reference=4, min_scale=0.01)
    np.testing.assert_allclose(cohort.score_site, want.score_site)
    assert cohort.flagged.dtype == bool
    assert (cohort.flagged == ((cohort.score > 1) | (cohort.score_site > 3) | cohort.flag_tau5)).all()
    shard = pd.read_parquet(next((tmp_path / "results/scores/site=A").glob("part-*.parquet")))
    assert shard.flagged.isna().all()  # a site rule is evaluated at the gather only

    cfg["site_score"]["threshold"] = 1.5
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(cfg))
    add_site_d_only_its_shards_planned(tmp_path, rows, "T1w")
    run(tmp_path)
    grown = pd.read_parquet(tmp_path / "results/scores/cohort.parquet").set_index("volume_id")
    assert grown.loc["D-0", "score_site_basis"] == "pooled"  # not in the frozen manifest
    old = cohort.set_index("volume_id")
    np.testing.assert_allclose(grown.loc[old.index, "score_site"], old["score_site"])
    g = grown.reset_index()
    assert (g.flagged == ((g.score > 1) | (g.score_site > 1.5) | g.flag_tau5)).all()
