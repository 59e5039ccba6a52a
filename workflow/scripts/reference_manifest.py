"""Freeze the flow's reference manifest: an explicit list from config, or every ingested volume now."""

from artifactqc import runlog, shards

runlog.to_file(snakemake.log[0])
shards.write_reference_manifest(snakemake.input[0], snakemake.output[0], explicit=snakemake.params.explicit or None)
