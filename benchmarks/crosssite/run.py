"""Leave-site-out benchmark of the artifact encoder (issue 16): the headline quality benchmark.

The usable real volumes of ``../shared/data`` are grouped by site/source (MANIFEST ``group``; the templates
are not a site and always train). Each fold trains on every other site and evaluates on whole held-out sites.
Per fold, on the fold's evaluation volumes (whole held-out sites):

* the five simulated types at SS 0.25/0.5/0.75/1 with both severity definitions (type-mean calibration =
  ``simulate_volume`` default, and per-sample SSIM-matched, ``match_ssim=True``): Pearson r(SS, score),
  Spearman per type, argmax of the heads (SS >= 0.5), AUROC (SS >= 0.5 vs the clean held-out volumes);
* four artifact kinds the trainer never simulates (implemented here, kept out of training): intensity
  clipping/saturation, a k-space spike (herringbone stripes), a signal-dropout slab, wrap-around (aliasing),
  each mild and strong: AUROC vs clean, per kind and together; each row's masked SSIM is recorded;
* benign changes: resampling to 1.5 mm, int16 x1000 rescale, reorientation, re-save through NIfTI: |change of
  the clean score| in absolute terms, x the clean-score sd and x the clean-score range of the held-out sites;
* the clean-score distribution of *every* volume of the held-out sites (3D; for thick-slice 2D scans also the
  largest non-resolution head).

Then ``table`` writes mean +- sd over folds (the sd is the fold-to-fold spread) into results.md/results.json.

Steps (cached per fold under ``benchmarks/crosssite/cache/<fold>/``, gitignored, so the benchmark runs in pieces):

    python benchmarks/crosssite/run.py fold ixi --budget proxy          # train (if needed) + evaluate one fold
    python benchmarks/crosssite/run.py folds                            # list folds and their volumes
    python benchmarks/crosssite/run.py cache clinical2d --budget proxy  # only the evaluation cache of a fold
    python benchmarks/crosssite/run.py proxy                            # the two proxy folds, proxy budget
    python benchmarks/crosssite/run.py table --budget proxy             # results.md / results.json
    python benchmarks/crosssite/run.py thick                            # builtin model on the clean 2D scans
    python benchmarks/crosssite/run.py ensemble --budget full            # average each fold's seed runs

``--tag NAME`` keeps a variant's models and metrics apart (``cache/<fold>/<budget>-<tag>/``); ``--train JSON``
passes further ``train_encoder`` arguments (the idea under test). The simulated evaluation slices do not
depend on the model and are cached once per fold and budget (``cache/<fold>/eval-<n>.npz``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/_harness.py, benchmarks/encoder_eval.py
import _harness as H  # noqa: E402
from encoder_eval import (  # noqa: E402  (shared with benchmarks/encoder)
    HEADS, TYPES, auroc, canon_norm, int16_x1000, quality_metrics, reorient, resample,
)

log = logging.getLogger("bench.crosssite")
CACHE = HERE / "cache"

# ---------------------------------------------------------------------------------------- the data
#: not usable for this benchmark (reason): duplicates, crops, EPI, non-brain
EXCLUDE = {
    "templates/mricron_ch2better.nii.gz": "ch2's subject again (0.5 mm)",
    "templates/niivue-images_spm152.nii.gz": "another MNI average",
    "volumes/dcm_qa_canon_61/3000_DTI_PA-ortho_cl_b0.nii.gz": "3 mm b0 EPI",
    "volumes/dipy/aniso_vox.nii.gz": "4x4x5 mm b0 EPI",
    "volumes/nibabel/anatomical.nii.gz": "a 33x41x25 crop at 2 mm",
}
#: held-out sites per fold (MANIFEST ``group`` values; ``IXI_*`` = every IXI-Hammersmith subject)
FOLDS = {
    "ixi": ["IXI_*"],
    "clinical2d": ["open_ms_data"],
    "t2flair3d": ["CSTAR_stroke_patient", "T2lesion", "py_synthsr", "coreg_qa"],
    "newscanners": ["dcm_qa_xa30", "dcm_qa_uih", "chris_rorden", "Seg3D_MR", "register_T1_head", "register_T2w",
                    "dcm_qa_decubitus_subj1"],
}
#: the evaluation volumes of each fold (all from its held-out sites; the proxy uses the first three). The
#: clean-score distribution uses every volume of the held-out sites.
EVAL = {
    "ixi": ["volumes/NiChart_IXI/IXI296-HH-1970_T1.nii.gz", "volumes/NiChart_IXI/IXI316-HH-1862_T1.nii.gz",
            "volumes/NiChart_IXI/IXI329-HH-1908_T1.nii.gz", "volumes/NiChart_IXI/IXI334-HH-1907_T1.nii.gz",
            "volumes/NiChart/IXI012-HH-1211_T1.nii.gz", "volumes/NiChart_IXI/IXI132-HH-1415_T1.nii.gz"],
    "clinical2d": ["volumes/open_ms_data/oms_long_patient01_study1_T1W.nii.gz",
                   "volumes/open_ms_data/oms_long_patient03_study1_FLAIR.nii.gz",
                   "volumes/open_ms_data/oms_long_patient04_study1_T2W.nii.gz",
                   "volumes/open_ms_data/oms_long_patient12_study1_FLAIR.nii.gz",
                   "volumes/open_ms_data/oms_long_patient12_study2_T1W.nii.gz",
                   "volumes/open_ms_data/oms_long_patient01_study1_T2W.nii.gz"],
    "t2flair3d": ["volumes/VolumeRenderingData/stroke_T1.nii.gz", "volumes/VolumeRenderingData/stroke_T2.nii.gz",
                  "volumes/VolumeRenderingData/stroke_FLAIR.nii.gz", "volumes/py_synthsr/synthsr_example_FLAIR.nii.gz",
                  "volumes/T2lesion/arc_M2265_T2w.nii.gz", "volumes/coreg_qa/coreg_qa_highres_brain.nii.gz"],
    "newscanners": ["volumes/dcm_qa_xa30/xa30_s5_anat-T1w_acq-tfl.nii.gz", "volumes/niivue-images/chris_t1.nii.gz",
                    "volumes/VolumeRenderingData/seg3D_MR.nii.gz",
                    "volumes/niivue-demo-images/register_T1_head_ext2.nii.gz",
                    "volumes/dcm_qa_decubitus/HFP/t1_fl2d_sag_2.nii.gz", "volumes/dcm_qa_uih/uih_t1_gre_fsp_3d_sag_132750.nii.gz"],
}
#: the trainer's validation volumes per fold (whole volumes of training sites; fixed so --seed varies only
#: initialisation and pool draws). v9's set where IXI trains.
V9_VALIDATION = ["templates/spm12_avg152T1.nii.gz", "volumes/NiChart_IXI/IXI174-HH-1571_T1.nii.gz",
                 "volumes/NiChart_IXI/IXI239-HH-2296_T1.nii.gz", "volumes/NiChart_IXI/IXI252-HH-1693_T1.nii.gz"]
VALIDATION = {
    "ixi": ["templates/spm12_avg152T1.nii.gz", "templates/spm12_single_subj_T1.nii.gz",
            "volumes/dcm_qa_xa30/xa30_s6_anat-T1w_acq-tfl.nii.gz", "volumes/coreg_qa/coreg_qa_highres_brain.nii.gz"],
}
PROXY_FOLDS = ("ixi", "clinical2d")
#: training budgets: a fixed number of optimiser steps and of new corrupted volumes per epoch (deterministic
#: for a seed: ``pool_refresh``); ``max_minutes`` is only a safety cap (it never bound in the committed runs,
#: see results.json ``train.stop_reason``); no early stopping (patience > epochs), the best validation epoch
#: (EMA weights) is kept. The rest is the v9 recipe of benchmarks/encoder.
BUDGETS = {
    "proxy": {"epochs": 6, "steps_per_epoch": 25, "pool_refresh": 6, "max_minutes": 90.0, "eval_volumes": 3},
    "screen": {"epochs": 12, "steps_per_epoch": 50, "pool_refresh": 10, "max_minutes": 60.0, "eval_volumes": 3},
    "full": {"epochs": 24, "steps_per_epoch": 50, "pool_refresh": 15, "max_minutes": 150.0, "eval_volumes": 6},
    # twice the full budget (the builtin model's): does a longer training transfer better?
    "long": {"epochs": 48, "steps_per_epoch": 50, "pool_refresh": 15, "max_minutes": 150.0, "eval_volumes": 6},
}
#: the shipped model's budget (``builtin`` step: every usable volume trains, no fold held out)
BUILTIN_BUDGET = {"epochs": 48, "steps_per_epoch": 50, "pool_refresh": 15, "max_minutes": 150.0}
#: budgets evaluated on the two proxy folds only (screening); ``full`` runs every fold
TWO_FOLD_BUDGETS = ("proxy", "screen")
V9_RECIPE = {"batch_size": 32, "lr": 2e-3, "pool_size": 300, "train_slices_per_axis": 12,
             "val_severities": (0.3, 0.6, 0.9)}
SEVERITIES = (0.25, 0.5, 0.75, 1.0)
UNSEEN = ("clipping", "spike", "dropout", "wrap")
UNSEEN_LEVELS = {"mild": 0.5, "strong": 1.0}
BENIGN = ("resampled_1.5mm", "int16_x1000", "reoriented", "resaved")



def inventory(data: Path):
    """The usable volumes: ``file, contrast, site, thick`` (site = MANIFEST group, ``templates`` for templates;
    thick = largest/smallest voxel size >= 1.9, i.e. a thick-slice 2D acquisition)."""
    import pandas as pd

    m = pd.read_csv(data / "MANIFEST.tsv", sep="\t", dtype=str).fillna("")
    m = m[(m.kind == "TEMPLATE") | m.kind.str.startswith("real_brain")]
    m = m[~m.file.isin(EXCLUDE)].copy()
    m["site"] = np.where(m.kind == "TEMPLATE", "templates", m.group)
    vox = m.voxel_mm.str.split("x").apply(lambda v: [float(x) for x in v])
    m["thick"] = vox.apply(lambda v: max(v) / min(v) >= 1.9)
    return m[["file", "contrast", "site", "thick"]].reset_index(drop=True)


def site_matches(site: str, pattern: str) -> bool:
    """Whether a MANIFEST group is ``pattern`` (``X*``: any group starting with X)."""
    return site == pattern or (pattern.endswith("*") and site.startswith(pattern[:-1]))


def held_out(site: str, fold: str) -> bool:
    return any(site_matches(site, g) for g in FOLDS[fold])


def fold_split(data: Path, fold: str) -> dict:
    """``train`` (3D volumes of the other sites and the templates, minus ``val``), ``val``, ``test`` (every
    volume of the held-out sites), ``eval`` (the simulated subset)."""
    inv = inventory(data)
    ho = inv.site.apply(lambda s: held_out(s, fold))
    val = VALIDATION.get(fold, V9_VALIDATION)
    train = inv[~ho & ~inv.thick & ~inv.file.isin(val)].file.tolist()
    test = inv[ho]
    assert not set(val) & set(test.file), f"{fold}: validation volume in the held-out sites"
    assert set(EVAL[fold]) <= set(test.file), f"{fold}: evaluation volume outside the held-out sites"
    return {"train": train, "val": val, "test": test.to_dict("records"), "eval": EVAL[fold],
            "held_out_sites": sorted(test.site.unique()), "excluded_thick_from_training":
            inv[~ho & inv.thick].file.tolist()}


# ---------------------------------------------------------------- training data: raw or N4 (+ SR)
#: training data variants: ``raw3d`` = the 3D volumes as stored (the v9 recipe; thick-slice scans never train);
#: ``n4sr`` = the workflow's own training path: every training-site volume N4-corrected, thick-slice scans then
#: super-resolved (config/config.yaml ``preprocess`` defaults), so the 2D clinical scans train too; ``sr`` = the
#: 3D volumes as stored plus the thick-slice scans super-resolved without N4 (intensities as acquired); ``raw`` =
#: every training-site volume as stored, thick-slice scans included on their own grid: the trainer keeps only
#: their acquisition-plane slices (:func:`artifactqc.training.pool._keep_slices`), the planes the scorer grades
#: them on, and the simulator draws their anisotropy, ghosting and motion along an in-plane axis
DATA_VARIANTS = ("raw3d", "n4sr", "sr", "raw")
PREP = CACHE / "prep"


def prep_settings() -> tuple[dict, dict, float]:
    """The workflow's default N4 and super-resolution settings, read from config/config.yaml (as the rules pass
    them), so the benchmark trains on what the workflow would make of these volumes."""
    import yaml

    cfg = yaml.safe_load((HERE.parents[1] / "config" / "config.yaml").read_text())["preprocess"]
    n4 = {k: cfg["n4"][k] for k in ("shrink_factor", "iters", "tol", "spline_distance_mm")} | {
        "mask_method": cfg["n4"]["mask"]}
    sr = {k: cfg["superres"][k] for k in ("method", "profile", "profile_width", "half_slices", "half_width",
                                          "phase_bins", "ridge", "seed")}
    return n4, sr, float(cfg["superres"]["ratio"])


def prepped(rel: str, with_n4: bool = True) -> Path:
    """The N4 (+ super-resolution) copy of a volume in the prep cache (``with_n4=False``: super-resolution only)."""
    stem = rel.replace("/", "__").removesuffix(".gz").removesuffix(".nii")
    return PREP / (stem + ("" if with_n4 else "_sr") + ".nii.gz")


def prep_volumes(data: Path, files: list[str], with_n4: bool = True) -> list[Path]:
    """N4 (unless ``with_n4`` is false) and super-resolution (thick slices only) of each file into the prep
    cache (once; a file under its final name is complete), as the workflow's n4 and superres rules do; returns
    the prepared paths."""
    from artifactqc.preprocess.n4 import n4_file
    from artifactqc.preprocess.superres import superres_file

    n4, sr, ratio = prep_settings()
    PREP.mkdir(parents=True, exist_ok=True)
    out = []
    for rel in files:
        dst = prepped(rel, with_n4)
        if not dst.is_file():
            t0 = time.perf_counter()
            mid, tmp = (dst.with_name(f".{x}-{dst.name}") for x in ("n4", "tmp"))  # NIfTI names for nibabel
            if with_n4:
                n4_file(data / rel, mid, **n4)
            info = superres_file(mid if with_n4 else data / rel, tmp, ratio=ratio, **sr)
            tmp.replace(dst)
            mid.unlink(missing_ok=True)
            steps = ["N4"] * with_n4 + ["super-resolution"] * bool(info.get("superresolved"))
            log.info("prepared %s (%s, %.0f s)", rel, " + ".join(steps) or "copied", time.perf_counter() - t0)
        out.append(dst)
    return out


def training_files(data: Path, split: dict, variant: str) -> tuple[list[str], list[str]]:
    """Training and validation paths of a fold for a data variant."""
    if variant == "raw3d":
        return [str(data / f) for f in split["train"]], [str(data / f) for f in split["val"]]
    if variant == "raw":
        train = split["train"] + split["excluded_thick_from_training"]
        return [str(data / f) for f in train], [str(data / f) for f in split["val"]]
    if variant == "sr":
        thick = [str(p) for p in prep_volumes(data, split["excluded_thick_from_training"], with_n4=False)]
        return [str(data / f) for f in split["train"]] + thick, [str(data / f) for f in split["val"]]
    train = split["train"] + split["excluded_thick_from_training"]
    return ([str(p) for p in prep_volumes(data, train)], [str(p) for p in prep_volumes(data, split["val"])])


# ------------------------------------------------------------------------ unseen artifact kinds
def unseen_artifact(d: np.ndarray, kind: str, level: float, seed: int) -> tuple[np.ndarray, dict]:
    """Artifact kinds the trainer never simulates, on a ~[0, 1] volume; ``level`` in (0, 1]."""
    from artifactqc.simulate import head_mask

    rng = np.random.default_rng(seed)
    mask = head_mask(d)
    out = d.astype(np.float32).copy()
    if kind == "clipping":  # saturation: intensities above a head percentile are clipped flat
        q = 95.0 - 35.0 * level  # mild: 77.5th, strong: 60th percentile of the head
        c = float(np.percentile(d[mask], q))
        out = np.minimum(out, c)
        return out, {"clip_percentile": q}
    if kind == "spike":  # one bad k-space sample: stripes across the whole field of view (herringbone)
        f = np.fft.fftn(out)
        idx = tuple(int(rng.integers(n // 8, n // 3)) * int(rng.choice([-1, 1])) for n in out.shape)
        amp = (0.25 + 0.75 * level) * abs(f[0, 0, 0])
        f[idx] += amp * np.exp(1j * rng.uniform(0, 2 * np.pi))
        return np.abs(np.fft.ifftn(f)).astype(np.float32), {"k_index": idx, "amplitude_rel_dc": amp / abs(f[0, 0, 0])}
    if kind == "dropout":  # a slab of slices with lost signal (coil element / RF failure)
        ax = int(rng.integers(3))
        nz = np.nonzero(mask.any(axis=tuple(i for i in range(3) if i != ax)))[0]
        lo, hi = (int(nz.min()), int(nz.max())) if nz.size else (0, out.shape[ax] - 1)
        width = max(1, int(round((0.08 + 0.12 * level) * (hi - lo + 1))))
        start = int(rng.integers(lo + (hi - lo) // 4, max(lo + (hi - lo) // 4 + 1, hi - (hi - lo) // 4 - width)))
        sl = [slice(None)] * 3
        sl[ax] = slice(start, start + width)
        out[tuple(sl)] *= 1.0 - 0.85 * level
        return out, {"axis": ax, "start": start, "width": width, "attenuation": 0.85 * level}
    if kind == "wrap":  # field of view smaller than the head along one axis: the outside folds over
        ax = int(rng.integers(3))
        nz = np.nonzero(mask.any(axis=tuple(i for i in range(3) if i != ax)))[0]
        lo, hi = (int(nz.min()), int(nz.max())) if nz.size else (0, out.shape[ax] - 1)
        cut = max(1, int(round((0.06 + 0.10 * level) * (hi - lo + 1))))
        fov_lo, fov_hi = lo + cut, hi + 1 - cut  # FOV [fov_lo, fov_hi)
        L = fov_hi - fov_lo
        o = np.moveaxis(out, ax, 0)
        inside = o[fov_lo:fov_hi].copy()
        below = o[:fov_lo][-L:]
        above = o[fov_hi:][:L]
        inside[L - len(below):] += below  # the part below the FOV appears at its far end
        inside[: len(above)] += above  # the part above appears at its near end
        new = np.zeros_like(o)
        new[fov_lo:fov_hi] = inside
        return np.ascontiguousarray(np.moveaxis(new, 0, ax)), {"axis": ax, "cut_voxels_each_side": cut}
    raise ValueError(f"unknown unseen artifact kind {kind!r}")


# ------------------------------------------------------------------------------- evaluation cache
def thick_geometry(cfg) -> dict:
    """The thick-slice part of a slice geometry (``SliceConfig``): ``{}`` for the fixed grid."""
    if not cfg.thick_pixel_ratio:
        return {}
    return {"thick_pixel_ratio": cfg.thick_pixel_ratio, "min_pixel_mm": cfg.min_pixel_mm}


def eval_cache_path(fold: str, n_eval: int, geometry: dict) -> Path:
    """A fold's evaluation cache: ``eval-<n>.npz`` for the fixed grid, ``eval-<n>-thick<r>.npz`` when
    thick-slice scans are sampled at ``r`` × their in-plane voxel size (``SliceConfig.thick_pixel_ratio``), with
    ``-min<m>`` when their finest pixel is not ``SliceConfig``'s default."""
    from artifactqc.encoder.slices import SliceConfig

    if not geometry:
        return CACHE / fold / f"eval-{n_eval}.npz"
    m = geometry["min_pixel_mm"]
    name = f"eval-{n_eval}-thick{geometry['thick_pixel_ratio']:g}"
    if m != SliceConfig.min_pixel_mm:
        name += f"-min{m:g}"
    return CACHE / fold / f"{name}.npz"


def load_eval_cache(data: Path, fold: str, n_eval: int, geometry: dict) -> tuple[list, list[dict]]:
    """``(X, meta)`` of a fold's evaluation cache for a slice ``geometry`` (:func:`thick_geometry`; built first
    when missing): X one ``[N, S, S]`` slice stack per row (rows of several image sizes when thick-slice scans
    are sampled finer). A fold without thick-slice volumes has one cache for every geometry."""
    if not any(r["thick"] for r in fold_split(data, fold)["test"]):
        geometry = {}
    path = eval_cache_path(fold, n_eval, geometry)
    if not path.is_file():
        log.info("building the evaluation cache of fold %s -> %s", fold, path)
        build_eval_cache(data, fold, n_eval, path, geometry)
    z = np.load(path)
    meta = [json.loads(s) for s in z["meta"]]
    return (z["X"] if "X" in z.files else [z[f"X{i}"] for i in range(len(meta))]), meta


def build_eval_cache(data: Path, fold: str, n_eval: int, path: Path, geometry: dict | None = None) -> None:
    """Slices of every evaluation row of a fold (model-independent for a slice geometry: ``geometry``, see
    :func:`thick_geometry`): clean held-out volumes, the five types at both severity definitions, the
    unseen kinds and the benign changes; float16 slices + row metadata."""
    import nibabel as nib
    import tempfile

    from artifactqc import io
    from artifactqc.simulate import head_mask, simulate_volume, ssim_masked
    from artifactqc.encoder.slices import SliceConfig, extract_from_array

    cfg = SliceConfig(**(geometry or {}))
    split = fold_split(data, fold)
    X, meta = [], []

    def add(s, **m):
        X.append(s.astype(np.float16))
        meta.append(m)

    t0 = time.perf_counter()
    for rec in split["test"]:  # clean distribution: every held-out volume, as stored
        v = io.load_volume(data / rec["file"])
        s, _ = extract_from_array(v.data, v.affine, cfg)
        add(s, volume=rec["file"], contrast=rec["contrast"], site=rec["site"], thick=bool(rec["thick"]),
            kind="clean", artifact="none", severity=0.0, definition="", ssim=1.0)
    info = {r["file"]: r for r in split["test"]}
    for k, rel in enumerate(split["eval"][:n_eval]):
        rec = info[rel]
        base = dict(volume=rel, contrast=rec["contrast"], site=rec["site"], thick=bool(rec["thick"]))
        d, a = canon_norm(data / rel)
        spacing = tuple(float(z) for z in io.voxel_sizes(a))
        mask = head_mask(d)
        for definition in ("mean", "matched"):
            for t in TYPES:
                for sv in SEVERITIES:
                    c, p = simulate_volume(d, t, sv, seed=1000 * k + int(100 * sv), spacing=spacing,
                                           match_ssim=definition == "matched")
                    ssim = p["ssim"] if definition == "matched" else ssim_masked(d, c, mask)
                    add(extract_from_array(c, a, cfg)[0], **base, kind="simulated", artifact=t, severity=sv,
                        definition=definition, ssim=float(ssim))
            log.info("%s %s: %s simulated (%.0f s)", fold, rel, definition, time.perf_counter() - t0)
        for j, kind in enumerate(UNSEEN):
            for lev_name, lev in UNSEEN_LEVELS.items():
                c, p = unseen_artifact(d, kind, lev, seed=7000 + 100 * k + 10 * j)
                add(extract_from_array(c, a, cfg)[0], **base, kind="unseen", artifact=kind, severity=lev,
                    definition=lev_name, ssim=float(ssim_masked(d, c, mask)))
        v = io.load_volume(data / rel)  # benign changes of the file as stored
        add(extract_from_array(v.data, v.affine, cfg)[0], **base, kind="benign_base", artifact="none",
            severity=0.0, definition="", ssim=1.0)
        changed = {"resampled_1.5mm": resample(v.data, v.affine, 1.5), "int16_x1000": (int16_x1000(v.data), v.affine),
                   "reoriented": reorient(v.data, v.affine)}
        with tempfile.TemporaryDirectory() as tmp:  # re-save: float32 NIfTI-1 written by nibabel, read back
            f = Path(tmp) / "resaved.nii"
            nib.save(nib.Nifti1Image(np.asarray(v.data, np.float32), v.affine), str(f))
            r = io.load_volume(f)
            changed["resaved"] = (r.data, r.affine)
        for name, (cd, ca) in changed.items():
            add(extract_from_array(cd, ca, cfg)[0], **base, kind="benign", artifact=name, severity=0.0,
                definition="", ssim=float("nan"))
        log.info("%s %s done (%.0f s)", fold, rel, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_a = np.array([json.dumps(m) for m in meta])
    if len({x.shape for x in X}) == 1:
        np.savez(path, X=np.stack(X), meta=meta_a)
    else:  # one array per row: thick-slice scans sampled on a finer grid
        np.savez(path, meta=meta_a, **{f"X{i}": x for i, x in enumerate(X)})


def row_voxel_mm(data: Path, meta: list[dict]) -> list[list[float]]:
    """The canonical voxel sizes of each cached row's volume (what the scorer's extraction reports), from the
    file headers: the stored file's, except the resampled benign change (1.5 mm isotropic)."""
    import nibabel as nib

    from artifactqc import io

    by_file: dict[str, list[float]] = {}
    out = []
    for m in meta:
        if m.get("artifact") == "resampled_1.5mm":
            out.append([1.5, 1.5, 1.5])
            continue
        if m["volume"] not in by_file:
            by_file[m["volume"]] = io.canonical_voxel_sizes(nib.load(str(data / m["volume"])).affine).tolist()
        out.append(by_file[m["volume"]])
    return out


def scoring_model(model_dir: Path, override: dict | None = None):
    """A fold's model for scoring, with its own slice geometry or with the fields of ``override``
    (:func:`geometry_override`)."""
    import dataclasses

    from artifactqc.encoder.checkpoint import load_model

    model = load_model(model_dir, device="cpu")
    if override:
        model.slice_cfg = dataclasses.replace(model.slice_cfg, **override)
    return model


def score_cache(model, X: np.ndarray, voxel_mm: list, planes: str = "acquisition", pooling: str = "head") -> list[dict]:
    """Each cached slice stack scored as a cohort row is (:func:`artifactqc.encoder.score.score_slices`: the
    encoder's outputs, ``score_learned``, the clipping check and the reported ``score``; ``planes`` =
    ``acquisition``: thick-slice scans graded on their acquisition planes, the scorer's default). ``pooling`` =
    ``trimmed`` sets the model's volume head aside, so that its score and severities are the 10 % trimmed mean
    of its slice outputs (the scorer's aggregation for models without a volume head): a benchmark comparison
    (``results-pooling-trimmed.md``), not a scorer option."""
    if pooling == "trimmed":
        model.volume_head = None
    from artifactqc.encoder.score import score_slices

    return [score_slices(model, x.astype(np.float32), voxel_mm=v, planes=planes) for x, v in zip(X, voxel_mm)]


def geometry_override(args) -> dict | None:
    """The slice geometry fields that ``--thick-pixels`` / ``--thick-min-pixel`` set (None: the model's own)."""
    o = {k: float(v) for k, v in (("thick_pixel_ratio", args.thick_pixels), ("min_pixel_mm", args.thick_min_pixel))
         if v is not None}
    return o or None


def scoring_suffix(planes: str, pooling: str = "head", override: dict | None = None) -> str:
    """The name suffix of a scoring policy other than ``--planes acquisition --pooling head`` with the model's
    own slice geometry (the scoring the first tables were made with): ``-planes-all``, ``-pooling-trimmed``,
    ``-thickpx<r>`` / ``-minpx<m>`` (``--thick-pixels`` / ``--thick-min-pixel``), or several."""
    o = override or {}
    return (("" if planes == "acquisition" else f"-planes-{planes}")
            + ("" if pooling == "head" else f"-pooling-{pooling}")
            + ("" if "thick_pixel_ratio" not in o else f"-thickpx{o['thick_pixel_ratio']:g}")
            + ("" if "min_pixel_mm" not in o else f"-minpx{o['min_pixel_mm']:g}"))


def metrics_name(planes: str, pooling: str = "head", override: dict | None = None) -> str:
    """A fold run's metrics file: ``metrics.json`` for ``--planes acquisition --pooling head``,
    ``metrics-planes-all.json`` when thick-slice scans are graded on all orientations (``--planes all``, the
    scoring before 2026-12-03), ``metrics-pooling-trimmed.json`` for the trimmed-mean pooling,
    ``metrics-thickpx<r>-minpx<m>.json`` for another thick-slice geometry (:func:`scoring_suffix`)."""
    return f"metrics{scoring_suffix(planes, pooling, override)}.json"


def fold_metrics(meta: list[dict], rows: list[dict]) -> dict:
    """Every number of one fold from the scored cache rows."""
    R = [m | {k: v for k, v in r.items() if k in ("score", "score_learned") or k.startswith("severity_")}
         for m, r in zip(meta, rows)]
    clean_all = [r for r in R if r["kind"] == "clean"]
    eval_vols = sorted({r["volume"] for r in R if r["kind"] == "simulated"})
    clean_eval = [r for r in clean_all if r["volume"] in eval_vols]
    neg = [r["score"] for r in clean_all]
    res: dict = {"eval_volumes": eval_vols, "n_clean": len(clean_all)}
    for definition in ("mean", "matched"):
        sim = [r for r in R if r["kind"] == "simulated" and r["definition"] == definition]
        q = quality_metrics(clean_eval + sim)
        q.pop("clean_scores")
        pos = [r["score"] for r in sim if r["severity"] >= 0.5]
        q["auroc_ss_ge_0.5_vs_clean"] = auroc(pos, neg)
        q["auroc_by_type"] = {t: auroc([r["score"] for r in sim if r["artifact"] == t and r["severity"] >= 0.5], neg)
                              for t in TYPES}
        res[f"quality_{definition}"] = q
    un = [r for r in R if r["kind"] == "unseen"]
    neg_learned = [r["score_learned"] for r in clean_all]
    res["unseen"] = {"auroc_all_vs_clean": auroc([r["score"] for r in un], neg),
                     # the kinds no rule covers (clipping is covered by the measured clipping check)
                     "auroc_learned_kinds_vs_clean": auroc([r["score"] for r in un if r["artifact"] != "clipping"], neg),
                     "auroc_by_kind_score_learned": {k: auroc([r["score_learned"] for r in un if r["artifact"] == k],
                                                              neg_learned) for k in UNSEEN},
                     "mean_severity_clipping_by_kind": {k: float(np.mean([r["severity_clipping"] for r in un
                                                                          if r["artifact"] == k])) for k in UNSEEN},
                     "auroc_by_kind": {k: auroc([r["score"] for r in un if r["artifact"] == k], neg) for k in UNSEEN},
                     "mean_score_by_kind": {k: float(np.mean([r["score"] for r in un if r["artifact"] == k]))
                                            for k in UNSEEN},
                     "mean_ssim_by_kind": {k: float(np.mean([r["ssim"] for r in un if r["artifact"] == k]))
                                           for k in UNSEEN},
                     "argmax_by_kind": {k: dict(zip(*np.unique([HEADS[int(np.argmax([r[f"severity_{h}"] for h in HEADS]))]
                                                                 for r in un if r["artifact"] == k],
                                                                return_counts=True))) for k in UNSEEN}}
    res["unseen"]["argmax_by_kind"] = {k: {h: int(n) for h, n in v.items()} for k, v in res["unseen"]["argmax_by_kind"].items()}
    cs = np.array(neg)
    nonres = [max(r[f"severity_{h}"] for h in HEADS if h != "resolution") for r in clean_all]
    res["clean"] = {
        "median": float(np.median(cs)), "max": float(cs.max()), "sd": float(cs.std(ddof=1)) if len(cs) > 1 else 0.0,
        "range": float(cs.max() - cs.min()), "fraction_below_0.5": float(np.mean(cs < 0.5)),
        "fraction_below_0.5_3d": float(np.mean([r["score"] < 0.5 for r in clean_all if not r["thick"]]))
        if any(not r["thick"] for r in clean_all) else None,
        "fraction_2d_nonresolution_heads_below_0.5": float(np.mean([x < 0.5 for x, r in zip(nonres, clean_all) if r["thick"]]))
        if any(r["thick"] for r in clean_all) else None,
        "scores": {r["volume"]: round(float(r["score"]), 4) for r in clean_all},
    }
    base = {r["volume"]: r["score"] for r in R if r["kind"] == "benign_base"}
    sd, rng = max(res["clean"]["sd"], 1e-6), max(res["clean"]["range"], 1e-6)
    ben = {}
    for b in BENIGN:
        d = np.array([abs(r["score"] - base[r["volume"]]) for r in R if r["kind"] == "benign" and r["artifact"] == b])
        ben[b] = {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "mean_x_sd": float(d.mean() / sd),
                  "max_x_sd": float(d.max() / sd), "max_x_range": float(d.max() / rng)}
    res["benign"] = ben
    return res


# ----------------------------------------------------------------------------------------- steps
def variant_dir(fold: str, budget: str, tag: str) -> Path:
    return CACHE / fold / (budget if tag == "baseline" else f"{budget}-{tag}")


def seed_dirs(fold: str, budget: str, tag: str) -> dict[int, Path]:
    """``{seed: folder}`` of a fold variant's seed runs that exist: seed 0 is the variant's folder, seed k its
    ``-s<k>`` sibling (other variants whose name merely starts with ``-s``, e.g. ``full-synth``, are not)."""
    base = variant_dir(fold, budget, tag)
    found = sorted(int(d.name[len(base.name) + 2:]) for d in base.parent.glob(base.name + "-s*")
                   if d.name[len(base.name) + 2:].isdigit())
    dirs = {0: base, **{k: base.with_name(f"{base.name}-s{k}") for k in found}}
    return {k: d for k, d in dirs.items() if d.is_dir()}


def drop_training_sites(data: Path, split: dict, sites: list[str]) -> dict:
    """``split`` without the training volumes of ``sites`` (MANIFEST groups; ``X*`` matches a prefix): the
    site-ablation runs (``--drop-sites``) that measure what one more training site is worth."""
    site = inventory(data).set_index("file").site
    drop = [f for f in split["train"] if any(site_matches(site[f], g) for g in sites)]
    unmatched = [g for g in sites if not any(site_matches(site[f], g) for f in split["train"])]
    if unmatched:
        raise ValueError(f"--drop-sites: no training volume of {unmatched} in this fold")
    return split | {"train": [f for f in split["train"] if f not in drop], "dropped": drop}


def train_fold(data: Path, fold: str, budget: str, out: Path, seed: int, threads: int, extra: dict,
               variant: str = "raw3d", drop_sites: list[str] | None = None) -> dict:
    from artifactqc.training.loop import train_encoder

    split = fold_split(data, fold)
    if drop_sites:
        split = drop_training_sites(data, split, drop_sites)
    b = BUDGETS[budget]
    kw = dict(V9_RECIPE, epochs=b["epochs"], steps_per_epoch=b["steps_per_epoch"], pool_refresh=b["pool_refresh"],
              max_minutes=b["max_minutes"], patience=10**6) | extra
    train, val = training_files(data, split, variant)
    t0 = time.perf_counter()
    m = train_encoder(train, out / "model", val_volumes=val, seed=seed, device="cpu", threads=threads,
                      model_id=f"crosssite-{fold}", **kw)
    info = {"seconds": time.perf_counter() - t0, "best_epoch": m.get("best_epoch"), "epochs_run": m.get("epochs_run"),
            "stop_reason": m.get("stop_reason"), "pool_made": m.get("n_corrupted_volumes"),
            "val_pearson_best": (m.get("final") or {}).get("val_pearson"),
            "arguments": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}, "seed": seed,
            "data": variant, "n_train": len(train), "val": split["val"], "dropped": split.get("dropped", [])}
    (out / "train.json").write_text(json.dumps(info, indent=2))
    return info


def cmd_fold(args, data: Path, fold: str) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    b = BUDGETS[args.budget]
    out = variant_dir(fold, args.budget, args.tag)
    if args.seed:
        out = out.with_name(out.name + f"-s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "model.json").is_file():
        log.info("training fold %s (%s budget) -> %s", fold, args.budget, out)
        train_fold(data, fold, args.budget, out, args.seed, args.threads, json.loads(args.train) if args.train else {},
                   args.training_data, args.drop_sites)
    model = scoring_model(out / "model", geometry_override(args))
    X, meta = load_eval_cache(data, fold, b["eval_volumes"], thick_geometry(model.slice_cfg))
    t0 = time.perf_counter()
    rows = score_cache(model, X, row_voxel_mm(data, meta), args.planes, args.pooling)
    res = fold_metrics(meta, rows)
    res |= {"fold": fold, "budget": args.budget, "tag": args.tag, "seed": args.seed, "planes": args.planes,
            "pooling": args.pooling, "thick_geometry": thick_geometry(model.slice_cfg),
            "held_out_sites": fold_split(data, fold)["held_out_sites"], "score_seconds": time.perf_counter() - t0,
            "train": json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else {}}
    tr = json.loads((out / "model" / "model.json").read_text()).get("training", {})  # the model's own record
    res["train"] |= {"pool_made": tr.get("n_corrupted_volumes"), "val_pearson_best": (tr.get("final") or {}).get("val_pearson")}
    (out / metrics_name(args.planes, args.pooling, geometry_override(args))).write_text(json.dumps(res, indent=2))
    log.info("fold %s: r %.3f (matched %.3f), AUROC %.3f, unseen %.3f, clean max %.2f", fold,
             res["quality_mean"]["pearson_overall"], res["quality_matched"]["pearson_overall"],
             res["quality_mean"]["auroc_ss_ge_0.5_vs_clean"], res["unseen"]["auroc_all_vs_clean"], res["clean"]["max"])
    return res


def cmd_builtin(args, data: Path) -> dict:
    """Train the shipped model on every usable volume (no site held out; the validation volumes of the
    folds where IXI trains choose the epoch) with a variant's recipe, into ``args.out``. The model's training
    record names its volumes relative to the development data (with the preparation), not by machine paths."""
    from artifactqc.training.loop import train_encoder

    inv = inventory(data)
    split = {"train": inv[~inv.thick & ~inv.file.isin(V9_VALIDATION)].file.tolist(), "val": V9_VALIDATION,
             "excluded_thick_from_training": inv[inv.thick].file.tolist()}
    train, val = training_files(data, split, args.training_data)
    kw = dict(V9_RECIPE, patience=10**6, **BUILTIN_BUDGET) | (json.loads(args.train) if args.train else {})
    out = Path(args.out)
    t0 = time.perf_counter()
    train_encoder(train, out, val_volumes=val, seed=args.seed, device="cpu", threads=args.threads,
                  model_id=args.model_id, **kw)
    n4 = " (N4)" if args.training_data == "n4sr" else ""
    how = {"n4sr": " (N4 + super-resolution)", "sr": " (super-resolution)", "raw": " (as stored)"}.get(args.training_data, "")
    thick = [f + how for f in split["excluded_thick_from_training"]]
    mj = json.loads((out / "model.json").read_text())
    mj["training"]["train_volumes"] = [f + n4 for f in split["train"]] + (thick if args.training_data != "raw3d" else [])
    mj["training"]["val_volumes"] = [f + n4 for f in split["val"]]
    mj["training"]["data_root"] = "the development data (../shared/data, MANIFEST.tsv): paths are relative to it"
    mj["training"]["recipe"] = {"benchmark": "benchmarks/crosssite/run.py builtin", "tag": args.tag,
                                "training_data": args.training_data, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "model.json").write_text(json.dumps(mj, indent=2) + "\n")
    log.info("builtin model %s -> %s (%.1f min)", args.model_id, out, (time.perf_counter() - t0) / 60)
    return mj


# -------------------------------------------------------------------------------------------- table
def headline(m: dict) -> dict:
    """The per-fold numbers of the summary table (flat)."""
    qm, qs = m["quality_mean"], m["quality_matched"]
    out = {"pearson_typemean": qm["pearson_overall"], "pearson_matched": qs["pearson_overall"],
           **{f"spearman_{t}": qm["spearman_by_type"][t] for t in TYPES},
           "auroc_typemean": qm["auroc_ss_ge_0.5_vs_clean"], "auroc_matched": qs["auroc_ss_ge_0.5_vs_clean"],
           "auroc_unseen": m["unseen"]["auroc_all_vs_clean"],
           "auroc_unseen_noclip": m["unseen"].get("auroc_learned_kinds_vs_clean", float(np.mean(
               [v for k, v in m["unseen"]["auroc_by_kind"].items() if k != "clipping"]))),
           "argmax": qm["argmax_accuracy_ss_ge_0.5"],
           "clean_median": m["clean"]["median"], "clean_max": m["clean"]["max"],
           "clean_below_0.5": m["clean"]["fraction_below_0.5"],
           "resample_max_x_range": m["benign"]["resampled_1.5mm"]["max_x_range"],
           "resample_mean_x_sd": m["benign"]["resampled_1.5mm"]["mean_x_sd"]}
    return out


TARGETS = {"pearson_typemean": ">= 0.80", "pearson_matched": ">= 0.90", **{f"spearman_{t}": ">= 0.85" for t in TYPES},
           "auroc_typemean": ">= 0.95 (no fold < 0.85)", "auroc_matched": ">= 0.95", "auroc_unseen": "(report)", "auroc_unseen_noclip": "(report)",
           "argmax": ">= 0.85", "clean_median": "", "clean_max": "< 0.5", "clean_below_0.5": ">= 0.95",
           "resample_max_x_range": "< 0.5", "resample_mean_x_sd": "< 0.25"}


#: The designs measured against the baseline (issue 16), for the baseline tables: (change, table, outcome).
#: The findings in README.md give the numbers and the reasons.
TRIED = (
    ("N4 + super-resolution training data (`--training-data n4sr` / `sr`)", "results-n4sr_screen.md, results-sr_screen.md",
     "clearly worse on the screen; dropped"),
    ("tissue re-rendering twins with a consistency loss (`render_pairs`)", "results-render_screen.md", "not kept"),
    ("within-anatomy ranking pairs (`rank_pairs`)", "results-rank_screen.md", "not kept"),
    ("thick-slice training items (`thick_augment`)", "results-thick.md", "a trade-off by fold; option, off"),
    ("seed ensembles of 2 and 4 members (scoring only)", "results-ensemble2.md, results-ensemble.md",
     "4 members: AUROC +0.011, r +0.04, argmax +0.09, clean below 0.5 -0.07; 4 x the training"),
    ("trimmed mean of the slice outputs instead of the volume head", "results-pooling-trimmed.md", "no gain"),
    ("thick-slice scans on a finer grid (`thick_pixel_ratio` 1.5)", "results-thickpx1.5-minpx1.md",
     "AUROC +0.023 at this budget, none at the builtin's; option, off"),
    ("zoom items (`zoom_augment`)", "results-zoom.md", "clean offsets down, ranking worse; option, off"),
    ("label-map synthesis: deformed anatomy, re-rendered tissues (`synth_augment`)", "results-synth.md",
     "no mean gain; new scanners +0.04 / +0.07 per seed; option, off"),
    ("longer training (2400 steps, the builtin's budget)", "results_long.md", "3D folds gain, clinical 2D loses"),
    ("thick-slice scans in training as stored, on their acquisition planes (`--training-data raw`)", "results-raw.md",
     "AUROC -0.093 +- 0.029 (every fold worse); dropped"),
    ("the score made from the heads (2 x max, sum, or with the score output; scoring only)", "README.md, Findings",
     "AUROC -0.02 to -0.08; not kept"),
    ("test-time flip: outputs averaged with the mirrored slices' (scoring only)", "README.md, Findings",
     "AUROC +0.000 +- 0.011; not kept"),
    ("volume-adversarial training: confusion loss against a classifier of the training volume",
     "results-adv-thickpx1.5-minpx1.md", "AUROC -0.003 +- 0.031, argmax -0.05; removed"),
    ("test-time alignment to the new site's clean scans: BatchNorm statistics or the volume head's input "
     "(scoring only)", "adapt.md", "AUROC -0.02 to -0.05; not kept"),
    ("fewer training sites or subjects (new-scanner fold, `--drop-sites`)", "results-nootherreal.md, "
     "results-fewerixi.md", "no change beyond seed noise either way"),
)


def _gap(key: str, mean: float) -> str:
    """How far a mean misses its target (signed, in the measure's units), ``met``, or '' without a target."""
    t = TARGETS.get(key, "")
    for op in (">=", "<"):
        if t.startswith(op):
            goal = float(t.split()[1])
            ok = mean >= goal if op == ">=" else mean < goal
            return "met" if ok else f"{mean - goal:+.3f}"
    return ""


def seed_runs(fold: str, budget: str, tag: str, planes: str = "acquisition", pooling: str = "head",
              override: dict | None = None) -> dict[int, dict]:
    """Every finished seed run of a fold variant scored with ``planes`` and ``pooling``: ``{seed: metrics}`` (seed 0 = the
    variant's folder, seed k = its ``-s<k>`` sibling)."""
    runs = {}
    for d in seed_dirs(fold, budget, tag).values():
        p = d / metrics_name(planes, pooling, override)
        if p.is_file():
            m = json.loads(p.read_text())
            runs[int(m.get("seed") or 0)] = m
    return runs


def cmd_table(args) -> dict:
    folds = PROXY_FOLDS if args.budget in TWO_FOLD_BUDGETS else tuple(FOLDS)
    runs = {}
    for f in folds:
        r = seed_runs(f, args.budget, args.tag, args.planes, args.pooling, geometry_override(args))
        if r:
            runs[f] = r
        else:
            log.warning("fold %s has no %s under %s (run: run.py fold %s --budget %s with the same scoring options)",
                        f, metrics_name(args.planes, args.pooling, geometry_override(args)),
                        variant_dir(f, args.budget, args.tag), f, args.budget)
    if not runs:
        sys.exit("no fold results to tabulate")
    per_seed = {f: {s_: headline(m) for s_, m in r.items()} for f, r in runs.items()}
    keys = list(next(iter(next(iter(per_seed.values())).values())))
    H = {f: {k: float(np.mean([h[k] for h in hs.values()])) for k in keys} for f, hs in per_seed.items()}
    seed_sd = {f: {k: float(np.std([h[k] for h in hs.values()], ddof=1)) for k in keys}
               for f, hs in per_seed.items() if len(hs) > 1}
    summary = {k: {"mean": float(np.mean([h[k] for h in H.values()])),
                   "sd": float(np.std([h[k] for h in H.values()], ddof=1)) if len(H) > 1 else None,
                   "seed_sd": float(np.sqrt(np.mean([sd[k] ** 2 for sd in seed_sd.values()]))) if seed_sd else None}
               for k in keys}
    first = {f: r[min(r)] for f, r in runs.items()}
    train = next(iter(first.values())).get("train") or {}
    res = {"budget": args.budget, "budget_settings": BUDGETS[args.budget], "planes": args.planes, "pooling": args.pooling,
           "thick_geometry": next(iter(first.values())).get("thick_geometry", {}),
           "recipe": {"tag": args.tag, "data": train.get("data", "raw3d"), "arguments": train.get("arguments")},
           "seeds": {f: sorted(r) for f, r in runs.items()}, "folds": first, "per_fold": H,
           "per_fold_per_seed": per_seed, "seed_sd": seed_sd, "mean_sd": summary, "fold_definitions": FOLDS}
    name = "results" if args.tag == "baseline" else f"results-{args.tag}"
    name += scoring_suffix(args.planes, args.pooling, geometry_override(args))
    if args.budget != "full":
        name += f"_{args.budget}"
    (HERE / f"{name}.json").write_text(json.dumps(res, indent=2, default=list))
    write_md(HERE / f"{name}.md", res)
    return res


def _sites(sites: list[str]) -> str:
    """Held-out sites for display: the IXI subjects' groups collapsed into one site."""
    ixi = [x for x in sites if x.startswith("IXI_")]
    rest = [x for x in sites if not x.startswith("IXI_")]
    return ", ".join(([f"IXI-Hammersmith ({len(ixi)} subjects)"] if ixi else []) + rest)


def _f(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def write_md(path: Path, res: dict) -> None:
    H, S, F = res["per_fold"], res["mean_sd"], res["folds"]
    b, rc = res["budget_settings"], res["recipe"]
    seeds = res.get("seeds") or {f: [0] for f in F}
    n_seeds = sorted({len(v) for v in seeds.values()})
    L = [f"# Leave-site-out benchmark: {res['budget'].upper()} budget" + (
         f" ({res['budget'].upper()}: two folds, shorter training; for screening ideas, not the headline)"
         if res["budget"] in TWO_FOLD_BUDGETS else ""), "",
         f"Variant `{rc['tag']}`: training data `{rc['data']}`, train_encoder arguments `{rc['arguments']}`; "
         f"budget per fold: {b['epochs']} epochs x {b['steps_per_epoch']} steps (batch 32), {b['pool_refresh']} new "
         f"corrupted volumes per epoch, safety cap {b['max_minutes']} min; {b['eval_volumes']} simulated evaluation "
         f"volumes per fold. Scoring: thick-slice scans graded on " + (
             "their acquisition planes (the scorer's default, `score.planes: acquisition`)"
             if res.get("planes", "acquisition") == "acquisition" else "all three orientations (`--planes all`)")
         + "; a volume's score and severities from the model's " + (
             "volume head (the scorer)" if res.get("pooling", "head") == "head"
             else "slice outputs by their 10 % trimmed mean (`--pooling trimmed`: the volume head set aside)")
         + ("; thick-slice scans sampled at {thick_pixel_ratio:g} × their in-plane voxel size, at least "
            "{min_pixel_mm:g} mm (`SliceConfig.thick_pixel_ratio`)".format(**res["thick_geometry"])
            if res.get("thick_geometry") else "")
         + ". Seeds per fold: " + ", ".join(f"{f} {v}" for f, v in seeds.items()) + " (a fold's "
         "value is the mean over its seeds). Folds (held-out sites): " + "; ".join(
             f"`{f}` {_sites(m['held_out_sites'])}" for f, m in F.items()) + ". Reproduce and fold definitions: "
         "see README.md.", "",
         "| measure | target | " + " | ".join(H) + " | mean ± fold sd | gap to target | seed sd |",
         "|---|---|" + "---|" * len(H) + "---|---|---|"]
    for k in next(iter(H.values())):
        sd, ssd = S[k]["sd"], S[k].get("seed_sd")
        gap = _gap(k, S[k]["mean"])
        if k == "auroc_typemean" and min(h[k] for h in H.values()) < 0.85:
            gap += f"; fold floor 0.85: {min(H, key=lambda f: H[f][k])} {min(h[k] for h in H.values()) - 0.85:+.3f}"
        L.append(f"| {k} | {TARGETS.get(k, '')} | " + " | ".join(_f(h[k]) for h in H.values())
                 + f" | {_f(S[k]['mean'])}" + (f" ± {sd:.3f}" if sd is not None else "") + f" | {gap} | {_f(ssd)} |")
    L += ["", "Rows: `pearson_*` r(SS, score) over the evaluation volumes' clean + corrupted rows (type-mean "
          "calibrated / SSIM-matched severities); `spearman_*` within a type (type-mean); `auroc_*` corrupted "
          "SS >= 0.5 (or every unseen-kind row) vs the clean scores of every held-out volume; `argmax` heads name "
          "the type, SS >= 0.5; `clean_*` every held-out volume as stored; `resample_*` |change| of the clean "
          "score after resampling to 1.5 mm, x the clean range / x the clean sd of the fold's held-out volumes.",
          "`fold sd` is the fold-to-fold spread (different held-out sites AND different training sets); `seed sd` "
          "is the run-to-run noise of one fold (sd over seeds, root-mean-square over the folds with several seeds: "
          f"seeds per fold {n_seeds}). A difference between two variants smaller than about twice the seed sd is "
          "not a difference. `gap to target` = mean minus target where the mean misses it. The per-fold sections "
          "below describe the first seed's run.", ""]
    if rc["tag"] == "baseline":
        L += ["## What was tried to close the gaps", "",
              "Each against this baseline, on the same folds (numbers and reasons: README.md, Findings):", "",
              "| change | table | outcome |", "|---|---|---|"]
        L += [f"| {c} | {t} | {o} |" for c, t, o in TRIED] + [""]
    for f, m in F.items():
        t = m.get("train") or {}
        L += [f"## Fold `{f}`: held out {_sites(m['held_out_sites'])}", "",
              f"- training: {t.get('n_train')} volumes, validation {t.get('val')}; {(t.get('seconds') or 0) / 60:.1f} "
              f"min, best epoch {t.get('best_epoch')} of {t.get('epochs_run')} ({t.get('stop_reason')}), "
              f"{t.get('pool_made')} corrupted volumes",
              f"- evaluation volumes: {', '.join(Path(v).name for v in m['eval_volumes'])}; clean volumes: {m['n_clean']}"]
        for d in ("mean", "matched"):
            q = m[f"quality_{d}"]
            L.append(f"- {d}: r {q['pearson_overall']:.3f}; Spearman " + ", ".join(
                f"{t_} {v:.2f}" for t_, v in q["spearman_by_type"].items()) + f"; AUROC {q['auroc_ss_ge_0.5_vs_clean']:.3f} "
                "(by type " + ", ".join(f"{t_} {v:.2f}" for t_, v in q["auroc_by_type"].items()) + f"); argmax "
                f"{q['argmax_accuracy_ss_ge_0.5']:.2f} (" + ", ".join(f"{t_} {v:.2f}" for t_, v in q["argmax_accuracy_by_type"].items())
                + "); mean score at SS 0.5: " + ", ".join(f"{t_} {v:.2f}" for t_, v in q["score_at_0.5_by_type"].items()))
        u = m["unseen"]
        L.append(f"- unseen kinds: AUROC {u['auroc_all_vs_clean']:.3f}; by kind " + ", ".join(
            f"{k} {v:.2f} (score {u['mean_score_by_kind'][k]:.2f}, SSIM {u['mean_ssim_by_kind'][k]:.2f})"
            for k, v in u["auroc_by_kind"].items()) + (
            f"; clipping with the learned score alone (no clipping check): AUROC "
            f"{u['auroc_by_kind_score_learned']['clipping']:.2f}, mean clipping severity "
            f"{u['mean_severity_clipping_by_kind']['clipping']:.2f}" if "auroc_by_kind_score_learned" in u else ""))
        c = m["clean"]
        L.append(f"- clean scores: median {c['median']:.2f}, max {c['max']:.2f}, sd {c['sd']:.2f}, below 0.5: "
                 f"{c['fraction_below_0.5']:.2f}" + (f"; 2D scans with every non-resolution head < 0.5: "
                 f"{c['fraction_2d_nonresolution_heads_below_0.5']:.2f}" if c["fraction_2d_nonresolution_heads_below_0.5"] is not None else ""))
        L += ["", "| benign change | mean abs | max abs | mean x sd | max x sd | max x range |", "|---|---|---|---|---|---|"]
        for k, v in m["benign"].items():
            L.append(f"| {k} | {v['mean_abs']:.3f} | {v['max_abs']:.3f} | {v['mean_x_sd']:.2f} | {v['max_x_sd']:.2f} | "
                     f"{v['max_x_range']:.2f} |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


def cmd_ensemble(args, data: Path, fold: str) -> dict:
    """Screen a seed ensemble without training: every finished seed run of a fold variant (or the first
    ``--members`` of them, by seed) scores the evaluation cache, the members' learned scores and severities are
    averaged (the clipping check is the same for all), and the metrics go to the ``<variant>-ensemble`` folder
    (``-ensemble<k>`` with ``--members k``), so ``table --tag <tag>-ensemble`` (``ensemble`` / ``ensemble<k>``
    for the baseline) tabulates them like any variant."""
    from artifactqc.encoder.saturation import combined_score

    base = variant_dir(fold, args.budget, args.tag)
    members = [d for d in seed_dirs(fold, args.budget, args.tag).values()
               if (d / "model" / "model.json").is_file()][:args.members]
    if len(members) < max(2, args.members or 0):
        sys.exit(f"ensemble of fold {fold}: needs {max(2, args.members or 0)} seed runs under {base}[-s<k>], "
                 f"found {len(members)}")
    models = [scoring_model(d / "model", geometry_override(args)) for d in members]
    X, meta = load_eval_cache(data, fold, BUDGETS[args.budget]["eval_volumes"], thick_geometry(models[0].slice_cfg))
    vox = row_voxel_mm(data, meta)
    scored = [score_cache(m, X, vox, args.planes, args.pooling) for m in models]
    learned = [k for k in scored[0][0] if k == "score_learned" or (k.startswith("severity_") and k != "severity_clipping")]
    rows = []
    for per_member in zip(*scored):
        r = dict(per_member[0]) | {k: float(np.mean([m[k] for m in per_member])) for k in learned}
        r["score"] = combined_score(r["score_learned"], r["severity_clipping"])
        rows.append(r)
    name = "ensemble" + (str(args.members) if args.members else "")
    res = fold_metrics(meta, rows) | {"fold": fold, "budget": args.budget, "tag": f"{args.tag}-{name}", "seed": 0,
                                      "planes": args.planes, "pooling": args.pooling, "held_out_sites": fold_split(data, fold)["held_out_sites"],
                                      "members": [d.name for d in members], "train": {"ensemble_of": [d.name for d in members]}}
    out = base.with_name(f"{base.name}-{name}")
    out.mkdir(exist_ok=True)
    (out / metrics_name(args.planes, args.pooling, geometry_override(args))).write_text(json.dumps(res, indent=2))
    log.info("fold %s ensemble of %s: AUROC %.3f, r %.3f", fold, res["members"], res["quality_mean"]["auroc_ss_ge_0.5_vs_clean"],
             res["quality_mean"]["pearson_overall"])
    return res


def cmd_thick(args, data: Path) -> dict:
    """The clean thick-slice (2D) development scans, none of which the builtin model trained on, scored by the
    builtin model (or ``--model FOLDER``, e.g. a candidate from the ``builtin`` step) on all orientations and on
    their acquisition planes -> thick_builtin.md / .json (``thick_<folder name>.md`` / .json for ``--model``)."""
    from artifactqc.encoder.checkpoint import resolve_model_dir
    from artifactqc.encoder.score import score_volumes

    inv = inventory(data)
    th = inv[inv.thick].reset_index(drop=True)
    heads = [f"severity_{h}" for h in HEADS if h != "resolution"]
    rows, summary = {}, {}
    for planes in ("all", "acquisition"):
        df = score_volumes(args.model, [str(data / f) for f in th.file], threads=args.threads, planes=planes)
        nonres = df[heads].max(axis=1)
        summary[planes] = {"n": len(df), "median": float(df.score.median()), "max": float(df.score.max()),
                           "below_0.5": float((df.score < 0.5).mean()), "below_1": float((df.score < 1).mean()),
                           "nonresolution_heads_below_0.5": float((nonres < 0.5).mean())}
        rows[planes] = df.score.round(3).tolist()
    res = {"files": th.file.tolist(), "contrast": th.contrast.tolist(), "site": th.site.tolist(), "score": rows,
           "summary": summary}
    name = "thick_builtin" if args.model == "builtin" else f"thick_{Path(args.model).name}"
    res["model"] = json.loads((resolve_model_dir(args.model) / "model.json").read_text())["model_id"]
    (HERE / f"{name}.json").write_text(json.dumps(res, indent=2))
    L = [f"# Clean thick-slice scans scored by `{res['model']}`: all orientations vs acquisition planes", "",
         "Every thick-slice (2D) scan of the development data (largest/smallest voxel side >= 1.9; the builtin model "
         "never trained on them), as stored. `all` = every orientation (the scorer before 2026-12-03), `acquisition` "
         "= score and non-resolution severities from the acquisition planes (`score.planes: acquisition`, the "
         "default). Reproduce: `python benchmarks/crosssite/run.py thick"
         + ("" if args.model == "builtin" else f" --model {args.model}") + "`.", "",
         "| planes | n | median | max | share < 0.5 | share < 1 | non-resolution heads all < 0.5 |", "|---|---|---|---|---|---|---|"]
    for k, v in summary.items():
        L.append(f"| {k} | {v['n']} | {v['median']:.2f} | {v['max']:.2f} | {v['below_0.5']:.2f} | {v['below_1']:.2f} | "
                 f"{v['nonresolution_heads_below_0.5']:.2f} |")
    L += ["", "| scan | contrast | site | score (all) | score (acquisition) |", "|---|---|---|---|---|"]
    for i, f in enumerate(th.file):
        L.append(f"| {Path(f).name} | {th.contrast[i]} | {th.site[i]} | {rows['all'][i]:.2f} | {rows['acquisition'][i]:.2f} |")
    (HERE / f"{name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L[:8]))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["fold", "cache", "prep", "proxy", "all", "table", "folds", "builtin", "thick",
                                     "ensemble"])
    ap.add_argument("fold", nargs="?", choices=list(FOLDS))
    H.add_data_arg(ap, default=None)
    ap.add_argument("--budget", choices=list(BUDGETS), default="full")
    ap.add_argument("--tag", default="baseline", help="variant name (models/metrics kept apart per tag)")
    ap.add_argument("--train", default=None, help="JSON of further train_encoder arguments (the idea under test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--training-data", choices=DATA_VARIANTS, default="raw3d",
                    help="training data: raw3d (3D volumes as stored, v9), n4sr (all, through N4 + super-resolution) "
                    "or sr (3D as stored + thick-slice scans super-resolved)")
    ap.add_argument("--drop-sites", nargs="+", default=None, metavar="GROUP",
                    help="fold: train without these training sites (MANIFEST groups, 'X*' = prefix); use with --tag")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--planes", choices=["acquisition", "all"], default="acquisition",
                    help="how thick-slice scans are scored (artifactqc.encoder.score; metrics kept per choice)")
    ap.add_argument("--pooling", choices=["head", "trimmed"], default="head",
                    help="fold/ensemble/table: a volume's score from the model's volume head (the scorer) or, "
                    "volume head set aside, from the trimmed mean of its slice outputs (scoring only, metrics kept "
                    "per choice)")
    ap.add_argument("--thick-pixels", type=float, default=None,
                    help="fold/ensemble/table: score with thick-slice scans sampled at this multiple of their in-plane "
                    "voxel size instead of the model's own slice geometry (SliceConfig.thick_pixel_ratio; 0 = the "
                    "fixed grid); scoring only, metrics kept per choice")
    ap.add_argument("--thick-min-pixel", type=float, default=None,
                    help="with --thick-pixels: the finest pixel (mm) of that rule (SliceConfig.min_pixel_mm)")
    ap.add_argument("--members", type=int, default=None,
                    help="ensemble: average the first MEMBERS seed runs (by seed) instead of every finished one")
    ap.add_argument("--out", default=None, help="builtin: the model folder to write")
    ap.add_argument("--model-id", default="artifactqc-builtin-1", help="builtin: the model's id")
    ap.add_argument("--model", default="builtin", help="thick: the model to score with (a folder; default the builtin)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.step == "table":
        cmd_table(args)
        return 0
    data = H.data_dir(args.data)
    if args.step == "folds":
        for f in FOLDS:
            s = fold_split(data, f)
            print(f"{f}: held out {s['held_out_sites']} ({len(s['test'])} volumes, eval {len(s['eval'])}); "
                  f"train {len(s['train'])}, val {s['val']}")
        return 0
    if args.step == "builtin":
        if not args.out:
            sys.exit("run.py builtin --out FOLDER [--training-data n4sr --train JSON --tag NAME]")
        cmd_builtin(args, data)
        return 0
    if args.step == "thick":  # the builtin model on the clean thick-slice scans, both planes policies
        cmd_thick(args, data)
        return 0
    if args.step == "prep":  # N4 (+ super-resolution) of every usable volume, for --training-data n4sr
        prep_volumes(data, inventory(data).file.tolist())
        return 0
    if args.step == "cache":  # only the (model-independent) evaluation cache of a fold
        n = BUDGETS[args.budget]["eval_volumes"]
        from artifactqc.encoder.slices import SliceConfig

        load_eval_cache(data, args.fold, n, thick_geometry(SliceConfig(**(geometry_override(args) or {}))))
        return 0
    if args.step == "ensemble":  # average the seed runs of a variant (scoring only)
        for f in [args.fold] if args.fold else FOLDS:
            cmd_ensemble(args, data, f)
        return 0
    if args.step == "fold":
        if not args.fold:
            sys.exit("run.py fold NAME (one of " + ", ".join(FOLDS) + ")")
        cmd_fold(args, data, args.fold)
        return 0
    if args.step == "proxy":
        args.budget = "proxy"
    for f in PROXY_FOLDS if args.step == "proxy" else FOLDS:
        cmd_fold(args, data, f)
    cmd_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
