"""Cohort sheets, BIDS discovery and ingest, including every bad-input kind of the foundation issue."""

from __future__ import annotations

import gzip
import math
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from artifactqc import cohort
from artifactqc.io import VolumeError, load_volume
from artifactqc.provenance import column_descriptions


def _nifti(path, shape=(12, 14, 10), affine=None, dtype=np.int16, fill=None, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 1000, size=shape).astype(dtype) if fill is None else np.full(shape, fill, dtype=dtype)
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)
    nib.save(img, str(path))
    return path


def _singular_affine_nifti(path):
    """nibabel refuses to write a singular affine, so patch the header bytes: sform only, z row zero."""
    _nifti(path)
    raw = bytearray(path.read_bytes())
    raw[252:254] = np.int16(0).tobytes()  # qform_code = 0
    raw[254:256] = np.int16(1).tobytes()  # sform_code = 1
    raw[312:328] = np.zeros(4, np.float32).tobytes()  # srow_z = 0 -> determinant 0
    path.write_bytes(bytes(raw))
    return path


def _bad_inputs(tmp_path):
    """Every bad-input kind of the issue, keyed by the error_type it must produce."""
    d = tmp_path / "vols"
    d.mkdir()
    cases = {}
    cases["missing_file"] = d / "missing.nii.gz"
    unreadable = _nifti(d / "unreadable.nii.gz")
    os.chmod(unreadable, 0)
    cases["permission_denied"] = unreadable
    (d / "text.nii.gz").write_bytes(gzip.compress(b"this is a text file, not an image\n" * 40))
    cases["not_nifti"] = d / "text.nii.gz"
    full = _nifti(d / "full.nii.gz", shape=(40, 40, 30)).read_bytes()
    (d / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    cases["truncated"] = d / "truncated.nii.gz"
    data = np.ones((8, 8, 8), np.float32)
    data[2, 3, 4] = np.nan
    data[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(d / "nan.nii.gz"))
    cases["nonfinite_voxels"] = d / "nan.nii.gz"
    cases["all_zero"] = _nifti(d / "zeros.nii.gz", fill=0)
    cases["multi_volume"] = _nifti(d / "fmri.nii.gz", shape=(8, 8, 8, 5))
    cases["single_slice"] = _nifti(d / "slice.nii.gz", shape=(64, 64, 1))
    cases["too_large"] = _nifti(d / "big.nii.gz", shape=(200, 200, 200), dtype=np.uint8, fill=1)
    cases["bad_affine"] = _singular_affine_nifti(d / "singular.nii")
    return cases


def _sheet(tmp_path, rows):
    df = pd.DataFrame(rows)
    p = tmp_path / "sheet.tsv"
    df.to_csv(p, sep="\t", index=False)
    return p


def test_permission_denied_reason(tmp_path, monkeypatch):
    p = _nifti(tmp_path / "x.nii.gz")
    os.chmod(p, 0)
    if os.geteuid() == 0:  # root reads mode-000 files; make the OS answer as it would for a user
        import artifactqc.io as aio

        monkeypatch.setattr(aio.os, "access", lambda path, mode: False)
    with pytest.raises(VolumeError) as e:
        load_volume(p)
    assert e.value.error_type == "permission_denied"
    assert "not readable" in e.value.message and str(p) in str(e.value)


def test_each_bad_input_gets_its_reason_and_good_ones_pass(tmp_path):
    cases = _bad_inputs(tmp_path)
    if os.geteuid() == 0:  # root can read mode-000 files: that case is covered by the test above elsewhere
        cases.pop("permission_denied")
    good = [_nifti(tmp_path / f"good{i}.nii.gz", seed=i) for i in range(3)]
    squeezed = _nifti(tmp_path / "squeezed.nii.gz", shape=(10, 10, 10, 1), seed=7)
    shutil.copy(good[0], tmp_path / "copy_of_good0.nii.gz")
    rows = [dict(volume_id=f"bad_{k}", site="s1", subject=k, contrast="T1w", path=str(p)) for k, p in cases.items()]
    rows += [dict(volume_id=f"good{i}", site="s2", subject=f"g{i}", contrast="T2w", path=str(p)) for i, p in enumerate(good)]
    rows += [
        dict(volume_id="squeezed", site="s2", subject="q", contrast="FLAIR", path=str(squeezed)),
        dict(volume_id="copy", site="s2", subject="c", contrast="PD", path="copy_of_good0.nii.gz"),  # relative
        dict(volume_id="good0", site="s3", subject="dup", contrast="other", path=str(good[1])),  # duplicate id
    ]
    sheet = _sheet(tmp_path, rows)
    out = tmp_path / "out"
    volumes, failures = cohort.ingest(sheet, out, max_mem_mb=16)

    assert (out / "volumes.parquet").is_file() and (out / "failures.parquet").is_file()
    by_id = failures.groupby("volume_id")["error_type"].apply(set).to_dict()
    for kind in cases:
        assert by_id[f"bad_{kind}"] == {kind}, (kind, by_id.get(f"bad_{kind}"))
    assert "duplicate_id" in by_id["good0"]
    assert "duplicate_content" in by_id["copy"]
    # one volumes row per good file; the duplicate-content copy is kept
    assert sorted(volumes["volume_id"]) == ["copy", "good0", "good1", "good2", "squeezed"]
    assert volumes.set_index("volume_id").loc["copy", "duplicate_of"] == "good0"
    # messages are specific and name the problem
    msg = failures.set_index("volume_id")["message"]
    assert "4D" in msg["bad_multi_volume"] or "volumes" in msg["bad_multi_volume"]
    assert "MB" in msg["bad_too_large"] and "max_mem_mb" in msg["bad_too_large"]
    assert "2" in msg["bad_nonfinite_voxels"]  # two bad voxels counted
    assert set(failures["stage"]) == {"ingest"}


def test_volume_rows_hold_header_facts(tmp_path):
    aff = np.array([[-0.9, 0, 0, 10], [0, 0, 1.2, -5], [0, 3.0, 0, 2], [0, 0, 0, 1]])
    p = _nifti(tmp_path / "a.nii.gz", shape=(10, 12, 14), affine=aff, dtype=np.uint8)
    sheet = _sheet(tmp_path, [dict(volume_id="a", site="x", subject="1", contrast="T1w", path=str(p), label="2", scanner="GE")])
    volumes, failures = cohort.ingest(sheet, tmp_path / "o")
    assert failures.empty
    r = volumes.iloc[0]
    assert list(r["shape"]) == [10, 12, 14]
    np.testing.assert_allclose(list(r["voxel_mm"]), [0.9, 3.0, 1.2])
    assert r["orientation"] == "".join(nib.aff2axcodes(aff))
    assert r["dtype"] == "uint8"
    data = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
    np.testing.assert_allclose([r.p01, r.p50, r.p99], np.percentile(data, [1, 50, 99]))
    import hashlib

    assert r["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert r["label"] == "2" and r["scanner"] == "GE"  # optional and extra columns kept
    docs = column_descriptions(tmp_path / "o" / "volumes.parquet")
    assert "SHA-256" in docs["sha256"]


def test_sheet_errors_name_file_and_allowed_values(tmp_path):
    p = _sheet(tmp_path, [dict(volume_id="a", site="x", subject="1", path="a.nii")])
    with pytest.raises(cohort.CohortError, match=r"sheet.tsv: missing required column\(s\) \['contrast'\]"):
        cohort.read_sheet(p)
    p = _sheet(tmp_path, [dict(volume_id="a", site="x", subject="1", contrast="T1", path="a.nii")])
    with pytest.raises(cohort.CohortError, match=r"contrast.*T1w.*FLAIR.*line, value\): \[\(2, 'T1'\)\]"):
        cohort.read_sheet(p)
    p = _sheet(tmp_path, [dict(volume_id="a", site="site A/1", subject="1", contrast="T1w", path="a.nii")])
    with pytest.raises(cohort.CohortError, match="site"):
        cohort.read_sheet(p)


    p = _sheet(tmp_path, [dict(volume_id="bad id!", site="x", subject="1", contrast="T1w", path="a.nii")])
    with pytest.raises(cohort.CohortError, match=r"volume_id.*\(2, 'bad id!'\)"):
        cohort.read_sheet(p)


def _bids_tree(root, n_sub=3, sessions=("1", "2")):
    root.mkdir()
    (root / "participants.tsv").write_text(
        "participant_id\tsite\n" + "".join(f"sub-{i:02d}\tS{i % 2}\n" for i in range(n_sub))
    )
    files = []
    for i in range(n_sub):
        for ses in sessions:
            anat = root / f"sub-{i:02d}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True)
            for suf in ("T1w", "FLAIR", "PDw"):
                f = anat / f"sub-{i:02d}_ses-{ses}_{suf}.nii.gz"
                f.write_bytes(b"")
                files.append(f)
            (anat / f"sub-{i:02d}_ses-{ses}_T1w.json").write_text("{}")
            (anat / f"sub-{i:02d}_ses-{ses}_dwi.nii.gz").write_bytes(b"")
    # a session-less subject
    anat = root / "sub-99" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-99_acq-fast_T2w.nii").write_bytes(b"")
    with open(root / "participants.tsv", "a") as fh:
        fh.write("sub-99\tS9\n")
    return files


def test_bids_discovery(tmp_path):
    _bids_tree(tmp_path / "bids")
    df = cohort.discover_bids(tmp_path / "bids")
    assert len(df) == 3 * 2 * 3 + 1
    r = df.set_index("volume_id").loc["sub-01_ses-2_PDw"]
    assert (r.site, r.subject, r.session, r.contrast, r.bids_name) == ("S1", "01", "2", "PD", "sub-01_ses-2_PDw")
    r = df.set_index("volume_id").loc["sub-99_acq-fast_T2w"]
    assert (r.site, r.session, r.contrast) == ("S9", "", "T2w")
    assert not df["path"].str.contains("dwi").any()
    const = cohort.discover_bids(tmp_path / "bids", site_constant="one")
    assert set(const["site"]) == {"one"}
    with pytest.raises(cohort.CohortError, match="no column 'scanner'"):
        cohort.discover_bids(tmp_path / "bids", site_column="scanner")


def test_shards_keep_sheet_order_and_merge_the_remainder():
    df = pd.DataFrame(
        {"volume_id": [f"v{i}" for i in range(1203)], "site": ["b"] * 1200 + ["a"] * 3}
    )
    shards = cohort.shard_cohort(df, shard_size=500)
    assert sorted(shards) == [("a", 0), ("b", 0), ("b", 1)]
    assert [len(shards[("b", k)]) for k in range(2)] == [500, 700]
    assert list(shards[("b", 1)]["volume_id"])[:2] == ["v500", "v501"]
    assert shards[("b", 1)]["volume_id"].iloc[-1] == "v1199"
    # every row in exactly one shard, shards never mix sites
    ids = pd.concat(shards.values())["volume_id"]
    assert sorted(ids) == sorted(df["volume_id"]) and ids.is_unique
    assert all(g["site"].nunique() == 1 for g in shards.values())
    # appending to site b changes only its last shard ...
    more = pd.concat([df, pd.DataFrame({"volume_id": ["new"], "site": ["b"]})], ignore_index=True)
    shards2 = cohort.shard_cohort(more, shard_size=500)
    for key in [("a", 0), ("b", 0)]:
        assert shards2[key]["volume_id"].tolist() == shards[key]["volume_id"].tolist()
    # ... also when the remainder fills a whole shard and the last shard splits
    full = pd.DataFrame({"volume_id": [f"w{i}" for i in range(1500)], "site": ["b"] * 1500})
    split = cohort.shard_cohort(full, shard_size=500)
    assert [len(split[("b", k)]) for k in range(3)] == [500, 500, 500]
    assert split[("b", 0)]["volume_id"].tolist() == cohort.shard_cohort(full.iloc[:1499], 500)[("b", 0)][
        "volume_id"
    ].tolist()


def test_shard_count_meets_ceil_n_over_shard_size_when_sites_are_large():
    """Issue 8: at most ceil(N/500) shard jobs, while a shard never mixes sites."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(500, 5000, size=rng.integers(1, 15))
        df = pd.DataFrame({"site": np.repeat([f"s{k:02d}" for k in range(len(sizes))], sizes)})
        df["volume_id"] = [f"v{i}" for i in range(len(df))]
        shards = cohort.shard_cohort(df, shard_size=500)
        assert len(shards) <= math.ceil(len(df) / 500)
        assert max(len(g) for g in shards.values()) < 1000
    # a site smaller than shard_size still gets its own (only) shard
    small = pd.DataFrame({"volume_id": ["x", "y", "z"], "site": ["p", "q", "q"]})
    assert {k: len(g) for k, g in cohort.shard_cohort(small, 500).items()} == {("p", 0): 1, ("q", 0): 2}
    with pytest.raises(ValueError, match="shard_size"):
        cohort.shard_cohort(small, 0)


def test_real_volumes_mixed_with_bad_inputs(shared_data, fixture_paths, tmp_path):
    """The issue's acceptance check: one volumes row per good file, one failures row per bad one."""
    cases = _bad_inputs(tmp_path)
    if os.geteuid() == 0:
        cases.pop("permission_denied")
    rows = [
        dict(volume_id=f"real{i}", site="real", subject=str(i), contrast="other", path=str(p))
        for i, p in enumerate(fixture_paths)
    ]
    rows += [dict(volume_id=f"bad_{k}", site="bad", subject=k, contrast="T1w", path=str(p)) for k, p in cases.items()]
    volumes, failures = cohort.ingest(_sheet(tmp_path, rows), tmp_path / "o", n_jobs=2, max_mem_mb=16)
    assert sorted(volumes["volume_id"]) == sorted(f"real{i}" for i in range(len(fixture_paths)))
    assert sorted(failures["volume_id"]) == sorted(f"bad_{k}" for k in cases)
    assert dict(zip(failures["volume_id"], failures["error_type"])) == {f"bad_{k}": k for k in cases}
    assert (volumes["p99"] >= volumes["p01"]).all()


def test_column_validation_agrees_with_jsonschema():
    """The fast column-wise check gives the same verdict as jsonschema row by row."""
    import jsonschema
    import yaml

    from .conftest import REPO

    schema = yaml.safe_load((REPO / "workflow/schemas/sheet.schema.yaml").read_text())
    good = dict(volume_id="a-1", site="s.1", subject="1", session="", contrast="PD", path="x.nii", bids_name="", label="")
    variants = [{}, {"volume_id": "a b"}, {"site": "a/b"}, {"contrast": "T1"}, {"path": ""}, {"subject": ""}]
    for change in variants:
        row = {**good, **change}
        try:
            jsonschema.validate(row, schema)
            expected_ok = True
        except jsonschema.ValidationError:
            expected_ok = False
        try:
            cohort.validate_columns(pd.DataFrame([good, row]), schema)
            got_ok = True
        except cohort.CohortError as exc:
            got_ok = False
            assert "line, value): [(3," in str(exc)
        assert got_ok == expected_ok, change


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_load_volume_equals_nibabel_and_names_a_corrupt_gzip(tmp_path, suffix):
    """The one-shot .nii.gz reader gives nibabel's voxels (scaled int16, NIfTI-1 and -2); a gzip whose
    checksum fails is reported as truncated/corrupt, not read."""
    rng = np.random.default_rng(1)
    data = rng.integers(-300, 3000, size=(9, 11, 7)).astype(np.int16)
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        img = kind(data, np.diag([0.9, 1.1, 3.0, 1.0]))
        img.header.set_slope_inter(0.5, 10.0)
        p = tmp_path / f"{kind.__name__}{suffix}"
        nib.save(img, str(p))
        got = load_volume(p).data
        want = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
        assert got.dtype == np.float32 and np.array_equal(got, want)
        np.testing.assert_allclose(got, data * 0.5 + 10.0)
    if suffix == ".nii.gz":
        raw = bytearray((tmp_path / f"Nifti1Image{suffix}").read_bytes())
        raw[-8] ^= 0xFF  # CRC32 of the gzip trailer
        bad = tmp_path / "badcrc.nii.gz"
        bad.write_bytes(bytes(raw))
        with pytest.raises(VolumeError) as e:
            load_volume(bad)
        assert e.value.error_type == "truncated" and "badcrc.nii.gz" in str(e.value)
