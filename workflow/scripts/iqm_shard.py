"""artifactqc's MRIQC-style IQMs of the readable volumes of one ingest shard."""

import pandas as pd

from artifactqc import runlog
from artifactqc.qc import iqm
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
runlog.limit_threads(snakemake.threads)
vols = pd.read_parquet(snakemake.input.volumes)
table = iqm.iqm_table(vols["path"], vols["contrast"].astype(str), ids=vols["volume_id"], use_n4=snakemake.params.use_n4)
write_parquet(table, snakemake.output[0], iqm.COLUMN_DOCS,
              {"site": snakemake.wildcards.site, "part": snakemake.wildcards.part})
log.info("IQMs of %d volumes (%d failed)", len(table), int((table.status != "ok").sum()))
