# The browser review page (results/review/index.html): one static, self-contained file listing the
# volumes in review order with the scorer's own slices, scores, severities, density flags and image
# rulers; ratings made in it are exported as a TSV for labels.ratings. Mosaics are drawn per ingest
# shard (one job per shard, like scoring), so new ratings rebuild only the page.


rule review_mosaics:
    input:
        volumes=rules.ingest_shard.output.volumes,
        model=model_files(),
    output:
        "results/review/mosaics/site={site}/part-{part}.parquet",
    params:
        per_axis=config["review"]["per_axis"],
        tile_px=config["review"]["tile_px"],
        quality=config["review"]["quality"],
        max_mem_mb=config["ingest"]["max_mem_mb"],
    log:
        "logs/review/mosaics/site={site}/part-{part}.log",
    benchmark:
        "results/benchmarks/review/mosaics/site={site}/part-{part}.tsv"
    threads: 1
    resources:
        mem_mb=mem_per_attempt(config["review"]["mem_mb"]),
        runtime=shard_runtime(config["review"]["runtime"]),
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/review_mosaics.py"


rule review:
    input:
        scores=rated_scores(),
        mosaics=shard_files(rules.review_mosaics.output[0]),
        rulers=rules.report_figures.output.rulers,
    output:
        report(
            "results/review/index.html",
            caption="../report/review.rst",
            category="7. Review",
        ),
    params:
        threshold=config["flags"]["score_threshold"],
        near_margin=config["review"]["near_margin"],
        title=config["review"]["title"],
        storage_key=config["review"]["storage_key"],
    log:
        "logs/review/page.log",
    benchmark:
        "results/benchmarks/review/page.tsv"
    threads: 1
    resources:
        mem_mb=mem_per_attempt(config["review"]["mem_mb"]),
        runtime=config["review"]["runtime"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/review_page.py"
