"""Fit the few-label calibration and write results/calibration/ (artifactqc.qc.calibrate.write_calibration)."""

import sys

import pandas as pd

from artifactqc import runlog
from artifactqc.qc import calibrate
from artifactqc.qc.ratings import RatingsError
from artifactqc.io import sha256_file

log = runlog.to_file(snakemake.log[0])
p = snakemake.params
inp = snakemake.input
try:
    res = calibrate.write_calibration(
        pd.read_parquet(inp.scores),
        list(inp.ratings),
        dict(snakemake.output.items()),
        fail_values=p.fail_values,
        pass_values=p.pass_values,
        iqm_tables=[pd.read_parquet(t) for t in inp.iqms],
        provenance={path: sha256_file(path) for path in [inp.scores, *inp.ratings, *inp.iqms]},
        n_boot=p.n_boot,
        seed=p.seed,
        **p.fit,
    )
except RatingsError as exc:
    log.error("%s", exc)
    print(f"calibrate: bad ratings file:\n{exc}", file=sys.__stderr__)
    sys.exit(1)
log.info("calibration %s", res["status"])
