"""Load-time checks of the workflow configuration that a JSON schema alone cannot give.

* :func:`unknown_keys`: every key the schema does not know, at any depth, with a "did you mean" for near
  misses (``scoer`` -> ``score``, ``model.pretrianed`` -> ``model.pretrained``): a typo must never be
  ignored silently (``model.pretrianed`` would quietly switch a run to training for an hour).
* :func:`check_names`: free-form sections (``train.settings``) against the settings a function accepts.
* :func:`check_flag_rule`: ``flags.rule`` names only τ values listed in ``flags.taus``.
* :func:`check_pretrained`: a ``model.pretrained`` folder (or ``builtin``, the model shipped with the
  package) is a complete, intact artifactqc model, and the run's model id agrees with it.
* :func:`check_init`: a ``train.init`` folder (or ``builtin``) to fine-tune from is a complete, intact model.

Each returns or raises messages naming the key path (or the file) and the problem; the workflow raises
them before any job runs.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Iterable


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key or file."""


def _did_you_mean(key: str, known: Iterable[str], path: str = "") -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{path + '.' if path else ''}{close[0]}'?)" if close else ""


def unknown_keys(config, schema: dict, path: str = "") -> list[str]:
    """Messages for keys of ``config`` that ``schema`` does not allow (``additionalProperties: false``),
    recursing into nested objects and arrays of objects."""
    out: list[str] = []
    if isinstance(config, dict) and isinstance(schema, dict):
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is False:
            for key in config:
                if key not in props:
                    where = f"{path}.{key}" if path else str(key)
                    hint = _did_you_mean(str(key), props, path)
                    allowed = ", ".join(sorted(props)) if len(props) <= 16 else f"{len(props)} keys, see the schema"
                    out.append(f"unknown key '{where}'{hint}; allowed here: {allowed}")
        for key, value in config.items():
            if key in props:
                out += unknown_keys(value, props[key], f"{path}.{key}" if path else str(key))
    elif isinstance(config, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(config):
            out += unknown_keys(item, schema["items"], f"{path}[{i}]")
    return out


def check_names(values: dict, allowed: Iterable[str], path: str) -> list[str]:
    """Messages for keys of ``values`` (a free-form section at ``path``) that are not in ``allowed``."""
    allowed = set(allowed)
    return [
        f"unknown key '{path}.{k}'{_did_you_mean(str(k), allowed, path)}; allowed here: {', '.join(sorted(allowed))}"
        for k in values or {}
        if k not in allowed
    ]


def check_flag_rule(rule: str, taus: Iterable[float]) -> list[str]:
    """``flags.rule`` (terms ``score``, ``site``, ``tau<τ>`` joined by ``_or_`` or by ``_and_``, parsed by
    :func:`artifactqc.density.flags.parse_flag_rule`) may only use a τ of ``flags.taus``."""
    from .density.flags import FLAG_RULES, SITE_FLAG_RULES, parse_flag_rule

    names = {f"tau{float(t):g}" for t in taus}
    examples = ["score", "site"] + sorted(names) + [f"score_{op}_{n}" for n in sorted(names) for op in ("or", "and")]
    try:
        terms = parse_flag_rule(str(rule))[1]
    except ValueError:
        terms = None
    if terms is not None and all(t in ("score", "site") or f"tau{float(t[3:]):g}" in names for t in terms):
        return []
    return [f"flags.rule '{rule}' is not a rule over score, site and the τ of flags.taus (e.g. "
            f"{', '.join(examples)}; a τ flag must be listed in flags.taus)"
            + _did_you_mean(str(rule), list(FLAG_RULES + SITE_FLAG_RULES) + examples)]


#: ``model.id`` of config/config.yaml. With ``model.pretrained: builtin`` an id left at this default means
#: "the builtin model's own id" (tests/test_builtin.py checks that config.yaml still says so).
DEFAULT_MODEL_ID = "artifactqc-v1"


def check_model_folder(folder: str | os.PathLike, where: str) -> dict:
    """A model folder is complete and intact; returns its ``model.json``. ``builtin`` is the shipped model.

    The folder must exist and hold ``model.json`` and its safetensors weights file, ``model.json`` must
    record ``weights_sha256`` and the file must hash to it. Raises :class:`ConfigError` naming ``where``
    (the config key and value), the file and the problem.
    """
    from .encoder.checkpoint import BUILTIN, ModelLoadError, builtin_model_dir
    from .io import sha256_file

    where = f"{where} {str(folder)!r}"
    if str(folder) == BUILTIN:
        try:
            folder = builtin_model_dir()
        except ModelLoadError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    p = Path(folder)
    if not p.exists():
        raise ConfigError(f"{where}: no such folder")
    if not p.is_dir():
        raise ConfigError(f"{where}: not a folder (give the folder holding encoder.safetensors and model.json)")
    meta_path = p / "model.json"
    if not meta_path.is_file():
        found = sorted(q.name for q in p.iterdir())[:8]
        raise ConfigError(f"{where}: no model.json in {p} (found {found}); an artifactqc model folder holds "
                          "encoder.safetensors and model.json")
    try:
        info = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{meta_path}: not valid JSON ({exc})") from exc
    wname = str(info.get("weights_file", "encoder.safetensors"))
    if not wname.endswith(".safetensors"):
        raise ConfigError(f"{meta_path}: weights_file {wname!r} is not a .safetensors file (pickles are refused)")
    weights = p / wname
    if not weights.is_file():
        raise ConfigError(f"{where}: weights file {weights} not found (only safetensors weights are accepted)")
    want = info.get("weights_sha256")
    if not want:
        raise ConfigError(f"{meta_path}: no weights_sha256; the weights cannot be checked (write it with "
                          "artifactqc.io.sha256_file of the weights file)")
    got = sha256_file(weights)
    if got != want:
        raise ConfigError(f"{where}: {weights}: sha256 {got[:12]}… does not match model.json's weights_sha256 "
                          f"{str(want)[:12]}… (file changed or corrupt)")
    if not info.get("model_id"):
        raise ConfigError(f"{meta_path}: no model_id")
    return info


def check_pretrained(folder: str | os.PathLike, model_id: str) -> dict:
    """Check a ``model.pretrained`` folder before anything runs (:func:`check_model_folder`); returns its
    ``model.json``.

    The model's ``model_id`` must equal the config's ``model.id`` (the id names the flows fitted on this
    encoder's latents and every score row). For ``builtin`` (the shipped model) ``model.id`` may also stay at
    its default (:data:`DEFAULT_MODEL_ID`): the run then uses the builtin model's own id, which changes with
    every new builtin model, so flows of an older builtin are never mixed with a newer one.
    Raises :class:`ConfigError` naming the path and the problem.
    """
    from .encoder.checkpoint import BUILTIN

    info = check_model_folder(folder, "model.pretrained")
    own = info.get("model_id")
    if str(folder) == BUILTIN:
        if model_id not in (own, DEFAULT_MODEL_ID):
            raise ConfigError(f"model.pretrained 'builtin': model.id {model_id!r} is not the builtin model's id "
                              f"{own!r}; leave model.id at its default ({DEFAULT_MODEL_ID}) or set model.id: {own} "
                              "(to score under another id, copy the model folder and give its path)")
        return info
    if own != model_id:
        meta_path = Path(folder) / "model.json"
        raise ConfigError(f"{meta_path}: model_id {own!r} differs from the config's model.id "
                          f"{model_id!r}; set model.id: {own} (flows and score rows are keyed "
                          "by it)")
    return info


def check_init(folder: str | os.PathLike) -> dict:
    """Check a ``train.init`` folder (the model training starts from; ``builtin`` = the shipped model)
    before anything runs (:func:`check_model_folder`); returns its ``model.json``."""
    return check_model_folder(folder, "train.init")
