"""Benchmark: discovery time of a generated BIDS tree (default 100,000 files) with artifactqc.cohort.

Usage: python benchmarks/bids_discovery/run.py [--files 100000] [--tmp DIR] [--out results.json]

The tree has sub-*/ses-{1,2}/anat with T1w/T2w/FLAIR NIfTIs, a JSON sidecar and a non-anatomical
file per session (5 files per session), plus participants.tsv. Files are empty: discovery reads
only directory listings. Reported: creation time, discovery time (cold-ish: first listing after
creation, and a second, warm listing), volumes found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from artifactqc.cohort import discover_bids

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _harness as H  # noqa: E402

FILES_PER_SESSION = ("T1w.nii.gz", "T1w.json", "T2w.nii.gz", "FLAIR.nii.gz", "dwi.nii.gz")


def make_tree(root: Path, n_files: int) -> int:
    n_sessions = n_files // len(FILES_PER_SESSION)
    n_subjects = n_sessions // 2
    with open(root / "participants.tsv", "w") as fh:
        fh.write("participant_id\tsite\n")
        for i in range(n_subjects):
            fh.write(f"sub-{i:06d}\tsite{i % 20:02d}\n")
    made = 1
    for i in range(n_subjects):
        for ses in (1, 2):
            anat = root / f"sub-{i:06d}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True)
            for suffix in FILES_PER_SESSION:
                (anat / f"sub-{i:06d}_ses-{ses}_{suffix}").touch()
                made += 1
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--tmp", default=None, help="where to build the tree (default: a temporary folder)")
    H.add_out_arg(ap, Path(__file__).with_name("results.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bids-bench-", dir=args.tmp))
    try:
        n, _, t_make = H.timed(make_tree, tmp, args.files)
        os.sync()
        df, _, t_first = H.timed(discover_bids, tmp)
        df2, _, t_second = H.timed(discover_bids, tmp)
        assert len(df) == len(df2)
        res = {
            "files": n,
            "volumes_found": len(df),
            "sites": int(df["site"].nunique()),
            "create_seconds": round(t_make, 2),
            "discover_seconds_first": round(t_first, 2),
            "discover_seconds_second": round(t_second, 2),
            "target_seconds": 30,
            "cpu_count": os.cpu_count(),
            "machine": platform.platform(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    H.write_json(args.out, res, indent=2, newline=True)


if __name__ == "__main__":
    main()
