"""Build the embedded demo cohort's volumes from the demo spec."""

from artifactqc import demo, runlog

log = runlog.to_file(snakemake.log[0])
sheet = demo.build_demo(snakemake.params.spec, snakemake.output[0], n_jobs=snakemake.threads)
log.info("demo cohort: %d volumes in %s", len(sheet), snakemake.output[0])
