"""Write the BIDS-derivatives dataset (results/derivatives/artifactqc/) from the cohort tables."""

from pathlib import Path

import pandas as pd

from artifactqc import runlog
from artifactqc.derivatives import write_derivatives

log = runlog.to_file(snakemake.log[0])
out_dir = Path(snakemake.output.description).parent
iqms = pd.read_parquet(snakemake.input.iqms[0]) if snakemake.input.iqms else None
index = write_derivatives(pd.read_parquet(snakemake.input.scores), out_dir, iqms=iqms,
                          bids_root=snakemake.params.bids_root or None)
index.to_csv(snakemake.output.index, sep="\t", index=False)
