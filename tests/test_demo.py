"""Tests for the embedded demo cohort (artifactqc.demo), on a tiny spec (3 mm template, coarse grids)."""

from __future__ import annotations

import builtins
import copy
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from artifactqc import demo
from artifactqc.io import VolumeError, load_volume

TINY = {
    "seed": 123,
    "session": "1",
    "template_resolution_mm": 3,
    "head_shell_mm": [3.0, 7.5, 13.0],
    "subject_variation": {
        "rotation_deg": 5.0,
        "scale": [0.92, 1.08],
        "translation_mm": 5.0,
        "elastic_mm": 2.0,
        "elastic_spacing_mm": 36.0,
        "gamma": [0.85, 1.15],
    },
    "artifacts": ["ghosting", "bias"],
    "severity_range": [0.25, 0.95],
    "fail_threshold": 0.5,
    "sites": [
        dict(name="siteA", role="reference", contrast="T1w", n_subjects=2, voxel_mm=[3.0, 3.0, 3.0],
             orientation="RAS", fov_mm=[171.0, 210.0, 180.0], fov_shift_mm=[0, 0, 0], dtype="float32",
             scale=1.0, noise=0.015, slab_average=False, artifact_fraction=0.0, broken=[]),
        dict(name="siteB", role="target", contrast="T1w", n_subjects=2, voxel_mm=[3.6, 3.6, 3.6],
             orientation="LPS", fov_mm=[158.0, 192.0, 150.0], fov_shift_mm=[0, 4, 12], dtype="int16",
             scale=1000.0, noise=0.04, slab_average=False, artifact_fraction=0.5,
             broken=["truncated", "zeros"]),
        dict(name="siteC", role="target", contrast="T2w", n_subjects=1, voxel_mm=[3.0, 3.0, 4.5],
             orientation="PIR", fov_mm=[171.0, 210.0, 180.0], fov_shift_mm=[0, 0, 0], dtype="uint8",
             scale=200.0, noise=0.025, slab_average=False, artifact_fraction=0.0, broken=[]),
        dict(name="siteD", role="target", contrast="T1w", n_subjects=1, voxel_mm=[3.0, 3.0, 9.0],
             orientation="LAS", fov_mm=[171.0, 210.0, 153.0], fov_shift_mm=[0, 0, 10], dtype="int16",
             scale=700.0, noise=0.02, slab_average=True, artifact_fraction=0.0, broken=[]),
    ],
}
ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def _site(spec, name):
    return next(s for s in spec["sites"] if s["name"] == name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    sheet = demo.build_demo(TINY, root, n_jobs=1)
    return root, sheet


# ------------------------------------------------------------------------------------------------ sheet


def test_sheet_is_pure_and_deterministic(tmp_path, monkeypatch):
    root = tmp_path / "not-created"

    def no_open(*a, **k):
        raise AssertionError(f"demo_sheet opened a file: {a}")

    monkeypatch.setattr(builtins, "open", no_open)
    s1 = demo.demo_sheet(TINY, root)
    s2 = demo.demo_sheet(copy.deepcopy(TINY), root)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(s1, s2)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_sheet_rows_ids_paths_and_labels(tmp_path):
    sheet = demo.demo_sheet(TINY, tmp_path)
    expected_ids = set()
    for s in TINY["sites"]:
        expected_ids |= {f"{s['name']}-sub{i:02d}" for i in range(1, s["n_subjects"] + 1)}
        expected_ids |= {f"{s['name']}-broken-{k}" for k in s["broken"]}
    assert set(sheet["volume_id"]) == expected_ids
    assert sheet["volume_id"].is_unique
    assert all(ID_RE.match(v) for v in sheet["volume_id"])
    for col in ("volume_id", "site", "subject", "session", "contrast", "path", "label",
                "injected_artifact", "injected_severity"):
        assert col in sheet.columns
    for r in sheet.itertuples():
        assert Path(r.path) == tmp_path / r.site / f"{r.volume_id}.nii.gz"
        assert r.contrast == _site(TINY, r.site)["contrast"]
        if "-broken-" in r.volume_id:
            assert r.label == "" and r.injected_artifact == "" and r.injected_severity == 0
        elif r.injected_artifact:
            assert r.injected_artifact in TINY["artifacts"]
            assert 0.25 <= r.injected_severity <= 0.95
            assert r.label == ("fail" if r.injected_severity >= 0.5 else "pass")
        else:
            assert r.label == "pass" and r.injected_severity == 0
    # sites without artifacts are clean
    assert (sheet.loc[sheet.site.isin(["siteA", "siteC", "siteD"]), "injected_artifact"] == "").all()
    if demo.simulate_available():
        # artifact_fraction 0.5 of 2 subjects -> exactly one injected volume in siteB
        assert (sheet.loc[sheet.site == "siteB", "injected_artifact"] != "").sum() == 1


def test_default_spec_sheet_and_yaml_roundtrip(tmp_path):
    sheet = demo.demo_sheet(demo.DEFAULT_SPEC, tmp_path)
    n_expected = sum(s["n_subjects"] + len(s["broken"]) for s in demo.DEFAULT_SPEC["sites"])
    assert len(sheet) == n_expected and 20 <= n_expected <= 35
    assert set(sheet.site) == {"siteA", "siteB", "siteC", "siteD"}
    assert {"siteB-broken-truncated", "siteB-broken-zeros"} <= set(sheet.volume_id)
    assert (sheet.loc[sheet.site == "siteA", "label"] == "pass").all()
    if demo.simulate_available():
        injected = sheet[sheet.injected_artifact != ""]
        assert set(injected.site) == {"siteB", "siteC"}
        assert {"pass", "fail"} <= set(injected.label)  # stratified severities give both
    # the default spec is plain YAML and round-trips through the config section
    doc = yaml.safe_load(demo.spec_yaml())
    assert doc["demo"] == demo.DEFAULT_SPEC
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"other": 1, "demo": {"seed": 7}}))
    spec = demo.load_spec(cfg)
    assert spec["seed"] == 7 and spec["sites"] == demo.DEFAULT_SPEC["sites"]


def test_bad_specs_are_rejected(tmp_path):
    bad = copy.deepcopy(TINY)
    bad["sites"][1]["name"] = "siteA"
    with pytest.raises(ValueError, match="unique"):
        demo.demo_sheet(bad, tmp_path)
    bad = copy.deepcopy(TINY)
    bad["sites"][0]["name"] = "site_A"
    with pytest.raises(ValueError, match="name"):
        demo.demo_sheet(bad, tmp_path)
    bad = copy.deepcopy(TINY)
    bad["sites"][0]["orientation"] = "RAR"
    with pytest.raises(ValueError, match="orientation"):
        demo.demo_sheet(bad, tmp_path)


# ------------------------------------------------------------------------------------------------ build


def test_build_writes_exactly_the_sheet(built):
    root, sheet = built
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    expected = {Path(p).relative_to(root).as_posix() for p in sheet["path"]} | {"sheet.tsv"}
    assert files == expected
    back = pd.read_csv(root / "sheet.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(back["volume_id"]) == list(sheet["volume_id"])
    assert list(back["path"]) == list(sheet["path"])
    assert list(back["label"]) == list(sheet["label"])


def test_per_site_geometry_dtype_and_header(built):
    root, sheet = built
    for r in sheet[~sheet.volume_id.str.contains("-broken-")].itertuples():
        s = _site(TINY, r.site)
        img = nib.load(r.path)
        aff = img.affine
        assert "".join(nib.aff2axcodes(aff)) == s["orientation"]
        np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)), s["voxel_mm"], atol=1e-5)
        np.testing.assert_allclose(img.header.get_zooms()[:3], s["voxel_mm"], atol=1e-5)
        assert img.get_data_dtype() == np.dtype(s["dtype"])
        # qform and sform both set and equal to the affine
        q, qc = img.header.get_qform(coded=True)
        f, fc = img.header.get_sform(coded=True)
        assert int(qc) > 0 and int(fc) > 0
        np.testing.assert_allclose(q, aff, atol=1e-4)
        np.testing.assert_allclose(f, aff, atol=1e-4)
        # shape: the field of view (world R, A, S extents) divided by the voxel size of the disk axis
        for disk_axis, code in enumerate(s["orientation"]):
            fov = s["fov_mm"][_AXIS[code]]
            assert img.shape[disk_axis] == round(fov / s["voxel_mm"][disk_axis])
        data = np.asarray(img.dataobj)
        assert data.dtype == np.dtype(s["dtype"])
        vol = load_volume(r.path)  # passes the ingest guards
        d = vol.data
        # looks like a head in air: corners dark, middle bright
        c = 3
        corners = np.concatenate(
            [d[sx, sy, sz].ravel() for sx in (slice(0, c), slice(-c, None))
             for sy in (slice(0, c), slice(-c, None)) for sz in (slice(0, c), slice(-c, None))]
        )
        p99 = np.percentile(d, 99)
        assert corners.mean() < 0.1 * p99
        centre = d[tuple(slice(n // 2 - 2, n // 2 + 2) for n in d.shape)]
        assert centre.mean() > 0.2 * p99
        fg = (d > 0.15 * p99).mean()
        assert 0.15 < fg < 0.8


def test_intensity_scale_per_site(built):
    root, sheet = built
    med = {}
    for r in sheet[~sheet.volume_id.str.contains("-broken-")].itertuples():
        d = load_volume(r.path).data
        med.setdefault(r.site, []).append(np.percentile(d, 99))
    # siteA float ~1, siteB int16 x1000, siteC uint8 (<=255), siteD int16 x700
    assert 0.8 < np.mean(med["siteA"]) < 2.0
    assert 800 < np.mean(med["siteB"]) < 2500
    assert 100 < np.mean(med["siteC"]) <= 255
    assert 500 < np.mean(med["siteD"]) < 1500


def test_t2_contrast_is_inverted_relative_to_t1(tmp_path):
    """Same subject pose rendered as T1w and T2w: intensities anti-correlate inside the brain."""
    spec = copy.deepcopy(TINY)
    a = copy.deepcopy(_site(spec, "siteA"))
    a.update(noise=0.0)
    spec["sites"] = [a]
    t1, _ = demo.render_volume(spec, "siteA", 0)
    a["contrast"] = "T2w"
    t2, _ = demo.render_volume(spec, "siteA", 0)
    head = demo.head_model(3, (3.0, 7.5, 13.0))
    brain_t1 = (t1 > 0.5) & (t1 < 1.3)  # brain tissue in T1 (GM/WM), no scalp fat at the edges
    core = np.zeros_like(brain_t1)
    sl = tuple(slice(n // 4, 3 * n // 4) for n in t1.shape)
    core[sl] = True
    m = brain_t1 & core
    assert m.sum() > 100
    r = np.corrcoef(t1[m].astype(float), t2[m].astype(float))[0, 1]
    assert r < -0.5, r
    assert head.t2.max() <= 1.2


def test_thick_slices_average_the_slab(tmp_path):
    """A 3x3x9 mm slab-averaged volume equals the 3 mm volume averaged over z in blocks of 3."""
    spec = copy.deepcopy(TINY)
    spec["subject_variation"].update(elastic_mm=0.0, gamma=[1.0, 1.0])
    thin = dict(_site(spec, "siteD"), voxel_mm=[3.0, 3.0, 3.0], orientation="RAS", noise=0.0,
                dtype="float32", scale=1.0, slab_average=False)
    thick = dict(thin, voxel_mm=[3.0, 3.0, 9.0], slab_average=True)
    spec["sites"] = [thin]
    d_thin, a_thin = demo.render_volume(spec, "siteD", 0)
    spec["sites"] = [thick]
    d_thick, a_thick = demo.render_volume(spec, "siteD", 0)
    assert d_thin.shape[2] == 3 * d_thick.shape[2]
    np.testing.assert_allclose(np.linalg.norm(a_thick[:3, 2]), 9.0)
    # slab j covers thin slices 3j..3j+2: the centres agree
    np.testing.assert_allclose(a_thick[:3, 3] + a_thick[:3, 2], a_thin[:3, 3] + 4 * a_thin[:3, 2], atol=1e-6)
    expected = d_thin.reshape(*d_thin.shape[:2], -1, 3).mean(axis=3)
    # float32 output is stored on a grid of scale/256: each side is off by at most half a step
    np.testing.assert_allclose(d_thick, expected, atol=1.0 / 256 + 1e-6)
    # and it is not just the centre slice
    assert np.abs(d_thick - d_thin[:, :, 1::3]).max() > 0.05


def test_broken_files_are_really_broken(built):
    root, sheet = built
    paths = dict(zip(sheet.volume_id, sheet.path))
    with pytest.raises(VolumeError) as e:
        load_volume(paths["siteB-broken-truncated"])
    assert e.value.error_type == "truncated"
    with pytest.raises(VolumeError) as e:
        load_volume(paths["siteB-broken-zeros"])
    assert e.value.error_type == "all_zero"


def test_subjects_differ_and_injection_changes_the_volume(built):
    root, sheet = built
    a1 = load_volume(dict(zip(sheet.volume_id, sheet.path))["siteA-sub01"]).data
    a2 = load_volume(dict(zip(sheet.volume_id, sheet.path))["siteA-sub02"]).data
    assert a1.shape == a2.shape
    assert np.corrcoef(a1.ravel(), a2.ravel())[0, 1] < 0.98  # different people, same site
    assert np.corrcoef(a1.ravel(), a2.ravel())[0, 1] > 0.5  # ...but both heads
    inj = sheet[sheet.injected_artifact != ""]
    if not demo.simulate_available():
        pytest.skip("artifactqc.simulate not available: no injected artifacts")
    r = inj.iloc[0]
    on_disk = load_volume(r.path).data
    clean, aff = demo.render_volume(TINY, r.site, int(r.subject) - 1, inject=False)
    clean = clean.astype(np.float32)
    assert on_disk.shape == clean.shape
    assert np.abs(on_disk - clean).mean() > 0.01 * np.percentile(clean, 99)


def test_determinism_bytes_and_jobs(built, tmp_path):
    root, sheet = built
    spec = copy.deepcopy(TINY)
    spec["sites"] = [s for s in spec["sites"] if s["name"] in {"siteA", "siteD"}]
    sheet2 = demo.build_demo(spec, tmp_path, n_jobs=2)  # other process(es), other order: same bytes
    assert len(sheet2) == 3
    for vid, site in zip(sheet2.volume_id, sheet2.site):
        p1 = root / site / f"{vid}.nii.gz"
        p2 = tmp_path / site / f"{vid}.nii.gz"
        assert p1.read_bytes() == p2.read_bytes(), vid
    # injected volumes are reproducible too (rendered again in this process)
    for r in sheet[sheet.injected_artifact != ""].itertuples():
        again, aff = demo.render_volume(TINY, r.site, int(r.subject) - 1)
        img = nib.load(r.path)
        np.testing.assert_array_equal(np.asarray(img.dataobj), again)
        np.testing.assert_allclose(img.affine, aff)
    # a different seed gives different subjects
    spec3 = dict(copy.deepcopy(TINY), seed=124)
    d3, _ = demo.render_volume(spec3, "siteA", 0)
    d1 = np.asarray(nib.load(root / "siteA" / "siteA-sub01.nii.gz").dataobj)
    assert d1.shape == d3.shape and not np.array_equal(d1, d3)


def test_cli_build_and_spec(tmp_path, capsys):
    from artifactqc.cli import main

    spec = copy.deepcopy(TINY)
    spec["sites"] = [_site(spec, "siteC")]
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"demo": spec}))
    out = tmp_path / "out"
    assert main(["demo", "build", "--config", str(cfg), "--out", str(out)]) == 0
    sheet = pd.read_csv(out / "sheet.tsv", sep="\t")
    assert list(sheet.volume_id) == ["siteC-sub01"]
    assert Path(sheet.path[0]).is_file()
    capsys.readouterr()
    assert main(["demo", "spec"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["demo"] == demo.DEFAULT_SPEC
