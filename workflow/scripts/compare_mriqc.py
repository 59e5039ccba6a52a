"""MRIQC comparison (Table-2 analogue) from the per-contrast simulated sets."""

from pathlib import Path

import pandas as pd

from artifactqc import runlog
from artifactqc.qc import compare
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
rows, table, markdown = compare.summarise(pd.read_parquet(p) for p in snakemake.input)
write_parquet(rows, snakemake.output.rows, compare.ROW_DOCS)
write_parquet(table, snakemake.output.table, compare.TABLE_DOCS)
Path(snakemake.output.markdown).write_text(markdown)
log.info("MRIQC comparison on %d simulated volumes:\n%s", len(rows), markdown)
