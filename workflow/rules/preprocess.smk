# Training-data preprocessing (feeds encoder training only; scoring reads raw files).
#
#   checkpoint training_selection   volumes.parquet (ancient) -> results/training/selection.tsv
#       which ingested volumes enter training (config `training`: include/exclude by site,
#       contrast or id list). Written once and then frozen: a site added to the cohort later is
#       not trained on (and nothing retrains) unless this file is deleted.
#   rule n4          one selected volume -> results/preprocessed/n4/{volume_id}.nii.gz (+ bias field)
#   rule superres    its N4 output -> results/preprocessed/final/{volume_id}.nii.gz, super-resolved to
#                    an isotropic grid when the largest spacing exceeds the smallest by
#                    preprocess.superres.ratio, else copied unchanged
#   rule select_training   selection + every preprocessed file -> results/training/manifest.tsv
#       (path = the preprocessed file): the manifest the training rule reads.


checkpoint training_selection:
    input:
        volumes=frozen_input(rules.ingest.output.volumes),
    output:
        "results/training/selection.tsv",
    params:
        criteria={
            "include_sites": config["training"]["include_sites"],
            "exclude_sites": config["training"]["exclude_sites"],
            "include_contrasts": config["training"]["include_contrasts"],
            "exclude_contrasts": config["training"]["exclude_contrasts"],
            "include_list": config["training"]["include_list"],
            "exclude_list": config["training"]["exclude_list"],
            "ratio": config["preprocess"]["superres"]["ratio"],
        },
    log:
        "logs/training/selection.log",
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=10,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/select_training.py"


rule n4:
    input:
        raw_volume_path,
    output:
        volume="results/preprocessed/n4/{volume_id}.nii.gz",
        bias="results/preprocessed/n4/{volume_id}_bias.nii.gz",
    params:
        settings={k: config["preprocess"]["n4"][k] for k in ("shrink_factor", "iters", "tol", "spline_distance_mm")},
        mask_method=config["preprocess"]["n4"]["mask"],
        max_mem_mb=config["ingest"]["max_mem_mb"],
    wildcard_constraints:
        volume_id=TRAINING_VOLUME_ID,
    log:
        "logs/preprocessed/n4/{volume_id}.log",
    benchmark:
        "results/benchmarks/preprocessed/n4/{volume_id}.tsv"
    threads: config["preprocess"]["n4"]["threads"]
    resources:
        mem_mb=mem_per_attempt(config["preprocess"]["n4"]["mem_mb"]),
        runtime=config["preprocess"]["n4"]["runtime"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/n4.py"


rule superres:
    input:
        rules.n4.output.volume,
    output:
        volume="results/preprocessed/final/{volume_id}.nii.gz",
        summary="results/preprocessed/final/{volume_id}.json",
    params:
        ratio=config["preprocess"]["superres"]["ratio"],
        settings={
            k: config["preprocess"]["superres"][k]
            for k in ("method", "profile", "profile_width", "half_slices", "half_width", "phase_bins", "ridge", "seed")
        },
        max_mem_mb=config["ingest"]["max_mem_mb"],
    wildcard_constraints:
        volume_id=TRAINING_VOLUME_ID,
    log:
        "logs/preprocessed/superres/{volume_id}.log",
    benchmark:
        "results/benchmarks/preprocessed/superres/{volume_id}.tsv"
    threads: config["preprocess"]["superres"]["threads"]
    resources:
        mem_mb=mem_per_attempt(config["preprocess"]["superres"]["mem_mb"]),
        runtime=config["preprocess"]["superres"]["runtime"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/superres.py"


rule select_training:
    input:
        selection="results/training/selection.tsv",
        volumes=preprocessed_volumes,
    output:
        "results/training/manifest.tsv",
    log:
        "logs/training/manifest.log",
    resources:
        mem_mb=mem_per_attempt(1000),
        runtime=10,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/select_training.py"
