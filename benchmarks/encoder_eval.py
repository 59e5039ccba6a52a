"""Evaluation code shared by the encoder benchmarks (``benchmarks/encoder``, ``benchmarks/crosssite``).

Scores simulated and benignly changed volumes with a trained encoder and computes the issue's quality
numbers (Pearson r(SS, score), Spearman per type, argmax of the heads). Import it from a benchmark script
with ``sys.path.insert(0, <repo>/benchmarks)``; it holds no data lists of its own.
"""

from __future__ import annotations

import numpy as np

TYPES = ("noise", "ghosting", "bias", "anisotropy", "motion")
#: the encoder head that names each simulated type
HEAD_OF = {"noise": "noise", "ghosting": "ghosting", "bias": "bias", "anisotropy": "resolution", "motion": "motion"}
HEADS = ("noise", "ghosting", "motion", "bias", "resolution")  # score row columns severity_<head>


def score_array(model, data: np.ndarray, affine: np.ndarray) -> dict:
    """The scorer's row (score, score_learned, severity_<head>, severity_clipping, saturation, latents) for an
    in-memory volume (``encoder.score.score_slices``, as the workflow scores a file)."""
    from artifactqc.encoder.score import score_slices
    from artifactqc.encoder.slices import extract_from_array

    s, info = extract_from_array(data, affine, model.slice_cfg)
    return score_slices(model, s, voxel_mm=info["voxel_mm"])


def canon_norm(path):
    """Canonical volume scaled to ~[0, 1] for the simulator by a pure scale (``encoder.slices.scale_for_simulation``),
    so its clean slices are exactly those of the raw file. (Results before 2026-11-23 14:30 used
    ``io.normalize_intensity`` here, whose offset+clip is not idempotent under the scorer's normalisation.)"""
    from artifactqc import io
    from artifactqc.encoder.slices import scale_for_simulation

    v = io.load_volume(path)
    d, a = io.to_canonical(v.data, v.affine)
    return scale_for_simulation(d), a


def argmax_head(row: dict) -> str:
    """The head with the largest predicted severity in a score row."""
    return HEADS[int(np.argmax([row[f"severity_{h}"] for h in HEADS]))]


def quality_metrics(rows: list[dict], types=TYPES) -> dict:
    """The issue's quality numbers for one set of rows (dicts with ``severity``, ``artifact`` — "none" for
    clean —, ``score``, ``severity_<head>``, ``contrast``, ``volume``, optionally ``ssim``)."""
    from scipy.stats import pearsonr, spearmanr

    ss = np.array([r["severity"] for r in rows])
    sc = np.array([r["score"] for r in rows])
    res = {"n": len(rows), "pearson_overall": float(pearsonr(ss, sc).statistic)}
    if all("ssim" in r for r in rows):
        # ceiling: an oracle that measures each row's masked SSIM loss against its clean volume
        res["pearson_ss_vs_ssim_loss"] = float(pearsonr(ss, [1.0 - r["ssim"] for r in rows]).statistic)
    per_type = {}
    for t in types:
        m = np.array([r["artifact"] in (t, "none") for r in rows])
        per_type[t] = float(spearmanr(ss[m], sc[m]).statistic)
    res["spearman_by_type"] = per_type
    per_contrast = {}
    for c in sorted({r["contrast"] for r in rows}):
        m = np.array([r["contrast"] == c for r in rows])
        if len(set(ss[m])) > 1:
            per_contrast[c] = float(pearsonr(ss[m], sc[m]).statistic)
    res["pearson_by_contrast"] = per_contrast
    hi = [r for r in rows if r["artifact"] != "none" and r["severity"] >= 0.5]
    correct = [argmax_head(r) == HEAD_OF[r["artifact"]] for r in hi]
    res["argmax_accuracy_ss_ge_0.5"] = float(np.mean(correct))
    res["argmax_accuracy_by_type"] = {
        t: float(np.mean([c for c, r in zip(correct, hi) if r["artifact"] == t])) for t in types
    }
    res["clean_scores"] = {r["volume"]: r["score"] for r in rows if r["artifact"] == "none"}
    res["score_at_0.5_by_type"] = {
        t: float(np.mean([r["score"] for r in rows if r["artifact"] == t and abs(r["severity"] - 0.5) < 0.11]))
        for t in types
    }
    return res


def auroc(pos, neg) -> float:
    """Area under the ROC curve of ``pos`` (should score higher) against ``neg`` (ties count half)."""
    from scipy.stats import mannwhitneyu

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


# ------------------------------------------------------------------------------------ benign changes
def resample(data: np.ndarray, affine: np.ndarray, new_mm: float):
    """Trilinear resampling to an isotropic ``new_mm`` grid (affine updated)."""
    from scipy.ndimage import affine_transform

    from artifactqc import io

    old = io.voxel_sizes(affine)
    shape = np.maximum(1, np.round(np.array(data.shape) * old / new_mm)).astype(int)
    scale = new_mm / old
    out = affine_transform(data, np.diag(scale), output_shape=tuple(shape), order=1, mode="nearest")
    new_aff = affine.copy()
    new_aff[:3, :3] = affine[:3, :3] @ np.diag(scale)
    return out.astype(np.float32), new_aff


def reorient(data: np.ndarray, affine: np.ndarray):
    """Permute axes (0,1,2)->(1,2,0) and flip the new first axis; affine updated consistently."""
    perm = (1, 2, 0)
    t = np.transpose(data, perm)
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3][:, list(perm)]
    n = t.shape[0]
    t = t[::-1]
    flip = np.eye(4)
    flip[0, 0] = -1
    flip[0, 3] = n - 1
    return np.ascontiguousarray(t), aff @ flip


def int16_x1000(data: np.ndarray) -> np.ndarray:
    """The volume rescaled to a ×1000 range and rounded through int16 (as a different export would store it)."""
    return np.round(data / max(float(data.max()), 1e-6) * 30.0 * 1000.0).astype(np.int16).astype(np.float32)
