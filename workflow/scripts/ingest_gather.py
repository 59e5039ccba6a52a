"""Gather shard tables into the cohort's volumes.parquet and failures.parquet."""

import pandas as pd

from artifactqc import cohort, runlog
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
volumes, failures = cohort.combine_ingest(
    [pd.read_parquet(p) for p in snakemake.input.volumes],
    [pd.read_parquet(p) for p in snakemake.input.failures],
    pd.DataFrame(snakemake.params.sheet_failures, columns=list(cohort.FAILURE_COLUMNS)).astype(str),
)
write_parquet(volumes, snakemake.output.volumes, cohort.COLUMN_DOCS)
write_parquet(failures, snakemake.output.failures, cohort.COLUMN_DOCS)
log.info("%d volumes ingested, %d failures rows", len(volumes), len(failures))
