"""Browser review page: one static, self-contained HTML file to rate flagged volumes with the keyboard.

``results/review/index.html`` needs no server and no network: every image is embedded (as a data URI
inside one JSON block, decoded only when its volume is shown), so it opens from the file system, from
the unpacked ``report.zip`` or from a mail attachment alike. What the reviewer sees per volume:

* an orthogonal **mosaic** of the scorer's own slices (:func:`render_mosaic`: the encoder's slice
  extraction, :func:`artifactqc.encoder.slices.extract_slices` with the model's ``SliceConfig``; rows sagittal,
  coronal, axial in canonical RAS orientation, superior/anterior up, patient's right on the right);
* the **score** with the review threshold, the **per-artifact severities** as bars (the five learned heads
  and the measured ``clipping`` check; a table from an older run without it shows it as n/a), the score's
  **percentile within its site**, the **density flags** (τ flags and ``density_pct``), the calibrated
  ``p_fail`` and flag when a calibration exists, and
* the **image-ruler strip** of its top artifact (the report's ruler for that contrast and artifact,
  ``results/report/rulers/ruler_<contrast>_<artifact>.png``), so "how bad compared to a known 0.5".

Review order (:func:`review_order`): without a calibration, flagged volumes first (highest score
first), then unflagged volumes within ``near_margin`` of the threshold (nearest first), then every
site's worst, round-robin over sites (each site's worst, then each site's second worst, ...). With a
calibration: unrated volumes first, most uncertain first (nearest their site's threshold on the logit
scale: each rating there teaches the model the most), then the rated ones.

Keyboard: 1 accept, 2 doubtful, 3 exclude (then the next volume), → / ↓ / j next, ← / ↑ / k previous,
n the note field (Esc leaves it). Ratings live in the browser's ``localStorage`` (per page storage key),
survive reloads, and export as the TSV ``volume_id, rating, note, rater, time`` that
:func:`artifactqc.qc.ratings.read_ratings` reads back (config ``labels.ratings``). Ratings already given
(sheet labels, earlier ratings files) are shown as rated and included in an export.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SEVERITIES = ("noise", "ghosting", "motion", "bias", "resolution", "clipping")
#: Severity name → the simulator's artifact name the image rulers use.
RULER_ARTIFACT = {"noise": "noise", "ghosting": "ghosting", "motion": "motion", "bias": "bias",
                  "resolution": "anisotropy"}
AXES = ("sagittal", "coronal", "axial")
MOSAIC_COLUMNS = {"volume_id": "volume identifier", "mosaic": "JPEG bytes of the orthogonal mosaic",
                  "width": "mosaic width (px)", "height": "mosaic height (px)",
                  "error": "why no mosaic was drawn ('' when drawn)"}


# ------------------------------------------------------------------------------------------ images
def _jpeg(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality), optimize=True)
    return buf.getvalue()


def mosaic_from_slices(slices: np.ndarray, slices_per_axis: int, per_axis: int = 3, tile_px: int = 96) -> np.ndarray:
    """A uint8 mosaic from the scorer's slices ``[3 * slices_per_axis, S, S]``: one row per axis
    (sagittal, coronal, axial), ``per_axis`` slices evenly spread over that axis' slices, each tile
    ``tile_px`` square, 2-pixel black gutters. Intensities as the encoder sees them, clipped to [0, 1]."""
    from PIL import Image

    n = int(slices_per_axis)
    cols = np.unique(np.round(np.linspace(0, n - 1, per_axis + 2)[1:-1]).astype(int)) if n > per_axis else np.arange(n)
    gut = 2
    rows = []
    for a in range(3):
        tiles = []
        for c in cols:
            sl = np.clip(slices[a * n + int(c)], 0, 1)
            im = Image.fromarray((sl * 255).astype(np.uint8)).resize((tile_px, tile_px), Image.BILINEAR)
            tiles.append(np.asarray(im))
            tiles.append(np.zeros((tile_px, gut), np.uint8))
        rows.append(np.concatenate(tiles[:-1], axis=1))
        rows.append(np.zeros((gut, rows[-1].shape[1]), np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def render_mosaic(path, slice_cfg, per_axis: int = 3, tile_px: int = 96, quality: int = 80,
                  max_mem_mb: float = 4096.0) -> tuple[bytes, int, int]:
    """JPEG bytes, width and height of a volume's mosaic (:func:`mosaic_from_slices`)."""
    from ..encoder.slices import extract_slices

    sl, _ = extract_slices(path, slice_cfg, max_mem_mb=max_mem_mb)
    img = mosaic_from_slices(sl, slice_cfg.slices_per_axis, per_axis, tile_px)
    return _jpeg(img, quality), int(img.shape[1]), int(img.shape[0])


def shard_mosaics(volumes: pd.DataFrame, model_dir, per_axis: int = 3, tile_px: int = 96, quality: int = 80,
                  max_mem_mb: float = 4096.0) -> pd.DataFrame:
    """Mosaics of an ingest shard's ok volumes (``MOSAIC_COLUMNS``); a volume that cannot be drawn gets an
    empty mosaic and the reason, never stops the shard."""
    from ..encoder.slices import SliceConfig

    cfg = SliceConfig.from_dict(json.loads((Path(model_dir) / "model.json").read_text()).get("slices", {}))
    rows = []
    ok = volumes[volumes["status"].astype(str) == "ok"] if "status" in volumes else volumes
    for r in ok.itertuples():
        try:
            b, w, h = render_mosaic(r.path, cfg, per_axis, tile_px, quality, max_mem_mb)
            rows.append({"volume_id": str(r.volume_id), "mosaic": b, "width": w, "height": h, "error": ""})
        except Exception as exc:  # a file that went away or broke after ingest
            log.warning("mosaic %s: %s: %s", r.volume_id, type(exc).__name__, exc)
            rows.append({"volume_id": str(r.volume_id), "mosaic": b"", "width": 0, "height": 0,
                         "error": f"{type(exc).__name__}: {exc}"})
    return pd.DataFrame(rows, columns=list(MOSAIC_COLUMNS))


def _data_uri(b: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(b).decode("ascii") if b else ""


def ruler_uris(rulers_dir, contrasts: Iterable[str], width: int = 640, quality: int = 82) -> dict[str, str]:
    """``{"<contrast>/<artifact>": data URI}`` of the report's image rulers, downscaled to ``width``."""
    from PIL import Image

    out = {}
    if not rulers_dir or not Path(rulers_dir).is_dir():
        return out
    for c in contrasts:
        for sev, art in RULER_ARTIFACT.items():
            p = Path(rulers_dir) / f"ruler_{_safe(c)}_{_safe(art)}.png"
            if p.is_file():
                im = Image.open(p).convert("RGB")
                if im.width > width:
                    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
                buf = _io.BytesIO()
                im.save(buf, format="JPEG", quality=quality, optimize=True)
                out[f"{c}/{sev}"] = _data_uri(buf.getvalue())
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


# ------------------------------------------------------------------------------------------ order
def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def review_order(df: pd.DataFrame, threshold: float = 1.0, near_margin: float = 0.25) -> pd.DataFrame:
    """``df`` (ok volumes) sorted into review order, with ``reason`` (why a volume is where it is) and
    ``rank`` (1-based). See the module docstring for the order."""
    d = df.copy()
    d["score"] = d["score"].astype(float)
    flagged = d["flagged"].astype("boolean").fillna(False).astype(bool) if "flagged" in d else d["score"] > threshold
    dist = (d["score"] - threshold).abs()
    near = ~flagged & (dist <= near_margin)
    rest = ~flagged & ~near
    # each site's worst among the rest: rank 1 of every site, then rank 2, ... (higher score first within a rank)
    site_rank = d["score"].where(rest).groupby(d["site"]).rank(ascending=False, method="first").fillna(0)
    grp = np.where(flagged, 0, np.where(near, 1, 2))
    key2 = np.where(flagged, -d["score"], np.where(near, dist, site_rank * 1e6 - d["score"]))
    d["reason"] = np.where(flagged, "flagged", np.where(near, "near the threshold",
                                                       "site's worst #" + site_rank.astype(int).astype(str)))
    calibrated = "p_fail" in d and np.isfinite(d["p_fail"].astype(float)).any()
    if calibrated:
        # rated = any rating, doubtful included (a doubtful volume has been looked at; it is not fitted on)
        rated = (d["label"].fillna("").astype(str).str.strip() != "") if "label" in d else d["fail"].notna()
        thr = d["p_fail_threshold"].astype(float) if "p_fail_threshold" in d else 0.5
        unc = np.abs(_logit(d["p_fail"].astype(float).fillna(0.5)) - _logit(thr))
        d["reason"] = np.where(rated, "rated: " + d["reason"],
                               "uncertain (p_fail " + d["p_fail"].astype(float).map("{:.2f}".format) + ")")
        grp = np.where(rated, 3 + grp, 0)
        key2 = np.where(rated, key2, unc)
    d["_g"], d["_k"] = grp, key2
    d = d.sort_values(["_g", "_k", "volume_id"], kind="mergesort").drop(columns=["_g", "_k"])
    d["rank"] = np.arange(1, len(d) + 1)
    return d.reset_index(drop=True)


# ------------------------------------------------------------------------------------------ page
def _num(v, nd=3):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, nd) if np.isfinite(f) else None


def page_records(scores: pd.DataFrame, mosaics: pd.DataFrame, threshold: float = 1.0,
                 near_margin: float = 0.25) -> list[dict]:
    """One dict per ok volume, in review order, with everything the page shows."""
    ok = scores[scores["status"].astype(str) == "ok"].copy()
    ok = ok[np.isfinite(ok["score"].astype(float))]
    ok["site_pct"] = ok.groupby("site")["score"].rank(pct=True, method="max") * 100
    ok = review_order(ok, threshold, near_margin)
    mos = mosaics.drop_duplicates("volume_id").set_index("volume_id") if len(mosaics) else None
    taus = [c for c in ok.columns if re.fullmatch(r"flag_tau[0-9.]+", c)]
    recs = []
    for r in ok.to_dict("records"):
        sev = {s: _num(r.get(f"severity_{s}")) for s in SEVERITIES}
        finite = {k: v for k, v in sev.items() if v is not None}
        top = max(finite, key=finite.get) if finite else ""
        vid = str(r["volume_id"])
        img, err = "", "no mosaic"
        if mos is not None and vid in mos.index:
            m = mos.loc[vid]
            img, err = _data_uri(bytes(m["mosaic"])), str(m["error"])
        label = str(r.get("label", "") or "").strip()
        recs.append({
            "id": vid, "site": str(r.get("site", "")), "contrast": str(r.get("contrast", "")),
            "rank": int(r["rank"]), "reason": str(r["reason"]), "score": _num(r["score"]),
            "flagged": bool(r.get("flagged", False)), "sev": sev, "top": top,
            "site_pct": _num(r["site_pct"], 1), "density_pct": _num(r.get("density_pct"), 1),
            "taus": {t[len("flag_tau"):]: bool(r.get(t)) for t in taus},
            "p_fail": _num(r.get("p_fail")), "p_thr": _num(r.get("p_fail_threshold")),
            "flagged_cal": None if pd.isna(r.get("flagged_calibrated", pd.NA)) else bool(r.get("flagged_calibrated")),
            "label": label, "label_source": str(r.get("label_source", "sheet" if label else "") or ""),
            "rater": str(r.get("rater", "") or ""), "rating_time": str(r.get("rating_time", "") or ""),
            "rating_note": str(r.get("rating_note", "") or ""),
            "img": img, "img_error": "" if img else (err or "no mosaic"),
        })
    return recs


def _template() -> str:
    return resources.files("artifactqc.report").joinpath("review_page.html").read_text(encoding="utf-8")


def render_page(records: Sequence[Mapping], rulers: Mapping[str, str], *, title: str = "artifactqc review",
                storage_key: str = "artifactqc-review", threshold: float = 1.0, n_failed: int = 0,
                calibrated: bool = False, generated: str = "") -> str:
    """The page's HTML: the template with the data JSON (``<`` escaped so no ``</script>`` can close it)."""
    data = {"title": title, "storage_key": storage_key, "threshold": threshold, "n_failed": int(n_failed),
            "calibrated": bool(calibrated), "generated": generated, "severities": list(SEVERITIES),
            "rulers": dict(rulers), "volumes": list(records)}
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return _template().replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)


def write_review_page(scores: pd.DataFrame, mosaics: Iterable[pd.DataFrame], rulers_dir, out, *,
                      threshold: float = 1.0, near_margin: float = 0.25, title: str = "artifactqc review",
                      storage_key: str = "artifactqc-review") -> Path:
    """Build and write ``results/review/index.html`` (see the module docstring); returns its path."""
    from datetime import datetime, timezone

    parts = [m for m in mosaics if len(m)]
    mos = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(MOSAIC_COLUMNS))
    recs = page_records(scores, mos, threshold, near_margin)
    contrasts = sorted({r["contrast"] for r in recs})
    calibrated = "p_fail" in scores and np.isfinite(scores["p_fail"].astype(float)).any()
    n_failed = int((scores["status"].astype(str) != "ok").sum())
    page = render_page(recs, ruler_uris(rulers_dir, contrasts), title=title, storage_key=storage_key,
                       threshold=threshold, n_failed=n_failed, calibrated=calibrated,
                       generated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("review page: %d volumes (%d flagged, %d failed not shown), %.1f MB -> %s", len(recs),
             sum(r["flagged"] for r in recs), n_failed, out.stat().st_size / 1e6, out)
    return out
