"""Checks of a BIDS-derivatives folder against the BIDS specification itself (not against artifactqc's code).

* :func:`schema_problems`: the dataset_description.json rules of the official BIDS schema (bidsschematools):
  every field a rule that applies to a derivative dataset marks required is present, and every present field
  the schema defines validates against its definition (GeneratedBy items need Name, ...).
* :func:`validator_issues`: the BIDS validator (bids-validator-deno, the schema-based validator) run on the
  folder; its errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

_DISPLAY_KEYS = {"name", "display_name", "description", "recommended", "definition"}


def _as_jsonschema(defn):
    """A BIDS schema metadata definition as JSON Schema (its display-only keys dropped)."""
    if isinstance(defn, dict):
        return {k: _as_jsonschema(v) for k, v in defn.items() if k not in _DISPLAY_KEYS}
    if isinstance(defn, list):
        return [_as_jsonschema(v) for v in defn]
    return defn


def _rule_applies(selectors: list[str], description: dict) -> bool:
    """The selectors the dataset_description rules use: the path, and DatasetType comparisons."""
    for sel in selectors:
        sel = sel.strip()
        if sel == 'path == "/dataset_description.json"':
            continue
        if sel.startswith("json.DatasetType =="):
            if description.get("DatasetType") != sel.split("==", 1)[1].strip().strip('"'):
                return False
            continue
        if sel.startswith("!exists("):  # e.g. no CITATION.cff: only recommendations hang on it
            continue
        raise AssertionError(f"selector not understood by this check: {sel}")
    return True


def schema_problems(root: Path) -> list[str]:
    """Problems of ``root/dataset_description.json`` under the BIDS schema's rules (empty = none)."""
    from bidsschematools import schema

    bids = schema.load_schema()
    desc = json.loads((root / "dataset_description.json").read_text())
    problems, checked_required = [], set()
    rules = bids.rules.json.dataset.to_dict()
    for name, rule in rules.items():
        if not _rule_applies(rule["selectors"], desc):
            continue
        for field, level in rule["fields"].items():
            level = level if isinstance(level, str) else level["level"]
            if level == "required":
                checked_required.add(field)
                if field not in desc:
                    problems.append(f"{name}: required field {field} missing")
    if not {"Name", "BIDSVersion", "GeneratedBy"} <= checked_required:
        problems.append(f"the schema's rules required only {sorted(checked_required)}: rules not understood")
    metadata = bids.objects.metadata.to_dict()
    for field, value in desc.items():
        if field in metadata:
            try:
                jsonschema.validate(value, _as_jsonschema(metadata[field]))
            except jsonschema.ValidationError as exc:
                problems.append(f"{field}: {exc.message}")
    return problems


def validator_issues(root: Path) -> tuple[list[dict], list[dict]]:
    """``(errors, warnings)`` of the BIDS validator on ``root``; skips when it is not installed."""
    exe = Path(sys.executable).with_name("bids-validator-deno")
    if not exe.exists():
        found = shutil.which("bids-validator-deno")
        if not found:
            pytest.skip("bids-validator-deno not installed (pip install -e '.[test]')")
        exe = Path(found)
    res = subprocess.run([str(exe), "--format", "json", str(root)], capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"bids-validator gave no JSON report (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    issues = report["issues"]["issues"]
    return ([i for i in issues if i["severity"] == "error"], [i for i in issues if i["severity"] == "warning"])
