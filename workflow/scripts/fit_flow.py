"""Fit the RealNVP flow on the reference volumes' latents."""

import os

import pandas as pd

from artifactqc import runlog, shards

runlog.to_file(snakemake.log[0])
scores = pd.concat([pd.read_parquet(p) for p in snakemake.input.scores], ignore_index=True)
shards.fit_flow_for_reference(
    scores,
    snakemake.input.reference,
    snakemake.output.weights,
    flow_id=snakemake.wildcards.flow_id,
    model_dir=os.path.dirname(snakemake.input.model[0]),
    **snakemake.params.fit,
)
