"""Train the artifact encoder on the training manifest (staged, published atomically, stops with its run)."""

from artifactqc import runlog
from artifactqc.training.job import train_model_folder

log = runlog.to_file(snakemake.log[0])
metrics = train_model_folder(
    snakemake.input.manifest,
    snakemake.output.weights,
    demo=snakemake.params.demo,
    seed=snakemake.params.seed,
    device=snakemake.params.device,
    model_id=snakemake.wildcards.model_id,
    threads=snakemake.threads,
    **snakemake.params.overrides,
)
log.info("trained %s: best epoch %s, val loss %.4f (%s)", snakemake.wildcards.model_id, metrics["best_epoch"],
         metrics["best_val_loss"], metrics["stop_reason"])
