"""Logging set-up for workflow scripts: everything, tracebacks included, goes to the rule's log."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def to_file(path: str) -> logging.Logger:
    """Send logging and stderr (uncaught tracebacks, warnings) to ``path``; return the root logger."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", buffering=1)
    sys.stderr = stream
    logging.basicConfig(
        stream=stream,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)
    return logging.getLogger()


def limit_threads(n: int) -> None:
    """Keep a job's native libraries within its ``threads:`` (ITK/ANTs, OpenMP, BLAS, torch).

    ITK (antspyx N4, Atropos) otherwise starts one thread per core, so two 1-thread N4 jobs on a 2-core
    machine run four threads and starve each other. Call before the first use of those libraries.
    """
    n = max(1, int(n))
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
