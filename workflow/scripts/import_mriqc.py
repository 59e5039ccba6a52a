"""Import existing MRIQC results and join them onto the ingested volumes (mriqc_status per volume)."""

import pandas as pd

from artifactqc import runlog
from artifactqc.qc import mriqc
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
vols = pd.read_parquet(snakemake.input.volumes)
found = mriqc.read_mriqc(list(snakemake.input.results))
keep = ["volume_id", "path", "contrast"] + (["bids_name"] if "bids_name" in vols else [])
joined = mriqc.join_mriqc(vols[keep], found)
write_parquet(joined, snakemake.output[0], mriqc.COLUMN_DOCS)
log.info("MRIQC rows read: %d; volumes: %s", len(found), joined["mriqc_status"].value_counts().to_dict())
