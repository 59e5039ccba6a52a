# Ingest: validate, checksum and summarise every volume, one job per site shard (at most
# cohort.shard_size volumes), then gather the cohort tables. A bad volume becomes a failures row
# with its reason; the run carries on. Adding a site runs only that site's shards and the gather.


rule ingest_shard:
    input:
        cohort_prerequisites,
    output:
        volumes="results/ingest/site={site}/part-{part}.parquet",
        failures="results/ingest/site={site}/failures-{part}.parquet",
    params:
        rows=shard_rows,
        max_mem_mb=config["ingest"]["max_mem_mb"],
    log:
        "logs/ingest/site={site}/part-{part}.log",
    benchmark:
        "results/benchmarks/ingest/site={site}/part-{part}.tsv"
    threads: config["ingest"]["threads"]
    resources:
        mem_mb=mem_per_attempt(config["ingest"]["mem_mb"]),
        runtime=shard_runtime(60),
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/ingest_shard.py"


rule ingest:
    input:
        volumes=shard_files(rules.ingest_shard.output.volumes),
        failures=shard_files(rules.ingest_shard.output.failures),
    output:
        volumes="results/cohort/volumes.parquet",
        failures="results/cohort/failures.parquet",
    params:
        sheet_failures=sheet_failure_rows,
    log:
        "logs/ingest/gather.log",
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=10,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/ingest_gather.py"
