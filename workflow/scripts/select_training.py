"""Training-set selection (checkpoint training_selection) and the training manifest (rule select_training)."""

from pathlib import Path

from artifactqc import runlog
from artifactqc.preprocess import selection

log = runlog.to_file(snakemake.log[0])
if snakemake.rule == "training_selection":
    n = selection.select_training_file(snakemake.input.volumes, snakemake.output[0], **snakemake.params.criteria)
    log.info("selected %d volumes for training -> %s", n, snakemake.output[0])
else:
    done = {Path(p).name[: -len(".nii.gz")]: p for p in snakemake.input.volumes}
    n = selection.training_manifest(snakemake.input.selection, done, snakemake.output[0])
    log.info("training manifest: %d preprocessed volumes -> %s", n, snakemake.output[0])
