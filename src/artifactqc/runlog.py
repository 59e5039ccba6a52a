"""Logging set-up for workflow scripts: everything, tracebacks included, goes to the rule's log."""

from __future__ import annotations

import logging
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
