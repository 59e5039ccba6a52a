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
