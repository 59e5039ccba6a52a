"""Score one ingest shard with the encoder (loaded once)."""

import os

import pandas as pd

from artifactqc import runlog, shards
from artifactqc.cohort import COLUMN_DOCS as INGEST_DOCS
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
rows, fails = shards.score_shard(
    pd.read_parquet(snakemake.input.volumes),
    pd.read_parquet(snakemake.input.failures),
    os.path.dirname(snakemake.input.model[0]),
    batch_size=snakemake.params.batch_size,
    device=snakemake.params.device,
    planes=snakemake.params.planes,
    threads=snakemake.threads,
    sheet_rows=pd.DataFrame(snakemake.params.rows),
)
meta = {"site": snakemake.wildcards.site, "part": snakemake.wildcards.part}
write_parquet(rows, snakemake.output.rows, shards.COLUMN_DOCS, meta)
write_parquet(fails, snakemake.output.failures, INGEST_DOCS, meta)
log.info("scored %d volumes, %d failed at scoring", int((rows.status == "ok").sum()), len(fails))
