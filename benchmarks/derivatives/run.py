"""BIDS-derivatives export at cohort scale: first write, an unchanged rerun, and a new site's delivery.

For each N (default 10,000 and 100,000) this builds a cohort table as rule cohort_scores writes it (BIDS names
over 12 sites, half the subjects with a session, one T2w for every fourth subject, 1 % failed volumes), then
times :func:`artifactqc.derivatives.write_derivatives` three times in a fresh folder:

1. first export (every file written);
2. the same table again (nothing may be written: write-if-changed);
3. a new site of N/10 volumes appended (only its JSONs and the group tables may be written).

It checks the counts of written files and records wall seconds and the number of files. Results:
``results.json`` / ``results.md`` beside this script::

    .venv/bin/python benchmarks/derivatives/run.py
    .venv/bin/python benchmarks/derivatives/run.py --sizes 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from artifactqc.derivatives import write_derivatives

HERE = Path(__file__).resolve().parent
HEADS = ("noise", "ghosting", "motion", "bias", "resolution")


def cohort_table(n: int, sites: list[str], seed: int) -> pd.DataFrame:
    """n scored rows spread over ``sites``, with BIDS names as the BIDS discovery gives them."""
    rng = np.random.default_rng(seed)
    site = np.array(sites)[np.arange(n) % len(sites)]
    rows = []
    for i in range(n):
        sub = f"{site[i]}{i:06d}"
        ses = "_ses-1" if i % 2 else ""
        suffix = "T2w" if i % 4 == 3 else "T1w"
        rows.append((f"sub-{sub}{ses}_{suffix}", site[i], sub, ses[5:], suffix))
    df = pd.DataFrame(rows, columns=["volume_id", "site", "subject", "session", "contrast"])
    df["bids_name"] = df["volume_id"]
    df["path"] = "/data/bids/" + df["volume_id"] + ".nii.gz"
    df["status"], df["error"] = "ok", ""
    df["score"] = rng.gamma(2.0, 0.3, n)
    for h in HEADS:
        df[f"severity_{h}"] = rng.uniform(size=n)
    df["log_density"] = rng.normal(size=n)
    df["density_pct"] = rng.uniform(0, 100, n)
    df["density_pct_site"] = rng.uniform(0, 100, n)
    df["pct_scope"] = "site"
    df["flag_tau5"], df["flag_tau3"] = df.density_pct < 5, df.density_pct < 3
    df["flagged"] = (df.score > 1) | df.flag_tau5
    for c in ("input_sha256", "model_sha256", "flow_sha256", "config_sha256"):
        df[c] = [f"{rng.integers(2**63):064x}" for _ in range(n)] if c == "input_sha256" else "ab" * 32
    df["model_id"], df["flow_id"], df["artifactqc_version"], df["code_version"] = "m1", "f1", "0.1.0", "0.1.0+g0"
    failed = rng.choice(n, max(1, n // 100), replace=False)
    df.loc[failed, ["status", "error"]] = ["failed", "ingest: truncated: cut off"]
    df.loc[failed, ["score", "log_density", "density_pct"]] = np.nan
    return df


def timed(scores: pd.DataFrame, out: Path) -> tuple[float, pd.DataFrame]:
    t0 = time.perf_counter()
    index = write_derivatives(scores, out)
    return time.perf_counter() - t0, index


def run_size(n: int, workdir: Path) -> dict:
    base = cohort_table(n, [f"site{k:02d}" for k in range(12)], seed=n)
    new = cohort_table(max(1, n // 10), ["siteNEW"], seed=n + 1)
    out = workdir / f"n{n}"
    first, idx1 = timed(base, out)
    again, idx2 = timed(base, out)
    grown, idx3 = timed(pd.concat([base, new], ignore_index=True), out)
    written3 = idx3[idx3.written]
    assert int(idx1.written.sum()) == len(idx1), "first export must write every file"
    assert int(idx2.written.sum()) == 0, "an unchanged rerun must write nothing"
    assert set(written3.loc[written3.kind == "sidecar", "volume_id"]) == set(new.volume_id)
    assert set(written3.kind) <= {"sidecar", "group", "description"}
    shutil.rmtree(out)
    return {"n": n, "files": len(idx1), "first_s": round(first, 1), "unchanged_s": round(again, 1),
            "new_site_volumes": len(new), "new_site_s": round(grown, 1), "new_site_written": len(written3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="aq-deriv-") as tmp:
        results = [run_size(n, Path(tmp)) for n in args.sizes]
    meta = {"platform": platform.platform(), "cpus": __import__("os").cpu_count()}
    (HERE / "results.json").write_text(json.dumps({"results": results, **meta}, indent=2) + "\n")
    lines = ["| N | files | first export | unchanged rerun | new site (volumes) | new site: run | files written |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['n']:,} | {r['files']:,} | {r['first_s']} s | {r['unchanged_s']} s | "
                     f"{r['new_site_volumes']:,} | {r['new_site_s']} s | {r['new_site_written']:,} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
