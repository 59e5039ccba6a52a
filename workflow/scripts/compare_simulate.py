"""Artifacts simulated onto the cleanest non-training volume(s) of one contrast: score and IQMs per rung."""

import os

import pandas as pd

from artifactqc import runlog
from artifactqc.qc import compare
from artifactqc.provenance import write_parquet

log = runlog.to_file(snakemake.log[0])
runlog.limit_threads(snakemake.threads)
p = snakemake.params
model_dir = os.path.dirname(snakemake.input.model[0])
rows = compare.simulate_contrast(
    pd.read_parquet(snakemake.input.scores),
    model_dir,
    snakemake.wildcards.contrast,
    exclude_paths=compare.training_paths(model_dir, snakemake.input.training),
    artifacts=p.artifacts,
    severities=p.severities,
    per_contrast=p.per_contrast,
    seed=p.seed,
    use_n4=p.use_n4,
    device=p.device,
    planes=p.planes,
)
write_parquet(rows, snakemake.output[0], compare.ROW_DOCS, {"contrast": snakemake.wildcards.contrast})
log.info("%s: %d simulated volumes", snakemake.wildcards.contrast, len(rows))
