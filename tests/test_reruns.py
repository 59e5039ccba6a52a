"""Issue 17 ("reruns that cannot lie"), the package side: every derived artifact names what it was made
from and refuses to be mixed with anything else; bad cohorts and pretrained folders fail loudly; failure
rows keep their sheet identity; a training job never outlives its run. The workflow side (real runs,
killed) is in tests/workflow/test_kill_reruns.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from artifactqc import cohort, config_check, jobguard, shards
from artifactqc.density.flow import load_flow
from artifactqc.io import VolumeError, load_volume, sha256_file

from .conftest import save_tiny_model


def _volume(path, seed=0, shape=(20, 22, 16), fill=None):
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 20, size=shape).astype(np.float32) if fill is None else np.full(shape, fill, np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
    return str(path)


def _cohort(tmp_path, n=10, site="A", extra=None):
    rows = []
    for i in range(n):
        rows.append(dict(volume_id=f"v{i}", site=site, subject=f"s{i}", contrast="T1w",
                         path=_volume(tmp_path / f"v{i}.nii.gz", seed=i), **(extra or {})))
    return cohort.normalise_cohort(pd.DataFrame(rows))


def _scored(tmp_path, model_dir, sheet):
    vols, fails = cohort.ingest_rows(sheet)
    return shards.score_shard(vols, fails, model_dir, device="cpu", threads=1, sheet_rows=sheet)


# --- item 1: a flow is tied to the encoder whose latents it was fitted on -------------------------------

def test_flow_records_encoder_and_refuses_rows_of_another(tmp_path):
    model_a = save_tiny_model(tmp_path / "a", seed=0, meta={"model_id": "a"})
    model_b = save_tiny_model(tmp_path / "b", seed=1, meta={"model_id": "b"})
    sheet = _cohort(tmp_path)
    rows_a, _ = _scored(tmp_path, model_a, sheet)
    rows_b, _ = _scored(tmp_path, model_b, sheet)
    vols, _ = cohort.ingest_rows(sheet)
    vols.to_parquet(tmp_path / "volumes.parquet")
    shards.write_reference_manifest(tmp_path / "volumes.parquet", tmp_path / "ref.tsv")
    flow_dir = tmp_path / "flow"
    shards.fit_flow_for_reference(rows_a, tmp_path / "ref.tsv", flow_dir / "flow.safetensors", flow_id="f",
                                  model_dir=model_a, epochs=5, hidden=[8], device="cpu")
    meta = json.loads((flow_dir / "flow.json").read_text())
    assert meta["model_id"] == "a" and meta["model_sha256"] == sha256_file(model_a / "encoder.safetensors")
    kw = dict(taus=[5], rule="score_or_tau5", score_threshold=1.0, config_sha256="x")
    out = shards.add_density(rows_a, flow_dir, **kw)
    assert np.isfinite(out.loc[out.status == "ok", "log_density"]).all()
    with pytest.raises(shards.FlowEncoderMismatch, match="fitted on the latents of encoder a"):
        shards.add_density(rows_b, flow_dir, **kw)
    # fitting a flow for encoder b on rows scored by a is refused too
    with pytest.raises(shards.FlowEncoderMismatch, match="rescore them"):
        shards.fit_flow_for_reference(rows_a, tmp_path / "ref.tsv", tmp_path / "fb" / "flow.safetensors",
                                      flow_id="f", model_dir=model_b, epochs=5, hidden=[8], device="cpu")
    # a flow that does not say which encoder it was fitted on is refused
    meta.pop("model_sha256")
    (flow_dir / "flow.json").write_text(json.dumps(meta))
    assert load_flow(flow_dir) is not None
    with pytest.raises(shards.FlowEncoderMismatch, match="records no model_sha256"):
        shards.add_density(rows_a, flow_dir, **kw)


# --- item 3: a pretrained folder is checked before anything runs; rows carry the model that scored them -

def test_check_pretrained_names_path_and_problem(tmp_path):
    good = save_tiny_model(tmp_path / "good", meta={"model_id": "m1"})
    assert config_check.check_pretrained(good, "m1")["model_id"] == "m1"
    with pytest.raises(config_check.ConfigError, match="no such folder"):
        config_check.check_pretrained(tmp_path / "nowhere", "m1")
    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    (only_pt / "encoder.pt").write_bytes(b"x")
    with pytest.raises(config_check.ConfigError, match=f"{only_pt}.*no model.json.*encoder.pt"):
        config_check.check_pretrained(only_pt, "m1")
    meta = json.loads((good / "model.json").read_text())
    nosha = tmp_path / "nosha"
    nosha.mkdir()
    (nosha / "encoder.safetensors").write_bytes((good / "encoder.safetensors").read_bytes())
    (nosha / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    with pytest.raises(config_check.ConfigError, match="no weights_sha256"):
        config_check.check_pretrained(nosha, "m1")
    (nosha / "model.json").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    with pytest.raises(config_check.ConfigError, match="does not match"):
        config_check.check_pretrained(nosha, "m1")
    with pytest.raises(config_check.ConfigError, match="differs from the config's model.id 'other'"):
        config_check.check_pretrained(good, "other")


def test_rows_carry_the_loaded_models_identity(tmp_path):
    model = save_tiny_model(tmp_path / "m", meta={"model_id": "m7"})
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    rows, _ = _scored(tmp_path, model, _cohort(tmp_path, n=2))
    assert set(rows["model_id"]) == {"m7"}
    assert set(rows["model_sha256"]) == {sha256_file(model / "encoder.safetensors")}


# --- item 6: empty cohorts, constant volumes, duplicate copies ------------------------------------------

def test_header_only_sheet_and_empty_bids_are_errors(tmp_path):
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("volume_id\tsite\tsubject\tcontrast\tpath\n")
    with pytest.raises(cohort.CohortError, match=f"{sheet}: the cohort sheet has a header but no rows"):
        cohort.read_sheet(sheet)
    sheet.write_text("")
    with pytest.raises(cohort.CohortError, match="the cohort sheet is empty"):
        cohort.read_sheet(sheet)
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(cohort.CohortError, match=f"{bids}: no anatomical images found"):
        cohort.discover_bids(bids, site_constant="X")


def test_constant_volume_is_a_failure_row(tmp_path):
    path = _volume(tmp_path / "c.nii.gz", fill=7.0)
    with pytest.raises(VolumeError) as err:
        load_volume(path)
    assert err.value.error_type == "constant"
    sheet = cohort.normalise_cohort(pd.DataFrame([dict(volume_id="c", site="S1", subject="1", contrast="T1w",
                                                       path=path)]))
    vols, fails = cohort.ingest_rows(sheet)
    assert vols.empty and list(fails["error_type"]) == ["constant"] and list(fails["site"]) == ["S1"]


def test_duplicate_copies_enter_the_flow_reference_once(tmp_path):
    sheet = _cohort(tmp_path, n=3)
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(open(sheet.loc[0, "path"], "rb").read())
    sheet = cohort.normalise_cohort(pd.concat([sheet, pd.DataFrame([dict(
        volume_id="copy", site="A", subject="s0", contrast="T1w", path=str(copy))])], ignore_index=True))
    vols, fails = cohort.ingest_rows(sheet)
    volumes, _ = cohort.combine_ingest([vols], [fails])
    volumes.to_parquet(tmp_path / "volumes.parquet")
    ref = shards.write_reference_manifest(tmp_path / "volumes.parquet", tmp_path / "ref.tsv")
    assert sorted(ref["volume_id"]) == ["v0", "v1", "v2"]
    (tmp_path / "explicit.tsv").write_text("volume_id\nv0\ncopy\nv1\n")
    ref = shards.write_reference_manifest(tmp_path / "volumes.parquet", tmp_path / "ref2.tsv",
                                          explicit=tmp_path / "explicit.tsv")
    assert sorted(ref["volume_id"]) == ["v0", "v1"]


# --- item 7: failure rows keep the sheet's identity, extra sheet columns reach the score tables ---------

def test_failed_rows_keep_sheet_identity_and_extra_columns(tmp_path):
    model = save_tiny_model(tmp_path / "m", meta={"model_id": "m"})
    sheet = _cohort(tmp_path, n=3, site="S9", extra={"note": "scanner 2"})
    sheet.loc[2, "note"] = "moved"
    bad = tmp_path / "v1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: fails at ingest
    vols, fails = cohort.ingest_rows(sheet)
    assert list(fails["site"]) == ["S9"] and list(fails.columns) == list(cohort.FAILURE_COLUMNS)
    rows, _ = shards.score_shard(vols, fails, model, device="cpu", threads=1, sheet_rows=sheet)
    by_id = rows.set_index("volume_id")
    assert by_id.loc["v1", "status"] == "failed"
    assert (by_id.loc["v1", ["site", "subject", "contrast"]] == ["S9", "s1", "T1w"]).all()
    assert by_id["note"].to_dict() == {"v0": "scanner 2", "v1": "scanner 2", "v2": "moved"}


# --- item 7: a training job never outlives its run, never leaves half a model -------------------------

def test_staging_dir_publishes_only_on_success(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with jobguard.staging_dir(out) as stage:
            (stage / "encoder.safetensors").write_text("partial")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == []
    with jobguard.staging_dir(out) as stage:
        (stage / "encoder.safetensors").write_text("w")
        (stage / "model.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.safetensors", "model.json"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ".writer.pid").write_text(f"{sleeper.pid}\n")
        with pytest.raises(jobguard.FolderBusy, match=f"process {sleeper.pid} is still writing"):
            with jobguard.staging_dir(out):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with jobguard.staging_dir(out):  # the writer is gone: its stale pid file is replaced
        pass


def test_job_exits_when_its_snakemake_is_killed(tmp_path):
    """A fake scheduler (its command line names snakemake) starts a job through a shell, as Snakemake's
    script rules do; kill -9 on the scheduler alone must end the job within seconds, its staging folder
    removed and the output folder untouched."""
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(f"""
        import functools, shutil, time
        from artifactqc import jobguard
        with jobguard.staging_dir({str(tmp_path / 'out')!r}) as stage:
            jobguard.exit_when_orphaned(interval=0.2, on_exit=functools.partial(shutil.rmtree, stage))
            (stage / "started").write_text("1")
            time.sleep(60)
            (stage / "model.json").write_text("late")
    """))
    sched = tmp_path / "fake_snakemake.py"
    sched.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen(["bash", "-c", "set -euo pipefail; {sys.executable} {job}; true"])
        open({str(tmp_path / 'job.pid')!r}, "w").write(str(p.pid))
        time.sleep(120)
    """))
    s = subprocess.Popen([sys.executable, str(sched)])
    out = tmp_path / "out"
    deadline = time.time() + 60
    while not list(out.glob(".partial-*/started")) and time.time() < deadline:
        time.sleep(0.1)
    assert list(out.glob(".partial-*/started")), "job did not start"
    pids = [int(p.name.split("-")[1]) for p in out.glob(".partial-*")]
    os.kill(s.pid, signal.SIGKILL)
    s.wait()
    deadline = time.time() + 10
    while any(jobguard._alive(p) and "job.py" in jobguard._cmdline(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(jobguard._alive(p) and "job.py" in jobguard._cmdline(p) for p in pids), "orphaned job still runs"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".writer")) == []


# --- item 4: with a step budget the clock can only stop training, never shape it -------------------------

def _tiny_training(data, tmp_path, name, **kw):
    from artifactqc.training.loop import train_encoder

    vols = [str(data / p) for p in ("volumes/NiChart/IXI012-HH-1211_T1.nii.gz", "volumes/NiChart/IXI015-HH-1258_T1.nii.gz",
                                    "volumes/nibabel/anatomical.nii.gz")]
    out = tmp_path / name
    metrics = train_encoder(vols, out, epochs=2, steps_per_epoch=2, batch_size=4, image_size=32, pixel_mm=4.0,
                            train_slices_per_axis=3, val_severities=(0.5,), pool_size=4, pool_init_per_volume=1,
                            pool_refresh=1, threads=1, device="cpu", bn_recalib_batches=1, seed=0, **kw)
    return metrics, (out / "encoder.safetensors").read_bytes()


@pytest.mark.realdata
def test_step_budget_training_ignores_the_clock(tmp_path, shared_data):
    free, w_free = _tiny_training(shared_data, tmp_path, "free")
    capped, w_capped = _tiny_training(shared_data, tmp_path, "capped", max_minutes=600)
    assert w_free == w_capped  # a far-away time limit changes nothing (it used to pace the learning rate)
    assert not capped["stopped_by_clock"] and capped["epochs_run"] == 2
    stopped, _ = _tiny_training(shared_data, tmp_path, "stopped", max_minutes=1e-4)
    assert stopped["stopped_by_clock"] and stopped["epochs_run"] == 1
    assert stopped["stop_reason"].startswith("safety stop: time limit")


def test_gather_refuses_a_cohort_table_missing_ingested_volumes():
    part = pd.DataFrame({"volume_id": ["a", "b"], "site": ["S", "S"], "status": ["ok", "ok"],
                         "log_density": [0.0, 1.0]})
    assert len(shards.gather([part], ingested=pd.DataFrame({"volume_id": ["a", "b"]}))) == 2
    with pytest.raises(shards.IncompleteCohort, match="1 ingested volume"):
        shards.gather([part], ingested=pd.DataFrame({"volume_id": ["a", "b", "c"]}))
