# Few-label calibration: from the manual ratings (the sheet's `label` column and the labels.ratings
# files the review page exports), a per-site calibrated probability of failure and flag for every volume.
# Runs only when ratings exist. New or changed ratings rerun this rule and the tables built on it
# (label evaluation, review page), never the scoring.


rule calibrate:
    input:
        scores=rules.cohort_scores.output.parquet,
        ratings=config["labels"]["ratings"],
        iqms=iqm_tables(),
    output:
        model="results/calibration/model.json",
        thresholds="results/calibration/thresholds.tsv",
        labels="results/calibration/labels.tsv",
        metrics="results/calibration/metrics.tsv",
        markdown=report(
            "results/calibration/metrics.md",
            caption="../report/calibration.rst",
            category="5. Label evaluation",
        ),
        cohort=CALIBRATED_COHORT,
        tsv="results/calibration/cohort.tsv",
    params:
        fail_values=config["labels"]["fail_values"],
        pass_values=config["labels"]["pass_values"],
        n_boot=config["labels"]["n_boot"],
        seed=config["labels"]["seed"],
        fit=config["calibration"],
    log:
        "logs/calibration/calibrate.log",
    benchmark:
        "results/benchmarks/calibration/calibrate.tsv"
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=30,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/calibrate.py"
