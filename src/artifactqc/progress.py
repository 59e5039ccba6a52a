"""Progress of long loops (scoring, ingest, training, IQMs): a bar on a terminal, periodic log lines elsewhere.

One helper for every long command. On a terminal (``sys.stderr`` is a TTY) a tqdm bar shows the count, the
rate and the ETA. Anywhere else (a SLURM job log, a pipe, a workflow rule's log) one INFO line through the
``artifactqc.progress`` logger every ``every`` items (and one at the end), so a log of 100,000 volumes holds a
few hundred progress lines instead of 100,000. :func:`configure` (the CLI's ``--quiet`` and
``--progress-every``) turns it off or sets ``every``; the environment variable ``ARTIFACTQC_PROGRESS_EVERY``
sets the default ``every`` (100).

    for path in track(paths, desc="score", unit="volume"):
        ...

    with Progress(total=epochs * steps, desc="train", unit="step") as bar:
        ...; bar.update()
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta
from typing import Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_EVERY = "ARTIFACTQC_PROGRESS_EVERY"
DEFAULT_EVERY = 100

_settings: dict = {"quiet": False, "every": None}


def configure(*, quiet: bool | None = None, every: int | None = None) -> None:
    """Process-wide settings: ``quiet`` turns progress off; ``every`` = items between log lines off a terminal."""
    if quiet is not None:
        _settings["quiet"] = bool(quiet)
    if every is not None:
        if int(every) < 1:
            raise ValueError(f"progress every must be >= 1, got {every}")
        _settings["every"] = int(every)


def log_every() -> int:
    """Items between two progress lines off a terminal: :func:`configure`, else $ARTIFACTQC_PROGRESS_EVERY, else 100."""
    if _settings["every"]:
        return _settings["every"]
    env = os.environ.get(ENV_EVERY, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            log.warning("ignoring %s=%r (not an integer)", ENV_EVERY, env)
    return DEFAULT_EVERY


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds))))


class Progress:
    """Count done items of a known (or unknown) total; show a bar on a terminal, log lines elsewhere."""

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "item"):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._t0 = time.perf_counter()
        self._bar = None
        self._redirect = None
        self._next_line = log_every()
        self.mode = "off" if _settings["quiet"] else ("bar" if _isatty(sys.stderr) else "lines")
        if self.mode == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log records (warnings about one bad volume) print above the bar instead of breaking it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            # a terminal that reports no width (some pseudo-terminals) gets 80 columns, not an empty bar
            width = _width(sys.stderr)
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, smoothing=0.1,
                             dynamic_ncols=width > 0, ncols=None if width > 0 else 80)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self.n >= self._next_line:
            self._line()
            every = log_every()
            self._next_line = (self.n // every + 1) * every

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._t0
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            log.info("%s: %d/%d %ss (%.0f%%), %.3g %s/s, elapsed %s, ETA %s", self.desc, self.n, self.total, self.unit,
                     100.0 * self.n / self.total, rate, self.unit, _duration(elapsed),
                     _duration(eta) if eta == eta else "?")
        else:
            log.info("%s: %d %ss, %.3g %s/s, elapsed %s", self.desc, self.n, self.unit, rate, self.unit,
                     _duration(elapsed))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._redirect.__exit__(None, None, None)
        elif self.mode == "lines" and self.n and self.n % log_every():
            self._line()  # the last count, unless the periodic line just said it
        self.mode = "closed" if self.mode != "off" else "off"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _width(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def track(iterable: Iterable[T], total: int | None = None, *, desc: str = "", unit: str = "item") -> Iterator[T]:
    """Yield the items of ``iterable`` while showing progress (``total`` defaults to ``len(iterable)``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc=desc, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update()
