"""How fast does a 1,000-volume review page open in a real browser (headless chromium)?

Builds a page with ``--n`` volumes through the package's own code (artifactqc.report.review.write_review_page)
with mosaics of the size the workflow writes (default SliceConfig: 8 slices of 128 px per axis, 3 per
axis shown, 96 px tiles, JPEG quality 80), drawn from nilearn's MNI152 template with a different noise
level per volume (0-4 % of the intensity range; noise makes JPEGs larger), plus four image
rulers. Then opens it from file:// in headless chromium ``--repeats`` times (fresh browser each time)
and records the time from navigation start to the page being usable (``window.artifactqcReadyMs``:
the data parsed, the queue of n rows built, the first volume shown) and the browser's load event, and
the time to step through 100 volumes with the keyboard.

    .venv/bin/python benchmarks/review_page/run.py [--n 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from artifactqc.report import review  # noqa: E402
from artifactqc.encoder.slices import SliceConfig, extract_from_array  # noqa: E402
from tests.browser import browser_available, chrome  # noqa: E402


def cohort(n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores and mosaics of ``n`` volumes (10 sites)."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    cfg = SliceConfig()
    clean, _ = extract_from_array(data, img.affine, cfg)
    rng = np.random.default_rng(seed)
    rows, mos = [], []
    for i in range(n):
        noise = rng.uniform(0.0, 0.04)
        sl = clean + noise * rng.standard_normal(clean.shape).astype(np.float32)
        m = review.mosaic_from_slices(sl, cfg.slices_per_axis, per_axis=3, tile_px=96)
        b = review._jpeg(m, 80)
        vid = f"sub-{i:04d}"
        score = float(rng.gamma(2.0, 0.3))
        rows.append({"volume_id": vid, "site": f"site{i % 10}", "contrast": "T1w", "status": "ok", "score": score,
                     "flagged": score > 1.0, "density_pct": float(rng.uniform(0, 100)), "flag_tau5": False,
                     "flag_tau3": False, **{f"severity_{k}": float(rng.uniform(0, 1)) for k in review.SEVERITIES}})
        mos.append({"volume_id": vid, "mosaic": b, "width": m.shape[1], "height": m.shape[0], "error": ""})
    return pd.DataFrame(rows), pd.DataFrame(mos)


def rulers(dirpath: Path) -> Path:
    from PIL import Image

    dirpath.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for art in ("noise", "motion", "ghosting", "bias"):
        Image.fromarray((rng.random((440, 700)) * 255).astype(np.uint8)).save(dirpath / f"ruler_T1w_{art}.png")
    return dirpath


def open_times(page: Path, repeats: int) -> list[dict]:
    from selenium.webdriver.common.by import By

    out = []
    for _ in range(repeats):
        d = chrome()
        try:
            t0 = time.perf_counter()
            d.get(page.as_uri())
            while not d.execute_script("return window.artifactqcReady === true"):
                time.sleep(0.01)
            wall = time.perf_counter() - t0
            ready = d.execute_script("return window.artifactqcReadyMs")
            load = d.execute_script("var t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd")
            body = d.find_element(By.TAG_NAME, "body")
            t1 = time.perf_counter()
            for _ in range(20):
                body.send_keys("j")
            step_wd = (time.perf_counter() - t1) / 20
            # in the page: 100 key presses dispatched as keydown events, each followed by a forced layout
            step = d.execute_script(
                "var t = performance.now(); for (var i = 0; i < 100; i++) {"
                " document.dispatchEvent(new KeyboardEvent('keydown', {key: 'j'})); void document.body.offsetHeight; }"
                " return (performance.now() - t) / 100;")
            out.append({"ready_ms": ready, "load_event_ms": load, "wall_s": wall, "step_ms": step,
                        "step_webdriver_ms": 1000 * step_wd})
        finally:
            d.quit()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    missing = browser_available()
    if missing:
        sys.exit(f"no headless browser: missing {missing}")
    tmp = Path(tempfile.mkdtemp(prefix="aqc-review-bench-"))
    t0 = time.time()
    scores, mos = cohort(a.n)
    t_build = time.time()
    page = review.write_review_page(scores, [mos], rulers(tmp / "rulers"), tmp / "index.html")
    t_page = time.time() - t_build
    res = pd.DataFrame(open_times(page, a.repeats))
    med = res.median()
    mb = page.stat().st_size / 1e6
    L = ["# Review page: opening time in a real browser", "",
         f"Produced by `.venv/bin/python benchmarks/review_page/run.py --n {a.n} --repeats {a.repeats}` "
         f"(headless chromium {chrome_version()}, shared 2-core machine under load from other jobs).", "",
         f"Page: {a.n} volumes, one self-contained file of {mb:.1f} MB (mean mosaic "
         f"{mos['mosaic'].map(len).mean() / 1e3:.1f} kB JPEG, 3 x 3 tiles of 96 px); written by "
         f"`artifactqc.report.review.write_review_page` in {t_page:.1f} s (mosaics drawn beforehand, "
         f"{t_build - t0:.0f} s for {a.n}: in the workflow that is the per-shard review_mosaics jobs).", "",
         "| measure | median | max |", "|---|---:|---:|",
         f"| navigation start → page usable (data parsed, queue of {a.n} built, first volume shown), ms | {med.ready_ms:.0f} | {res.ready_ms.max():.0f} |",
         f"| navigation start → load event, ms | {med.load_event_ms:.0f} | {res.load_event_ms.max():.0f} |",
         f"| WebDriver get() → page usable, wall clock, s | {med.wall_s:.2f} | {res.wall_s.max():.2f} |",
         f"| next volume (key j dispatched in the page, layout included), ms | {med.step_ms:.1f} | {res.step_ms.max():.1f} |",
         f"| next volume (key j sent through WebDriver, its round trip included), ms | {med.step_webdriver_ms:.0f} | {res.step_webdriver_ms.max():.0f} |", "",
         "Target (issue 18): a 1,000-volume review opens in under 2 s. Only the shown volume's image (and the next "
         "two, prefetched) is decoded; the others stay as text in the page's JSON block until shown.", ""]
    (HERE / "results.md").write_text("\n".join(L))
    res.to_csv(HERE / "results.tsv", sep="\t", index=False, float_format="%.2f")
    print("\n".join(L))


def chrome_version() -> str:
    import subprocess

    try:
        return subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True).stdout.split()[1]
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
