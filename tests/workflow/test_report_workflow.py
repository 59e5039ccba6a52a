"""End-to-end report stage: figures, label evaluation and `snakemake --report` on a tiny generated cohort.

The encoder is randomly initialised (saved through the real checkpoint code): the test is about the
stage's plumbing (every figure written and non-blank, the label table's rows and counts matching the
sheet), not about score quality.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from artifactqc.report import stage

from ..conftest import save_tiny_model
from .test_ingest_workflow import REPO, make_volume, run_snakemake, write_sheet

pytestmark = pytest.mark.slow

LABELS = {"A": ["pass", "pass", "fail", "pass"], "B": ["fail", "1", "pass", "doubtful"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), meta={"model_id": "wf-test"})


def setup(workdir, model_dir, labels=True):
    rows = []
    for site, labs in LABELS.items():
        for i, lab in enumerate(labs):
            p = make_volume(workdir / f"{site}{i}.nii.gz", seed=10 * ord(site) + i)
            rows.append(dict(volume_id=f"{site}-{i}", site=site, subject=f"{site}{i}",
                             contrast="T1w" if site == "A" else "T2w", path=str(p), label=lab if labels else ""))
    # an unreadable volume: a failure row in the overview, excluded from the label evaluation
    bad = make_volume(workdir / "B9.nii.gz", seed=99)
    bad.write_bytes(bad.read_bytes()[:300])
    rows.append(dict(volume_id="B-9", site="B", subject="B9", contrast="T2w", path=str(bad),
                     label="fail" if labels else ""))
    write_sheet(workdir, rows)
    cfg = {
        "model": {"id": "wf-test", "pretrained": str(model_dir)},
        "flow": {"id": "wf-flow", "fit": {"epochs": 20, "seed": 0, "device": "cpu", "hidden": [16, 16]}},
        "score": {"threads": 1},
        "report": {"thumbnails": {"k": 2}, "ruler": {"artifacts": ["noise", "motion"], "severities": [0, 0.5, 1]}},
        "labels": {"n_boot": 50},
        "iqm": {"use_n4": False},
        "compare": {"artifacts": ["noise", "bias"], "severities": [0, 0.5, 1], "use_n4": False, "threads": 1},
    }
    (workdir / "test.yaml").write_text(yaml.safe_dump(cfg))
    return rows


def run(workdir, *args, check=True):
    return run_snakemake(workdir, "--configfile", str(REPO / "config/config.yaml"), str(workdir / "test.yaml"), *args,
                         check=check)


def assert_not_blank(png):
    img = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert img.shape[0] > 100 and img.shape[1] > 100, png
    assert img.std() > 10 and (img < 128).mean() > 0.005, f"{png} looks blank"


def test_report_figures_labels_and_report_zip(tmp_path, model_dir):
    setup(tmp_path, model_dir)
    run(tmp_path)
    rep = tmp_path / "results/report"
    for name in ("cohort_overview.png", "score_distributions.png", "latent_plane.png", "label_roc.png"):
        assert_not_blank(rep / name)
    thumbs = sorted(p.name for p in (rep / "thumbnails").glob("*.png"))
    assert thumbs == ["thumbnails_A.png", "thumbnails_B.png"]
    rulers = sorted(p.name for p in (rep / "rulers").glob("*.png"))
    assert rulers == [f"ruler_{c}_{a}.png" for c in ("T1w", "T2w") for a in ("motion", "noise")]
    for p in list((rep / "thumbnails").glob("*.png")) + list((rep / "rulers").glob("*.png")):
        assert_not_blank(p)

    cohort = pd.read_parquet(tmp_path / "results/scores/cohort.parquet").set_index("volume_id")
    assert cohort.loc["B-9", "status"] == "failed"
    # the per-site table: one row per site, the failed B-9 counted as a scan, not as scored
    sites_md = (rep / "sites.md").read_text()
    n_b = int((cohort.site == "B").sum())
    assert f"| B | {n_b} | {n_b - 1} | 1 |" in sites_md and sites_md.count("\n| A | ") == 1

    # label table: one row per flag + the score + each IQM that could be computed (labels on the sheet:
    # cohort IQMs run), counts from the sheet's ratings
    # ('doubtful' is in neither list, so it is ignored; '1' is pass; the failed B-9 is left out)
    table = pd.read_parquet(rep / "label_metrics.parquet")
    iqms = pd.read_parquet(tmp_path / "results/iqm/cohort.parquet")
    assert sorted(iqms["volume_id"]) == sorted(v for v in cohort.index if v != "B-9")
    # the calibrated flag and probability (out-of-fold) sit next to the raw ones; with 2 fails the calibration
    # is fitted, but no fold keeps 2 fails to refit on, so they have no out-of-fold values (n = 0)
    # the site-aware and the encoder's own score are evaluated beside the reported one
    assert list(table["metric"])[:9] == ["score>1", "flag_tau5", "flag_tau3", "flagged", "flagged_calibrated_cv",
                                         "score", "score_site", "score_learned", "p_fail_cv"]
    assert set(table["metric"][9:]) <= set(stage.EVAL_IQMS)
    assert list(table["kind"]) == ["flag"] * 5 + ["score"] * (len(table) - 5)
    flags_and_score = table.iloc[[0, 1, 2, 3, 5]]
    assert (flags_and_score["n"] == 7).all() and (flags_and_score["n_fail"] == 2).all()
    assert (flags_and_score["n_pass"] == 5).all()
    assert (table.iloc[[4, 8]]["n"] == 0).all()  # flagged_calibrated_cv, p_fail_cv
    assert (table.iloc[[6, 7]]["n"] == 7).all()  # score_site, score_learned
    calibration = (tmp_path / "results/calibration/model.json").read_text()
    assert '"status": "fitted on 7 rated volumes (2 fail)' in calibration
    # independent check of the score > 1 row from the cohort table
    fail = {f"{s}-{i}": lab == "fail" for s, labs in LABELS.items() for i, lab in enumerate(labs) if lab != "doubtful"}
    pred = {v: bool(cohort.loc[v, "score"] > 1.0) for v in fail}
    tp = sum(fail[v] and pred[v] for v in fail)
    tn = sum(not fail[v] and not pred[v] for v in fail)
    row = table.set_index("metric").loc["score>1"]
    assert row["sensitivity"] == pytest.approx(tp / 2)
    assert row["specificity"] == pytest.approx(tn / 5)
    md = (rep / "label_metrics.md").read_text()
    assert md.count("\n| ") == 1 + len(table) and "| flagged | flag | 7 | 2 |" in md

    # MRIQC comparison on the simulated set: the cleanest scored volume of each contrast, each artifact x severity
    sim = pd.read_parquet(tmp_path / "results/compare/simulated.parquet")
    assert len(sim) == 2 * 2 * 3 and set(sim["contrast"]) == {"T1w", "T2w"}
    for c, g in sim.groupby("contrast"):
        ok = cohort[(cohort.contrast == c) & (cohort.status == "ok") & ~cohort.flagged.astype(bool)]
        assert set(g["volume_id"]) == {ok["score"].idxmin()}
    assert "| noise | Pearson r |" in (rep / "mriqc_comparison.md").read_text()

    res = run(tmp_path, "--report", str(tmp_path / "report.zip"))
    with zipfile.ZipFile(tmp_path / "report.zip") as z:
        names = z.namelist()
    for name in ("cohort_overview.png", "latent_plane.png", "thumbnails_A.png", "ruler_T2w_noise.png", "label_roc.png",
                 "mriqc_comparison.md", "sites.md"):
        assert any(n.endswith(name) for n in names), (name, res.stderr[-2000:])


def test_no_labels_no_label_evaluation(tmp_path, model_dir):
    setup(tmp_path, model_dir, labels=False)
    res = run(tmp_path, "-n")
    out = res.stdout + res.stderr
    assert "rule report_figures" in out
    assert "evaluate_labels" not in out and "rule calibrate" not in out
    assert "rule review:" in out
