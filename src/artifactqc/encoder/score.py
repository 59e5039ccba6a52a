"""Batch scoring of many volumes with one loaded encoder -> one row per input volume.

Each volume goes through :func:`artifactqc.encoder.slices.extract_slices` with the slice geometry stored in the
model's ``model.json`` (the same code path as training), the slices run through the encoder in batches,
and per-slice outputs are aggregated to the volume:

* models with a volume head (``volume_head`` in ``model.json``; the default for newly trained models):
  the per-slice hidden features are pooled over the volume (mean over slices, max and min over the three
  orientation means, :func:`artifactqc.encoder.network.pool_volume_features`) and the head gives score, the five
  severities and the latent (:func:`volume_outputs`);
* older models: score, the five severities and the latent = **10 % trimmed mean** over all slices (three
  orientations, middle 60 % of the head). The trimmed mean is robust to a few odd slices (an eye, the edge
  of the field of view) while artifacts that affect one or two orientations only (thick slices blur two of
  the three orientations; ghosts run along one phase-encode axis) still raise the mean.

**Thick-slice (2D) acquisitions** are graded on their acquisition planes (``planes="acquisition"``, the
default). A volume whose file geometry has one voxel side at least :data:`THICK_RATIO` times both others
(e.g. 0.9 x 0.9 x 5 mm, the 2D protocols of clinical sites) shows the blur of its thick slices in two of the
three orientations: that is the protocol, not an artifact, and scoring every orientation gives every such
scan a high score (the builtin model's clean 2D FLAIRs: 1.6-2.0, ``benchmarks/crosssite/thick_builtin.md``). Such
a volume's score and non-resolution severities come from the slices parallel to its acquisition planes only
(the same per-slice outputs, pooled as if the three orientations were those planes); ``severity_resolution``
and the latent (so the density flow) keep every orientation, so the resolution of the protocol is still
reported and a cohort's flow still sees it. ``score_planes`` names what was used: ``all``, or the canonical
orientation (``sagittal``, ``coronal``, ``axial``) of the acquisition planes. The decision uses the file's
voxel sizes only: a thick-slice scan resampled to an isotropic grid is scored on all orientations.

The same slices also go through the intensity-clipping check (:mod:`artifactqc.encoder.saturation`, a few
numpy operations): ``saturation`` (fraction of head pixels on the upper plateau) and ``severity_clipping``
(measured, not learned). The row's ``score`` is max(``score_learned``, ``SCORE_SCALE`` × ``severity_clipping``);
``score_learned`` keeps the encoder's own score so a reader sees which of the two set it. The latent (and so
the density flow) is the encoder's only.

A file that cannot be read or scored gives ``status="failed"``, ``error="<error_type>: <message>"`` and NaN
outputs; it never stops the batch.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .. import io
from ..io import THICK_RATIO, acquisition_axis  # noqa: F401  (re-exported: the scorer's rule)
from ..progress import track
from .checkpoint import load_model
from .network import HEADS, resolve_device
from .saturation import combined_score, saturation_columns
from .slices import extract_slices

log = logging.getLogger(__name__)

TRIM = 0.1

#: columns of the measured (not learned) checks on the slices, after the learned severities
CHECK_COLUMNS = ("severity_clipping", "saturation")

#: the ``planes`` policies: ``acquisition`` = thick-slice scans graded on their acquisition planes, ``all`` =
#: every volume on all three orientations
PLANES = ("acquisition", "all")
#: names of the canonical (RAS+) slice orientations, by the axis normal to the slices
ORIENTATIONS = ("sagittal", "coronal", "axial")


def trimmed_mean(x: np.ndarray, trim: float = TRIM, axis: int = 0) -> np.ndarray:
    """Mean after dropping ``trim`` of the values at each end along ``axis`` (scipy's definition)."""
    from scipy.stats import trim_mean

    return np.asarray(trim_mean(x, trim, axis=axis), dtype=np.float64)


def score_columns(latent_dim: int) -> list[str]:
    """Column order of the score table."""
    return (
        ["path", "status", "error", "score", "score_learned"]
        + [f"severity_{h}" for h in HEADS]
        + list(CHECK_COLUMNS)
        + ["score_planes"]
        + [f"latent_{i}" for i in range(latent_dim)]
        + ["n_slices", "seconds"]
    )


def predict_slices(model: torch.nn.Module, slices: np.ndarray, batch_size: int = 64, device=None) -> dict:
    """Per-slice outputs (numpy): ``score`` [N], ``severity`` [N,5], ``latent`` [N,k], ``hidden`` [N,H]."""
    dev = device or getattr(model, "device", None) or next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    if x.ndim == 3:
        x = x[:, None]
    outs: dict[str, list] = {"score": [], "severity": [], "latent": [], "hidden": []}
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            o = model(x[i:i + batch_size].to(dev, memory_format=torch.channels_last))
            o["severity"] = torch.sigmoid(o["severity_logits"])
            for k, v in outs.items():
                v.append(o[k].float().cpu())
    return {k: torch.cat(v).numpy() for k, v in outs.items()}


def _row(score: float, severity: np.ndarray, latent: np.ndarray) -> dict:
    out = {"score": float(score)}
    for j, h in enumerate(HEADS):
        out[f"severity_{h}"] = float(severity[j])
    for j, v in enumerate(latent):
        out[f"latent_{j}"] = float(v)
    return out


def aggregate(pred: dict, trim: float = TRIM) -> dict:
    """Volume-level values from per-slice predictions (trimmed mean)."""
    return _row(trimmed_mean(pred["score"], trim), trimmed_mean(pred["severity"], trim),
                trimmed_mean(pred["latent"], trim))


def slice_axes(n: int) -> np.ndarray:
    """Canonical orientation (0/1/2) of each of the ``n`` slices of :func:`artifactqc.encoder.slices.extract_from_array`,
    which returns equal blocks of the three orientations in axis order."""
    if n % 3:
        raise ValueError(f"expected equal blocks of slices for the three orientations, got {n} slices")
    return np.repeat(np.arange(3), n // 3)


def volume_outputs(model: torch.nn.Module, pred: dict) -> dict:
    """Volume-level values: the model's :class:`~artifactqc.encoder.network.VolumeHead` on the pooled per-slice
    features if it has one, else the trimmed mean of the per-slice outputs (:func:`aggregate`)."""
    head = getattr(model, "volume_head", None)
    if head is None:
        return aggregate(pred)
    from .network import pool_volume_features

    axis = slice_axes(len(pred["hidden"]))
    dev = next(head.parameters()).device
    with torch.inference_mode():
        feats = pool_volume_features(torch.from_numpy(pred["hidden"]), torch.from_numpy(axis))
        o = head(feats[None].to(dev))
    return _row(float(o["score"][0]), torch.sigmoid(o["severity_logits"][0]).float().cpu().numpy(),
                o["latent"][0].float().cpu().numpy())


def _check_planes(planes: str) -> None:
    if planes not in PLANES:
        raise ValueError(f"planes must be one of {PLANES}, got {planes!r}")


def predict_volume(model: torch.nn.Module, slices: np.ndarray, batch_size: int = 64, device=None,
                   inplane_axis: int | None = None) -> dict:
    """Volume-level score, severities and latent from a volume's slices (all orientations, as extracted).

    With ``inplane_axis`` (a thick-slice acquisition, :func:`acquisition_axis`), the score and the severities
    other than ``resolution`` come from the slices normal to that axis only (its acquisition planes, pooled
    as if they were all three orientations); ``severity_resolution`` and the latent from every orientation."""
    pred = predict_slices(model, slices, batch_size, device)
    out = volume_outputs(model, pred)
    if inplane_axis is None:
        return out
    n = len(pred["score"]) // 3
    block = {k: np.concatenate([v[inplane_axis * n:(inplane_axis + 1) * n]] * 3) for k, v in pred.items()}
    planes = volume_outputs(model, block)
    keep = {"severity_resolution"} | {k for k in out if k.startswith("latent_")}
    return {k: (out[k] if k in keep else v) for k, v in planes.items()}


def score_slices(model: torch.nn.Module, slices: np.ndarray, batch_size: int = 64, device=None,
                 voxel_mm=None, planes: str = "acquisition") -> dict:
    """A volume's row values from its slices (as :func:`artifactqc.encoder.slices.extract_from_array` returns
    them, float32 ``[N, S, S]``): the encoder's outputs (:func:`predict_volume`) with its score kept as
    ``score_learned``, the clipping check (``saturation``, ``severity_clipping``,
    :mod:`artifactqc.encoder.saturation`) and ``score`` = max(score_learned, SCORE_SCALE × severity_clipping).
    ``voxel_mm`` (the canonical voxel sizes, ``info["voxel_mm"]`` of the extraction) and ``planes`` choose the
    planes of a thick-slice acquisition (module docstring; ``score_planes`` records it; without ``voxel_mm``
    every orientation is used). Every scoring path (cohort rows, image rulers, the simulated-artifact
    comparison) goes through here."""
    _check_planes(planes)
    axis = acquisition_axis(voxel_mm) if planes == "acquisition" and voxel_mm is not None else None
    out = predict_volume(model, slices, batch_size, device, inplane_axis=axis)
    out["score_planes"] = "all" if axis is None else ORIENTATIONS[axis]
    out.update(saturation_columns(slices))
    out["score_learned"] = out["score"]
    out["score"] = combined_score(out["score_learned"], out["severity_clipping"])
    return out


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, io.VolumeError):
        return f"{exc.error_type}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def score_volume(model: torch.nn.Module, path: str | os.PathLike, batch_size: int = 64,
                 planes: str = "acquisition") -> dict:
    """One row (dict) for one volume (``planes``: :func:`score_slices`); never raises for a bad input."""
    t0 = time.perf_counter()
    k = int(model.config.latent_dim)
    row: dict = {"path": str(path), "status": "ok", "error": None}
    try:
        sl, info = extract_slices(path, model.slice_cfg)
        row.update(score_slices(model, sl, batch_size, voxel_mm=info["voxel_mm"], planes=planes))
        row["n_slices"] = int(info["n_slices"])
    except Exception as exc:  # one bad file must never stop the batch
        log.warning("scoring failed for %s: %s", path, _error_text(exc))
        row.update({"status": "failed", "error": _error_text(exc), "score": np.nan, "score_learned": np.nan,
                    "n_slices": 0, "score_planes": ""})
        for h in HEADS:
            row[f"severity_{h}"] = np.nan
        for c in CHECK_COLUMNS:
            row[c] = np.nan
        for j in range(k):
            row[f"latent_{j}"] = np.nan
    row["seconds"] = time.perf_counter() - t0
    return row


def score_volumes(
    model: torch.nn.Module | str | os.PathLike,
    paths: Iterable[str | os.PathLike],
    batch_size: int = 64,
    device: str = "auto",
    threads: int | None = None,
    planes: str = "acquisition",
) -> pd.DataFrame:
    """Score many volumes with one model (a loaded encoder, or a model directory loaded once here).

    Returns a DataFrame with one row per input path, columns :func:`score_columns` (``path, status, error,
    score, score_learned, severity_<head> ×5, severity_clipping, saturation, score_planes, latent_0..k-1,
    n_slices, seconds``). ``planes``: how thick-slice acquisitions are graded (:func:`score_slices`).
    """
    _check_planes(planes)
    if threads:
        torch.set_num_threads(int(threads))
    if not isinstance(model, torch.nn.Module):
        model = load_model(model, device=device)
    else:
        dev = resolve_device(device) if device != "auto" or not hasattr(model, "device") else model.device
        model.to(dev).eval()
        model.device = dev
    if not hasattr(model, "slice_cfg"):
        from .slices import SliceConfig

        model.slice_cfg = SliceConfig()
    rows = []
    paths = list(paths)
    for i, p in enumerate(track(paths, desc="score", unit="volume")):
        rows.append(score_volume(model, p, batch_size, planes=planes))
        r = rows[-1]
        log.debug("[%d/%d] %s: %s score=%s (%.2fs)", i + 1, len(paths), p, r["status"],
                  "nan" if r["status"] != "ok" else f"{r['score']:.3f}", r["seconds"])
    cols = score_columns(int(model.config.latent_dim))
    df = pd.DataFrame(rows, columns=cols)
    df["n_slices"] = df["n_slices"].astype("int64")
    df["error"] = df["error"].astype("object")
    return df


def read_path_list(list_file: str | os.PathLike) -> list[str]:
    """Paths from a text file (one per line, ``#`` comments and blank lines ignored) or a table with a
    ``path`` column (``.tsv``/``.csv``/``.parquet``; if it has a ``status`` column, only ``ok`` rows)."""
    p = str(list_file)
    df = None
    if p.endswith(".parquet"):
        df = pd.read_parquet(p)
    elif p.endswith((".tsv", ".csv")):
        df = pd.read_csv(p, sep="\t" if p.endswith(".tsv") else ",")
        if "path" not in df.columns:
            df = None
    if df is not None:
        if "status" in df.columns:
            df = df[df["status"].astype(str) == "ok"]
        return [str(x) for x in df["path"]]
    with open(p) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def score_to_file(model_dir: str, paths: Sequence[str], out: str, batch_size: int = 64, device: str = "auto",
                  threads: int | None = None, planes: str = "acquisition") -> pd.DataFrame:
    """Load the model once, score ``paths`` and write ``out`` (.parquet, or .tsv/.csv by suffix)."""
    df = score_volumes(model_dir, paths, batch_size=batch_size, device=device, threads=threads, planes=planes)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".tsv"):
        df.to_csv(out, sep="\t", index=False)
    elif out.endswith(".csv"):
        df.to_csv(out, index=False)
    else:
        df.to_parquet(out, index=False)
    return df


def score_from_cli(model_dir: str, paths: Sequence[str], list_file: str | None, out: str, **kw) -> pd.DataFrame:
    """``artifactqc score``: paths from the command line and/or ``--list``; writes ``out``."""
    allp = list(paths or []) + (read_path_list(list_file) if list_file else [])
    return score_to_file(model_dir, allp, out, **kw)
