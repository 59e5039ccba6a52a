# Shared helpers: config and cohort validation, shard bookkeeping, named input functions.
# Reading the cohort (a TSV sheet, a BIDS listing or the demo's sheet) is the only thing done at
# parse time; it takes seconds even for 100,000 volumes (benchmarks/bids_discovery).

import dataclasses
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from artifactqc import cohort as aq_cohort
from artifactqc import config_check as aq_check
from artifactqc import provenance as aq_prov


def check_config():
    """Unknown keys (with "did you mean"), the schema, then the cross-checks the schema cannot express.
    Returns the pretrained model's model.json (None when the workflow trains its encoder). With
    model.pretrained: builtin and model.id left at its default, config model.id is set to the builtin
    model's own id here (the run record, the flows folder and the report then name the model used)."""
    schema = yaml.safe_load(Path(workflow.source_path("../schemas/config.schema.yaml")).read_text())
    problems = aq_check.unknown_keys(config, schema)
    if problems:
        raise WorkflowError("config: " + "; ".join(problems))
    validate(config, schema="../schemas/config.schema.yaml")
    from artifactqc.training.config import TrainConfig

    problems = aq_check.check_names(config["train"]["settings"], train_settings_names(TrainConfig), "train.settings")
    problems += aq_check.check_flag_rule(config["flags"]["rule"], config["flags"]["taus"])
    if problems:
        raise WorkflowError("config: " + "; ".join(problems))
    try:
        if not config["model"]["pretrained"]:
            if config["train"]["init"]:
                aq_check.check_init(config["train"]["init"])
            return None
        info = aq_check.check_pretrained(config["model"]["pretrained"], config["model"]["id"])
    except aq_check.ConfigError as exc:
        raise WorkflowError(f"config: {exc}")
    config["model"]["id"] = info["model_id"]
    return info


def train_settings_names(train_config_cls):
    """Trainer settings train.settings may hold: the TrainConfig fields that have no key of their own."""
    own = {"seed", "threads", "epochs", "steps_per_epoch", "batch_size", "lr", "patience", "pool_refresh",
           "max_minutes", "volume_head", "init"}
    return [f.name for f in dataclasses.fields(train_config_cls) if f.name not in own]


PRETRAINED = check_config()

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
    model_id=r"[A-Za-z0-9_.-]+",
    flow_id=r"[A-Za-z0-9_.-]+",


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


def model_folder_files(folder):
    """encoder.safetensors and model.json of a model folder from config (``builtin``: the shipped model's)."""
    from artifactqc.encoder.checkpoint import resolve_model_dir

    folder = str(resolve_model_dir(folder))
    return [os.path.join(folder, "encoder.safetensors"), os.path.join(folder, "model.json")]


def model_files():
    """The encoder used for scoring: a pretrained folder from config, or the one the workflow trains."""
    pre = config["model"]["pretrained"]
    if pre:
        return model_folder_files(pre)
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
    return [rules.training_selection.output[0]]


def compare_parts():
    """One simulated-set table per contrast of the readable cohort (rule compare_simulate)."""
    contrasts = sorted(VALID["contrast"].dropna().astype(str).unique())
    return expand(rules.compare_simulate.output[0], contrast=contrasts)


def scoring_enabled():
    """Scoring enters the DAG once there is an encoder to score with."""
    return bool(model_files())


def flow_files():
    """The flow fitted on this run's encoder: results/flows/<model.id>/<flow.id>/."""
    return expand(rules.fit_flow.output, model_id=config["model"]["id"], flow_id=config["flow"]["id"])


def scoring_model():
    """The encoder a score shard is made with, as a parameter: a shard reruns when it changes (a pretrained
    folder's weights sha256 is known when the workflow loads; a trained model's change reaches the shards
    through its files)."""
    return {"id": config["model"]["id"], "sha256": PRETRAINED["weights_sha256"] if PRETRAINED else None}


# --- frozen manifests and reruns -----------------------------------------------------------
# The training selection and the flow reference are frozen: written once from the cohort tables, then
# kept while the cohort grows. Only the frozen jobs' own input (volumes.parquet) and the flow's scored
# reference shards are marked ancient(). Every edge *downstream* of a frozen manifest is a plain input,
# because Snakemake 9 (dag.update_needrun) masks every job downstream of a job that must rerun and then
# follows only edges that are not "ancient and existing": a consumer behind such an edge is never looked
# at, even when its own outputs are missing. With ancient() on fit_flow's reference input, a rerun after
# `kill -9` during reference_manifest reran that job alone and exited 0 without the flow or the cohort
# tables. Worse, ancient(rules.ingest.output.volumes) flagged ingest's output object itself (ancient()
# flags in place), so every edge from ingest, even the one into `all`, was ancient: a rerun of the ingest
# gather after a kill ran that job alone. frozen_input() flags a copy. Every remaining ancient edge
# has a plain path from its producer to the final targets, so the
# targets are always evaluated; outputs are written atomically (artifactqc.atomic), so an existing file is
# a complete one; and check_requested_targets() fails a run that ends with a requested target missing.


def frozen_input(path):
    """``ancient()`` on a copy of ``path``. Snakemake's ancient() flags the string it is given in place, so
    ``ancient(rules.ingest.output.volumes)`` marked ingest's output itself: every other rule reading
    ``rules.ingest.output.volumes`` (the target rule `all` included) then had an ancient edge too, and a
    rerun of ingest reached none of them."""
    return ancient(str(path))


def reference_score_shards(wildcards):
    """Scored shards holding the flow's reference volumes.

    Before the reference manifest exists (first run) that is every shard; afterwards only the
    shards of the frozen reference, marked ancient: a new site never refits the flow.
    """
    keys = list(SHARDS)
    ref = Path(expand(rules.reference_manifest.output[0], model_id=wildcards.model_id, flow_id=wildcards.flow_id)[0])
    if ref.exists():
        ids = set(pd.read_csv(ref, sep="\t", usecols=["volume_id"], dtype=str)["volume_id"])
        keys = [k for k, rows in SHARDS.items() if rows["volume_id"].isin(ids).any()]
    paths = expand(rules.score_shard.output.rows, zip, site=[k[0] for k in keys], part=[k[1] for k in keys])
    return [frozen_input(p) for p in paths]


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
    """The frozen training manifest. Not ancient (see "frozen manifests and reruns" above): it depends on
    the frozen selection only, never on the cohort tables, so a growing cohort does not rewrite it."""
    return rules.select_training.output[0]


def train_overrides():
    """Training settings from config that override the model's defaults (null = default; train.init '' =
    from scratch)."""
    keys = ("epochs", "steps_per_epoch", "batch_size", "lr", "patience", "pool_refresh", "max_minutes",
            "volume_head")
    out = {**config["train"]["settings"], **{k: config["train"][k] for k in keys if config["train"][k] is not None}}
    if config["train"]["init"]:
        out["init"] = config["train"]["init"]
    return out


def train_init_files():
    """The files of the model training starts from (train.init), as inputs of train_encoder."""
    return model_folder_files(config["train"]["init"]) if config["train"]["init"] else []


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


def requested_targets():
    """Files this invocation must leave behind: the default target's files, or the file targets named on
    the command line; None when the run was partial by request (--until, --omit-from, --batch, rules)."""
    ds = workflow.dag_settings
    if ds.until or ds.omit_from or ds.batch is not None or ds.target_jobs:
        return None
    names = set(ds.targets)
    rule_names = {r.name for r in workflow.rules}
    if not names or names == {"all"}:
        return [str(f) for f in final_targets()]
    if names & (rule_names - {"all"}):
        return None
    return sorted(str(f) for f in names if f != "all")


def check_requested_targets():
    """Fail the run (non-zero exit) when it ends with a requested target missing: never report success
    without the results."""
    targets = requested_targets()
    if targets is None:
        return
    missing = [f for f in targets if not os.path.exists(f)]
    if missing:
        write_run_record("incomplete")
        raise WorkflowError(
            f"artifactqc: the run finished but {len(missing)} requested output(s) are missing: "
            + ", ".join(missing[:10])
            + ". Nothing was lost; run the same command again (with --rerun-incomplete after an interrupted run)."
        )


def has_labels():
    """Manual ratings exist (the sheet's `label` column or labels.ratings files): the calibration and the
    label evaluation join the DAG."""
    return bool(config["labels"]["ratings"]) or bool((COHORT["label"].fillna("").astype(str).str.strip() != "").any())


#: The cohort table with the merged ratings, p_fail and flagged_calibrated (rule calibrate, which
#: report.smk's label evaluation reads before calibrate.smk is included).
CALIBRATED_COHORT = "results/calibration/cohort.parquet"


def rated_scores():
    """The cohort table the label evaluation and the review page read: the calibrated one (with the
    merged ratings, p_fail, flagged_calibrated) when ratings exist, else the scores."""
    if has_labels():
        return CALIBRATED_COHORT
    return rules.cohort_scores.output.parquet


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
            targets += list(rules.calibrate.output) + list(rules.evaluate_labels.output)
        targets += list(rules.review.output)
        if derivatives_enabled():
            targets += list(rules.derivatives.output)
    targets += iqm_tables()
    return targets
