"""The shipped configs validate against the schemas, and demo.yaml stays in step with the package."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from artifactqc.demo import DEFAULT_SPEC

REPO = Path(__file__).resolve().parents[1]


def load(name):
    return yaml.safe_load((REPO / name).read_text())


def merged(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_configs_validate():
    schema = load("workflow/schemas/config.schema.yaml")
    base = load("config/config.yaml")
    jsonschema.validate(base, schema)
    jsonschema.validate(merged(base, load("config/demo.yaml")), schema)
    jsonschema.validate(merged(merged(base, load("config/demo.yaml")), load("config/demo_train.yaml")), schema)


def test_demo_yaml_equals_package_default():
    demo = load("config/demo.yaml")["demo"]
    assert demo.pop("enabled") is True
    assert demo == DEFAULT_SPEC


def test_schema_names_bad_key_and_allowed_values():
    schema = load("workflow/schemas/config.schema.yaml")
    bad = load("config/config.yaml")
    bad["cohort"]["shard_size"] = 0
    with pytest.raises(jsonschema.ValidationError, match="0 is less than the minimum of 1"):
        jsonschema.validate(bad, schema)
    sheet_schema = load("workflow/schemas/sheet.schema.yaml")
    row = dict(volume_id="a", site="s", subject="1", contrast="T1", path="a.nii")
    with pytest.raises(jsonschema.ValidationError, match="'T1' is not one of \\['T1w', 'T2w', 'FLAIR', 'PD', 'other'\\]"):
        jsonschema.validate(row, sheet_schema)


# --- strict config (issue 17, item 5) -----------------------------------------------------------------

from artifactqc import config_check  # noqa: E402


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"scoer": {}}, "unknown key 'scoer' (did you mean 'score'?)"),
        ({"score": {"batchsize": 8}}, "unknown key 'score.batchsize' (did you mean 'score.batch_size'?)"),
        ({"demo": {"enabeld": True}}, "unknown key 'demo.enabeld' (did you mean 'demo.enabled'?)"),
        ({"model": {"pretrianed": "x"}}, "unknown key 'model.pretrianed' (did you mean 'model.pretrained'?)"),
        ({"flow": {"fit": {"epoch": 3}}}, "unknown key 'flow.fit.epoch' (did you mean 'flow.fit.epochs'?)"),
        ({"preprocess": {"n4": {"iter": [1]}}}, "unknown key 'preprocess.n4.iter'"),
    ],
)
def test_unknown_keys_are_named_with_did_you_mean(override, expected):
    schema = load("workflow/schemas/config.schema.yaml")
    cfg = merged(load("config/config.yaml"), override)
    problems = config_check.unknown_keys(cfg, schema)
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    with pytest.raises(jsonschema.ValidationError):  # the schema alone refuses it too
        jsonschema.validate(cfg, schema)


def test_every_schema_object_is_closed():
    """additionalProperties: false on every object of the schema (train.settings is checked in code)."""
    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and path != "train.settings":
                assert node.get("additionalProperties") is False, path
            for k, v in node.get("properties", {}).items():
                walk(v, f"{path}.{k}" if path else k)
            if isinstance(node.get("items"), dict):
                walk(node["items"], path + "[]")

    walk(load("workflow/schemas/config.schema.yaml"), "")


def test_flag_rule_and_train_settings_checked():
    assert config_check.check_flag_rule("score_or_tau5", [5, 3]) == []
    assert config_check.check_flag_rule("tau3", [5, 3]) == []
    msg = config_check.check_flag_rule("score_or_tau7", [5, 3])
    assert msg and "did you mean 'score_or_tau5'" in msg[0]
    assert config_check.check_flag_rule("score_xor_tau5", [5, 3])
    # rules over the site-aware score (artifactqc.sitescore) pass; their τ terms are checked too
    assert config_check.check_flag_rule("score_or_site_or_tau5", [5, 3]) == []
    assert config_check.check_flag_rule("site_and_tau3", [5, 3]) == []
    assert config_check.check_flag_rule("score_or_site_or_tau7", [5, 3])
    msg = config_check.check_names({"image_sise": 64}, ["image_size", "pool_size"], "train.settings")
    assert msg == ["unknown key 'train.settings.image_sise' (did you mean 'train.settings.image_size'?); "
                   "allowed here: image_size, pool_size"]
