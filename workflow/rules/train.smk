# Encoder training: one job, on the training manifest (the frozen, preprocessed volumes chosen by
# training_selection). The model is written to results/models/<model.id>/ and is never retrained
# when the cohort grows (the manifest depends only on the frozen selection); a new model.id trains a new model.
#
# Settings: the `train:` section of config/config.yaml. With train.init (a model folder, or builtin) the
# training starts from that model's weights (fine-tuning); its files are inputs of the job.


rule train_encoder:
    input:
        manifest=training_manifest(),
        init=train_init_files(),
    output:
        weights="results/models/{model_id}/encoder.safetensors",
        meta="results/models/{model_id}/model.json",
    params:
        demo=config["train"]["demo"],
        device=config["train"]["device"],
        seed=config["train"]["seed"],
        overrides=train_overrides(),
    log:
        "logs/models/{model_id}/train.log",
    benchmark:
        "results/benchmarks/models/{model_id}/train.tsv"
    threads: config["train"]["threads"]
    resources:
        mem_mb=mem_per_attempt(config["train"]["mem_mb"]),
        runtime=config["train"]["runtime"],
        gpu=config["train"]["gpu"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/train_encoder.py"
