# Encoder training: one job, on the training manifest (frozen volumes chosen by select_training) or,
# while the preprocessing stage is absent, on every ingested volume with status ok. The model is
# written to results/models/<model.id>/ and is never retrained when the cohort grows (the manifest
# input is ancient); a new model.id trains a new model.
#
# Settings come from an optional `train:` config section (defaults below, used when it is absent):
#   demo         true = small CPU config (artifactqc.model.demo_config, <= 10 min on 2 cores)
#   device       auto (CUDA if available, else CPU) | cpu | cuda
#   gpu          GPUs the job requests: 0 on a workstation (a CPU-only local run must not ask for a
#                GPU resource it can never get); set 1 in a cluster profile
#   threads, mem_mb, runtime   job resources; seed; epochs/batch_size/lr/patience/max_minutes (null = default)

TRAIN = {
    "demo": True,
    "device": "auto",
    "gpu": 0,
    "threads": 2,
    "mem_mb": 8000,
    "runtime": 240,
    "seed": 0,
    "epochs": None,
    "batch_size": None,
    "lr": None,
    "patience": None,
    "max_minutes": None,
    **config.get("train", {}),
}


def training_manifest():
    """results/training/manifest.tsv when the preprocessing stage writes it, else the ingested volumes."""
    try:
        return ancient(rules.select_training.output[0])
    except (WorkflowError, AttributeError):
        return ancient(rules.ingest.output.volumes)


rule train_encoder:
    input:
        manifest=training_manifest(),
    output:
        weights="results/models/{model_id}/encoder.safetensors",
        meta="results/models/{model_id}/model.json",
    params:
        out_dir="results/models/{model_id}",
        demo=TRAIN["demo"],
        device=TRAIN["device"],
        seed=TRAIN["seed"],
        overrides={k: TRAIN[k] for k in ("epochs", "batch_size", "lr", "patience", "max_minutes") if TRAIN[k] is not None},
    log:
        "logs/models/{model_id}/train.log",
    benchmark:
        "results/benchmarks/models/{model_id}/train.tsv"
    threads: TRAIN["threads"]
    resources:
        mem_mb=TRAIN["mem_mb"],
        runtime=TRAIN["runtime"],
        gpu=TRAIN["gpu"],
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/train_encoder.py"
