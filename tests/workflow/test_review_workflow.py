"""The review loop end to end, in a real headless browser (Debian's chromium through chromedriver):
the workflow writes the review page, a reviewer rates volumes with the keyboard, reloads, exports the
ratings TSV, and the workflow reads it back (labels.ratings) and writes the calibration. Also: a rerun
with more ratings plans only the calibration and what is built on it, and a bad ratings file stops
with the file and line while the scores stay.

The encoder is randomly initialised (the test is about the loop, not score quality); the volumes are
nilearn's MNI152 template (shipped with nilearn) with added noise or ghosting, so the page shows brains.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from ..browser import browser_available, chrome
from ..conftest import save_tiny_model
from .test_ingest_workflow import REPO, planned_jobs, run_snakemake, write_sheet

pytestmark = pytest.mark.slow

SCREENSHOT = Path("/tmp/review_screenshot.png")


def brain_volume(path: Path, seed: int, noise: float = 0.0, ghost: float = 0.0) -> Path:
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32)[::2, ::2, ::2]
    data = data / max(float(data.max()), 1e-6)
    rng = np.random.default_rng(seed)
    if ghost:
        data = data + ghost * np.roll(data, data.shape[1] // 3, axis=1)
    data = data + (0.01 + noise) * rng.standard_normal(data.shape).astype(np.float32)
    aff = img.affine.copy()
    aff[:3, :3] *= 2
    nib.save(nib.Nifti1Image(np.clip(data, 0, None).astype(np.float32), aff), str(path))
    return path


VOLUMES = {"A": [(0, 0), (0.02, 0), (0.25, 0), (0, 0.5)], "B": [(0.01, 0), (0.3, 0), (0, 0.6), (0.05, 0)]}


def setup_cohort(workdir: Path, model_dir: Path, ratings: list[str] | None = None) -> list[str]:
    rows = []
    for site, specs in VOLUMES.items():
        for i, (noise, ghost) in enumerate(specs):
            p = brain_volume(workdir / f"{site}{i}.nii.gz", seed=10 * ord(site) + i, noise=noise, ghost=ghost)
            rows.append(dict(volume_id=f"{site}-{i}", site=site, subject=f"{site}{i}", contrast="T1w", path=str(p)))
    write_sheet(workdir, rows)
    write_config(workdir, model_dir, ratings or [])
    return [r["volume_id"] for r in rows]


def write_config(workdir: Path, model_dir: Path, ratings: list[str]) -> None:
    cfg = {
        "model": {"id": "wf-review", "pretrained": str(model_dir)},
        "flow": {"id": "wf-flow", "fit": {"epochs": 20, "seed": 0, "device": "cpu", "hidden": [16, 16]}},
        "score": {"threads": 1},
        "report": {"thumbnails": {"k": 1}, "ruler": {"artifacts": ["noise", "ghosting"], "severities": [0, 1]}},
        "labels": {"n_boot": 50, "ratings": ratings},
        "iqm": {"enabled": False},
        "compare": {"enabled": False},
        "review": {"tile_px": 64, "storage_key": "wf-test"},
    }
    (workdir / "test.yaml").write_text(yaml.safe_dump(cfg))


def run(workdir, *args, check=True):
    return run_snakemake(workdir, "--configfile", str(REPO / "config/config.yaml"), str(workdir / "test.yaml"), *args,
                         check=check)


def page_data(html_path: Path) -> dict:
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', html_path.read_text(), re.S).group(1)
    return json.loads(blob)


def wait_for(cond, timeout=20.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), meta={"model_id": "wf-review"})


def test_review_page_rate_reload_export_calibrate(tmp_path, model_dir):
    missing = browser_available()
    if missing:
        pytest.skip(f"no headless browser: missing {missing} (.ci/run installs chromium and chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ids = setup_cohort(tmp_path, model_dir)
    run(tmp_path)
    page = tmp_path / "results/review/index.html"
    data = page_data(page)
    order = [v["id"] for v in data["volumes"]]
    assert sorted(order) == sorted(ids) and data["calibrated"] is False
    assert all(v["img"].startswith("data:image/jpeg;base64,") for v in data["volumes"])
    assert set(data["rulers"]) == {"T1w/noise", "T1w/ghosting"}
    assert not (tmp_path / "results/calibration").exists()  # no ratings yet: no calibration in the DAG

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chrome(downloads)
    try:
        driver.get(page.as_uri())
        wait_for(lambda: driver.execute_script("return window.artifactqcReady === true"), what="page ready")
        progress = lambda: driver.find_element(By.ID, "progress").text  # noqa: E731
        assert progress() == f"0 of {len(ids)} rated"
        assert driver.find_element(By.ID, "vid").text == order[0]
        rater = driver.find_element(By.ID, "rater")
        rater.send_keys("T. Tester", Keys.ESCAPE)
        body = driver.find_element(By.TAG_NAME, "body")
        # rate the first seven in review order with the keyboard; a note on the second one
        keys = ["3", "1", "3", "1", "2", "3", "1"]
        expected = {"1": "accept", "2": "doubtful", "3": "exclude"}
        for i, k in enumerate(keys):
            assert driver.find_element(By.ID, "vid").text == order[i]  # rating moved on to the next volume
            if i == 1:
                body.send_keys("n")
                driver.switch_to.active_element.send_keys("ghost in the frontal lobe", Keys.ESCAPE)
            body.send_keys(k)
        assert progress() == f"7 of {len(ids)} rated"
        vid = lambda: driver.find_element(By.ID, "vid").text  # noqa: E731
        assert vid() == order[7]
        body.send_keys("k", "k")
        assert vid() == order[5]
        body.send_keys("j", Keys.ARROW_RIGHT)
        assert vid() == order[7]
        body.send_keys(Keys.ARROW_RIGHT)  # the last volume: stays
        assert vid() == order[7]
        body.send_keys(Keys.ARROW_UP, Keys.ARROW_LEFT)
        assert vid() == order[5]

        driver.refresh()  # ratings, rater and position survive a reload
        wait_for(lambda: driver.execute_script("return window.artifactqcReady === true"), what="page ready after reload")
        assert progress() == f"7 of {len(ids)} rated"
        assert driver.find_element(By.ID, "rater").get_attribute("value") == "T. Tester"
        assert driver.find_element(By.ID, "vid").text == order[5]
        badges = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#queue .badge")]
        assert badges == [expected[k] for k in keys] + ["unrated"] * (len(ids) - 7)
        driver.find_element(By.ID, "q1").click()
        assert driver.find_element(By.ID, "note").get_attribute("value") == "ghost in the frontal lobe"
        assert driver.find_element(By.CSS_SELECTOR, ".r-accept").get_attribute("aria-pressed") == "true"

        driver.find_element(By.ID, "q0").click()
        driver.save_screenshot(str(SCREENSHOT))
        driver.find_element(By.ID, "export").click()
        tsv = wait_for(lambda: [p for p in downloads.glob("*.tsv")], what="the exported TSV")[0]
        wait_for(lambda: tsv.stat().st_size > 0, what="the download to finish")
    finally:
        driver.quit()

    exported = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    assert list(exported.columns) == ["volume_id", "rating", "note", "rater", "time"]
    assert list(exported["volume_id"]) == order[:7]
    assert list(exported["rating"]) == [expected[k] for k in keys]
    assert exported["note"].tolist()[1] == "ghost in the frontal lobe" and exported["note"].tolist()[0] == ""
    assert set(exported["rater"]) == {"T. Tester"} and exported["time"].str.match(r"\d{4}-\d\d-\d\dT").all()

    # feed the export back: the calibration joins the DAG and is fitted on the 6 mapped ratings (doubtful unused)
    ratings = tmp_path / "ratings.tsv"
    ratings.write_text(tsv.read_text())
    write_config(tmp_path, model_dir, [str(ratings)])
    jobs = {r for r, _ in planned_jobs(tmp_path, "--configfile", str(REPO / "config/config.yaml"), str(tmp_path / "test.yaml"))}
    assert jobs == {"calibrate", "evaluate_labels", "review", "all"}, jobs
    run(tmp_path)
    cal = tmp_path / "results/calibration"
    model = json.loads((cal / "model.json").read_text())
    assert model["status"].startswith("fitted on 6 rated volumes (3 fail)"), model["status"]
    assert str(ratings) in model["provenance"]
    labels = pd.read_csv(cal / "labels.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert dict(zip(labels.volume_id, labels.label)) == dict(zip(order[:7], exported["rating"]))
    thr = pd.read_csv(cal / "thresholds.tsv", sep="\t").set_index("site")
    assert thr["n_rated"].sum() == 7 and thr["n_unmapped"].sum() == 1 and thr["n_fail"].sum() == 3
    cohort = pd.read_parquet(cal / "cohort.parquet")
    assert cohort["p_fail"].notna().all() and cohort["flagged_calibrated"].notna().all()
    md = (tmp_path / "results/report/label_metrics.md").read_text()
    assert "| flagged | flag | 6 | 3 |" in md and "| flagged_calibrated_cv | flag | 6 | 3 |" in md
    data = page_data(page)
    assert data["calibrated"] is True
    unrated = [v for v in data["volumes"] if not v["label"]]
    assert [v["id"] for v in data["volumes"][:len(unrated)]] == [v["id"] for v in unrated]  # unrated first

    # the page opens from the unpacked report zip too (it is a report item; self-contained)
    run(tmp_path, "--report", str(tmp_path / "report.zip"))
    with zipfile.ZipFile(tmp_path / "report.zip") as z:
        z.extractall(tmp_path / "unzipped")
    copies = [p for p in (tmp_path / "unzipped").rglob("index.html") if "artifactqcReady" in p.read_text()]
    assert len(copies) == 1, list((tmp_path / "unzipped").rglob("*.html"))
    driver = chrome()
    try:
        driver.get(copies[0].as_uri())
        wait_for(lambda: driver.execute_script("return window.artifactqcReady === true"), what="page from the zip")
        assert driver.find_element(By.ID, "progress").text == f"7 of {len(ids)} rated"  # the exported ratings
        wait_for(lambda: driver.execute_script("return document.getElementById('mosaic').naturalWidth > 0"),
                 what="the mosaic to decode")
    finally:
        driver.quit()

    # more ratings: only the calibration and the tables built on it rerun
    with ratings.open("a") as f:
        f.write(f"{order[7]}\texclude\t\tT. Tester\t2026-12-03T09:00:00Z\n")
    jobs = planned_jobs(tmp_path, "--configfile", str(REPO / "config/config.yaml"), str(tmp_path / "test.yaml"))
    assert {r for r, _ in jobs} == {"calibrate", "evaluate_labels", "review", "all"}, jobs

    # a bad ratings file: a clear message naming file and line; nothing computed is lost
    bad = tmp_path / "bad.tsv"
    bad.write_text("volume_id\trating\tnote\trater\ttime\nA-0\t1\t\t\t\nnot-a-volume\t3\t\t\t\n")
    write_config(tmp_path, model_dir, [str(ratings), str(bad)])
    res = run(tmp_path, check=False)
    assert res.returncode != 0
    assert f"{bad}:3: unknown volume_id 'not-a-volume'" in res.stdout + res.stderr
    assert (tmp_path / "results/scores/cohort.parquet").is_file() and page.is_file()
    assert len(list((tmp_path / "results/review/mosaics").rglob("*.parquet"))) == 2
