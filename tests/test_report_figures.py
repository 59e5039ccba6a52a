"""Report figures on synthetic tables and tiny NIfTIs: each PNG exists, has a sensible size and is not blank."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from artifactqc.density import fit as FIT
from artifactqc.density import flags as FLAGS
from artifactqc import io
from artifactqc.report import figures

torch.set_num_threads(1)


def _png_ok(path, min_w=300, min_h=200):
    assert path.is_file() and path.suffix == ".png"
    im = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    h, w = im.shape
    assert w >= min_w and h >= min_h, (w, h)
    assert w <= 4000 and h <= 4000, (w, h)
    assert im.std() > 5, "figure looks blank"
    return im


def _head(shape=(20, 24, 16), seed=0, noise=0.02):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    vol = (r < 0.8) * 0.6 + (r < 0.5) * 0.4 + rng.normal(0, noise, shape)
    return np.clip(vol, 0, None).astype(np.float32) * 1000


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    rng = np.random.default_rng(0)
    rows = []
    sites = ["siteA", "siteB", "siteC"]
    for i in range(18):
        site = sites[i % 3]
        path = tmp / f"v{i:02d}.nii.gz"
        noise = 0.02 + 0.25 * (i % 7 == 0)
        io.save_like(_head(seed=i, noise=noise), np.diag([1.2, 1.0, 2.0, 1.0]), path)
        rows.append({"volume_id": f"v{i:02d}", "site": site, "contrast": "T1w" if i % 4 else "T2w",
                     "path": str(path), "status": "ok", "score": float(rng.gamma(2, 0.25) + 1.2 * (i % 7 == 0))})
    vols = pd.DataFrame(rows)
    vols.loc[5, "status"] = "failed"
    failures = pd.DataFrame({"volume_id": ["v05", "x1", "x2"], "path": ["a", "b", "c"],
                             "stage": ["ingest", "ingest", "score"],
                             "error_type": ["truncated", "not_nifti", "truncated"], "message": ["m"] * 3})
    scores = vols.copy()
    lat = rng.normal(size=(len(scores), 4))
    lat[scores["score"] > 1.2] += 3
    for j in range(4):
        scores[f"latent_{j}"] = lat[:, j]
    scores.loc[5, [f"latent_{j}" for j in range(4)]] = np.nan
    scores.loc[5, "score"] = np.nan
    flow = FIT.fit_flow(lat[scores["status"] == "ok"], seed=0, hidden=(8, 8), n_transforms=2, epochs=15,
                      latent_columns=[f"latent_{j}" for j in range(4)])
    scores = FLAGS.score_table(scores, flow)
    return tmp, vols, failures, scores, flow


def test_cohort_overview(tables, tmp_path):
    _, vols, failures, _, _ = tables
    _png_ok(figures.plot_cohort_overview(vols, failures, tmp_path / "o.png"))
    _png_ok(figures.plot_cohort_overview(vols, failures.iloc[:0], tmp_path / "o2.png"))


def test_score_distributions(tables, tmp_path):
    _, _, _, scores, _ = tables
    _png_ok(figures.plot_score_distributions(scores, tmp_path / "d.png"))


def test_latent_plane_pca_and_2d(tables, tmp_path):
    _, _, _, scores, flow = tables
    _png_ok(figures.plot_latent_plane(scores, tmp_path / "l.png", flow=flow, grid=40))
    # k = 2: latent dims directly, contours of the flow
    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.normal(size=(40, 2)), columns=["latent_0", "latent_1"]).assign(status="ok", score=0.5)
    f2 = FIT.fit_flow(df[["latent_0", "latent_1"]].to_numpy(), seed=0, hidden=(8, 8), n_transforms=2, epochs=15,
                    latent_columns=["latent_0", "latent_1"])
    _png_ok(figures.plot_latent_plane(FLAGS.score_table(df, f2), tmp_path / "l2.png", flow=f2, grid=40))
    # without a flow: points only
    _png_ok(figures.plot_latent_plane(scores, tmp_path / "l3.png"))


def test_mid_slices_canonical_and_aspect(tmp_path):
    # a volume stored in LPS order with 2 mm slices: mid_slices must give the same picture as RAS storage
    vol = _head(shape=(20, 24, 16), noise=0.0)
    vol[12:, :, :] *= 0.5  # make left/right asymmetric
    ras = tmp_path / "ras.nii.gz"
    io.save_like(vol, np.diag([1.0, 1.0, 2.0, 1.0]), ras)
    lps = tmp_path / "lps.nii.gz"
    io.save_like(vol[::-1, ::-1, :], np.array([[-1.0, 0, 0, 19], [0, -1, 0, 23], [0, 0, 2, 0], [0, 0, 0, 1]]), lps)
    a = figures.mid_slices(ras, height=64)
    b = figures.mid_slices(lps, height=64)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # sagittal tile: 24 mm (A) wide x 32 mm (S) tall -> width 48 px at height 64
    assert a.shape[0] == 64
    assert a.shape[1] == 48 + 2 + 40 + 2 + 53  # sag 24x32 mm | cor 20x32 mm | ax 20x24 mm, 2 px separators


def test_thumbnail_strips(tables, tmp_path):
    _, _, _, scores, _ = tables
    paths = figures.plot_thumbnail_strips(scores, tmp_path, k=3)
    assert [p.name for p in paths] == ["thumbnails_siteA.png", "thumbnails_siteB.png", "thumbnails_siteC.png"]
    for p in paths:
        _png_ok(p)
    # a missing file is drawn as an 'unreadable' tile, not an error
    s2 = scores.copy()
    s2.loc[s2["score"].idxmax(), "path"] = str(tmp_path / "gone.nii.gz")
    _png_ok(figures.plot_thumbnail_strip(s2, s2.loc[s2["score"].idxmax(), "site"], tmp_path / "t.png", k=2))


def test_image_ruler(tables, tmp_path):
    _, _, _, scores, _ = tables
    ref = io.normalize_intensity(_head(shape=(64, 64, 3), noise=0.0))[:, :, 1]
    rungs = figures.ruler_ladder(ref, "noise", score_fn=lambda im: float(np.abs(im - ref).mean() * 10),
                           severities=(0.0, 0.3, 0.6, 1.0))
    assert [r[0] for r in rungs] == [0.0, 0.3, 0.6, 1.0]
    assert rungs[0][2] < rungs[-1][2]  # more noise, larger difference from the reference
    flagged = scores[scores["flagged"]]
    _png_ok(figures.plot_image_ruler(rungs, tmp_path / "r.png", "noise", "T1w", flagged=flagged))
    _png_ok(figures.plot_image_ruler(rungs, tmp_path / "r2.png", "noise", flagged=[("x", 1.4)]))


def test_roc_curves(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = y + rng.normal(0, 0.8, 200)
    thr = np.r_[np.inf, np.sort(s)[::-1]]
    fpr = [(s[~y] >= t).mean() for t in thr]
    tpr = [(s[y] >= t).mean() for t in thr]
    flag = s > 1
    curves = {"score": {"fpr": fpr, "tpr": tpr, "auc": float(np.trapezoid(tpr, fpr)), "ci": (0.7, 0.9)},
              "flag": {"fpr": [0, np.mean(flag[~y]), 1], "tpr": [0, np.mean(flag[y]), 1], "auc": 0.7}}
    _png_ok(figures.plot_roc_curves(curves, tmp_path / "roc.png"))


def test_tables():
    df = pd.DataFrame({"metric": ["CJV", "a|b"], "r": [0.36, np.nan], "n": [10, 12]})
    md = figures.markdown_table(df, floatfmt=".2f")
    assert md.splitlines()[0] == "| metric | r | n |"
    assert md.splitlines()[1] == "|---|---:|---:|"
    assert md.splitlines()[2] == "| CJV | 0.36 | 10 |"
    assert "a\\|b |  | 12" in md
    h = figures.html_table(df, caption="x<y")
    assert "<caption>x&lt;y</caption>" in h and h.count("<tr>") == 3
