# Shared helpers: config and cohort validation, shard bookkeeping, named input functions.
# Reading the cohort (a TSV sheet, a BIDS listing or the demo's sheet) is the only thing done at
# parse time; it takes seconds even for 100,000 volumes (benchmarks/bids_discovery).

from pathlib import Path

import pandas as pd

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from artifactqc import cohort as aq_cohort


validate(config, schema="../schemas/config.schema.yaml")

DEMO_ROOT = "results/demo/volumes"


def load_cohort_table():
    """The cohort as a normalised frame, from whichever source the config names."""
    src = config["cohort"]
    try:
        if config["demo"]["enabled"]:
            from artifactqc import demo as aq_demo

            return aq_cohort.normalise_cohort(
                aq_demo.demo_sheet(config["demo"], Path(DEMO_ROOT).resolve()), source="demo"
            )
        if src["sheet"]:
            return aq_cohort.read_sheet(src["sheet"])
        if src["bids"]["root"]:
            return aq_cohort.discover_bids(
                src["bids"]["root"],
                site_column=src["bids"]["site_column"],
                site_constant=src["bids"]["site_constant"] or None,
            )
    except aq_cohort.CohortError as exc:
        raise WorkflowError(f"cohort: {exc}")
    logger.warning(
        "artifactqc: no cohort configured, nothing to do. Set cohort.sheet (a TSV sheet) or "
        "cohort.bids.root (a BIDS folder) in your config, or run the demo with --configfile config/demo.yaml"
    )
    return aq_cohort.normalise_cohort(pd.DataFrame(columns=list(aq_cohort.COHORT_COLUMNS)))


COHORT = load_cohort_table()
validate(COHORT, schema="../schemas/sheet.schema.yaml")
VALID, SHEET_FAILURES = aq_cohort.split_valid(COHORT)
SHARDS = aq_cohort.shard_cohort(VALID, shard_size=config["cohort"]["shard_size"])
SHARD_SITES = [site for site, _ in SHARDS]
SHARD_PARTS = [part for _, part in SHARDS]


wildcard_constraints:
    site=r"[A-Za-z0-9_.-]+",
    part=r"\d+",


def shard_rows(wildcards):
    """The cohort rows of one ingest shard (params, so a changed row reruns only its shard)."""
    return SHARDS[(wildcards.site, int(wildcards.part))].to_dict("records")


def sheet_failure_rows(wildcards):
    return SHEET_FAILURES.to_dict("records")


def cohort_prerequisites(wildcards):
    """Files that must exist before any volume is read: the demo's generated volumes, if any."""
    return rules.demo_cohort.output if config["demo"]["enabled"] else []


def shard_files(pattern):
    """One path per (site, part) shard, from a pattern with {site} and {part}."""
    return expand(pattern, zip, site=SHARD_SITES, part=SHARD_PARTS)


def final_targets():
    if COHORT.empty:
        return []
    return [rules.ingest.output.volumes, rules.ingest.output.failures]
