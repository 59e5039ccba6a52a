"""Atomic file writes: a file that exists under its final name is complete.

A job killed while writing (``kill -9``, a node lost under SLURM) leaves at most a hidden temporary file
beside the target, never a truncated target. Snakemake then finds the output missing and reruns the job,
instead of handing a half-written table to the next one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; on success it is renamed to ``path`` (atomic on
    POSIX), on an exception it is removed and the target left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tsv(df, path: str | os.PathLike, **kwargs) -> None:
    """``df.to_csv(path, sep='\\t', index=False, **kwargs)``, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, **kwargs)
