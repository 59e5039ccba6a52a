"""Evaluate score > threshold, the tau flags, `flagged`, the score and the IQMs against the manual labels."""

from pathlib import Path

import pandas as pd

from artifactqc import runlog
from artifactqc.report import figures, stage

log = runlog.to_file(snakemake.log[0])
p = snakemake.params
table, curves = stage.evaluate_labels(
    pd.read_parquet(snakemake.input.scores),
    p.fail_values,
    p.pass_values,
    taus=p.taus,
    threshold=p.threshold,
    n_boot=p.n_boot,
    seed=p.seed,
    iqm_tables=[pd.read_parquet(t) for t in snakemake.input.iqms],
)
table.to_parquet(snakemake.output.table, index=False)
Path(snakemake.output.markdown).write_text(stage.label_markdown(table))
figures.plot_roc_curves(curves, snakemake.output.roc, title="Flags and score against the manual labels")
log.info("label evaluation:\n%s", table.to_string())
