# BIDS-derivatives export (results/derivatives/artifactqc/): dataset_description.json, one JSON per image at its
# BIDS-relative path and MRIQC-layout group tables group_<suffix>.tsv, rebuilt from the cohort tables only.
# On for BIDS input, opt-in for sheets (config derivatives.enabled).
# The per-image JSONs and group tables are written only when their content changed, so they are not declared
# as outputs (Snakemake deletes declared outputs before a job runs): the declared index lists every file of the
# dataset with its sha256, and a new site's delivery leaves the other sites' JSONs untouched.


rule derivatives:
    input:
        scores=rules.cohort_scores.output.parquet,
        iqms=derivative_iqm_tables(),
    output:
        description="results/derivatives/artifactqc/dataset_description.json",
        index="results/derivatives/artifactqc_index.tsv",
    params:
        bids_root=bids_source_root(),
    log:
        "logs/derivatives.log",
    benchmark:
        "results/benchmarks/derivatives.tsv"
    resources:
        mem_mb=mem_per_attempt(4000),
        runtime=30,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/derivatives.py"
