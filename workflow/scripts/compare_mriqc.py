"""MRIQC comparison (Table-2 analogue) on artifacts simulated onto the cohort's cleanest volumes."""

import os
from pathlib import Path

import pandas as pd

from artifactqc import compare, runlog
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
runlog.limit_threads(snakemake.threads)
p = snakemake.params
rows, table, markdown = compare.run_comparison(
    pd.read_parquet(snakemake.input.scores),
    os.path.dirname(snakemake.input.model[0]),
    exclude_paths=compare.training_paths(os.path.dirname(snakemake.input.model[0]), snakemake.input.training),
    artifacts=p.artifacts,
    severities=p.severities,
    per_contrast=p.per_contrast,
    seed=p.seed,
    use_n4=p.use_n4,
    device=p.device,
)
write_parquet(rows, snakemake.output.rows, compare.ROW_DOCS)
write_parquet(table, snakemake.output.table, compare.TABLE_DOCS)
Path(snakemake.output.markdown).write_text(markdown)
log.info("MRIQC comparison on %d simulated volumes:\n%s", len(rows), markdown)
