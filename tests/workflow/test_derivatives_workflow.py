"""End-to-end BIDS-derivatives export on a small BIDS cohort: the folder passes the BIDS checks, MRIQC's readers
read the group tables back with every volume, and a new site's delivery adds its JSONs without touching the
other sites' files. The encoder is randomly initialised (plumbing, not score quality)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from artifactqc.qc import mriqc

from ..bids_checks import schema_problems, validator_issues
from ..conftest import save_tiny_model
from .test_ingest_workflow import REPO, SNAKEMAKE, make_volume

pytestmark = pytest.mark.slow

DERIV = "results/derivatives/artifactqc"
TARGETS = (f"{DERIV}/dataset_description.json", "results/derivatives/artifactqc_index.tsv")


def add_site(root, site, subjects):
    """Subjects of one site: sub-<s>/[ses-1/]anat/*_T1w.nii.gz (every other one in a session), one T2w each."""
    names = []
    for k, sub in enumerate(subjects):
        anat = root / f"sub-{sub}" / ("ses-1/anat" if k % 2 else "anat")
        anat.mkdir(parents=True)
        ses = "_ses-1" if k % 2 else ""
        for j, suffix in enumerate(("T1w", "T2w") if k == 0 else ("T1w",)):
            make_volume(anat / f"sub-{sub}{ses}_{suffix}.nii.gz", seed=100 * ord(site) + 10 * k + j)
            names.append(f"sub-{sub}{ses}_{suffix}")
    part = root / "participants.tsv"
    old = pd.read_csv(part, sep="\t") if part.exists() else pd.DataFrame(columns=["participant_id", "site"])
    new = pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects], "site": site})
    pd.concat([old, new], ignore_index=True).to_csv(part, sep="\t", index=False)
    return names


def run(workdir, *args):
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(REPO / "config/config.yaml"), str(workdir / "test.yaml"), "--cores", "2", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"snakemake failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def files(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_bids_cohort_derivatives_validate_read_back_and_new_site(tmp_path, monkeypatch, capsys):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.8.0"}))
    names = add_site(bids, "A", ["A0", "A1", "A2", "A3"]) + add_site(bids, "B", ["B0", "B1", "B2"])
    bad = bids / "sub-B2/anat/sub-B2_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated file: a failed row, still in every output
    model = save_tiny_model(tmp_path / "model", meta={"model_id": "wf-deriv"})
    cfg = {
        "cohort": {"sheet": "", "bids": {"root": str(bids), "site_column": "site", "site_constant": ""}},
        "model": {"id": "wf-deriv", "pretrained": str(model)},
        "flow": {"id": "wf-flow", "fit": {"epochs": 20, "seed": 0, "device": "cpu", "hidden": [16, 16]},
                 "min_site_reference": 2},
        "score": {"threads": 1},
        "iqm": {"enabled": True, "use_n4": False},
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(cfg))
    assert "rule derivatives:" in run(tmp_path, "-n").stdout  # in the default targets for BIDS input
    run(tmp_path, *TARGETS)
    deriv = tmp_path / DERIV

    # valid BIDS derivatives: the schema's required fields, and the validator without errors
    assert schema_problems(deriv) == []
    errors, _ = validator_issues(deriv)
    assert errors == [], errors
    desc = json.loads((deriv / "dataset_description.json").read_text())
    cohort = pd.read_parquet(tmp_path / "results/scores/cohort.parquet")
    gen = desc["GeneratedBy"][0]
    assert gen["Models"] == [{"Id": "wf-deriv", "Sha256": cohort["model_sha256"].iloc[0]}]
    assert gen["Flows"] == [{"Id": "wf-flow", "Sha256": cohort["flow_sha256"].iloc[0]}]
    assert gen["ConfigSha256"] == [cohort["config_sha256"].iloc[0]]
    assert desc["SourceDatasets"] == [{"URL": bids.resolve().as_uri()}]

    # one JSON per image at its BIDS path, with the cohort's numbers and the IQMs
    for name in names:
        sub = name.split("_")[0]
        ses = "ses-1/" if "_ses-1_" in name else ""
        side = json.loads((deriv / sub / f"{ses}anat/{name}.json").read_text())
        row = cohort.set_index("volume_id").loc[name]
        if name == "sub-B2_T1w":
            assert side["status"] == "failed" and side["error"].startswith("ingest: truncated")
            assert side["score"] is None and side["iqm_status"] == "missing"
            continue
        assert side["score"] == pytest.approx(row["score"]) and side["site"] == row["site"]
        assert side["density_pct_site"] == pytest.approx(row["density_pct_site"])
        assert side["provenance"]["input_sha256"] == row["input_sha256"] and side["iqm_status"] == "ok"
        assert np.isfinite(side["cjv"])

    # MRIQC's readers: the project's import and plain pandas code for MRIQC group tables
    t1 = [n for n in names if n.endswith("_T1w")]
    back = mriqc.read_mriqc(deriv / "group_T1w.tsv").set_index("bids_name")
    assert sorted(back.index) == sorted(t1)
    expected = cohort.set_index("volume_id").loc[t1, "score"].to_dict()
    assert back["mriqc_score"].to_dict() == pytest.approx(expected, nan_ok=True)
    # every T1w row finds its group-table row; the truncated volume (a failed row that keeps its sheet
    # identity, contrast included) has n/a metrics there
    joined = mriqc.join_mriqc(cohort[cohort.contrast == "T1w"], mriqc.read_mriqc(deriv)).set_index("volume_id")
    assert (joined["mriqc_status"] == "ok").all()
    assert joined["mriqc_cjv"].drop(index="sub-B2_T1w").notna().all() and pd.isna(joined.loc["sub-B2_T1w", "mriqc_cjv"])
    df = pd.read_csv(deriv / "group_T1w.tsv", sep="\t", index_col=0)
    assert df.index.name == "bids_name" and sorted(df.index) == sorted(t1)
    assert df.select_dtypes("number").shape == df.shape  # numeric after bids_name, as MRIQC's
    scored = df.drop(index="sub-B2_T1w")
    assert scored[["score", "cjv", "cnr", "efc", "fber"]].notna().all().all()
    assert df.loc["sub-B2_T1w"].drop(["flag_tau5", "flag_tau3", "flagged"]).isna().all()  # n/a when not scored
    assert list(pd.read_csv(deriv / "group_T2w.tsv", sep="\t")["bids_name"]) == ["sub-A0_T2w", "sub-B0_T2w"]

    # the README's example ("Using the outputs") runs on these outputs
    example = (REPO / "README.md").read_text().split("## Using the outputs", 1)[1].split("```python\n", 1)[1]
    monkeypatch.chdir(tmp_path)
    exec(example.split("```", 1)[0], {})
    assert "volume_id" in capsys.readouterr().out

    # a new site delivers: its JSONs appear; the other sites' files keep their bytes and mtimes
    before = files(deriv)
    new = add_site(bids, "C", ["C0", "C1"])
    run(tmp_path, *TARGETS)
    after = files(deriv)
    changed = {p for p in after if before.get(p) != after[p]}
    new_sidecars = {f"sub-C0/anat/sub-C0_{s}.json" for s in ("T1w", "T2w")} | {"sub-C1/ses-1/anat/sub-C1_ses-1_T1w.json"}
    assert {f"{p.split('/')[0]}/{p.rsplit('/', 1)[1]}" for p in new_sidecars} == {
        f"{n.split('_')[0]}/{n}.json" for n in new}
    assert set(after) - set(before) == new_sidecars
    assert changed - new_sidecars <= {"dataset_description.json", "group_T1w.tsv", "group_T2w.tsv"}, changed
    assert {"group_T1w.tsv", "group_T2w.tsv"} <= changed
    assert sorted(mriqc.read_mriqc(deriv / "group_T1w.tsv")["bids_name"]) == sorted(
        t1 + [n for n in new if n.endswith("_T1w")])
    assert validator_issues(deriv)[0] == []
