# The embedded demo cohort: a small multi-site cohort generated from data that installed packages
# ship (nilearn's MNI152 T1 and tissue maps), with per-site differences and a few broken files.
# Active only when config demo.enabled is true (config/demo.yaml). demo_ratings writes the demo's
# known labels (fail -> exclude, pass -> accept) as a ratings file, which config/demo.yaml hands to
# labels.ratings like a file exported from the review page.


rule demo_cohort:
    output:
        directory(DEMO_ROOT),
    params:
        spec=config["demo"],
    log:
        "logs/demo_cohort.log",
    benchmark:
        "results/benchmarks/demo_cohort.tsv"
    threads: 2
    resources:
        mem_mb=mem_per_attempt(4000),
        runtime=20,
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/demo_cohort.py"


rule demo_ratings:
    output:
        "results/demo/ratings.tsv",
    params:
        spec=config["demo"],
        root=DEMO_ROOT,
        fail_values=config["labels"]["fail_values"],
        pass_values=config["labels"]["pass_values"],
    log:
        "logs/demo_ratings.log",
    conda:
        "../../envs/artifactqc.yaml"
    script:
        "../scripts/demo_ratings.py"
