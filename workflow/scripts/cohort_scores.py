"""Gather the scored shards into the cohort table, its TSV export and the scoring failures."""

import pandas as pd

from artifactqc import runlog, shards, sitescore
from artifactqc.cohort import COLUMN_DOCS as INGEST_DOCS
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
cohort = shards.gather(
    [pd.read_parquet(p) for p in snakemake.input.parts],
    per_site=snakemake.params.per_site,
    min_site_reference=snakemake.params.min_site_reference,
    ingested=pd.read_parquet(snakemake.input.volumes, columns=["volume_id"]),
    site_score=sitescore.gather_options(
        snakemake.params.site_score,
        snakemake.input.reference[0],
        rule=snakemake.params.rule,
        score_threshold=snakemake.params.score_threshold,
    ),
)
fails = pd.concat([pd.read_parquet(p) for p in snakemake.input.failures], ignore_index=True)
write_parquet(cohort, snakemake.output.parquet, shards.COLUMN_DOCS)
shards.export_tsv(cohort, snakemake.output.tsv)
write_parquet(fails, snakemake.output.failures, INGEST_DOCS)
log.info("cohort: %d rows, %d flagged, %d failed", len(cohort), int(cohort["flagged"].sum()), int((cohort.status != "ok").sum()))
