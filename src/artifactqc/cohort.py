"""Cohort input: TSV sheets and BIDS roots, validation, checksums, and the ingest tables.

Two forms, one result. A *sheet* is a TSV with columns ``volume_id, site, subject, [session],
contrast, path, [label], ...extra``; a *BIDS root* is scanned for
``sub-*/[ses-*/]anat/*_{T1w,T2w,FLAIR,PDw,PD}.nii[.gz]``. Both become a normalised cohort frame
(:data:`COHORT_COLUMNS` first, extra sheet columns kept), which :func:`ingest_rows` turns into

* ``volumes.parquet``: one row per readable volume (see :data:`VOLUME_COLUMNS`), and
* ``failures.parquet``: one row per problem (:data:`FAILURE_COLUMNS`), with a specific reason.

A bad volume never stops the run: it becomes a failures row and the rest carry on. Problems with
the sheet itself (missing columns, unknown contrast) raise :class:`CohortError` naming the file,
the rows and the allowed values, because no volume could be trusted until they are fixed.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .io import VolumeError, intensity_percentiles, load_volume, orientation_code, sha256_file
from .progress import track

log = logging.getLogger(__name__)

CONTRASTS = ("T1w", "T2w", "FLAIR", "PD", "other")
BIDS_SUFFIXES = {"T1w": "T1w", "T2w": "T2w", "FLAIR": "FLAIR", "PDw": "PD", "PD": "PD"}
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SITE_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
REQUIRED_SHEET_COLUMNS = ("volume_id", "site", "subject", "contrast", "path")
COHORT_COLUMNS = ("volume_id", "site", "subject", "session", "contrast", "path", "bids_name", "label")
VOLUME_COLUMNS = COHORT_COLUMNS + (
    "sha256",
    "size_bytes",
    "shape",
    "voxel_mm",
    "orientation",
    "dtype",
    "p01",
    "p50",
    "p99",
    "status",
    "duplicate_of",
    "artifactqc_version",
)
FAILURE_COLUMNS = ("volume_id", "site", "path", "stage", "error_type", "message")
#: Fields of a failure tuple as the checks produce it (the site is added from the cohort row).
FAILURE_FIELDS = ("volume_id", "path", "stage", "error_type", "message")

#: Column descriptions stored in the Parquet schema metadata.
COLUMN_DOCS = {
    "volume_id": "unique id of the volume ([A-Za-z0-9_-]+); BIDS: the file name without extension",
    "site": "acquisition site (sheet column, BIDS participants.tsv column or a constant)",
    "subject": "subject id",
    "session": "session id ('' when absent)",
    "contrast": "one of " + ", ".join(CONTRASTS),
    "path": "absolute path of the NIfTI file",
    "bids_name": "BIDS file name without extension ('' for sheets without one)",
    "label": "manual QC rating from the sheet ('' when absent)",
    "sha256": "SHA-256 of the file bytes",
    "size_bytes": "file size in bytes",
    "shape": "voxel grid shape (3 ints; a singleton 4th axis is squeezed)",
    "voxel_mm": "voxel edge lengths in mm, from the affine",
    "orientation": "axis code of the affine, e.g. RAS",
    "dtype": "on-disk data type",
    "p01": "1st percentile of all voxel intensities",
    "p50": "median of all voxel intensities",
    "p99": "99th percentile of all voxel intensities",
    "status": "'ok' for every row of volumes.parquet",
    "duplicate_of": "volume_id of an earlier volume with identical file content ('' when unique)",
    "artifactqc_version": "version of artifactqc that ingested the volume",
    "stage": "workflow stage that recorded the failure: ingest, preprocess, score, iqm",
    "error_type": "machine-readable failure kind",
    "message": "what is wrong, in words",
}


class CohortError(ValueError):
    """The cohort description itself (sheet or BIDS root) is unusable."""


# --------------------------------------------------------------------------------------------
# Reading the cohort description
# --------------------------------------------------------------------------------------------


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a cohort TSV sheet; relative paths resolve against the sheet's folder."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: cohort sheet does not exist")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    except pd.errors.EmptyDataError:
        raise CohortError(f"{path}: the cohort sheet is empty (no header, no rows)") from None
    except Exception as exc:
        raise CohortError(f"{path}: cannot be read as a tab-separated sheet ({exc})") from exc
    if df.empty:
        raise CohortError(f"{path}: the cohort sheet has a header but no rows: no volume to process")
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED_SHEET_COLUMNS if c not in df.columns]
    if missing:
        raise CohortError(
            f"{path}: missing required column(s) {missing}; a sheet needs {list(REQUIRED_SHEET_COLUMNS)} "
            f"(optional: session, label); found {list(df.columns)}"
        )
    df = df.apply(lambda col: col.str.strip())
    base = path.resolve().parent
    df["path"] = [str(p) if os.path.isabs(p) else str((base / p).resolve()) for p in df["path"]]
    return normalise_cohort(df, source=str(path))


def normalise_cohort(df: pd.DataFrame, source: str = "cohort") -> pd.DataFrame:
    """Fill optional columns, check contrasts and sites, put :data:`COHORT_COLUMNS` first."""
    df = df.copy()
    for col in COHORT_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = df.fillna("")
    for col in COHORT_COLUMNS:
        df[col] = df[col].astype(str)
    bad = ~df["contrast"].isin(CONTRASTS)
    if bad.any():
        rows = [(int(i) + 2, v) for i, v in zip(np.flatnonzero(bad)[:5], df.loc[bad, "contrast"][:5])]
        raise CohortError(
            f"{source}: column 'contrast' has {int(bad.sum())} value(s) outside the allowed {list(CONTRASTS)}; "
            f"first (line, value): {rows}"
        )
    bad = ~df["volume_id"].map(lambda s: bool(ID_PATTERN.match(s)))
    if bad.any():
        rows = [(int(i) + 2, v) for i, v in zip(np.flatnonzero(bad)[:5], df.loc[bad, "volume_id"][:5])]
        raise CohortError(
            f"{source}: column 'volume_id' must match [A-Za-z0-9_-]+ (ids name output files); "
            f"{int(bad.sum())} bad value(s), first (line, value): {rows}"
        )
    bad = ~df["site"].map(lambda s: bool(SITE_PATTERN.match(s)))
    if bad.any():
        rows = [(int(i) + 2, v) for i, v in zip(np.flatnonzero(bad)[:5], df.loc[bad, "site"][:5])]
        raise CohortError(
            f"{source}: column 'site' must match [A-Za-z0-9_.-]+ (it names output folders); "
            f"{int(bad.sum())} bad value(s), first (line, value): {rows}"
        )
    extra = [c for c in df.columns if c not in COHORT_COLUMNS]
    return df[list(COHORT_COLUMNS) + extra].reset_index(drop=True)


def _bids_entities(name: str) -> dict[str, str]:
    ents = {}
    for part in name.split("_")[:-1]:
        if "-" in part:
            k, v = part.split("-", 1)
            ents[k] = v
    return ents


def discover_bids(
    root: str | os.PathLike,
    site_column: str | None = "site",
    site_constant: str | None = None,
) -> pd.DataFrame:
    """Find anatomical NIfTI files in a BIDS tree with plain ``os.scandir`` (no indexer).

    Only ``sub-*/anat`` and ``sub-*/ses-*/anat`` are visited, so a 100,000-file tree is listed in
    seconds (see ``benchmarks/bids_discovery``). The site comes from ``site_column`` of
    ``participants.tsv`` or, if ``site_constant`` is given, is that constant for every volume.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise CohortError(f"{root}: BIDS root is not a directory")
    sites: dict[str, str] = {}
    if site_constant is None:
        ptsv = root / "participants.tsv"
        if not ptsv.is_file():
            raise CohortError(f"{ptsv}: missing; set cohort.bids.site_constant or provide participants.tsv")
        part = pd.read_csv(ptsv, sep="\t", dtype=str, keep_default_na=False)
        if site_column not in part.columns:
            raise CohortError(
                f"{ptsv}: has no column {site_column!r} for the site (columns: {list(part.columns)}); "
                "set cohort.bids.site_column or cohort.bids.site_constant"
            )
        sites = {pid.removeprefix("sub-"): s for pid, s in zip(part["participant_id"], part[site_column])}
    rows = []
    with os.scandir(root) as it:
        subjects = sorted(e.name for e in it if e.name.startswith("sub-") and e.is_dir())
    for sub in subjects:
        sdir = root / sub
        anat_dirs = []
        with os.scandir(sdir) as it:
            for e in it:
                if e.name == "anat" and e.is_dir():
                    anat_dirs.append((e.path, ""))
                elif e.name.startswith("ses-") and e.is_dir():
                    anat_dirs.append((os.path.join(e.path, "anat"), e.name[4:]))
        for adir, ses in sorted(anat_dirs):
            try:
                entries = sorted(os.scandir(adir), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for e in entries:
                name = e.name
                if name.endswith(".nii.gz"):
                    stem = name[:-7]
                elif name.endswith(".nii"):
                    stem = name[:-4]
                else:
                    continue
                suffix = stem.rsplit("_", 1)[-1]
                if suffix not in BIDS_SUFFIXES:
                    continue
                subject = sub[4:]
                site = site_constant if site_constant is not None else sites.get(subject, "")
                rows.append((stem, site, subject, ses, BIDS_SUFFIXES[suffix], e.path, stem, ""))
    df = pd.DataFrame(rows, columns=list(COHORT_COLUMNS))
    if df.empty:
        raise CohortError(
            f"{root}: no anatomical images found (looked for sub-*/[ses-*/]anat/*_{{"
            + ",".join(sorted(BIDS_SUFFIXES)) + "}.nii[.gz]): no volume to process"
        )
    missing_site = df["site"] == ""
    if missing_site.any():
        subs = sorted(set(df.loc[missing_site, "subject"]))[:5]
        raise CohortError(
            f"{root / 'participants.tsv'}: no {site_column!r} value for {len(set(df.loc[missing_site, 'subject']))} "
            f"subject(s) with images, e.g. {subs}"
        )
    return normalise_cohort(df, source=str(root))


def load_cohort(source: str | os.PathLike, site_column: str | None = "site", site_constant: str | None = None):
    """A sheet file or a BIDS root, whichever ``source`` is."""
    if Path(source).is_dir():
        return discover_bids(source, site_column=site_column, site_constant=site_constant)
    return read_sheet(source)


def split_valid(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Separate rows that cannot be ingested because their ``volume_id`` is already taken.

    Returns ``(valid, failures)``; for a duplicated id the first row is kept and every later
    one becomes a ``duplicate_id`` failure.
    """
    fails = []
    ok = df
    dup = ok["volume_id"].duplicated(keep="first")
    first_path = dict(zip(ok.loc[~dup, "volume_id"], ok.loc[~dup, "path"]))
    for _, r in ok[dup].iterrows():
        fails.append(
            (r.volume_id, r.site, r.path, "ingest", "duplicate_id",
             f"volume_id {r.volume_id!r} already used for {first_path[r.volume_id]}; this row was not ingested")
        )
    return ok[~dup].reset_index(drop=True), pd.DataFrame(fails, columns=list(FAILURE_COLUMNS)).astype(str)


def failures_frame(rows=(), sites=None) -> pd.DataFrame:
    """The failures table from ``(volume_id, path, stage, error_type, message)`` tuples; ``sites`` maps
    volume_id to the cohort row's site (the ``site`` column; '' for an id it does not know)."""
    df = pd.DataFrame(list(rows), columns=list(FAILURE_FIELDS)).astype(str)
    df.insert(1, "site", df["volume_id"].map(dict(sites or {})).fillna("").astype(str))
    return df


def shard_cohort(df: pd.DataFrame, shard_size: int = 500) -> dict[tuple[str, int], pd.DataFrame]:
    """Split a cohort into per-site shards of ``shard_size`` rows, in sheet order.

    A site's rows are cut into blocks of ``shard_size``; a last, partly filled block joins the block before
    it, so a site of n rows has ``max(1, n // shard_size)`` shards holding ``shard_size`` to
    ``2 * shard_size - 1`` rows (a site smaller than ``shard_size`` is one shard). The number of shards is
    then at most ``ceil(N / shard_size)`` whenever every site has at least ``shard_size`` rows, while a shard
    never mixes sites (a new site runs only its own jobs). Appending volumes to a site changes only that
    site's last shard (and, each time it reaches ``2 * shard_size`` rows, splits it in two).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards = {}
    for site, g in df.groupby("site", sort=True):
        n_shards = max(1, len(g) // shard_size)
        for k in range(n_shards):
            stop = (k + 1) * shard_size if k < n_shards - 1 else len(g)
            shards[(str(site), k)] = g.iloc[k * shard_size : stop]
    return shards


# --------------------------------------------------------------------------------------------
# Ingest
# --------------------------------------------------------------------------------------------


def ingest_one(row: dict, max_mem_mb: float = 4096.0) -> tuple[dict | None, tuple | None]:
    """Validate, checksum and summarise one volume: ``(volume_row, None)`` or ``(None, failure_row)``."""
    path = row["path"]
    try:
        vol = load_volume(path, max_mem_mb=max_mem_mb)
        digest = sha256_file(path)
    except VolumeError as exc:
        return None, (row["volume_id"], path, "ingest", exc.error_type, exc.message)
    except Exception as exc:  # an unforeseen problem is still a row, not a crash
        return None, (row["volume_id"], path, "ingest", "read_error", f"{type(exc).__name__}: {exc}")
    p01, p50, p99 = intensity_percentiles(vol.data)
    out = {k: row.get(k, "") for k in row}
    out.update(
        sha256=digest,
        size_bytes=os.path.getsize(path),
        shape=list(vol.shape),
        voxel_mm=[round(float(z), 6) for z in np.sqrt((vol.affine[:3, :3] ** 2).sum(axis=0))],
        orientation=orientation_code(vol.affine),
        dtype=vol.dtype,
        p01=p01,
        p50=p50,
        p99=p99,
        status="ok",
        duplicate_of="",
        artifactqc_version=__version__,
    )
    return out, None


def ingest_rows(rows: pd.DataFrame, max_mem_mb: float = 4096.0, n_jobs: int = 1):
    """Ingest cohort rows; returns ``(volumes, failures)`` frames. Never raises for a bad volume."""
    records = rows.to_dict("records")
    t0 = time.perf_counter()
    if n_jobs > 1 and len(records) > 1:
        # results come back in sheet order, one at a time (progress), in chunks (little overhead per volume)
        chunksize = max(1, min(16, len(records) // (4 * n_jobs)))
        with ProcessPoolExecutor(n_jobs) as ex:
            done = ex.map(ingest_one, records, [max_mem_mb] * len(records), chunksize=chunksize)
            results = list(track(done, total=len(records), desc="ingest", unit="volume"))
    else:
        results = [ingest_one(r, max_mem_mb) for r in track(records, desc="ingest", unit="volume")]
    vols = [v for v, _ in results if v is not None]
    fails = [f for _, f in results if f is not None]
    log.info("ingested %d volumes (%d failed) in %.1f s", len(vols), len(fails), time.perf_counter() - t0)
    extra = [c for c in rows.columns if c not in VOLUME_COLUMNS]
    volumes = pd.DataFrame(vols, columns=list(VOLUME_COLUMNS) + extra)
    return volumes, failures_frame(fails, sites=zip(rows["volume_id"], rows["site"]))


def mark_duplicate_content(volumes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flag volumes whose bytes equal an earlier volume's: kept, with ``duplicate_of`` and a failures row."""
    volumes = volumes.copy()
    dup = volumes["sha256"].duplicated(keep="first")
    first = dict(zip(volumes.loc[~dup, "sha256"], volumes.loc[~dup, "volume_id"]))
    fails = []
    for i in np.flatnonzero(dup):
        r = volumes.iloc[i]
        other = first[r.sha256]
        volumes.iat[i, volumes.columns.get_loc("duplicate_of")] = other
        fails.append(
            (r.volume_id, r.path, "ingest", "duplicate_content",
             f"identical file content (sha256 {r.sha256[:12]}…) to volume {other!r}; kept, not dropped")
        )
    return volumes, failures_frame(fails, sites=zip(volumes["volume_id"], volumes["site"]))


def combine_ingest(volume_parts, failure_parts, sheet_failures=None):
    """Concatenate shard tables, then add duplicate-content rows: the cohort-level tables."""
    vols = [v for v in volume_parts if len(v)]
    volumes = pd.concat(vols, ignore_index=True) if vols else pd.DataFrame(columns=list(VOLUME_COLUMNS))
    volumes, dup_fails = mark_duplicate_content(volumes)
    parts = [f for f in [sheet_failures, *failure_parts, dup_fails] if f is not None and len(f)]
    failures = pd.concat(parts, ignore_index=True) if parts else failures_frame()
    return volumes, failures


def ingest(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_mem_mb: float = 4096.0,
    n_jobs: int = 1,
    site_column: str | None = "site",
    site_constant: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Whole ingest in one process (the ``artifactqc ingest`` command); writes both tables to ``out_dir``."""
    from .provenance import write_parquet

    cohort = load_cohort(source, site_column=site_column, site_constant=site_constant)
    valid, sheet_fails = split_valid(cohort)
    vols, fails = ingest_rows(valid, max_mem_mb=max_mem_mb, n_jobs=n_jobs)
    volumes, failures = combine_ingest([vols], [fails], sheet_fails)
    out = Path(out_dir)
    write_parquet(volumes, out / "volumes.parquet", COLUMN_DOCS, {"source": str(source)})
    write_parquet(failures, out / "failures.parquet", COLUMN_DOCS, {"source": str(source)})
    return volumes, failures


def validate_columns(df: pd.DataFrame, schema: dict, source: str = "cohort") -> None:
    """Check a cohort frame against the sheet JSON schema, column-wise (fast for 100,000 rows).

    Implements the keywords the sheet schema uses (required, type string, pattern, enum, minLength);
    any other keyword in a column's schema is an error here, so the schema cannot silently outgrow
    this check. Raises :class:`CohortError` naming the column, the first bad lines and values.
    """
    known = {"type", "pattern", "enum", "minLength", "description"}
    missing = [c for c in schema.get("required", []) if c not in df.columns]
    if missing:
        raise CohortError(f"{source}: missing required column(s) {missing}")
    for col, rules in schema.get("properties", {}).items():
        unknown = set(rules) - known
        if unknown:
            raise NotImplementedError(f"sheet schema keyword(s) {sorted(unknown)} for {col!r} are not checked")
        if col not in df.columns:
            continue
        values = df[col].astype(str)
        bad = pd.Series(False, index=df.index)
        if "pattern" in rules:
            bad |= ~values.str.contains(rules["pattern"], regex=True)
        if "enum" in rules:
            bad |= ~values.isin(rules["enum"])
        if "minLength" in rules:
            bad |= values.str.len() < rules["minLength"]
        if bad.any():
            first = [(int(i) + 2, v) for i, v in zip(np.flatnonzero(bad)[:5], values[bad][:5])]
            allowed = f"one of {rules['enum']}" if "enum" in rules else f"matching {rules.get('pattern', 'non-empty')}"
            raise CohortError(
                f"{source}: column {col!r} must be {allowed}; {int(bad.sum())} bad value(s), first (line, value): {first}"
            )
