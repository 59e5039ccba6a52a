"""The shipped model (``model.pretrained: builtin``), fine-tuning from a saved model (``train.init``), the model
card, and the demo cohort's labelled failures."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

from artifactqc import config_check, io
from artifactqc.encoder.checkpoint import (BUILTIN_FILES, ModelLoadError, builtin_model_dir, load_model,
                                           resolve_model_dir)
from artifactqc.training.finetune import InitModelError

from .conftest import REPO, SHARED_DATA
from .test_model import _train, toy_cohort  # noqa: F401  (toy_cohort is a fixture)


# ----------------------------------------------------------------------------------------- the builtin model
def test_builtin_model_is_complete_and_passes_the_pretrained_check():
    d = builtin_model_dir()
    assert resolve_model_dir("builtin") == d and resolve_model_dir("some/folder").name == "folder"
    info = config_check.check_pretrained("builtin", config_check.DEFAULT_MODEL_ID)
    assert info["model_id"].startswith("artifactqc-builtin")
    assert info["weights_sha256"] == io.sha256_file(d / "encoder.safetensors")
    # the builtin's own id is accepted too; any other id is an error that names both and the way out
    assert config_check.check_pretrained("builtin", info["model_id"])["model_id"] == info["model_id"]
    with pytest.raises(config_check.ConfigError, match=f"model.id 'mine' is not the builtin model's id '{info['model_id']}'"):
        config_check.check_pretrained("builtin", "mine")
    # the id that means "the builtin's own" is the one config.yaml ships
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert cfg["model"]["id"] == config_check.DEFAULT_MODEL_ID and cfg["model"]["pretrained"] == ""
    assert cfg["train"]["init"] == ""
    assert 0.2e6 < (d / "encoder.safetensors").stat().st_size < 2e6


def test_builtin_model_loads_and_scores_a_volume_offline(tmp_path):
    from artifactqc.encoder.score import score_volumes

    model = load_model("builtin", device="cpu")
    assert model.model_info["model_id"].startswith("artifactqc-builtin")
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[-1:1:48j, -1:1:56j, -1:1:44j]
    head = ((x ** 2 + y ** 2 + z ** 2) < 0.7).astype(np.float32) * (0.6 + 0.4 * (x ** 2 + y ** 2 < 0.2))
    path = tmp_path / "head.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(head + 0.01 * rng.standard_normal(head.shape).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1])),
             path)
    df = score_volumes(model, [str(path)], threads=1)
    assert df.loc[0, "status"] == "ok" and np.isfinite(df.loc[0, "score"])


def test_builtin_grades_a_real_2d_scan_on_its_acquisition_planes(shared_data):
    """A clean clinical 2D T1w (1 x 1 x 4.8 mm sagittal slices, a scanner the builtin model never trained on):
    on its acquisition planes the score drops (the blur of 4.8 mm slices is the protocol, not an artifact),
    while severity_resolution still reports the thick slices."""
    from artifactqc.encoder.score import score_volumes

    path = shared_data / "volumes/dcm_qa_decubitus/HFS/t1_fl2d_sag_3.nii.gz"
    model = load_model("builtin", device="cpu")
    acq, every = (score_volumes(model, [str(path)], threads=1, planes=p).iloc[0] for p in ("acquisition", "all"))
    assert acq["score_planes"] == "sagittal" and every["score_planes"] == "all"
    assert acq["severity_resolution"] == every["severity_resolution"]
    assert acq["score"] < every["score"] - 0.3, (acq["score"], every["score"])


def test_builtin_model_is_in_the_wheel(tmp_path):
    """A non-editable install gets the model: build the wheel from a copy of the sources and look inside."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "wheel"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                          "-w", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (whl,) = out.glob("artifactqc-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    want = {f"artifactqc/models/builtin/{f}" for f in BUILTIN_FILES}
    assert want <= names, sorted(want - names)
    with zipfile.ZipFile(whl) as z:
        meta = json.loads(z.read("artifactqc/models/builtin/model.json"))
        assert meta["weights_sha256"] == _sha(z.read("artifactqc/models/builtin/encoder.safetensors"))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_model_info_cli_prints_the_builtin_identity(capsys):
    from artifactqc.cli import main

    assert main(["model-info", "builtin", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    d = builtin_model_dir()
    assert out["weights_sha256"] == io.sha256_file(d / "encoder.safetensors")
    assert out["model_card"] == str(d / "MODEL_CARD.md") and out["training_volumes"] > 0
    assert main(["model-info", "/nonexistent/model"]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_rows_of_the_builtin_model_carry_its_id_and_sha256():
    from artifactqc import shards

    d = builtin_model_dir()
    info = json.loads((d / "model.json").read_text())
    ident = shards.model_identity(d, info)
    assert ident == {"model_id": info["model_id"], "model_sha256": io.sha256_file(d / "encoder.safetensors")}


def test_workflow_plans_scoring_with_the_builtin_model_and_no_training(tmp_path):
    """model.pretrained: builtin resolves at load time: no train_encoder job, the flow under the builtin's id."""
    from .workflow.test_ingest_workflow import make_volume, planned_jobs, run_snakemake, write_sheet

    rows = [dict(volume_id=f"A-{i}", site="A", subject=f"A{i}", contrast="T1w",
                 path=str(make_volume(tmp_path / f"A{i}.nii.gz", seed=i))) for i in range(2)]
    write_sheet(tmp_path, rows)
    args = ("--configfile", str(REPO / "config/config.yaml"), str(tmp_path / "b.yaml"))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"model": {"pretrained": "builtin"}}))
    jobs = planned_jobs(tmp_path, *args)
    rules = {r for r, _ in jobs}
    assert "score_shard" in rules and "train_encoder" not in rules and "n4" not in rules
    model_id = json.loads((builtin_model_dir() / "model.json").read_text())["model_id"]
    assert ("fit_flow", f"model_id={model_id}, flow_id=flow-v1") in jobs
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"model": {"pretrained": "builtin", "id": "mine"}}))
    res = run_snakemake(tmp_path, *args, "-n", check=False)
    assert res.returncode != 0 and "is not the builtin model's id" in res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------ fine-tuning
def _params(folder):
    m = load_model(folder, device="cpu", optimize=False)
    return {k: v.detach().clone() for k, v in m.named_parameters() if not k.startswith("volume_head.")}


def test_fine_tuning_starts_from_the_init_weights_and_records_them(tmp_path, toy_cohort):  # noqa: F811
    paths, _ = toy_cohort
    _train(tmp_path / "base", paths, epochs=1, seed=3)
    base = _params(tmp_path / "base")
    base_info = json.loads((tmp_path / "base" / "model.json").read_text())
    # a (practically) frozen fine-tune keeps the init's weights; the same run from scratch does not
    _train(tmp_path / "ft", paths, epochs=1, lr=1e-12, seed=0, init=str(tmp_path / "base"))
    _train(tmp_path / "scratch", paths, epochs=1, lr=1e-12, seed=0)
    ft, scratch = _params(tmp_path / "ft"), _params(tmp_path / "scratch")
    assert set(ft) == set(base)
    for k in base:
        torch.testing.assert_close(ft[k], base[k], atol=1e-6, rtol=0)
    assert max(float((scratch[k] - base[k]).abs().max()) for k in base) > 1e-2
    rec = json.loads((tmp_path / "ft" / "model.json").read_text())["training"]
    assert rec["init_model"]["model_id"] == base_info["model_id"] == "base"
    assert rec["init_model"]["weights_sha256"] == base_info["weights_sha256"]
    assert rec["init_model"]["folder"] == str(tmp_path / "base")
    assert rec["hyperparameters"]["init"] == str(tmp_path / "base")
    assert json.loads((tmp_path / "scratch" / "model.json").read_text())["training"]["init_model"] is None
    # a real fine-tune moves away from the init
    _train(tmp_path / "ft2", paths, epochs=1, seed=0, init=str(tmp_path / "base"))
    assert max(float((_params(tmp_path / "ft2")[k] - base[k]).abs().max()) for k in base) > 1e-4


def test_fine_tuning_from_a_broken_init_fails_naming_the_file(tmp_path, toy_cohort):  # noqa: F811
    paths, _ = toy_cohort
    with pytest.raises(InitModelError, match="nowhere"):
        _train(tmp_path / "x", paths, epochs=1, init=str(tmp_path / "nowhere"))
    _train(tmp_path / "base", paths, epochs=1)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "base", bad)
    with open(bad / "encoder.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 64)
    with pytest.raises(InitModelError, match=f"{bad}/encoder.safetensors: SHA-256 does not match"):
        _train(tmp_path / "x", paths, epochs=1, init=str(bad))
    with pytest.raises(config_check.ConfigError, match=f"train.init '{bad}'.*encoder.safetensors: sha256"):
        config_check.check_init(bad)
    # weights that do not fit the architecture model.json records
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "base", other)
    meta = json.loads((other / "model.json").read_text())
    meta["architecture"]["latent_dim"] = 7
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InitModelError, match=f"{other}/encoder.safetensors: the weights do not fit the architecture"):
        _train(tmp_path / "x", paths, epochs=1, init=str(other))
    assert config_check.check_init(tmp_path / "base")["model_id"] == "base"


def test_fine_tuning_from_the_builtin_model_uses_its_architecture(tmp_path, toy_cohort):  # noqa: F811
    from artifactqc.training.config import TrainConfig
    from artifactqc.training.finetune import load_init

    cfg, state, rec = load_init(TrainConfig(init="builtin", image_size=32, encoder={"latent_dim": 2}))
    info = json.loads((builtin_model_dir() / "model.json").read_text())
    assert rec["weights_sha256"] == info["weights_sha256"] and rec["model_id"] == info["model_id"]
    assert cfg.image_size == info["slices"]["image_size"] and cfg.encoder["latent_dim"] == info["architecture"]["latent_dim"]
    assert state and not any(k.startswith("volume_head.") for k in state)


def test_workflow_fine_tune_config_is_checked_at_load(tmp_path):
    from .workflow.test_ingest_workflow import make_volume, run_snakemake, write_sheet

    write_sheet(tmp_path, [dict(volume_id="A-0", site="A", subject="A0", contrast="T1w",
                                path=str(make_volume(tmp_path / "A0.nii.gz", seed=1)))])
    args = ("--configfile", str(REPO / "config/config.yaml"), str(tmp_path / "f.yaml"), "-n")
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({"train": {"init": "builtin"}, "model": {"id": "ft"}}))
    res = run_snakemake(tmp_path, *args, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({"train": {"init": str(tmp_path / "none")}}))
    res = run_snakemake(tmp_path, *args, check=False)
    assert res.returncode != 0 and f"train.init '{tmp_path / 'none'}': no such folder" in res.stdout + res.stderr
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({"train": {"inti": "builtin"}}))
    res = run_snakemake(tmp_path, *args, check=False)
    assert res.returncode != 0 and "did you mean 'train.init'" in res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------ model card
def _card_module():
    spec = importlib.util.spec_from_file_location("model_card", REPO / "benchmarks" / "builtin" / "model_card.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_card_is_reproduced_by_its_script():
    if not (SHARED_DATA / "MANIFEST.tsv").is_file():
        pytest.skip(f"real development data not found at {SHARED_DATA} (the card lists its training volumes)")
    mod = _card_module()
    card = (builtin_model_dir() / "MODEL_CARD.md").read_text()
    assert card == mod.card_text(builtin_model_dir(), SHARED_DATA, mod.RESULTS)
    info = json.loads((builtin_model_dir() / "model.json").read_text())
    assert info["weights_sha256"] in card and "## Leave-site-out figures" in card and "## Known failure modes" in card
    # every training volume is listed with its licence
    for p in info["training"]["train_volumes"]:
        assert p.split("/")[-1] in card or "not in MANIFEST" in card
    assert "| licence |" in card and "(stated in MANIFEST)" in card or "licenses/" in card


def test_readme_links_the_model_card():
    readme = (REPO / "README.md").read_text()
    assert "src/artifactqc/models/builtin/MODEL_CARD.md" in readme and "pretrained: builtin" in readme


# ------------------------------------------------------------------------------------------------ the demo
def test_demo_cohort_has_enough_labelled_failures_over_types_and_sites(tmp_path):
    from artifactqc.demo import DEFAULT_SPEC, demo_sheet

    sheet = demo_sheet(DEFAULT_SPEC, tmp_path)
    fails = sheet[sheet["label"] == "fail"]
    assert len(fails) >= 6
    assert {"motion", "ghosting", "noise", "bias"} <= set(fails["injected_artifact"])
    assert fails["site"].nunique() >= 2
    assert (fails["injected_severity"] >= DEFAULT_SPEC["fail_threshold"]).all()
    # mild artifacts below the threshold stay in (labelled pass): the demo is not only clean vs. severe
    mild = sheet[(sheet["injected_artifact"] != "") & (sheet["label"] == "pass")]
    assert len(mild) >= 2
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    assert demo["model"]["pretrained"] == "builtin"
