# Scoring: one job per site shard (cohort.shard_size volumes, up to twice that in a site's last
# shard; the encoder loaded once per job), the density flow fit on a frozen reference manifest,
# flags, and the cohort tables.
# A new site runs only its own shards and the cohort gather: the encoder and the flow are tied to
# their manifests and are refit only under a new model.id / flow.id. A flow is fitted on one encoder's
# latents: its folder is results/flows/<model.id>/<flow.id>/, fit_flow takes the encoder's files as input
# and records their id and sha256 in flow.json, and density_shard refuses rows scored by another encoder.


rule score_shard:
    input:
        volumes=rules.ingest_shard.output.volumes,
        failures=rules.ingest_shard.output.failures,
        model=model_files(),
    output:
        rows="results/scores/raw/site={site}/part-{part}.parquet",
        failures="results/scores/raw/site={site}/failures-{part}.parquet",
    params:
        model=scoring_model(),
        rows=shard_rows,
        batch_size=config["score"]["batch_size"],
        device=config["score"]["device"],
        planes=config["score"]["planes"],
    log:
        "logs/score/site={site}/part-{part}.log",
    benchmark:
        "results/benchmarks/score/site={site}/part-{part}.tsv"
    threads: config["score"]["threads"]
    resources:
        mem_mb=mem_per_attempt(config["score"]["mem_mb"]),
        runtime=shard_runtime(config["score"]["runtime"]),
        gpu=config["score"]["gpu"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/score_shard.py"


rule reference_manifest:
    input:
        frozen_input(rules.ingest.output.volumes),
    output:
        "results/flows/{model_id}/{flow_id}/reference.tsv",
    params:
        explicit=config["flow"]["reference"],
    log:
        "logs/flows/{model_id}/{flow_id}/reference.log",
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/reference_manifest.py"


rule fit_flow:
    input:
        reference=rules.reference_manifest.output[0],
        scores=reference_score_shards,
        model=model_files(),
    output:
        weights="results/flows/{model_id}/{flow_id}/flow.safetensors",
        meta="results/flows/{model_id}/{flow_id}/flow.json",
    params:
        fit=config["flow"]["fit"],
    log:
        "logs/flows/{model_id}/{flow_id}/fit.log",
    benchmark:
        "results/benchmarks/flows/{model_id}/{flow_id}.tsv"
    threads: 2
    resources:
        mem_mb=mem_per_attempt(4000),
        runtime=60,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/fit_flow.py"


rule density_shard:
    input:
        rows=rules.score_shard.output.rows,
        flow=flow_files(),
    output:
        "results/scores/site={site}/part-{part}.parquet",
    params:
        taus=config["flags"]["taus"],
        rule=config["flags"]["rule"],
        score_threshold=config["flags"]["score_threshold"],
        config_sha256=scoring_config_sha256(),
    log:
        "logs/density/site={site}/part-{part}.log",
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/density_shard.py"


# The site-aware score (score_site: robust z within the site's reference volumes, pooled for sites
# with fewer than site_score.min_reference) is computed here, not per shard: it needs every shard of
# a site, and a table operation at the gather lets a new site's delivery run only its own shards
# (the other sites' score_site statistics come from the frozen reference manifest, so they do not
# move). Changing site_score.* reruns only this rule.
rule cohort_scores:
    input:
        parts=shard_files(rules.density_shard.output[0]),
        failures=shard_files(rules.score_shard.output.failures),
        # a plain edge from ingest to the cohort table: whenever ingest reruns, the table is looked at (and
        # every ingested volume must have a row), even though the frozen manifests behind ingest's
        # ancient() edges are not (see "frozen manifests and reruns" in common.smk)
        volumes=rules.ingest.output.volumes,
        # the frozen flow reference (a plain edge, like every edge downstream of a frozen manifest)
        reference=expand(
            rules.reference_manifest.output[0], model_id=config["model"]["id"], flow_id=config["flow"]["id"]
        ),
    output:
        parquet="results/scores/cohort.parquet",
        tsv="results/scores/cohort.tsv",
        failures="results/scores/failures.parquet",
    params:
        per_site=config["flow"]["per_site"],
        min_site_reference=config["flow"]["min_site_reference"],
        site_score=config["site_score"],
        rule=config["flags"]["rule"],
        score_threshold=config["flags"]["score_threshold"],
    log:
        "logs/score/cohort.log",
    resources:
        mem_mb=mem_per_attempt(4000),
        runtime=20,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/cohort_scores.py"
