# artifactqc: label-free detection of artifact-laden MR volumes in multi-site cohorts.
# This file only wires the stages together; every rule lives in workflow/rules/*.smk and all logic
# lives in the artifactqc package (src/artifactqc). Configuration: config/config.yaml (documented).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/review.smk"
include: "workflow/rules/derivatives.smk"


onstart:
    write_run_record("running")


onsuccess:
    check_requested_targets()
    write_run_record("finished")


onerror:
    write_run_record("failed")


rule all:
    input:
        final_targets(),
    default_target: True
