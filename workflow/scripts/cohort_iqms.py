"""Gather the per-shard IQM tables into results/iqm/cohort.parquet."""

import pandas as pd

from artifactqc import runlog
from artifactqc.qc import iqm
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
parts = [pd.read_parquet(p) for p in snakemake.input]
table = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else parts[0]
write_parquet(table, snakemake.output[0], iqm.COLUMN_DOCS)
log.info("cohort IQMs: %d volumes", len(table))
