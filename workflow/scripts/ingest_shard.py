"""Ingest one site shard: rows come from params, tables go to the outputs."""

import pandas as pd

from artifactqc import cohort, runlog
from artifactqc.provenance import write_parquet

runlog.to_file(snakemake.log[0])
rows = pd.DataFrame(snakemake.params.rows)
volumes, failures = cohort.ingest_rows(rows, max_mem_mb=snakemake.params.max_mem_mb, n_jobs=snakemake.threads)
meta = {"site": snakemake.wildcards.site, "part": snakemake.wildcards.part}
write_parquet(volumes, snakemake.output.volumes, cohort.COLUMN_DOCS, meta)
write_parquet(failures, snakemake.output.failures, cohort.COLUMN_DOCS, meta)
