"""Guards for long jobs that write a folder: never outlive the run that started them, never leave half a
model behind.

* :func:`exit_when_orphaned`: a job whose Snakemake process was killed (``kill -9`` on the scheduler, a
  closed terminal) exits within seconds instead of training on and writing into an output folder that the
  next run is already filling.
* :func:`staging_dir`: the job writes into a hidden folder inside its output folder; the files are moved
  into place (``os.replace``, the metadata file last) only when the job succeeded. A second writer of the
  same folder while the first is alive is an error naming its pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

#: Exit status of a job that stopped because the run that started it is gone.
ORPHANED_EXIT = 75


def _ppid_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watched_process(max_depth: int = 6) -> int:
    """The process whose death ends this job: the nearest ancestor running snakemake (the scheduler, or
    the per-job snakemake of a cluster job), else the parent."""
    pid = os.getpid()
    for _ in range(max_depth):
        ppid = _ppid_of(pid)
        if not ppid or ppid <= 1:
            break
        if "snakemake" in _cmdline(ppid):
            return ppid
        pid = ppid
    return os.getppid()


def exit_when_orphaned(interval: float = 2.0, on_exit=None) -> threading.Thread:
    """Start a daemon thread that ends this process (status :data:`ORPHANED_EXIT`) as soon as the process
    returned by :func:`watched_process` is gone. ``on_exit`` runs first (e.g. to remove a staging folder)."""
    watched = watched_process()

    def watch():
        while True:
            # a parent of 1 (init) means the run died before this job got here (imports take seconds)
            if watched <= 1 or not _alive(watched):
                log.error("the run that started this job (pid %d) is gone: stopping", watched)
                if on_exit is not None:
                    with contextlib.suppress(Exception):
                        on_exit()
                logging.shutdown()
                os._exit(ORPHANED_EXIT)
            time.sleep(interval)

    t = threading.Thread(target=watch, name="exit-when-orphaned", daemon=True)
    t.start()
    return t


class FolderBusy(RuntimeError):
    """Another live process is writing the same output folder."""


@contextlib.contextmanager
def staging_dir(out_dir: str | os.PathLike, last: tuple[str, ...] = ("model.json",)) -> Iterator[Path]:
    """Yields an empty hidden folder inside ``out_dir``; on success its files replace those of ``out_dir``
    (the names in ``last`` are moved last, so a reader that sees them sees the rest). On an exception, or
    when :func:`exit_when_orphaned` stops the job, nothing in ``out_dir`` changes.

    ``out_dir/.writer.pid`` names the writing process; if it names another process that is still alive,
    :class:`FolderBusy` is raised (a stale file from a killed job is replaced).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".writer.pid"
    if lock.exists():
        try:
            other = int(lock.read_text().split()[0])
        except (ValueError, IndexError):
            other = None
        if other and other != os.getpid() and _alive(other):
            raise FolderBusy(f"{out}: process {other} is still writing this folder ({_cmdline(other)[:120]!r}); "
                             f"it was probably orphaned by a killed run: stop it (kill {other}) and rerun")
    lock.write_text(f"{os.getpid()}\n")
    stage = out / f".partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        for name in [n for n in names if n not in last] + [n for n in last if n in names]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text().split()[0] == str(os.getpid()):
                lock.unlink()
