"""The 3D path: :func:`simulate_volume` corrupts a volume with one artifact type or a mixture (2-3 types in
:data:`APPLY_ORDER`, component severities split from the combined one), calibrated or SSIM-matched, and
:func:`apply_artifact` applies one type with an explicit physical parameter.
"""

from __future__ import annotations

import numpy as np

from .apply import apply_artifact
from .calibration import (
    APPLY_ORDER,
    ARTIFACTS,
    CALIBRATION_SOURCE,
    HEAD_NAMES,
    _check_artifact,
    severity_to_param,
    split_severity,
)
from .common import _jsonable
from .matching import _SSIMLoss, apply_matched
from .ssim import head_mask


def simulate_volume(
    data: np.ndarray,
    artifact: str,
    severity: float,
    seed: int | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rng: np.random.Generator | None = None,
    match_ssim: bool = False,
    noise_variant: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Corrupt a 3D volume (intensities normalised to ~[0, 1]) with one artifact type or a mixture.

    Returns ``(corrupted float32 array of the same shape, params)``; ``params`` is JSON-serialisable and holds
    ``artifact``, ``severity``, ``component_severities`` (per artifact type), ``head_severities`` (per encoder
    head, :data:`HEAD_ORDER`), the physical parameter and every random draw. Severity 0 returns an exact copy.
    With ``artifact="mix"``, 2-3 distinct types are applied in :data:`APPLY_ORDER` with component severities
    whose :func:`combine_severities` is ``severity``; ``params["components"]`` lists each one's params.
    The same ``seed`` gives the same random draws (shape, axis, timing, noise) at every severity.

    ``match_ssim=False`` maps the severity to the physical parameter with the type-mean calibration
    (:data:`CALIBRATION_3D`): the *expected* SSIM is ``target_ssim(severity)``, but one sample's SSIM varies
    with its random draws and its anatomy (e.g. ghosting at SS 0.8: 1 - SSIM 0.14-0.33 over 7 volumes).
    ``match_ssim=True`` searches the parameter per sample (:func:`apply_matched`, 2-3 simulations on
    average) so that this sample's masked SSIM to ``data`` is ``target_ssim(severity)`` within
    :data:`MATCH_TOLERANCE`; a mixture matches each component against its own input. ``params`` then
    records ``ssim`` (achieved, overall) and ``severity_definition``. ``noise_variant`` fixes the noise
    variant (``NOISE_VARIANTS``; default: drawn at random, as the encoder's training data has it).
    """
    _check_artifact(artifact)
    severity = float(severity)
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    if rng is None:
        rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in spacing)
    params: dict = {"artifact": artifact, "severity": severity, "seed": seed, "spacing": list(spacing)}
    mask = head_mask(data) if match_ssim and severity > 0 else None
    loss = _SSIMLoss(data, mask) if mask is not None else None
    comp_sev = {a: 0.0 for a in ARTIFACTS}
    if severity == 0.0:
        params.update(components=[], component_severities=comp_sev, head_severities=_heads(comp_sev))
        return data.copy(), params
    if artifact == "mix":
        k = int(rng.integers(2, 4))
        chosen = [str(a) for a in rng.choice(ARTIFACTS, size=k, replace=False)]
        sevs = split_severity(severity, k, rng)
        child_seeds = rng.integers(0, 2**31 - 1, size=k)
        order = sorted(range(k), key=lambda i: APPLY_ORDER.index(chosen[i]))
        out = data
        comps = []
        for i in order:
            a = chosen[i]
            comp_sev[a] = sevs[i]
            child = np.random.default_rng(int(child_seeds[i]))
            if match_ssim:
                ref_loss = loss if out is data else _SSIMLoss(out, mask)  # each component vs its own input
                out, p = apply_matched(out, a, sevs[i], child, spacing, loss=ref_loss, noise_variant=noise_variant)
            else:
                out, p = apply_artifact(out, a, severity_to_param(a, sevs[i], dim=3), child, spacing, noise_variant)
            comps.append({"artifact": a, "severity": sevs[i], "seed": int(child_seeds[i]), **p})
        params["components"] = comps
        params["combined_severity_rule"] = "1 - D*S = prod(1 - D*s_i), D = TARGET_SSIM_DROP"
    elif match_ssim:
        out, p = apply_matched(data, artifact, severity, rng, spacing, loss=loss, noise_variant=noise_variant)
        comp_sev[artifact] = severity
        params.update(p)
        params["components"] = [{"artifact": artifact, "severity": severity, **p}]
    else:
        out, p = apply_artifact(data, artifact, severity_to_param(artifact, severity, dim=3), rng, spacing,
                                noise_variant)
        comp_sev[artifact] = severity
        params.update(p)
        params["components"] = [{"artifact": artifact, "severity": severity, **p}]
    params["component_severities"] = comp_sev
    params["head_severities"] = _heads(comp_sev)
    params["calibration"] = CALIBRATION_SOURCE
    out = np.nan_to_num(np.asarray(out, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if match_ssim:
        params["severity_definition"] = "per-sample masked SSIM = 1 - TARGET_SSIM_DROP * severity (apply_matched)"
        if artifact == "mix":  # a single artifact's achieved SSIM is already in params
            params["ssim"] = 1.0 - loss(out)
    else:
        params["severity_definition"] = "type-mean calibrated parameter (CALIBRATION_3D)"
    return out, _jsonable(params)


def _heads(comp_sev: dict) -> dict:
    return {HEAD_NAMES[a]: float(s) for a, s in comp_sev.items()}
