"""N4 bias-field correction of one training volume."""

from artifactqc import runlog
from artifactqc.preprocess import n4

log = runlog.to_file(snakemake.log[0])
runlog.limit_threads(snakemake.threads)
summary = n4.n4_file(
    snakemake.input[0],
    snakemake.output.volume,
    bias_path=snakemake.output.bias,
    max_mem_mb=snakemake.params.max_mem_mb,
    mask_method=snakemake.params.mask_method,
    **snakemake.params.settings,
)
log.info("n4: %s", summary)
