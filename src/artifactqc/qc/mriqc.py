"""Import existing MRIQC results and join them to a volume table on ``bids_name``.

MRIQC writes one group table per modality (``group_T1w.tsv``, ``group_T2w.tsv``; first column
``bids_name``, e.g. ``sub-01_ses-1_T1w``) and one JSON per image (``sub-01_T1w.json``, with
nested ``bids_meta``/``provenance`` entries and flat IQM keys). :func:`read_mriqc` accepts a
directory (searched recursively for both), a TSV or a JSON file, and returns one row per image with
an ``mriqc_`` prefix on every IQM column. :func:`join_mriqc` adds these columns to a volume table
and a ``mriqc_status`` column:

* ``ok`` — MRIQC has a row for the volume;
* ``unsupported`` — the contrast is not one MRIQC's anatomical workflow handles (only T1w/T2w);
* ``failed`` — supported contrast but no MRIQC row (MRIQC aborted or was not run on it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

#: Contrasts MRIQC's anatomical workflow supports.
MRIQC_CONTRASTS = ("T1w", "T2w")

#: Column descriptions of the imported table (the ``mriqc_*`` IQM columns are MRIQC's own).
COLUMN_DOCS = {
    "volume_id": "volume identifier from the cohort sheet",
    "path": "input file",
    "contrast": "contrast from the cohort sheet",
    "bids_name": "BIDS name the MRIQC rows were joined on",
    "mriqc_status": "ok (MRIQC row found), failed (supported contrast, no MRIQC row: MRIQC failed or was "
                    "not run) or unsupported (a contrast MRIQC does not process)",
}

_NIFTI_EXT = re.compile(r"\.nii(\.gz)?$")


def bids_name_of(path_or_name: str) -> str:
    """``sub-01_ses-1_T1w`` from a path or file name (directory and ``.nii[.gz]``/``.json`` dropped)."""
    name = os.path.basename(str(path_or_name))
    name = _NIFTI_EXT.sub("", name)
    return re.sub(r"\.(json|tsv)$", "", name)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        else:
            out[key] = v
    return out


def read_mriqc_json(path: str | os.PathLike) -> dict:
    """One MRIQC per-image JSON as a flat dict with ``bids_name`` (metadata blocks dropped)."""
    with open(path) as f:
        d = json.load(f)
    for k in ("bids_meta", "provenance"):
        d.pop(k, None)
    row = {k: v for k, v in _flatten(d).items() if isinstance(v, (int, float, str, bool)) or v is None}
    name = row.pop("bids_name", None)
    if not name:
        name = bids_name_of(str(path))
    row["bids_name"] = bids_name_of(name)
    return row


def read_mriqc_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """An MRIQC group table; the first column is renamed ``bids_name`` if it is not already."""
    df = pd.read_csv(path, sep="\t", na_values=["n/a", "NA", ""])
    if "bids_name" not in df.columns:
        df = df.rename(columns={df.columns[0]: "bids_name"})
    df["bids_name"] = df["bids_name"].astype(str).map(bids_name_of)
    return df


def read_mriqc(source: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """MRIQC results from group TSVs and/or per-image JSONs, one row per ``bids_name``.

    ``source`` is a directory (``group_*.tsv`` and ``*.json`` found recursively; JSON files that
    are not MRIQC IQM files are skipped), a file, or a list of files. Group-table rows win over
    JSON rows for the same ``bids_name``. IQM columns get the prefix ``mriqc_``.
    """
    files: list[Path] = []
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            files = sorted(p.rglob("group_*.tsv")) + sorted(q for q in p.rglob("*.json") if not q.name.startswith("dataset_description"))
        else:
            files = [p]
    else:
        files = [Path(s) for s in source]
    tables, rows = [], []
    for f in files:
        if f.suffix == ".tsv":
            tables.append(read_mriqc_tsv(f))
        elif f.suffix == ".json":
            try:
                row = read_mriqc_json(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if any(k in row for k in ("cjv", "efc", "cnr", "fber", "snr_total")):
                rows.append(row)
    parts = tables + ([pd.DataFrame(rows)] if rows else [])
    if not parts:
        return pd.DataFrame(columns=["bids_name"])
    df = pd.concat(parts, ignore_index=True, sort=False)
    df = df.drop_duplicates("bids_name", keep="first").reset_index(drop=True)
    return df.rename(columns={c: f"mriqc_{c}" for c in df.columns if c != "bids_name"})


def join_mriqc(volumes: pd.DataFrame, mriqc: pd.DataFrame, contrast_col: str = "contrast") -> pd.DataFrame:
    """Left-join MRIQC columns onto ``volumes`` on ``bids_name`` and add ``mriqc_status``.

    ``volumes`` needs ``bids_name`` (or ``path``, from which it is derived) and ``contrast_col``.
    """
    v = volumes.copy()
    if "bids_name" not in v.columns or v["bids_name"].isna().all():
        v["bids_name"] = v["path"].map(bids_name_of)
    v["_bn"] = v["bids_name"].astype(str).map(bids_name_of)
    m = mriqc.rename(columns={"bids_name": "_bn"})
    out = v.merge(m, on="_bn", how="left", indicator=True).drop(columns="_bn")
    supported = out[contrast_col].astype(str).isin(MRIQC_CONTRASTS)
    found = out["_merge"] == "both"
    out["mriqc_status"] = np.where(found, "ok", np.where(supported, "failed", "unsupported"))
    return out.drop(columns="_merge")
