"""Manual ratings: the review page's TSV files (and a sheet's ``label`` column) read, checked and merged.

A ratings file has the columns ``volume_id, rating, note, rater, time`` (tab-separated), as the review page
exports it. ``rating`` is ``accept``/``doubtful``/``exclude`` or the page's keys ``1``/``2``/``3``, stored as
the words. Unknown volume ids, unknown ratings, a volume rated twice in one file, a missing column or an empty
file raise :class:`RatingsError` naming the file and line. :mod:`artifactqc.qc.calibrate` fits on them.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Review-page keys and words for ratings, and the word each maps to.
RATING_WORDS = {"1": "accept", "2": "doubtful", "3": "exclude",
                "accept": "accept", "doubtful": "doubtful", "exclude": "exclude"}
RATING_COLUMNS = ("volume_id", "rating", "note", "rater", "time")

class RatingsError(ValueError):
    """A ratings file that cannot be used; the message names the file and line."""


# ------------------------------------------------------------------------------------------ ratings
def read_ratings_file(path: str | Path, known_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """One ratings TSV as ``volume_id, rating (accept/doubtful/exclude), note, rater, time, source``.

    ``source`` is ``<file>:<line>``. Raises :class:`RatingsError` for a missing or empty file, a missing
    column, an unknown rating, an unknown volume id (when ``known_ids`` is given) or a volume id twice.
    """
    path = Path(path)
    if not path.is_file():
        raise RatingsError(f"{path}: ratings file not found")
    text = path.read_text(encoding="utf-8-sig")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise RatingsError(f"{path}: ratings file is empty (expected a header line "
                           f"'{chr(9).join(RATING_COLUMNS)}' and one line per rated volume)")
    reader = csv.reader(text.splitlines(), delimiter="\t")
    header = [h.strip() for h in next(reader)]
    missing = [c for c in ("volume_id", "rating") if c not in header]
    if missing:
        raise RatingsError(f"{path}:1: missing column(s) {missing}; the header must hold "
                           f"{', '.join(RATING_COLUMNS)} (tab-separated), found {header}")
    known = None if known_ids is None else {str(v) for v in known_ids}
    rows, seen, errors = [], {}, []
    for lineno, rec in enumerate(reader, start=2):
        if not any(c.strip() for c in rec):
            continue
        d = {h: (rec[i].strip() if i < len(rec) else "") for i, h in enumerate(header)}
        vid, raw = d.get("volume_id", ""), d.get("rating", "")
        where = f"{path}:{lineno}"
        word = RATING_WORDS.get(raw.lower())
        if not vid:
            errors.append(f"{where}: empty volume_id")
        elif word is None:
            errors.append(f"{where}: unknown rating {raw!r} for {vid} (use accept/doubtful/exclude or 1/2/3)")
        elif known is not None and vid not in known:
            errors.append(f"{where}: unknown volume_id {vid!r} (not in the cohort)")
        elif vid in seen:
            errors.append(f"{where}: {vid} rated twice in one file (first on line {seen[vid]})")
        else:
            seen[vid] = lineno
            rows.append({"volume_id": vid, "rating": word, "note": d.get("note", ""), "rater": d.get("rater", ""),
                         "time": d.get("time", ""), "source": where})
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise RatingsError(f"{path}: {len(errors)} bad line(s):\n  {shown}")
    if not rows:
        raise RatingsError(f"{path}: ratings file has a header but no rated volume")
    return pd.DataFrame(rows, columns=[*RATING_COLUMNS, "source"])


def read_ratings(paths: Sequence[str | Path], known_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """All ratings files merged (:func:`read_ratings_file` each); a volume rated in several files keeps
    the rating with the latest ``time`` (ISO 8601; the later file wins a tie), and a conflict is logged."""
    known = None if known_ids is None else {str(v) for v in known_ids}
    parts = [read_ratings_file(p, known).assign(_order=i) for i, p in enumerate(paths)]
    if not parts:
        return pd.DataFrame(columns=[*RATING_COLUMNS, "source"])
    allr = pd.concat(parts, ignore_index=True)
    allr["_t"] = pd.to_datetime(allr["time"], errors="coerce", utc=True, format="ISO8601")
    allr = allr.sort_values(["volume_id", "_t", "_order"], na_position="first", kind="mergesort")
    conflicts = allr.groupby("volume_id")["rating"].nunique()
    for vid in conflicts[conflicts > 1].index:
        g = allr[allr["volume_id"] == vid]
        log.warning("ratings: %s rated differently (%s); keeping the latest, %s",
                    vid, ", ".join(f"{r.rating} at {r.source}" for r in g.itertuples()), g.iloc[-1]["source"])
    out = allr.drop_duplicates("volume_id", keep="last").drop(columns=["_order", "_t"])
    return out.sort_values("volume_id").reset_index(drop=True)


def labels_to_ratings(sheet: pd.DataFrame, fail_values: Iterable, pass_values: Iterable, rater: str = "",
                      time: str = "") -> pd.DataFrame:
    """A ratings table (:data:`RATING_COLUMNS`) from a sheet's ``label`` column: fail → ``exclude``,
    pass → ``accept``; unlabelled rows and labels in neither list are left out. Used to hand the demo's
    known labels to the workflow as a ratings file, and to turn an existing QC spreadsheet into one."""
    from .evaluate import map_ratings
    from ..report.stage import rating_mapping

    fail = map_ratings(sheet["label"], rating_mapping(fail_values, pass_values))
    keep = fail.notna()
    return pd.DataFrame({"volume_id": sheet.loc[keep, "volume_id"].astype(str),
                         "rating": np.where(fail[keep].astype(bool), "exclude", "accept"),
                         "note": "", "rater": rater, "time": time}, columns=list(RATING_COLUMNS)).reset_index(drop=True)


def merge_labels(cohort: pd.DataFrame, ratings: pd.DataFrame, fail_values: Iterable, pass_values: Iterable) -> pd.DataFrame:
    """``cohort`` with ``label`` (a ratings-file rating replaces the sheet's label), ``label_source``
    (``sheet``, ``<file>:<line>`` or ``''``), ``rater``, ``rating_time``, ``rating_note`` and ``fail``
    (nullable boolean from ``fail_values``/``pass_values``; a label in neither list is ``<NA>``)."""
    from .evaluate import map_ratings
    from ..report.stage import rating_mapping

    out = cohort.copy()
    lab = out["label"].fillna("").astype(str).str.strip() if "label" in out else pd.Series("", index=out.index)
    out["label"] = lab
    out["label_source"] = np.where(lab != "", "sheet", "")
    for c in ("rater", "rating_time", "rating_note"):
        out[c] = ""
    if len(ratings):
        r = ratings.set_index("volume_id")
        vid = out["volume_id"].astype(str)
        hit = vid.isin(r.index)
        m = vid[hit]
        out.loc[hit, "label"] = m.map(r["rating"]).to_numpy()
        out.loc[hit, "label_source"] = m.map(r["source"]).to_numpy()
        out.loc[hit, "rater"] = m.map(r["rater"]).to_numpy()
        out.loc[hit, "rating_time"] = m.map(r["time"]).to_numpy()
        out.loc[hit, "rating_note"] = m.map(r["note"]).to_numpy()
    out["fail"] = map_ratings(out["label"], rating_mapping(fail_values, pass_values))
    return out
