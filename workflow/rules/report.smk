# Report: figures for `snakemake --report` (cohort overview, the per-site table, score distributions,
# latent plane with the density contours, thumbnails per site, image rulers per contrast) and, when the
# cohort sheet has a `label` column, the evaluation of the flags against those manual ratings.


rule report_figures:
    input:
        scores=rules.cohort_scores.output.parquet,
        score_failures=rules.cohort_scores.output.failures,
        volumes=rules.ingest.output.volumes,
        ingest_failures=rules.ingest.output.failures,
        flow=flow_files(),
        model=model_files(),
    output:
        overview=report(
            "results/report/cohort_overview.png",
            caption="../report/cohort_overview.rst",
            category="1. Cohort",
        ),
        sites=report(
            "results/report/sites.md",
            caption="../report/sites.rst",
            category="1. Cohort",
        ),
        distributions=report(
            "results/report/score_distributions.png",
            caption="../report/score_distributions.rst",
            category="2. Scores",
        ),
        latent=report(
            "results/report/latent_plane.png",
            caption="../report/latent_plane.rst",
            category="2. Scores",
        ),
        thumbnails=report(
            directory("results/report/thumbnails"),
            patterns=["{name}.png"],
            caption="../report/thumbnails.rst",
            category="3. Thumbnails",
        ),
        rulers=report(
            directory("results/report/rulers"),
            patterns=["{name}.png"],
            caption="../report/rulers.rst",
            category="4. Image rulers",
        ),
    params:
        taus=config["flags"]["taus"],
        threshold=config["flags"]["score_threshold"],
        thumbnails=config["report"]["thumbnails"],
        ruler=config["report"]["ruler"],
        device=config["score"]["device"],
        planes=config["score"]["planes"],
    log:
        "logs/report/figures.log",
    threads: 1
    resources:
        mem_mb=mem_per_attempt(config["report"]["mem_mb"]),
        runtime=config["report"]["runtime"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/report_figures.py"


rule iqm_shard:
    input:
        volumes=rules.ingest_shard.output.volumes,
    output:
        "results/iqm/site={site}/part-{part}.parquet",
    params:
        use_n4=config["iqm"]["use_n4"],
    log:
        "logs/iqm/site={site}/part-{part}.log",
    benchmark:
        "results/benchmarks/iqm/site={site}/part-{part}.tsv"
    threads: config["iqm"]["threads"]
    resources:
        mem_mb=mem_per_attempt(config["iqm"]["mem_mb"]),
        runtime=shard_runtime(config["iqm"]["runtime"]),
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/iqm_shard.py"


rule cohort_iqms:
    input:
        shard_files(rules.iqm_shard.output[0]),
    output:
        "results/iqm/cohort.parquet",
    log:
        "logs/iqm/cohort.log",
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/cohort_iqms.py"


rule import_mriqc:
    input:
        results=config["mriqc"]["results"],
        volumes=rules.ingest.output.volumes,
    output:
        "results/mriqc/cohort.parquet",
    log:
        "logs/mriqc/import.log",
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/import_mriqc.py"


rule evaluate_labels:
    input:
        scores=rated_scores(),
        iqms=iqm_tables(),
    output:
        table="results/report/label_metrics.parquet",
        markdown=report(
            "results/report/label_metrics.md",
            caption="../report/label_metrics.rst",
            category="5. Label evaluation",
        ),
        roc=report(
            "results/report/label_roc.png",
            caption="../report/label_roc.rst",
            category="5. Label evaluation",
        ),
    params:
        fail_values=config["labels"]["fail_values"],
        pass_values=config["labels"]["pass_values"],
        taus=config["flags"]["taus"],
        threshold=config["flags"]["score_threshold"],
        n_boot=config["labels"]["n_boot"],
        seed=config["labels"]["seed"],
    log:
        "logs/report/evaluate_labels.log",
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=20,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/evaluate_labels.py"


rule compare_simulate:
    input:
        scores=rules.cohort_scores.output.parquet,
        model=model_files(),
        training=training_selection_files(),
    output:
        "results/compare/simulated/{contrast}.parquet",
    params:
        artifacts=config["compare"]["artifacts"],
        severities=config["compare"]["severities"],
        per_contrast=config["compare"]["per_contrast"],
        use_n4=config["compare"]["use_n4"],
        seed=config["compare"]["seed"],
        device=config["score"]["device"],
        planes=config["score"]["planes"],
    log:
        "logs/report/compare_simulate/{contrast}.log",
    benchmark:
        "results/benchmarks/report/compare_simulate/{contrast}.tsv"
    threads: config["compare"]["threads"]
    resources:
        mem_mb=mem_per_attempt(config["compare"]["mem_mb"]),
        runtime=config["compare"]["runtime"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/compare_simulate.py"


rule compare_mriqc:
    input:
        compare_parts(),
    output:
        rows="results/compare/simulated.parquet",
        table="results/report/mriqc_comparison.parquet",
        markdown=report(
            "results/report/mriqc_comparison.md",
            caption="../report/mriqc_comparison.rst",
            category="6. MRIQC comparison",
        ),
    log:
        "logs/report/compare_mriqc.log",
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/compare_mriqc.py"
