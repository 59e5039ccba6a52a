"""Super-resolve one N4-corrected training volume when it has thick slices (else copy it)."""

import json

from artifactqc import runlog
from artifactqc.preprocess import superres

log = runlog.to_file(snakemake.log[0])
summary = superres.superres_file(
    snakemake.input[0],
    snakemake.output.volume,
    ratio=snakemake.params.ratio,
    max_mem_mb=snakemake.params.max_mem_mb,
    **snakemake.params.settings,
)
with open(snakemake.output.summary, "w") as fh:
    json.dump(summary, fh, indent=2)
log.info("superres: %s", summary)
