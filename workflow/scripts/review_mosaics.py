"""Mosaics of the scorer's slices for one ingest shard (artifactqc.report.review.shard_mosaics)."""

import os

import pandas as pd

from artifactqc import runlog
from artifactqc.report import review

log = runlog.to_file(snakemake.log[0])
runlog.limit_threads(snakemake.threads)
p = snakemake.params
mos = review.shard_mosaics(
    pd.read_parquet(snakemake.input.volumes),
    os.path.dirname(snakemake.input.model[0]),
    per_axis=p.per_axis,
    tile_px=p.tile_px,
    quality=p.quality,
    max_mem_mb=p.max_mem_mb,
)
mos.to_parquet(snakemake.output[0], index=False)
log.info("mosaics: %d drawn, %d failed", int((mos["error"] == "").sum()), int((mos["error"] != "").sum()))
