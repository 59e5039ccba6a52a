"""Report figures and the per-site table from the cohort tables, the density flow and the encoder."""

import os

import pandas as pd

from artifactqc import runlog
from artifactqc.atomic import write_text
from artifactqc.report import stage
from artifactqc.sitescore import site_summary

log = runlog.to_file(snakemake.log[0])
runlog.limit_threads(snakemake.threads)
ruler = snakemake.params.ruler
scores = pd.read_parquet(snakemake.input.scores)
paths = stage.make_report_figures(
    scores,
    pd.read_parquet(snakemake.input.volumes),
    stage.failures_table(
        pd.read_parquet(snakemake.input.ingest_failures), pd.read_parquet(snakemake.input.score_failures)
    ),
    os.path.dirname(snakemake.input.flow[0]),
    os.path.dirname(snakemake.input.model[0]),
    overview=snakemake.output.overview,
    distributions=snakemake.output.distributions,
    latent=snakemake.output.latent,
    thumbnails_dir=snakemake.output.thumbnails,
    rulers_dir=snakemake.output.rulers,
    taus=snakemake.params.taus,
    threshold=snakemake.params.threshold,
    thumbnails_k=snakemake.params.thumbnails["k"],
    ruler_artifacts=ruler["artifacts"],
    ruler_severities=ruler["severities"],
    seed=ruler["seed"],
    device=snakemake.params.device,
    planes=snakemake.params.planes,
)
log.info("report figures: %s", {k: len(v) for k, v in paths.items()})
sites = site_summary(scores, score_threshold=snakemake.params.threshold)
write_text(snakemake.output.sites, stage.site_markdown(sites, snakemake.params.threshold))
log.info("per-site table: %d sites, site-wide review: %s", len(sites), sites.loc[sites.site_review, "site"].tolist())
