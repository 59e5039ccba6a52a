"""Progress of long CLI commands: a bar with rate and ETA on a terminal, one line per N volumes in a pipe,
nothing with --quiet. `artifactqc score --list` runs on development volumes (FIXTURES) with a tiny encoder."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from artifactqc import progress

from .conftest import save_tiny_model

ARTIFACTQC = Path(sys.executable).with_name("artifactqc")
N_VOLUMES = 5


@pytest.fixture(scope="module")
def score_args(tmp_path_factory, fixture_paths):
    tmp = tmp_path_factory.mktemp("progress")
    model = save_tiny_model(tmp / "model", meta={"model_id": "progress-test"})
    listing = tmp / "list.txt"
    listing.write_text("\n".join(str(p) for p in fixture_paths[:N_VOLUMES]) + "\n")
    return [str(ARTIFACTQC), "score", "--list", str(listing), "--model", str(model), "--out", str(tmp / "s.parquet"),
            "--device", "cpu", "--threads", "1"]


def run_in_pty(cmd: list[str], env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd`` with stdin/stdout/stderr on a pseudo-terminal, as in an interactive shell; its output and exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows x 120 columns
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(errors="replace")


def test_bar_with_rate_and_eta_on_a_terminal(score_args):
    code, out = run_in_pty(score_args)
    assert code == 0, out
    # tqdm's bar: "score: 100%|█████| 5/5 [00:03<00:00,  1.52volume/s]" (or s/volume when slower than one a second)
    final = re.findall(rf"score: +100%\|[^|]*\| {N_VOLUMES}/{N_VOLUMES} \[\d+:\d\d<\d+:\d\d, +[\d.]+(volume/s|s/volume)\]",
                       out)
    assert final, out[-3000:]
    assert re.search(rf"score: +\d+%\|[^|]*\| [1-{N_VOLUMES - 1}]/{N_VOLUMES} ", out), out[-3000:]  # it moved
    assert "volumes scored" in out and "artifactqc.progress" not in out  # no progress log lines on a terminal


def test_periodic_lines_in_a_pipe(score_args):
    res = subprocess.run([*score_args, "--progress-every", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "artifactqc.progress" in ln]
    counts = [int(re.search(r"score: (\d+)/5 volumes", ln).group(1)) for ln in lines]
    assert counts == [2, 4, 5], res.stderr  # every 2 volumes, then the end
    assert all(re.search(r"volume/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d", ln) for ln in lines), lines
    assert "\r" not in res.stderr and "%|" not in res.stderr  # no bar in a log file
    # the same through the environment variable (how a SLURM job script sets it)
    env = {**os.environ, progress.ENV_EVERY: "3"}
    res = subprocess.run(score_args, capture_output=True, text=True, timeout=300, env=env)
    assert re.findall(r"score: (\d+)/5 volumes", res.stderr) == ["3", "5"], res.stderr


def test_quiet_prints_no_progress(score_args):
    code, out = run_in_pty([*score_args, "--quiet"])
    assert code == 0, out
    assert "%|" not in out and "artifactqc.progress" not in out
    assert "5 volumes scored" in out


def test_lines_and_counts_without_a_terminal(caplog):
    progress.configure(every=4)
    try:
        with caplog.at_level(logging.INFO, logger="artifactqc.progress"):
            assert list(progress.track(range(10), desc="ingest", unit="volume")) == list(range(10))
        assert [r.getMessage().split(" volumes")[0] for r in caplog.records] == ["ingest: 4/10", "ingest: 8/10",
                                                                                  "ingest: 10/10"]
        caplog.clear()
        progress.configure(quiet=True)
        with caplog.at_level(logging.INFO, logger="artifactqc.progress"):
            list(progress.track(range(10), desc="ingest"))
        assert caplog.records == []
    finally:
        progress.configure(quiet=False)
        progress._settings["every"] = None
