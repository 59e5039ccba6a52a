"""BIDS-derivatives export: layout, sidecar and group-table contents, BIDS validity, MRIQC readers, reruns."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from artifactqc import derivatives
from artifactqc.qc import mriqc

from .bids_checks import schema_problems, validator_issues

SEVERITIES = ["severity_noise", "severity_ghosting", "severity_motion", "severity_bias", "severity_resolution"]


def cohort_rows(site: str, n: int, *, bids: bool = True, seed: int = 0, failed: int | None = None) -> pd.DataFrame:
    """A cohort table as rule cohort_scores writes it (the columns the export reads)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sub = f"{site}{i:02d}"
        name = f"sub-{sub}_ses-1_T1w" if bids and i % 2 == 0 else (f"sub-{sub}_T2w" if bids else "")
        rows.append({
            "volume_id": name or f"{site}-{i}", "site": site, "subject": sub, "session": "1" if "ses-" in name else "",
            "contrast": "T1w" if (not bids or i % 2 == 0) else "T2w",
            "path": f"/data/{'bids/sub-' + sub + '/anat/' + name if bids else site + '/' + str(i)}.nii.gz",
            "bids_name": name, "label": "", "status": "ok", "error": "",
            "score": float(rng.uniform(0, 2)), **{s: float(rng.uniform()) for s in SEVERITIES},
            "latent_0": float(rng.normal()), "latent_1": float(rng.normal()), "n_slices": 30, "seconds": 0.5,
            "input_sha256": f"{i:064x}", "model_id": "m1", "model_sha256": "a" * 64, "log_density": float(rng.normal()),
            "density_pct": float(rng.uniform(0, 100)), "flag_tau5": bool(i == 1), "flag_tau3": False,
            "flagged": bool(i == 1), "flow_id": "f1", "flow_sha256": "b" * 64, "config_sha256": "c" * 64,
            "artifactqc_version": "0.1.0", "code_version": "0.1.0+gabc", "density_pct_site": float(rng.uniform(0, 100)),
            "pct_scope": "site", "score_planes": "axial" if i % 2 else "all", "score_site": float(rng.normal()),
            "score_site_basis": "pooled",
        })
    df = pd.DataFrame(rows)
    if failed is not None:
        cols = ["score", *SEVERITIES, "latent_0", "latent_1", "log_density", "density_pct", "density_pct_site"]
        df.loc[failed, cols] = np.nan
        df.loc[failed, ["status", "error", "input_sha256"]] = ["failed", "ingest: truncated: cut off", ""]
    return df


def test_bids_layout_contents_and_mriqc_readers(tmp_path):
    bids_root = tmp_path / "bids"
    bids_root.mkdir()
    (bids_root / "dataset_description.json").write_text(json.dumps({"Name": "Study X", "BIDSVersion": "1.8.0",
                                                                     "DatasetDOI": "doi:10.1/xyz"}))
    scores = cohort_rows("A", 4, failed=3)
    iqms = pd.DataFrame({"volume_id": scores["volume_id"][:3], "path": "", "contrast": "", "status": "ok",
                         "error_type": "", "error": "", "seconds": 1.0, "cjv": [0.4, 0.5, 0.6], "efc": [0.5, 0.6, 0.7]})
    out = tmp_path / "deriv"
    index = derivatives.write_derivatives(scores, out, iqms=iqms, bids_root=bids_root)

    # layout: each image's JSON at its BIDS-relative path, one group table per suffix
    expected = {"sub-A00/ses-1/anat/sub-A00_ses-1_T1w.json", "sub-A01/anat/sub-A01_T2w.json",
                "sub-A02/ses-1/anat/sub-A02_ses-1_T1w.json", "sub-A03/anat/sub-A03_T2w.json"}
    found = {p.relative_to(out).as_posix() for p in out.glob("sub-*/**/*.json")}
    assert found == expected
    assert sorted(p.name for p in out.glob("group_*.tsv")) == ["group_T1w.tsv", "group_T2w.tsv"]
    assert set(index["path"]) == expected | {"dataset_description.json", "README.md", ".bidsignore", "group_T1w.tsv",
                                             "group_T2w.tsv"}

    side = json.loads((out / "sub-A01/anat/sub-A01_T2w.json").read_text())
    row = scores.set_index("volume_id").loc["sub-A01_T2w"]
    assert side["bids_name"] == "sub-A01_T2w" and side["site"] == "A" and side["status"] == "ok"
    assert side["score_planes"] == "axial" and side["score_site_basis"] == "pooled"
    for col in ["score", *SEVERITIES, "density_pct", "density_pct_site", "log_density"]:
        assert side[col] == pytest.approx(row[col]), col
    assert side["flag_tau5"] is True and side["flagged"] is True and side["flag_tau3"] is False
    assert side["cjv"] == pytest.approx(0.5) and side["iqm_status"] == "ok"
    assert "latent_0" not in side and "n_slices" not in side
    assert side["provenance"] == {"source": row["path"], "input_sha256": row["input_sha256"], "model_id": "m1",
                                  "model_sha256": "a" * 64, "flow_id": "f1", "flow_sha256": "b" * 64,
                                  "config_sha256": "c" * 64, "artifactqc_version": "0.1.0",
                                  "code_version": "0.1.0+gabc"}
    failed = json.loads((out / "sub-A03/anat/sub-A03_T2w.json").read_text())
    assert failed["status"] == "failed" and failed["score"] is None and failed["iqm_status"] == "missing"

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["Name"].endswith("Study X")
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "artifactqc" and gen["Version"] == "0.1.0"
    assert gen["ConfigSha256"] == ["c" * 64]
    assert gen["Models"] == [{"Id": "m1", "Sha256": "a" * 64}] and gen["Flows"] == [{"Id": "f1", "Sha256": "b" * 64}]
    assert desc["SourceDatasets"] == [{"URL": bids_root.resolve().as_uri(), "DOI": "doi:10.1/xyz"}]

    # group tables: MRIQC's layout, read back by MRIQC's readers with every volume
    t2 = pd.read_csv(out / "group_T2w.tsv", sep="\t")
    assert list(t2.columns[:2]) == ["bids_name", "score"] and list(t2["bids_name"]) == ["sub-A01_T2w", "sub-A03_T2w"]
    assert all(pd.api.types.is_numeric_dtype(t2[c]) for c in t2.columns[1:])  # numeric only, as MRIQC's
    assert "score_site" in t2.columns and not {"score_planes", "score_site_basis"} & set(t2.columns)  # text
    assert t2.loc[0, "flagged"] == 1 and np.isnan(t2.loc[1, "score"])
    back = mriqc.read_mriqc(out).set_index("bids_name")
    assert sorted(back.index) == sorted(scores["volume_id"])
    assert back.loc["sub-A00_ses-1_T1w", "mriqc_score"] == pytest.approx(scores.loc[0, "score"], rel=1e-9)
    assert back.loc["sub-A02_ses-1_T1w", "mriqc_cjv"] == pytest.approx(0.6)

    # BIDS: the schema's required fields, and the validator
    assert schema_problems(out) == []
    errors, _ = validator_issues(out)
    assert errors == []


def test_sheet_rows_use_volume_id(tmp_path):
    scores = cohort_rows("B", 3, bids=False)
    derivatives.write_derivatives(scores, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")) == [
        "dataset_description.json", "volumes/B/B-0.json", "volumes/B/B-1.json", "volumes/B/B-2.json"]
    table = pd.read_csv(tmp_path / "group_T1w.tsv", sep="\t")
    assert list(table["bids_name"]) == ["B-0", "B-1", "B-2"]
    assert "SourceDatasets" not in json.loads((tmp_path / "dataset_description.json").read_text())
    assert schema_problems(tmp_path) == []
    assert validator_issues(tmp_path)[0] == []


def test_new_site_writes_only_its_files_and_stale_ones_go(tmp_path):
    a, b = cohort_rows("A", 4), cohort_rows("B", 3, seed=1)
    derivatives.write_derivatives(a, tmp_path)
    old = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    past = 1_000_000_000_000_000_000
    for p in old:
        os.utime(p, ns=(past, past))
    index = derivatives.write_derivatives(pd.concat([a, b], ignore_index=True), tmp_path)
    changed = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
               and p.stat().st_mtime_ns != past}
    new_sidecars = {f"sub-B{i:02d}/{'ses-1/' if i % 2 == 0 else ''}anat/{v}.json" for i, v in enumerate(b.volume_id)}
    assert changed == new_sidecars | {"group_T1w.tsv", "group_T2w.tsv"}
    assert set(index.loc[index.written, "path"]) == changed

    # a volume that left the cohort loses its JSON; a changed score rewrites only that JSON
    c = pd.concat([a.iloc[1:], b], ignore_index=True)
    c.loc[c.volume_id == "sub-B00_ses-1_T1w", "score"] = 5.0
    index = derivatives.write_derivatives(c, tmp_path)
    assert not (tmp_path / "sub-A00").exists()
    assert set(index.loc[index.written & (index.kind == "sidecar"), "volume_id"]) == {"sub-B00_ses-1_T1w"}
    assert json.loads((tmp_path / "sub-B00/ses-1/anat/sub-B00_ses-1_T1w.json").read_text())["score"] == 5.0


def test_two_rows_on_one_path_is_an_error(tmp_path):
    scores = pd.concat([cohort_rows("A", 1), cohort_rows("A", 1).assign(volume_id="other")], ignore_index=True)
    with pytest.raises(ValueError, match="share a derivatives file.*other"):
        derivatives.write_derivatives(scores, tmp_path)
