"""The demo's known labels as a ratings file (artifactqc.qc.ratings.labels_to_ratings)."""

from pathlib import Path

from artifactqc import demo, runlog
from artifactqc.qc import ratings as aq_ratings

log = runlog.to_file(snakemake.log[0])
p = snakemake.params
ratings = aq_ratings.labels_to_ratings(
    demo.demo_sheet(p.spec, Path(p.root).resolve()), p.fail_values, p.pass_values,
    rater="demo ground truth", time="2026-01-01T00:00:00Z",
)
ratings.to_csv(snakemake.output[0], sep="\t", index=False)
log.info("demo ratings: %d volumes (%d exclude)", len(ratings), int((ratings["rating"] == "exclude").sum()))
