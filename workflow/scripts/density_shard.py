"""Add log-density, percentiles, tau flags, the flagged column and provenance to one scored shard."""

import os

import pandas as pd

from artifactqc import runlog, shards
from artifactqc.provenance import write_parquet

runlog.to_file(snakemake.log[0])
out = shards.add_density(
    pd.read_parquet(snakemake.input.rows),
    os.path.dirname(snakemake.input.flow[0]),
    taus=snakemake.params.taus,
    rule=snakemake.params.rule,
    score_threshold=snakemake.params.score_threshold,
    config_sha256=snakemake.params.config_sha256,
)
write_parquet(out, snakemake.output[0], shards.COLUMN_DOCS, dict(snakemake.wildcards))
