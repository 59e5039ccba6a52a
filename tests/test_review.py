"""Review page: mosaics of the scorer's slices, review order, the page's embedded data."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from artifactqc.report import review

from .conftest import save_tiny_model
from .workflow.test_ingest_workflow import make_volume


def test_mosaic_rows_are_axes_and_columns_spread_slices():
    n = 8
    sl = np.zeros((3 * n, 16, 16), np.float32)
    for a in range(3):
        for i in range(n):
            sl[a * n + i] = (a * n + i) / (3 * n)  # each slice a distinct grey level
    m = review.mosaic_from_slices(sl, n, per_axis=3, tile_px=10)
    assert m.dtype == np.uint8 and m.shape == (3 * 10 + 2 * 2, 3 * 10 + 2 * 2)
    cols = np.round(np.linspace(0, n - 1, 5)[1:-1]).astype(int)
    for a in range(3):
        for j, c in enumerate(cols):
            tile = m[a * 12:a * 12 + 10, j * 12:j * 12 + 10]
            assert abs(int(tile.mean()) - int((a * n + c) / (3 * n) * 255)) <= 1
    assert (m[10:12] == 0).all()  # gutter


def test_mosaic_keeps_the_scorers_orientation():
    """A bright marker in the top-left of an axial slice stays top-left in the mosaic (no flips)."""
    n = 2
    sl = np.zeros((3 * n, 20, 20), np.float32)
    sl[2 * n:, :5, :5] = 1.0
    m = review.mosaic_from_slices(sl, n, per_axis=2, tile_px=20)
    axial = m[2 * 22:2 * 22 + 20, :20]
    assert axial[:5, :5].mean() > 200 and axial[-5:, -5:].mean() < 10


def scores_frame():
    rows = []
    for s, vals in {"A": [2.0, 1.1, 0.9, 0.2, 0.1], "B": [0.95, 0.5, 0.4, 0.3]}.items():
        for i, v in enumerate(vals):
            rows.append({"volume_id": f"{s}-{i}", "site": s, "contrast": "T1w", "status": "ok", "score": v,
                         "flagged": v > 1.0, "density_pct": 50.0, "flag_tau5": False, "flag_tau3": False,
                         **{f"severity_{k}": 0.1 for k in review.SEVERITIES}})
    rows.append({"volume_id": "B-9", "site": "B", "contrast": "T1w", "status": "failed", "score": np.nan})
    return pd.DataFrame(rows)


def test_review_order_without_calibration():
    d = scores_frame()
    o = review.review_order(d[d.status == "ok"], threshold=1.0, near_margin=0.25)
    assert list(o["volume_id"]) == ["A-0", "A-1", "B-0", "A-2", "B-1", "A-3", "B-2", "A-4", "B-3"]
    assert list(o["reason"]) == ["flagged", "flagged", "near the threshold", "near the threshold", "site's worst #1",
                                 "site's worst #1", "site's worst #2", "site's worst #2", "site's worst #3"]
    assert list(o["rank"]) == list(range(1, 10))


def test_review_order_with_calibration_puts_uncertain_unrated_first():
    d = scores_frame()
    d = d[d.status == "ok"].copy()
    d["p_fail"] = [0.99, 0.6, 0.45, 0.1, 0.01, 0.52, 0.3, 0.2, 0.02]
    d["p_fail_threshold"] = 0.5
    d["label"] = ["exclude", "", "", "", "", "", "", "accept", ""]
    o = review.review_order(d)
    assert list(o["volume_id"][:3]) == ["B-0", "A-2", "A-1"]  # |logit(p) - logit(0.5)| smallest first
    assert set(o["volume_id"][-2:]) == {"A-0", "B-2"}  # rated last
    assert o["reason"].iloc[0].startswith("uncertain (p_fail 0.52")


def test_page_embeds_data_safely_and_skips_failed(tmp_path):
    d = scores_frame()
    d.loc[0, "volume_id"] = "A-</script><b>x"
    mos = pd.DataFrame({"volume_id": ["A-1"], "mosaic": [b"\xff\xd8fakejpeg"], "width": [1], "height": [1], "error": [""]})
    out = review.write_review_page(d, [mos], None, tmp_path / "index.html", title="T <1>")
    html = out.read_text()
    assert html.count("</script>") == 2  # the data block and the code block, nothing from the data
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    data = json.loads(blob)
    ids = [v["id"] for v in data["volumes"]]
    assert "B-9" not in ids and len(ids) == 9 and ids[0] == "A-</script><b>x"
    assert data["n_failed"] == 1 and data["calibrated"] is False
    v = {x["id"]: x for x in data["volumes"]}
    assert v["A-1"]["img"].startswith("data:image/jpeg;base64,") and v["A-2"]["img"] == ""
    assert "<title>T &lt;1&gt;</title>" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network


def test_shard_mosaics_and_rulers(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    vols = pd.DataFrame({"volume_id": ["a", "b"], "status": ["ok", "ok"],
                         "path": [str(make_volume(tmp_path / "a.nii.gz", 1)), str(tmp_path / "gone.nii.gz")]})
    mos = review.shard_mosaics(vols, model, per_axis=3, tile_px=40)
    a, b = mos.iloc[0], mos.iloc[1]
    assert a["error"] == "" and b["mosaic"] == b"" and "gone.nii.gz" in b["error"]
    img = Image.open(io.BytesIO(a["mosaic"]))
    assert img.format == "JPEG" and img.size == (a["width"], a["height"]) == (3 * 40 + 4, 3 * 40 + 4)
    rulers = tmp_path / "rulers"
    rulers.mkdir()
    Image.new("RGB", (1200, 600), "white").save(rulers / "ruler_T1w_noise.png")
    Image.new("RGB", (300, 100), "white").save(rulers / "ruler_T1w_anisotropy.png")
    uris = review.ruler_uris(rulers, ["T1w"], width=640)
    assert set(uris) == {"T1w/noise", "T1w/resolution"}
    big = Image.open(io.BytesIO(base64.b64decode(uris["T1w/noise"].split(",", 1)[1])))
    assert big.size == (640, 320)


@pytest.mark.parametrize("top", ["motion", "resolution"])
def test_page_records_top_artifact(top):
    d = scores_frame()
    d.loc[0, f"severity_{top}"] = 0.9
    recs = review.page_records(d, pd.DataFrame(columns=list(review.MOSAIC_COLUMNS)))
    r = {x["id"]: x for x in recs}["A-0"]
    assert r["top"] == top and r["site_pct"] == 100.0 and r["flagged"] is True
