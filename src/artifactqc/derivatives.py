"""BIDS-derivatives export of the cohort tables: where MRIQC users and their tools look for QC results.

:func:`write_derivatives` turns ``results/scores/cohort.parquet`` (and the IQM table, when computed) into a
BIDS-derivatives dataset laid out as MRIQC lays out its own::

    results/derivatives/artifactqc/
      dataset_description.json       Name, BIDSVersion, DatasetType "derivative", GeneratedBy (+ provenance
                                     hashes), SourceDatasets (BIDS input)
      README.md, .bidsignore
      group_T1w.tsv, group_T2w.tsv   one per suffix: bids_name, then the numeric metrics (MRIQC's layout)
      sub-01/ses-1/anat/sub-01_ses-1_T1w.json   one JSON per image, at the image's BIDS-relative path
      volumes/<site>/<volume_id>.json           sheet rows without a BIDS name

**Naming of the per-image JSON.** BIDS has no file type for per-image QC metrics yet: a ``.json`` in a BIDS
dataset is a sidecar, and a sidecar needs a data file of the same name, which a derivative of metrics does
not have. artifactqc therefore follows MRIQC, which writes its IQMs to ``<bids_name>.json`` under the
image's ``sub-*/[ses-*/]anat/`` path (same entities, same suffix as the source image), so that scripts and
readers written for MRIQC derivatives find them; the dataset's ``.bidsignore`` lists these files and the group
tables as outside the specification, which is how the BIDS derivatives specification asks for files it
does not cover. Rows of a sheet without a BIDS name use their ``volume_id`` (``volumes/<site>/<volume_id>.json``
and ``bids_name = volume_id`` in the group table of their contrast).

**Reruns.** Every file is written only when its content changed (:func:`write_if_changed`): a new site's
delivery adds its own sidecars and rewrites the group tables, and leaves every other sidecar (and its
modification time) as it was. Sidecars of volumes no longer in the cohort are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: BIDS version the dataset description declares.
BIDS_VERSION = "1.10.0"
PIPELINE = "artifactqc"

#: Cohort-table columns that go into the sidecars and group tables as metrics: the score (and the encoder's own
#: ``score_learned``), the per-artifact severities (the learned heads and the measured ``severity_clipping``),
#: the clipping check's ``saturation``, log-density and percentiles, the tau flags and ``flagged``, and
#: site-relative or calibrated variants of them (``score_*``, ``density_pct_*``, ``flagged_*``, ``p_fail*``)
#: when the cohort has them (tables of older runs simply lack the newer columns).
METRIC_PATTERN = re.compile(r"^(score(_\w+)?|severity_\w+|saturation|log_density|density_pct(_\w+)?|flag_\w+"
                            r"|flagged(_\w+)?|p_fail(_\w+)?)$")
#: Row provenance copied into each sidecar's ``provenance`` block.
PROVENANCE_COLUMNS = ("input_sha256", "model_id", "model_sha256", "flow_id", "flow_sha256", "config_sha256",
                      "artifactqc_version", "code_version")
#: Descriptive text columns copied into each sidecar when present.
TEXT_COLUMNS = ("volume_id", "site", "subject", "session", "contrast", "status", "error", "pct_scope", "score_planes",
                "score_site_basis")
#: IQM-table columns that are bookkeeping, not metrics.
IQM_BOOKKEEPING = ("volume_id", "path", "contrast", "status", "error_type", "error", "seconds")

_BIDS_STEM = re.compile(r"^sub-[A-Za-z0-9]+(_[A-Za-z]+-[A-Za-z0-9]+)*_[A-Za-z0-9]+$")
_NIFTI = re.compile(r"\.nii(\.gz)?$")


def bids_stem(row: dict) -> str:
    """The row's BIDS name (``sub-01_ses-1_T1w``): ``bids_name``, else the file name if it is a BIDS name, else ''."""
    name = str(row.get("bids_name") or "")
    if not name:
        name = _NIFTI.sub("", os.path.basename(str(row.get("path") or "")))
    return name if _BIDS_STEM.match(name) else ""


def placement(row: dict) -> tuple[str, str, str]:
    """``(relative sidecar path, bids_name, suffix)`` of one cohort row.

    BIDS names go to ``sub-<label>/[ses-<label>/]anat/<bids_name>.json`` with the name's own suffix;
    other rows to ``volumes/<site>/<volume_id>.json`` with their ``volume_id`` as name and contrast as suffix.
    """
    stem = bids_stem(row)
    if stem:
        ents = dict(part.split("-", 1) for part in stem.split("_")[:-1])
        parts = [f"sub-{ents['sub']}"] + ([f"ses-{ents['ses']}"] if "ses" in ents else []) + ["anat", f"{stem}.json"]
        return "/".join(parts), stem, stem.rsplit("_", 1)[1]
    site = str(row.get("site") or "") or "unknown-site"
    vid = str(row["volume_id"])
    return f"volumes/{site}/{vid}.json", vid, str(row.get("contrast") or "") or "other"


def metric_columns(scores: pd.DataFrame) -> list[str]:
    """The cohort table's metric columns (:data:`METRIC_PATTERN`, but not the text columns that share its
    prefixes, such as ``score_planes``), in table order."""
    return [c for c in scores.columns if METRIC_PATTERN.match(c) and c not in TEXT_COLUMNS]


def iqm_columns(iqms: pd.DataFrame | None) -> list[str]:
    return [] if iqms is None else [c for c in iqms.columns if c not in IQM_BOOKKEEPING]


def _plain(v):
    """A JSON value: numpy scalars to Python, NaN/None to null, booleans kept."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(float(v)) or math.isinf(float(v)) else float(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if pd.isna(v):
        return None
    return str(v)


def sidecar(row: dict, bids_name: str, metrics: list[str], iqms: list[str]) -> dict:
    """One image's JSON: flat metric keys (like MRIQC's IQM JSONs), then ``provenance``."""
    out = {"bids_name": bids_name}
    for c in TEXT_COLUMNS:
        if c in row:
            out[c] = "" if pd.isna(row[c]) else str(row[c])
    for c in metrics:
        out[c] = _plain(row.get(c))
    if iqms:
        out["iqm_status"] = _plain(row.get("iqm_status")) or "missing"
        for c in iqms:
            out[c] = _plain(row.get(c))
    out["provenance"] = {"source": str(row.get("path") or ""),
                         **{c: _plain(row.get(c)) or "" for c in PROVENANCE_COLUMNS if c in row}}
    return out


def group_table(rows: pd.DataFrame, metrics: list[str], iqms: list[str]) -> pd.DataFrame:
    """MRIQC's group-table layout: ``bids_name`` first, then numeric columns only (flags as 0/1), sorted by name."""
    table = rows[["bids_name", *metrics, *iqms]].copy()
    for c in [*metrics, *iqms]:
        table[c] = _numeric(table[c])
    return table.sort_values("bids_name", kind="stable").reset_index(drop=True)


def _numeric(col: pd.Series) -> pd.Series:
    """Booleans as 0/1 (missing stays missing), everything else as numbers (text that is not becomes NaN)."""
    if col.dtype == bool:
        return col.astype("int64")
    values = col.dropna()
    if col.dtype == object and len(values) and values.map(lambda v: isinstance(v, (bool, np.bool_))).all():
        return col.map(lambda v: np.nan if pd.isna(v) else float(bool(v)))
    return pd.to_numeric(col, errors="coerce")


def _hash_list(rows: pd.DataFrame, id_col: str, sha_col: str) -> list[dict]:
    if id_col not in rows.columns:
        return []
    pairs = rows[[id_col, sha_col]].astype(str).drop_duplicates().sort_values([id_col, sha_col])
    return [{"Id": i, "Sha256": s} for i, s in pairs.itertuples(index=False) if i]


def dataset_description(scores: pd.DataFrame, *, bids_root: str | os.PathLike | None = None) -> dict:
    """``dataset_description.json`` of the derivatives: the BIDS fields and, in ``GeneratedBy``, the versions and
    provenance hashes of the rows (model and flow ids + SHA-256, config SHA-256). No time stamp, so that the file
    changes only when what made the scores changed."""
    ok = scores[scores["status"] == "ok"] if "status" in scores.columns else scores
    versions = sorted({str(v) for v in ok.get("artifactqc_version", pd.Series(dtype=str)) if str(v)})
    code = sorted({str(v) for v in ok.get("code_version", pd.Series(dtype=str)) if str(v)})
    generated = {
        "Name": PIPELINE,
        "Version": ", ".join(versions) or _own_version(),
        "Description": "Artifact scores, per-artifact severities, latent density percentiles and flags of each "
                       "image (label-free artifact detection); provenance of every number in each image's JSON.",
        "CodeVersion": code,
        "ConfigSha256": sorted({str(v) for v in ok.get("config_sha256", pd.Series(dtype=str)) if str(v)}),
        "Models": _hash_list(ok, "model_id", "model_sha256"),
        "Flows": _hash_list(ok, "flow_id", "flow_sha256"),
    }
    desc = {"Name": "artifactqc: artifact scores", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [generated]}
    if bids_root:
        root = Path(bids_root).resolve()
        source = {"URL": root.as_uri()}
        raw = root / "dataset_description.json"
        if raw.is_file():
            try:
                meta = json.loads(raw.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("%s: not readable as JSON (%s); its Name/DOI are not copied", raw, exc)
                meta = {}
            if meta.get("Name"):
                desc["Name"] = f"artifactqc: artifact scores of {meta['Name']}"
            if meta.get("DatasetDOI"):
                source["DOI"] = str(meta["DatasetDOI"])
        desc["SourceDatasets"] = [source]
    return desc


def _own_version() -> str:
    from . import __version__

    return __version__


README = """# artifactqc derivatives

Written by artifactqc from its cohort tables (`results/scores/cohort.parquet`; the Parquet tables hold the same
numbers plus the latents). Layout as MRIQC's derivatives:

- `group_<suffix>.tsv`: one row per image (`bids_name`, then numeric metrics; flags as 0/1; `n/a` when the
  image could not be scored), one table per suffix (T1w, T2w, FLAIR, ...).
- `sub-*/[ses-*/]anat/<bids_name>.json`: one JSON per image with the same metrics, its status and site, and a
  `provenance` block (input SHA-256, model and flow ids and SHA-256, config SHA-256, artifactqc version).
- `volumes/<site>/<volume_id>.json`: the same for images of a cohort sheet that have no BIDS name.

BIDS has no file type for per-image QC metrics; these files are listed in `.bidsignore`, as MRIQC's would be.
`score` >= 1 means "review"; severities are 0 (clean) to 1 (the worst simulated artifact). `score` is the larger
of the encoder's own score (`score_learned`) and 2 × `severity_clipping`, a measured (not learned) check for
clipped/saturated intensities (`saturation`: fraction of head pixels on the upper plateau). The meaning of each
column: `artifactqc.provenance.column_descriptions("results/scores/cohort.parquet")`.
"""

BIDSIGNORE = """# Per-image QC metrics and group tables: no BIDS file type covers them yet (MRIQC's layout).
group_*.tsv
sub-*/**/*.json
volumes
"""


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless the file already holds exactly it; returns whether it wrote.

    Unchanged files keep their modification time, so a rerun after a new site's delivery touches only what
    the new volumes changed (and tools that sync or back up by mtime copy only those)."""
    data = text.encode()
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def _tsv_text(table: pd.DataFrame) -> str:
    return table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.10g", lineterminator="\n")


def join_iqms(scores: pd.DataFrame, iqms: pd.DataFrame | None) -> pd.DataFrame:
    """The cohort rows with the IQM columns (and ``iqm_status``) joined on ``volume_id``."""
    if iqms is None:
        return scores
    extra = iqms[["volume_id", "status", *iqm_columns(iqms)]].rename(columns={"status": "iqm_status"})
    extra = extra.drop_duplicates("volume_id")
    return scores.merge(extra, on="volume_id", how="left", validate="one_to_one")


def _remove_stale(out: Path, expected: set[str]) -> int:
    """Delete group tables and per-image JSONs that ``expected`` no longer lists, then empty folders; returns the count."""
    stale = [p for p in out.glob("group_*.tsv") if p.name not in expected]
    tops = [e.path for e in os.scandir(out) if e.is_dir() and (e.name.startswith("sub-") or e.name == "volumes")]
    for top in tops:
        for folder, subdirs, names in os.walk(top, topdown=False):
            rel = Path(folder).relative_to(out).as_posix()
            stale += [Path(folder, n) for n in names if n.endswith(".json") and f"{rel}/{n}" not in expected]
    for p in stale:
        p.unlink()
    for top in tops:
        for folder, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(folder)  # only succeeds on an empty folder
            except OSError:
                pass
    return len(stale)


def write_derivatives(
    scores: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    iqms: pd.DataFrame | None = None,
    bids_root: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Write (or update) the BIDS-derivatives dataset ``out_dir`` from the cohort table ``scores``.

    Returns the index: one row per file of the dataset (``path`` relative to ``out_dir``, ``kind``, ``volume_id``,
    ``bids_name``, ``sha256``, ``written`` = whether this call changed it). Raises ``ValueError`` naming the
    volumes when two rows would share a sidecar path.
    """
    out = Path(out_dir)
    rows = join_iqms(scores.reset_index(drop=True), iqms)
    metrics, iqm_cols = metric_columns(scores), iqm_columns(iqms)
    records = rows.to_dict("records")
    placed = [placement(r) for r in records]
    rows = rows.assign(_rel=[p[0] for p in placed], bids_name=[p[1] for p in placed], _suffix=[p[2] for p in placed])
    dup = rows["_rel"].duplicated(keep=False)
    if dup.any():
        clash = rows.loc[dup, ["volume_id", "_rel"]].head(6).values.tolist()
        raise ValueError(f"{int(dup.sum())} volumes would share a derivatives file (volume_id, path): {clash}")

    index = []

    def put(rel: str, text: str, kind: str, vid: str = "", name: str = "") -> None:
        written = write_if_changed(out / rel, text)
        index.append((rel, kind, vid, name, hashlib.sha256(text.encode()).hexdigest(), written))

    put("dataset_description.json", _json_text(dataset_description(scores, bids_root=bids_root)), "description")
    put("README.md", README, "readme")
    put(".bidsignore", BIDSIGNORE, "bidsignore")
    for suffix, g in rows.groupby("_suffix", sort=True):
        put(f"group_{suffix}.tsv", _tsv_text(group_table(g, metrics, iqm_cols)), "group")
    for rec, (rel, name, _) in zip(records, placed):
        put(rel, _json_text(sidecar(rec, name, metrics, iqm_cols)), "sidecar", str(rec["volume_id"]), name)

    removed = _remove_stale(out, {rel for rel, *_ in index})
    table = pd.DataFrame(index, columns=["path", "kind", "volume_id", "bids_name", "sha256", "written"])
    log.info("derivatives %s: %d files (%d sidecars, %d group tables), %d written, %d unchanged, %d stale removed",
             out, len(table), int((table.kind == "sidecar").sum()), int((table.kind == "group").sum()),
             int(table.written.sum()), int((~table.written).sum()), removed)
    return table
