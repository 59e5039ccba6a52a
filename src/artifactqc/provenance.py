"""Provenance: hashes, versions, run manifests and documented Parquet files.

Everything an auditor needs to say where a number came from: the SHA-256 of inputs, models and
the resolved config, the versions of artifactqc and its stack, and per-column descriptions stored
in each Parquet file's schema metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__

#: Packages whose versions go into every run manifest.
TRACKED_PACKAGES = (
    "artifactqc",
    "torch",
    "torchio",
    "antspyx",
    "numpy",
    "scipy",
    "nibabel",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "zuko",
    "safetensors",
    "matplotlib",
    "snakemake",
    "snakemake-executor-plugin-slurm",
)


def canonical_json(obj) -> str:
    """Deterministic JSON (sorted keys, no whitespace variation) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_sha256(config: dict) -> str:
    """Hash of a resolved config, independent of key order."""
    return sha256_text(canonical_json(config))


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_describe(path: str | os.PathLike | None = None) -> str:
    """``git describe --always --dirty`` of the source tree, or '' outside a checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def code_version() -> str:
    """artifactqc version, plus git describe when running from a checkout."""
    desc = git_describe()
    return f"{__version__}+g{desc}" if desc else __version__


def run_manifest(config: dict, **extra) -> dict:
    """What a run used: resolved config (and its hash), versions, host, Python, time."""
    return {
        "artifactqc_version": __version__,
        "code_version": code_version(),
        "config": config,
        "config_sha256": config_sha256(config),
        "packages": package_versions(),
        "python": sys.version,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def write_json(obj, path: str | os.PathLike) -> None:
    from .atomic import write_text

    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(
    df: pd.DataFrame, path: str | os.PathLike, column_docs: dict[str, str] | None = None, meta: dict | None = None
) -> None:
    """Write ``df`` with each column's description in the Arrow field metadata and ``meta`` in the schema's.

    Read the descriptions back with ``pyarrow.parquet.read_schema(path).field(name).metadata``.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    docs = column_docs or {}
    fields = [
        f.with_metadata({b"description": docs[f.name].encode()}) if f.name in docs else f for f in table.schema
    ]
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[b"artifactqc"] = canonical_json({"artifactqc_version": __version__, **(meta or {})}).encode()
    table = table.cast(pa.schema(fields, metadata=schema_meta))
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def column_descriptions(path: str | os.PathLike) -> dict[str, str]:
    """The per-column descriptions stored by :func:`write_parquet`."""
    schema = pq.read_schema(path)
    return {
        f.name: f.metadata[b"description"].decode() for f in schema if f.metadata and b"description" in f.metadata
    }
