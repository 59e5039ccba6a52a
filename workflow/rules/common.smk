# Shared helpers: config and cohort validation, shard bookkeeping, named input functions.
# Reading the cohort (a TSV sheet, a BIDS listing or the demo's sheet) is the only thing done at
# parse time; it takes seconds even for 100,000 volumes (benchmarks/bids_discovery).

import math
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from artifactqc import cohort as aq_cohort
from artifactqc import provenance as aq_prov


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
# Column-wise check against the same schema file (per-row jsonschema takes ~40 s at 100,000 rows).
aq_cohort.validate_columns(
    COHORT, yaml.safe_load(Path(workflow.source_path("../schemas/sheet.schema.yaml")).read_text()), source="cohort"
)
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


def mem_per_attempt(base_mb):
    """A mem_mb resource that grows with each retry (base, 2 x base, 3 x base, ...): a job killed for
    memory under `--retries` (the slurm profile) is resubmitted with more."""

    def mem_mb(wildcards, attempt):
        return int(base_mb) * attempt

    return mem_mb


def shard_runtime(minutes):
    """A runtime resource for a per-shard job: `minutes` for a shard of cohort.shard_size volumes, scaled
    up for a site's last shard, which can hold up to 2 x shard_size - 1 (see cohort.shard_cohort)."""

    def runtime(wildcards):
        n = len(SHARDS[(wildcards.site, int(wildcards.part))])
        return math.ceil(int(minutes) * max(1.0, n / config["cohort"]["shard_size"]))

    return runtime


def shard_files(pattern):
    """One path per (site, part) shard, from a pattern with {site} and {part}."""
    return expand(pattern, zip, site=SHARD_SITES, part=SHARD_PARTS)


# --- models, flows and scoring -------------------------------------------------------------


def model_files():
    """The encoder used for scoring: a pretrained folder from config, or the one the workflow trains."""
    pre = config["model"]["pretrained"]
    if pre:
        return [os.path.join(pre, "encoder.safetensors"), os.path.join(pre, "model.json")]
    try:
        train = rules.train_encoder
    except WorkflowError:  # the training stage is not part of this workflow (yet)
        return []
    return expand(train.output, model_id=config["model"]["id"])


def training_selection_files():
    """The training selection when the workflow trains the encoder (its volumes are kept out of the
    simulated comparison set); none for a pretrained model."""
    if config["model"]["pretrained"]:
        return []
    return [ancient(rules.training_selection.output[0])]


def compare_parts():
    """One simulated-set table per contrast of the readable cohort (rule compare_simulate)."""
    contrasts = sorted(VALID["contrast"].dropna().astype(str).unique())
    return expand(rules.compare_simulate.output[0], contrast=contrasts)


def scoring_enabled():
    """Scoring enters the DAG once there is an encoder to score with."""
    return bool(model_files())


def flow_files():
    return expand(rules.fit_flow.output, flow_id=config["flow"]["id"])


def reference_score_shards(wildcards):
    """Scored shards holding the flow's reference volumes.

    Before the reference manifest exists (first run) that is every shard; afterwards only the
    shards of the frozen reference, marked ancient: a new site never refits the flow.
    """
    keys = list(SHARDS)
    ref = Path(expand(rules.reference_manifest.output[0], flow_id=wildcards.flow_id)[0])
    if ref.exists():
        ids = set(pd.read_csv(ref, sep="\t", usecols=["volume_id"], dtype=str)["volume_id"])
        keys = [k for k, rows in SHARDS.items() if rows["volume_id"].isin(ids).any()]
    paths = expand(rules.score_shard.output.rows, zip, site=[k[0] for k in keys], part=[k[1] for k in keys])
    return [ancient(p) for p in paths]


def scoring_config_sha256():
    """Hash of the config sections that shape the scores (recorded in every score row)."""
    return aq_prov.config_sha256({k: config[k] for k in ("model", "score", "flow", "flags")})


# --- training data (preprocess.smk, train.smk) -------------------------------------------------

def selected_volumes():
    """The selection as a frame (after the checkpoint has run)."""
    sel = checkpoints.training_selection.get().output[0]
    return pd.read_csv(sel, sep="\t", dtype={"volume_id": str})


def raw_volume_path(wildcards):
    rows = selected_volumes()
    match = rows.loc[rows["volume_id"] == wildcards.volume_id, "raw_path"]
    if match.empty:
        raise WorkflowError(f"{wildcards.volume_id} is not in the training selection")
    return match.iloc[0]


def preprocessed_volumes(wildcards):
    """Every selected volume's final preprocessed file."""
    return expand(rules.superres.output.volume, volume_id=selected_volumes()["volume_id"])


TRAINING_VOLUME_ID = r"[A-Za-z0-9_.-]+"


def training_manifest():
    """The frozen training manifest (ancient: a growing cohort never retrains the encoder)."""
    return ancient(rules.select_training.output[0])


def train_overrides():
    """Training settings from config that override the model's defaults (null = default)."""
    keys = ("epochs", "batch_size", "lr", "patience", "max_minutes", "volume_head")
    return {k: config["train"][k] for k in keys if config["train"][k] is not None}


# --- run provenance ----------------------------------------------------------------------------

RUN_STARTED = datetime.now(timezone.utc)
RUN_RECORD = Path("results/provenance") / (RUN_STARTED.strftime("%Y%m%dT%H%M%S") + ".json")


def write_run_record(status):
    """results/provenance/<run>.json: resolved config, versions, host, start/end time, status."""
    aq_prov.write_json(
        aq_prov.run_manifest(
            config,
            snakemake_version=snakemake.__version__,
            started_at=RUN_STARTED.isoformat(timespec="seconds"),
            status=status,
            cohort_volumes=len(COHORT),
            shards=len(SHARDS),
        ),
        RUN_RECORD,
    )


def has_labels():
    """The cohort sheet carries manual ratings: the label evaluation joins the DAG."""
    return bool((COHORT["label"].fillna("").astype(str).str.strip() != "").any())


def iqms_enabled():
    """Cohort IQMs run when config iqm.enabled is true, or 'auto' and the sheet has labels."""
    enabled = config["iqm"]["enabled"]
    return has_labels() if enabled == "auto" else bool(enabled)


def iqm_tables():
    """IQM tables joined into the label evaluation: artifactqc's own and imported MRIQC results."""
    tables = [rules.cohort_iqms.output[0]] if iqms_enabled() else []
    if config["mriqc"]["results"]:
        tables.append(rules.import_mriqc.output[0])
    return tables


def derivatives_enabled():
    """The BIDS-derivatives export runs when config derivatives.enabled is true, or 'auto' and the cohort is a
    BIDS root (a sheet opts in with true)."""
    enabled = config["derivatives"]["enabled"]
    return bool(bids_source_root()) if enabled == "auto" else bool(enabled)


def bids_source_root():
    """The BIDS root the cohort was discovered in ('' for a sheet or the demo)."""
    if config["demo"]["enabled"] or config["cohort"]["sheet"]:
        return ""
    return config["cohort"]["bids"]["root"]


def derivative_iqm_tables():
    """artifactqc's own IQM table, joined into the derivatives when the IQMs are computed."""
    return [rules.cohort_iqms.output[0]] if iqms_enabled() else []


def final_targets():
    if COHORT.empty:
        return []
    targets = [rules.ingest.output.volumes, rules.ingest.output.failures]
    if scoring_enabled():
        targets += [rules.cohort_scores.output.parquet, rules.cohort_scores.output.tsv]
        targets += list(rules.report_figures.output)
        if config["compare"]["enabled"]:
            targets += list(rules.compare_mriqc.output)
        if has_labels():
            targets += list(rules.evaluate_labels.output)
        if derivatives_enabled():
            targets += list(rules.derivatives.output)
    targets += iqm_tables()
    return targets
