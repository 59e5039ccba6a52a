"""Train the artifact encoder on the training manifest (or the ok rows of the ingested volumes)."""

import os

from artifactqc import runlog
from artifactqc.training.loop import train_from_cli

log = runlog.to_file(snakemake.log[0])
metrics = train_from_cli(
    [],
    snakemake.input.manifest,
    os.path.dirname(snakemake.output.weights),
    demo=snakemake.params.demo,
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    model_id=snakemake.wildcards.model_id,
    threads=snakemake.threads,
    **snakemake.params.overrides,
)
log.info("trained %s: best epoch %s, val loss %.4f", snakemake.wildcards.model_id, metrics["best_epoch"],
         metrics["best_val_loss"])
