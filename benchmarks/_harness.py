"""Shared benchmark code: what more than one ``benchmarks/*/run.py`` needs and the package itself does not.

* Paths and data lookup: :data:`REPO`, :func:`use_package` (put ``src/`` on ``sys.path``), :func:`data_dir`
  (the development data folder ``../shared/data`` or ``--data``; exits with a clear message when absent).
* Argument defaults: :func:`add_data_arg`, :func:`add_threads_arg`, :func:`add_out_arg`,
  :func:`add_from_log_arg` — every benchmark spells ``--data``/``--threads``/``--out`` the same way.
* Timing: :func:`timed` (result, CPU seconds, wall seconds) and :class:`Stopwatch` (wall seconds of a step).
* Results: :func:`print_row` / :func:`rows_from_log` (one JSON line per measured row, so a killed run can be
  re-rendered with ``--from-log``), :func:`write_json`, :func:`write_lines` (results.md and friends),
  :func:`write_tsv`.
* :class:`PublishedEncoder` — the published artifact encoder (Hays et al.) re-implemented for the encoder
  benchmark's speed comparison only (no workflow path uses it, so it lives here, not in ``artifactqc``).

A benchmark imports this module after putting ``benchmarks/`` on ``sys.path``::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import _harness as H  # noqa: E402
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
#: The development data folder (README.md, MANIFEST.tsv, FIXTURES.txt) beside the checkout.
DEFAULT_DATA = REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------- paths, data
def use_package() -> None:
    """Import ``artifactqc`` from this checkout's ``src/`` even without an installed venv."""
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def data_dir(arg: str | Path | None = None, *, marker: str = "MANIFEST.tsv", what: str = "development data") -> Path:
    """The data folder (``arg``, or :data:`DEFAULT_DATA`); exits with a message naming where it looked when
    ``marker`` (a file below it) is missing."""
    d = Path(arg) if arg else DEFAULT_DATA
    if not (d / marker).is_file():
        sys.exit(f"{what} not found at {d} (no {marker}; pass --data DIR)")
    return d


# ------------------------------------------------------------------------------------------ arguments
def add_data_arg(ap, default: str | Path | None = DEFAULT_DATA) -> None:
    ap.add_argument("--data", default=None if default is None else str(default),
                    help=f"development data folder (default {DEFAULT_DATA})")


def add_threads_arg(ap, default: int | None = 1, help: str = "torch threads") -> None:
    ap.add_argument("--threads", type=int, default=default, help=help)


def add_out_arg(ap, default: str | Path) -> None:
    ap.add_argument("--out", default=str(default), help=f"where the results go (default {default})")


def add_from_log_arg(ap) -> None:
    ap.add_argument("--from-log", default=None, help="only rebuild the results files from the JSON rows of a log")


# --------------------------------------------------------------------------------------------- timing
def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float, float]:
    """``(fn(*args, **kwargs), CPU seconds of this process, wall seconds)``."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.process_time() - c0, time.perf_counter() - w0


class Stopwatch:
    """Wall seconds since creation: ``sw = Stopwatch(); ...; sw.seconds``."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


# -------------------------------------------------------------------------------------------- results
def print_row(row: dict, digits: int = 4) -> None:
    """One measured row as a JSON line on stdout (floats rounded), for :func:`rows_from_log`."""
    print(json.dumps({k: (round(v, digits) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def rows_from_log(path: str | Path, first_key: str = "volume") -> list[dict]:
    """The rows :func:`print_row` wrote to a log (lines starting with ``{"<first_key>"``)."""
    with open(path) as fh:
        return [json.loads(ln) for ln in fh if ln.startswith('{"' + first_key + '"')]


def write_json(path: str | Path, obj, *, newline: bool = False, **json_kwargs) -> Path:
    """``json.dumps(obj, **json_kwargs)`` to ``path`` (``newline``: end with a newline)."""
    path = Path(path)
    path.write_text(json.dumps(obj, **json_kwargs) + ("\n" if newline else ""))
    return path


def write_lines(path: str | Path, lines: list[str], *, newline: bool = False) -> Path:
    """Markdown (or any text) from lines joined by newlines (``newline``: end with one more)."""
    path = Path(path)
    path.write_text("\n".join(lines) + ("\n" if newline else ""))
    return path


def write_tsv(path: str | Path, df, float_format: str = "%.4f") -> Path:
    """A results table as TSV without the index."""
    df.to_csv(path, sep="\t", index=False, float_format=float_format)
    return Path(path)


# ----------------------------------------------------------------------------------- reference models
def _published_encoder_class():
    import torch.nn as nn

    class PublishedEncoder(nn.Module):
        """Re-implementation of the published architecture (Hays et al.) for speed comparison only.

        Two conv blocks without downsampling (3×3 conv, InstanceNorm, LeakyReLU, twice each; channels rising),
        a 1×1 conv reducing features, adaptive average pooling and ``abs`` for a non-negative score.
        """

        def __init__(self, c1: int = 16, c2: int = 32):
            super().__init__()

            def block(cin, cout):
                return [
                    nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01),
                ]

            self.net = nn.Sequential(*block(1, c1), *block(c1, c2), nn.Conv2d(c2, 1, 1), nn.AdaptiveAvgPool2d(1))

        def forward(self, x):
            return self.net(x).flatten(1)[:, 0].abs()

    return PublishedEncoder


def __getattr__(name: str):
    # PublishedEncoder is built on first use, so that benchmarks without torch do not import it
    if name == "PublishedEncoder":
        cls = globals()["PublishedEncoder"] = _published_encoder_class()
        return cls
    raise AttributeError(name)
