"""Write the review page results/review/index.html (artifactqc.report.review.write_review_page)."""

import pandas as pd

from artifactqc import runlog
from artifactqc.report import review

log = runlog.to_file(snakemake.log[0])
p = snakemake.params
review.write_review_page(
    pd.read_parquet(snakemake.input.scores),
    [pd.read_parquet(m) for m in snakemake.input.mosaics],
    snakemake.input.rulers,
    snakemake.output[0],
    threshold=p.threshold,
    near_margin=p.near_margin,
    title=p.title,
    storage_key=p.storage_key,
)
