"""Contrastive artifact encoder: architecture, losses, training loop and checkpoint I/O.

Architecture (:class:`ArtifactEncoder`), for 2D slices ``[B, 1, S, S]`` (default S = 128, 1.5 mm pixels,
see :mod:`artifactqc.slices`):

* stem: 4×4 conv, stride 2 (every pixel is seen, so noise texture reaches the features), norm, LeakyReLU;
* four 3×3 stride-2 conv blocks (norm, LeakyReLU) with channels ``widths`` (two of them followed by a 3×3
  stride-1 conv): the receptive field grows to ~90 px (135 mm), and mean+std pooling over space (std pooling
  keeps "how uneven" features such as bias and ghosts) gives global context for ghost copies, bias
  gradients and blur;
* norm = BatchNorm by default (``EncoderConfig.norm``; "group"/"instance" available). Measured here, GroupNorm
  made the network ~3× slower on CPU, and any per-sample norm (Instance/GroupNorm) normalises away the
  absolute energy of a feature map, i.e. exactly the noise level a QC model must see; BatchNorm keeps it and
  costs nothing at inference (a fixed affine map). Its running statistics are recomputed exactly over
  several training batches before each validation and before saving (:func:`_recalibrate_bn`), so eval-mode
  scores do not jump between epochs with the momentum average;
* an MLP to a hidden vector ``h``; from ``h``: the **score** ``softplus(.) >= 0``, five **per-artifact
  severities** ``sigmoid(.)`` in [0, 1] (order :data:`HEADS` = noise, ghosting, motion, bias, resolution),
  and a **latent** vector ``z`` (``latent_dim``, default 4) for the density stage;
* a **volume head** (:class:`VolumeHead`, default for new models): the per-slice ``h`` of a volume are pooled
  (:func:`pool_volume_features`: mean over slices, max and min over the three orientation means) and a
  small MLP gives the volume's score, severities and latent. It is fitted after the encoder, on its frozen
  features of whole corrupted training volumes (:func:`fit_volume_head`), so the score is regressed on the
  volume's simulated severity, and it can compare orientations (anisotropic blur or ghosts affect one axis,
  resampling all three). Models without it (``volume_head`` false in ``model.json``) score with the 10 %
  trimmed mean of the per-slice outputs.

Score calibration: the target score of a slice with simulated severity SS is ``SCORE_SCALE * SS`` with
``SCORE_SCALE = 2`` (linear, so SS 0.5 -> score 1 = the review threshold; clean -> 0).

Training data follow the inference path exactly (:func:`train_encoder`, :func:`make_pool_entry`): a training
volume (canonical, normalised, optionally augmented: contrast, skull-stripped look, coarser grid) is corrupted
in 3D at its native resolution by ``simulate.simulate_volume`` (random type incl. ``mix``, SS ~ U(0,1)), and
the slices of the clean and of the corrupted volume are extracted with :func:`artifactqc.slices.extract_from_array`
(the scorer's code: percentile normalisation *after* corruption, 1.5 mm trilinear sampling). A pool of such
corrupted volumes is refreshed every epoch. (Session 1 trained on clean slices corrupted by the 2D simulator
and barely responded to 3D-simulated volumes scored through the real path: mean score ≈ 0.1 at SS 0.5.)

Loss per batch of B triplets (anchor ``a`` = clean slice, positive ``p`` = another clean slice of the same
volume in another orientation, negatives ``n``/``n2`` = the same planes of the *same* corrupted volume, i.e.
same artifact and severity SS_i, different anatomy):

* triplet term with a **per-sample** margin ``m_i = SCORE_SCALE * SS_i / 2``:
  ``relu(S_a - S_n + m_i) + relu(S_p - S_n2 + m_i)`` (the published code used the batch-mean severity);
* **squared** L2 on clean scores ``S_a^2 + S_p^2`` (the published code used an L1 penalty), plus a squared
  error pulling corrupted scores to ``SCORE_SCALE * SS_i`` (calibration);
* per-head BCE of the five severities against the simulator's known per-head severities (0 for clean);
* latent terms: a linear decoder from ``z`` must predict score target and the five severities (so ``z``
  carries the artifact information), and an InfoNCE term makes ``z(n_i)`` closest to ``z(n2_i)`` (same
  artifact level, different anatomy; the Zuo et al. positives) among the batch.

With ``slice_group`` = G > 1 the batch is drawn as groups of G triplets from one corrupted volume and the
triplet, calibration and InfoNCE terms act on the group means (a small-volume score, like the scorer's mean
over slices) instead of on single slices, whose per-slice target ``2 SS`` is noisy: a slice often does not
show its volume's artifact (:func:`encoder_loss`).

Volume augmentation before the simulation (:func:`_augment_volume`): skull-stripped look, contrast (random
per-tissue intensity remapping, :func:`_tissue_remap`, for T2w/FLAIR/PD-like images; or gamma/inversion),
and resampling of *every* volume to a random 1.0–1.7 mm grid (interpolation smoothing is not an artifact).

Checkpoints are ``encoder.safetensors`` + ``model.json``; :func:`load_model` refuses anything else.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .io import sha256_file
from .provenance import git_describe
from .slices import SliceConfig, extract_from_array, robust_range, subsample_step

log = logging.getLogger(__name__)

#: Names of the per-artifact severity heads, in output order.
HEADS = ("noise", "ghosting", "motion", "bias", "resolution")
#: Target score = SCORE_SCALE * severity, so severity 0.5 -> 1 (the review threshold).
SCORE_SCALE = 2.0
#: Simulator artifact names used in training (``"mix"`` = mixture of 2-3 types).
TRAIN_ARTIFACTS = ("noise", "ghosting", "bias", "anisotropy", "motion", "mix")
#: One round of artifact types drawn for the training pool: motion twice (the weakest type after slice
#: extraction: SSIM 0.76 at SS 1, v3 Spearman 0.58), every other type once.
POOL_ARTIFACTS = ("noise", "ghosting", "bias", "anisotropy", "motion", "motion", "mix")


# --------------------------------------------------------------------------------------------- device
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else is passed to :class:`torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("CUDA requested but not available: using CPU")
        return torch.device("cpu")
    return dev


# --------------------------------------------------------------------------------------- architecture
@dataclass
class EncoderConfig:
    """Architecture hyper-parameters (stored in ``model.json``)."""

    widths: tuple[int, ...] = (16, 32, 64, 96)
    #: whether each stage has a second (stride-1) 3x3 conv
    extra: tuple[bool, ...] = (False, True, True, False)
    stem_width: int = 8
    hidden: int = 64
    latent_dim: int = 4
    n_heads: int = len(HEADS)
    norm: str = "batch"
    #: volume-level head over the pooled per-slice features (:class:`VolumeHead`); False = trimmed mean of
    #: the per-slice outputs (older models)
    volume_head: bool = False
    volume_hidden: int = 64

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["extra"] = list(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        keys = cls.__dataclass_fields__.keys()
        d = {k: v for k, v in d.items() if k in keys}
        for k in ("widths", "extra"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _norm(kind: str, c: int, groups: int = 8) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(groups if c % groups == 0 else 1, c)
    if kind == "instance":
        return nn.InstanceNorm2d(c, affine=True)
    raise ValueError(f"unknown norm {kind!r}")


def _head_outputs(m: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output heads shared by :class:`ArtifactEncoder` (per slice) and :class:`VolumeHead` (per volume):
    score (softplus, >= 0), severity logits, latent and the latent decoder's prediction, from features ``h``."""
    z = m.latent_head(h)
    return {
        "score": F.softplus(m.score_head(h)[:, 0]),
        "severity_logits": m.severity_head(h),
        "latent": z,
        "latent_pred": m.latent_decoder(z),
    }


class ArtifactEncoder(nn.Module):
    """Downsampling conv encoder -> (score, severities[5], latent). See the module docstring."""

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        cfg = config or EncoderConfig()
        self.config = cfg
        act = lambda: nn.LeakyReLU(0.1, inplace=True)  # noqa: E731
        layers: list[nn.Module] = [
            nn.Conv2d(1, cfg.stem_width, 4, stride=2, padding=1, bias=False),
            _norm(cfg.norm, cfg.stem_width, 1),
            act(),
        ]
        c = cfg.stem_width
        extra = tuple(cfg.extra) + (False,) * (len(cfg.widths) - len(cfg.extra))
        for w, e in zip(cfg.widths, extra):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), _norm(cfg.norm, w), act()]
            if e:
                layers += [nn.Conv2d(w, w, 3, stride=1, padding=1, bias=False), _norm(cfg.norm, w), act()]
            c = w
        self.features = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(2 * c, cfg.hidden), nn.LeakyReLU(0.1), nn.Linear(cfg.hidden, cfg.hidden),
                                 nn.LeakyReLU(0.1))
        self.score_head = nn.Linear(cfg.hidden, 1)
        self.severity_head = nn.Linear(cfg.hidden, cfg.n_heads)
        self.latent_head = nn.Linear(cfg.hidden, cfg.latent_dim)
        # auxiliary decoder: the latent alone must predict score target and severities (training only)
        self.latent_decoder = nn.Linear(cfg.latent_dim, 1 + cfg.n_heads)
        self.volume_head = (VolumeHead(3 * cfg.hidden, cfg.volume_hidden, cfg.n_heads, cfg.latent_dim)
                            if cfg.volume_head else None)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        f = f.flatten(2)
        pooled = torch.cat([f.mean(-1), f.std(-1, correction=0)], dim=1)
        h = self.mlp(pooled)
        return {**_head_outputs(self, h), "hidden": h}


def pool_volume_features(h: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Per-slice hidden vectors ``h`` [N, H] of one volume and their orientation ``axis`` [N] (0/1/2) ->
    volume features [3H]: the mean over all slices, and the element-wise max and min over the three
    orientation means.

    The max/min pair is symmetric in the orientations (a permuted volume gives the same features) but keeps
    what differs *between* them: a thick-slice or anisotropic volume is blurred in two orientations and sharp
    in the third, ghosts run along one axis, while isotropic smoothing (resampling) changes all three alike.
    A per-slice score cannot make that comparison. Orientations without slices are left out.
    """
    means = torch.stack([h[axis == a].mean(0) for a in range(3) if bool((axis == a).any())])
    return torch.cat([h.mean(0), means.max(0).values, means.min(0).values])


class VolumeHead(nn.Module):
    """Volume-level outputs from :func:`pool_volume_features`: score (softplus), severity logits, latent.

    The input is standardised by fixed buffers (``feat_mean``/``feat_std``, set from the training features
    by :func:`fit_volume_head`), then a one-hidden-layer MLP. Trained after the encoder, on frozen features
    of whole corrupted training volumes against the volume's simulated severity (the quantity the score
    must predict), instead of the per-slice target that a single slice often does not show.
    """

    def __init__(self, in_dim: int, hidden: int, n_heads: int, latent_dim: int):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.1))
        self.drop = nn.Dropout(0.2)
        self.score_head = nn.Linear(hidden, 1)
        self.severity_head = nn.Linear(hidden, n_heads)
        self.latent_head = nn.Linear(hidden, latent_dim)
        self.latent_decoder = nn.Linear(latent_dim, 1 + n_heads)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return _head_outputs(self, self.drop(self.mlp((feats - self.feat_mean) / self.feat_std)))


class PublishedEncoder(nn.Module):
    """Re-implementation of the published architecture (Hays et al.) for speed comparison only.

    Two conv blocks without downsampling (3×3 conv, InstanceNorm, LeakyReLU, twice each; channels rising),
    a 1×1 conv reducing features, adaptive average pooling and ``abs`` for a non-negative score.
    """

    def __init__(self, c1: int = 16, c2: int = 32):
        super().__init__()

        def block(cin, cout):
            return [
                nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01),
                nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01),
            ]

        self.net = nn.Sequential(*block(1, c1), *block(c1, c2), nn.Conv2d(c2, 1, 1), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.net(x).flatten(1)[:, 0].abs()


# --------------------------------------------------------------------------------------------- losses
def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE: ``z1[i]`` and ``z2[i]`` are positives, the rest of the batch negatives."""
    a = F.normalize(z1, dim=1)
    b = F.normalize(z2, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def encoder_loss(
    out_a: dict, out_p: dict, out_n: dict, out_n2: dict, severity: torch.Tensor, targets: torch.Tensor,
    weights: dict | None = None, group: int = 1,
) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts for one batch (see the module docstring).

    ``severity`` [B]: simulated severity SS_i of the negatives; ``targets`` [B, 5]: per-head severities.

    ``group`` > 1: the batch holds ``B / group`` groups of ``group`` consecutive triplets from the *same*
    corrupted volume (:meth:`_Pool.sample` with ``group``). The score terms that carry the simulated severity
    (triplet margin, calibration) and the InfoNCE term are then computed on the group means, i.e. on a
    small-volume score like the scorer's mean over slices, instead of on every slice: a single slice often
    does not show its volume's artifact (thick slices blur two of three orientations, ghosts run along one
    axis, a bias field is flat within some slices), so a per-slice target ``2 SS`` is label noise. Clean
    terms (squared score, heads -> 0) stay per slice: every clean slice is clean.
    """
    w = {"triplet": 1.0, "clean": 1.0, "calib": 1.0, "heads": 1.0, "latent": 0.5, "nce": 0.1}
    w.update(weights or {})
    g = max(1, int(group))
    if severity.shape[0] % g:
        raise ValueError(f"batch of {severity.shape[0]} is not a multiple of group {g}")

    def gm(x: torch.Tensor) -> torch.Tensor:  # mean over each group of consecutive rows
        return x if g == 1 else x.reshape(x.shape[0] // g, g, *x.shape[1:]).mean(1)

    sev_g = severity[::g]
    target_score = SCORE_SCALE * sev_g
    margin = target_score / 2.0  # per-sample (per-volume) margin
    s_a, s_p, s_n, s_n2 = out_a["score"], out_p["score"], out_n["score"], out_n2["score"]
    triplet = (F.relu(gm(s_a) - gm(s_n) + margin) + F.relu(gm(s_p) - gm(s_n2) + margin)).mean()
    clean = (s_a.pow(2) + s_p.pow(2)).mean()  # true squared L2
    if g == 1:
        calib = ((s_n - target_score).pow(2) + (s_n2 - target_score).pow(2)).mean()
    else:
        calib = 2.0 * (0.5 * (gm(s_n) + gm(s_n2)) - target_score).pow(2).mean()
    # heads stay per slice: with the BCE on group-mean probabilities (measured, v5) the argmax accuracy of the
    # heads on held-out volumes fell from 0.78 to 0.56
    corrupt_heads = (F.binary_cross_entropy_with_logits(out_n["severity_logits"], targets)
                     + F.binary_cross_entropy_with_logits(out_n2["severity_logits"], targets))
    zeros = torch.zeros_like(targets)
    heads = (
        corrupt_heads
        + 0.5 * F.binary_cross_entropy_with_logits(out_a["severity_logits"], zeros)
        + 0.5 * F.binary_cross_entropy_with_logits(out_p["severity_logits"], zeros)
    ) / 3.0
    lat_t = torch.cat([SCORE_SCALE * severity[:, None], targets], 1)
    lat_t0 = torch.zeros_like(lat_t)
    latent = (
        F.mse_loss(out_n["latent_pred"], lat_t) + F.mse_loss(out_n2["latent_pred"], lat_t)
        + 0.5 * F.mse_loss(out_a["latent_pred"], lat_t0) + 0.5 * F.mse_loss(out_p["latent_pred"], lat_t0)
    ) / 3.0
    nce = info_nce(gm(out_n["latent"]), gm(out_n2["latent"]))
    parts = {"triplet": triplet, "clean": clean, "calib": calib, "heads": heads, "latent": latent, "nce": nce}
    total = sum(w[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ------------------------------------------------------------------------------------ checkpoint I/O

def save_model(model: ArtifactEncoder, out_dir: str | os.PathLike, slice_cfg: SliceConfig, meta: dict) -> dict:
    """Write ``encoder.safetensors`` + ``model.json`` (meta merged in); returns the model.json dict."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "encoder.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes the metadata map in arbitrary order, so more keys would make
    # the bytes (and the SHA-256) of identical weights differ between runs
    save_file(state, str(weights), metadata={"format": "pt"})
    info = {
        "model_id": meta.get("model_id") or out.name,
        "format": "artifactqc-encoder/1",
        "architecture": {"class": "ArtifactEncoder", **model.config.to_dict()},
        "slices": slice_cfg.to_dict(),
        "heads": list(HEADS),
        "score_scale": SCORE_SCALE,
        "aggregation": ("volume head on pooled slice features (mean; max/min over orientation means)"
                        if model.volume_head is not None else "trimmed mean (10% each side) over slices"),
        "artifactqc_version": __version__,
        "git_describe": git_describe() or None,
        "weights_file": weights.name,
        "weights_sha256": sha256_file(weights),
        **{k: v for k, v in meta.items() if k != "model_id"},
    }
    (out / "model.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return info


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (Path,)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class ModelLoadError(ValueError):
    """The model directory is missing, not safetensors, or does not match its model.json."""


_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar")


def optimize_for_inference(model: ArtifactEncoder) -> ArtifactEncoder:
    """Eval mode, every BatchNorm of the conv stack folded into the conv before it, weights channels-last.

    Folding uses the running statistics, so the outputs equal the eval-mode outputs up to float rounding
    (tested). Measured on 2 CPU threads, 24 slices of 128 × 128 through the default architecture, 200
    interleaved runs: median 12.9 -> 8.4 ms. The returned module is for inference only (its BatchNorms are
    gone); returns ``model``.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    layers = list(model.features)
    fused: list[nn.Module] = []
    i = 0
    while i < len(layers):
        if (isinstance(layers[i], nn.Conv2d) and i + 1 < len(layers)
                and isinstance(layers[i + 1], nn.BatchNorm2d)):
            fused.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
            i += 2
        else:
            fused.append(layers[i])
            i += 1
    model.features = nn.Sequential(*fused)
    return model.to(memory_format=torch.channels_last)


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "auto",
               optimize: bool = True) -> ArtifactEncoder:
    """Load ``encoder.safetensors`` + ``model.json`` from a directory (on ``device``, in eval mode, prepared
    for inference by :func:`optimize_for_inference` unless ``optimize`` is False, which keeps the module
    trainable and savable).

    Refuses pickle checkpoints (``.pt``/``.pth``/``.ckpt``/...) with :class:`ModelLoadError`: only the
    safetensors format is loaded, because unpickling runs arbitrary code. The weights' SHA-256 must match
    ``model.json``. The returned module carries ``.model_info`` (model.json), ``.slice_cfg`` and ``.device``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(model_dir)
    if p.is_file():
        if p.suffix.lower() in _PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"{p}: refusing to load a pickle checkpoint ({p.suffix}); only .safetensors weights are accepted"
            )
        if p.name == "model.json" or p.suffix == ".safetensors":
            p = p.parent
        else:
            raise ModelLoadError(f"{p}: expected a model directory holding encoder.safetensors and model.json")
    meta_path = p / "model.json"
    if not meta_path.is_file():
        raise ModelLoadError(f"{p}: no model.json (not an artifactqc model directory)")
    info = json.loads(meta_path.read_text())
    wname = info.get("weights_file", "encoder.safetensors")
    weights = p / wname
    if not wname.endswith(".safetensors"):
        raise ModelLoadError(f"{meta_path}: weights_file {wname!r} is not a .safetensors file; refusing to load")
    if not weights.is_file():
        pickles = sorted(q.name for q in p.iterdir() if q.suffix.lower() in _PICKLE_SUFFIXES)
        extra = f" (found pickle checkpoint(s) {pickles}, which are refused: convert to safetensors)" if pickles else ""
        raise ModelLoadError(f"{p}: {wname} not found{extra}")
    want = info.get("weights_sha256")
    if want and sha256_file(weights) != want:
        raise ModelLoadError(f"{weights}: SHA-256 does not match model.json (file changed or corrupt)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, Exception) as exc:
        raise ModelLoadError(f"{weights}: not a valid safetensors file ({type(exc).__name__}: {exc})") from exc
    arch = EncoderConfig.from_dict(info.get("architecture", {}))
    model = ArtifactEncoder(arch)
    model.load_state_dict(state)
    dev = resolve_device(device)
    (optimize_for_inference(model) if optimize else model.eval()).to(dev)
    model.model_info = info
    model.slice_cfg = SliceConfig.from_dict(info.get("slices", {}))
    model.device = dev
    return model


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Training hyper-parameters (defaults of :func:`train_encoder`); :func:`demo_config` is the
    ≤10 min / 2-core setting. See :func:`train_encoder` for the meaning of each field."""

    val_fraction: float = 0.2
    epochs: int = 40
    steps_per_epoch: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    patience: int = 8
    image_size: int = 128
    pixel_mm: float = 1.5
    train_slices_per_axis: int = 12
    val_severities: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    threads: int = 2
    max_minutes: float | None = None
    pool_size: int = 240
    pool_init_per_volume: int = 2
    sim_time_fraction: float = 0.45
    pool_refresh: int | None = None
    contrast_augment: float = 0.6
    mask_augment: float = 0.3
    resample_augment: float = 0.5
    slice_sim_fraction: float = 0.0
    slice_group: int = 1
    bn_recalib_batches: int = 6
    ema_decay: float | None = 0.995
    volume_head: bool = True
    match_ssim: bool = False
    encoder: dict = field(default_factory=dict)


def demo_config(**overrides) -> dict:
    """Small, CPU-friendly settings for the demo (~11 volumes of ~1 mm): ≤ 10 min on 2 cores.

    ``max_minutes`` caps the whole run including the simulation of the pool and of the validation set. The
    validation set of a demo is small (2 volumes × 11) and noisy, so ``patience`` is long: with 8 it stopped
    after 2 minutes at epoch 11 (best epoch 3) on a free machine.
    """
    d = dict(epochs=40, steps_per_epoch=25, batch_size=24, patience=15, max_minutes=8.5, train_slices_per_axis=10,
             val_severities=(0.3, 0.7), pool_size=120, pool_init_per_volume=1, sim_time_fraction=0.4)
    d.update(overrides)
    return d


def _contrast_augment(x: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """Random per-sample gamma (0.5–2) and, for a quarter of those, foreground inversion (T1 <-> T2-like).

    Slice-level variant (used only with ``slice_sim_fraction`` > 0).
    """
    b = x.shape[0]
    sel = torch.rand(b, generator=gen) < prob
    gamma = torch.exp((torch.rand(b, generator=gen) * 2 - 1) * math.log(2.0))
    inv = (torch.rand(b, generator=gen) < 0.25) & sel
    return sel, gamma, inv


def _apply_contrast(x, sel, gamma, inv):
    if not bool(sel.any()):
        return x
    y = x.clone()
    xs = y[sel].clamp(0, 1.5) / 1.5
    g = gamma[sel].view(-1, 1, 1, 1)
    out = xs.pow(g) * 1.5
    fg = (x[sel] > 0.08).float()
    i = inv[sel].view(-1, 1, 1, 1).float()
    out = i * fg * (1.5 - out) * 0.8 + (1 - i) * out
    y[sel] = out
    return y


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _simulate(x, arts, sev, gen):
    from . import simulate

    return simulate.simulate_slices(x, arts, sev, generator=gen, return_targets=True)


def _simulate_volume(data, artifact, severity, seed, spacing, match_ssim: bool = False):
    from . import simulate

    return simulate.simulate_volume(data, artifact, severity, seed=seed, spacing=spacing, match_ssim=match_ssim)


# ------------------------------------------------------------------------- inference-path training data
class TrainingVolumeError(ValueError):
    """A training volume that cannot be used (unreadable, or too small for the slice sampler)."""


@dataclass
class _CleanVolume:
    """A training volume in canonical (RAS+) order, intensities scaled (:func:`scale_for_simulation`), plus a
    crude brain mask."""

    path: str
    data: np.ndarray
    spacing: tuple[float, float, float]
    brain: np.ndarray | None = None


def _min_slices_ok(s: np.ndarray, axes: np.ndarray) -> bool:
    keep = _usable(s)
    return keep.sum() >= 2 and len(np.unique(axes[keep])) >= 2


def _usable(s: np.ndarray) -> np.ndarray:
    """Slices with enough foreground to be worth training on (> 3 % of pixels above 0.1)."""
    return (s > 0.1).mean(axis=(1, 2)) > 0.03


def _load_clean_volume(path: str, cfg: SliceConfig, with_brain: bool) -> _CleanVolume:
    """Load, reorient and scale (:func:`scale_for_simulation`) a training volume; raise :class:`TrainingVolumeError` naming the file
    if it is unreadable or too small for the slice sampler."""
    from . import io

    try:
        vol = io.load_volume(path)
    except Exception as exc:
        raise TrainingVolumeError(f"{path}: unreadable ({_err(exc)})") from exc
    data, aff = io.to_canonical(vol.data, vol.affine)
    spacing = tuple(float(z) for z in io.voxel_sizes(aff))
    if min(data.shape) < 4:
        raise TrainingVolumeError(f"{path}: too small for the slice sampler (shape {tuple(data.shape)}, need >= 4 "
                                  "voxels along every axis)")
    data = _crop_to_head(scale_for_simulation(data))
    s, _ = extract_from_array(data, np.diag([*spacing, 1.0]), cfg)
    axes = np.repeat(np.arange(3), cfg.slices_per_axis)
    if not _min_slices_ok(s, axes):
        raise TrainingVolumeError(
            f"{path}: too small or too empty for the slice sampler ({int(_usable(s).sum())} usable slices of "
            f"{len(s)}; need >= 2 in two orientations with > 3 % foreground at {cfg.pixel_mm} mm pixels)")
    brain = _brain_mask(data, spacing) if with_brain else None
    return _CleanVolume(str(path), np.ascontiguousarray(data, dtype=np.float32), spacing, brain)


def scale_for_simulation(data: np.ndarray) -> np.ndarray:
    """Bring a raw volume to the simulator's ~[0, 1] range by a *pure scale* (divide by the scorer's robust
    upper percentile), without offset or clipping.

    The scorer's percentile normalisation is invariant to a positive scale factor, so the clean slices of the
    scaled volume are exactly those of the raw file. ``io.normalize_intensity`` (offset + clip) is not: applying
    the scorer's normalisation a second time moves the low percentile from 0 to ~0.09 (the foreground threshold
    of ``io.foreground_mask`` is 10 % of the 98th percentile) and clips dark tissue to 0 — measured here, a
    mean absolute slice difference of 0.08 on IXI316 and clean scores that differed by up to 0.6 between the
    raw file and its normalised copy.
    """
    data = np.asarray(data, dtype=np.float32)
    _, hi, _ = robust_range(data)
    scale = np.float32(1.0 / hi) if hi > 0 else np.float32(1.0)
    return np.nan_to_num(data * scale, nan=0.0, posinf=0.0, neginf=0.0)


def _crop_to_head(data: np.ndarray, margin: int = 8) -> np.ndarray:
    """Drop empty borders (air) beyond ``margin`` voxels around the head: the 3D simulator's cost scales with
    the number of voxels. (The field of view still varies between training volumes, as in real cohorts.)"""
    from .io import mask_box

    fg = data > 0.05
    return data[mask_box(fg, margin)] if fg.any() else data


def _err(exc: BaseException) -> str:
    from . import io

    if isinstance(exc, io.VolumeError):
        return f"{exc.error_type}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _brain_mask(data: np.ndarray, spacing, depth_mm: float = 9.0) -> np.ndarray | None:
    """Crude brain mask for skull-stripping augmentation: the filled head mask eroded by ``depth_mm``
    (scalp + skull), largest component, slightly smoothed. Not a segmentation: it only has to make a
    training volume *look* skull-stripped (zero background right at a brain-like boundary)."""
    from scipy import ndimage as ndi

    step = max(1, int(round(2.0 / min(spacing))))  # work at ~2 mm
    sub = data[::step, ::step, ::step] > 0.1
    if sub.sum() < 100:
        return None
    sub = ndi.binary_fill_holes(ndi.binary_closing(sub, iterations=2))
    dist = ndi.distance_transform_edt(sub, sampling=[s * step for s in spacing])
    core = dist > depth_mm
    lab, n = ndi.label(core)
    if n == 0:
        return None
    sizes = ndi.sum(core, lab, index=np.arange(1, n + 1))
    core = lab == (1 + int(np.argmax(sizes)))
    core = ndi.binary_opening(core, iterations=1)
    if core.sum() < 50:
        return None
    # back to the full grid (nearest)
    idx = [np.minimum(np.arange(n_) // step, core.shape[a] - 1) for a, n_ in enumerate(data.shape)]
    return core[np.ix_(*idx)]


def _tissue_remap(data: np.ndarray, rng: np.random.Generator, max_slope: float = 3.0) -> tuple[np.ndarray, str]:
    """Random piecewise-linear intensity remapping with knots at the foreground intensity quantiles.

    Real T2w, FLAIR and PD images differ from T1w mainly by *which tissue is bright*: a map through knots at
    the 5/25/50/75/95th percentiles of the head intensities (roughly CSF / GM / WM levels of a T1w) with random
    new levels covers T2w-like inversions (CSF bright, WM dark), FLAIR-like tents (CSF dark, GM > WM) and PD-like
    flat contrasts. The background (below the foreground threshold 0.08) keeps its own scale, and the slope of
    the map is limited to ``max_slope`` (relative to the identity on a ~[0, 1] volume) so the map cannot
    amplify the volume's own noise into a noise artifact. Returns ``(data, description)``.
    """
    step = subsample_step(data.size, 200_000)
    sub = data[::step, ::step, ::step]
    fgv = sub[sub > 0.08]
    if fgv.size < 100:
        return data, "remap-skip"
    q = np.percentile(fgv, [5, 25, 50, 75, 95]).astype(np.float64)
    q = np.maximum.accumulate(np.maximum(q, 0.09))
    q = q + np.arange(5) * 1e-3  # strictly increasing knots
    xs = np.concatenate([[0.0, 0.08], q, [max(1.5, q[-1] + 0.05)]])
    ys = np.empty_like(xs)
    ys[0] = 0.0
    ys[1] = 0.08 * rng.uniform(0.6, 1.4)
    ys[2:] = rng.uniform(0.15, 1.0, size=len(xs) - 2)
    for i in range(2, len(xs)):  # limit the slope (no noise amplification)
        lim = max_slope * (xs[i] - xs[i - 1])
        ys[i] = ys[i - 1] + np.clip(ys[i] - ys[i - 1], -lim, lim)
    ys = np.maximum(ys, 0.0)
    out = np.interp(data.ravel(), xs, ys).astype(np.float32).reshape(data.shape)
    return out, "remap" + "-".join(f"{y:.2f}" for y in ys[2:7])


def _augment_volume(v: _CleanVolume, rng: np.random.Generator, contrast: float, mask: float, resample: float):
    """Volume-level augmentation *before* simulation (so the scorer's normalisation comes after both).

    * skull-stripping look (prob ``mask``): voxels outside :func:`_brain_mask` set to 0;
    * contrast (prob ``contrast``): half of those a random tissue remapping (:func:`_tissue_remap`: T2w-,
      FLAIR-, PD-like contrasts), the other half gamma 0.5–2 and, for a third of those, foreground inversion
      (T1w <-> T2w-like);
    * resampling (prob ``resample``): trilinear resampling to a random isotropic grid of 1.0–1.7 mm (at least
      0.65 × the coarsest voxel size, so a 2 mm volume is *upsampled* to 1.3–1.7 mm), skipped when the new
      grid is within 5 % of the old one. A resampled clean scan is clean: interpolation smoothing of a
      clean volume (either direction) must not read as an artifact. (Session 2 resampled only volumes finer
      than 1.4 mm, never the 2 mm IXI majority, and the benchmark's 1.5 mm resampling raised clean scores of
      2 mm IXI volumes by 0.3–0.6.)

    Returns ``(data, spacing, description)``.
    """
    from scipy import ndimage as ndi

    data = v.data
    spacing = v.spacing
    desc = []
    if v.brain is not None and rng.random() < mask:
        data = data * v.brain
        desc.append("brainmask")
    if rng.random() < contrast:
        if rng.random() < 0.5:
            data, d = _tissue_remap(data, rng)
            data = scale_for_simulation(data)
            desc.append(d)
        else:
            gamma = float(np.exp(rng.uniform(-1, 1) * math.log(2.0)))
            fg = data > 0.08
            x = np.clip(data, 0, 1.5) / 1.5
            data = (x ** gamma * 1.5).astype(np.float32)
            desc.append(f"gamma{gamma:.2f}")
            if rng.random() < 1 / 3:
                data = np.where(fg, (1.5 - data) * 0.8, 0.0).astype(np.float32)
                desc.append("invert")
    if rng.random() < resample:
        t = float(rng.uniform(max(1.0, 0.65 * max(spacing)), 1.7))
        if max(abs(t / s - 1.0) for s in spacing) > 0.05:
            zoom = [s / t for s in spacing]
            data = ndi.zoom(data, zoom, order=1, prefilter=False, grid_mode=False).astype(np.float32)
            spacing = tuple(float(s * (n0 - 1) / max(n1 - 1, 1))
                            for s, n0, n1 in zip(spacing, v.data.shape, data.shape))
            desc.append(f"resample{t:.2f}mm")
    return np.ascontiguousarray(data, dtype=np.float32), tuple(spacing), "+".join(desc) or "none"


def make_pool_entry(
    v: _CleanVolume, artifact: str, severity: float, seed: int, cfg: SliceConfig, sim_fn=None,
    contrast: float = 0.5, mask: float = 0.25, resample: float = 0.3, dtype=torch.float16,
) -> dict:
    """One training item on the inference path: augment the clean volume, corrupt it in 3D at its native
    resolution (``simulate.simulate_volume``), and extract the slices of the clean and of the corrupted
    volume with :func:`artifactqc.slices.extract_from_array` (the scorer's code: percentile normalisation
    *after* corruption, then 1.5 mm sampling).

    Returns a dict with ``clean``/``corrupt`` slices ``[N,1,S,S]`` (``dtype``), ``axis`` [N],
    ``severity``, ``targets`` [5] (per-head severities, :data:`HEADS` order) and ``artifact``.
    """
    rng = np.random.default_rng(seed)
    data, spacing, aug = _augment_volume(v, rng, contrast, mask, resample)
    sim = sim_fn or _simulate_volume
    corrupted, params = sim(data, artifact, float(severity), int(rng.integers(0, 2**31 - 1)), spacing)
    aff = np.diag([*spacing, 1.0])
    clean_s, _ = extract_from_array(data, aff, cfg)
    corr_s, _ = extract_from_array(corrupted, aff, cfg)
    axes = np.repeat(np.arange(3), cfg.slices_per_axis)
    keep = _usable(clean_s)
    if keep.sum() < 2 or len(np.unique(axes[keep])) < 2:
        keep = np.ones(len(clean_s), dtype=bool)
    hs = params.get("head_severities", {})
    return {
        "clean": torch.from_numpy(clean_s[keep][:, None]).to(dtype),
        "corrupt": torch.from_numpy(corr_s[keep][:, None]).to(dtype),
        "axis": axes[keep],
        "severity": float(severity),
        "targets": torch.tensor([float(hs.get(h, 0.0)) for h in HEADS], dtype=torch.float32),
        "artifact": artifact,
        "augment": aug,
        "volume": v.path,
    }


class _Pool:
    """Fixed-capacity FIFO of :func:`make_pool_entry` items, refilled round-robin over the training volumes
    with artifact types in rounds of :data:`POOL_ARTIFACTS` and U(0,1) severities; every entry has its own
    deterministic seed."""

    def __init__(self, vols, cfg, capacity, seed, sim_fn, aug):
        self.vols, self.cfg, self.capacity = vols, cfg, max(1, int(capacity))
        self.rng = np.random.default_rng(seed + 104729)
        self.sim_fn, self.aug = sim_fn, aug
        self.entries: list[dict] = []
        self.made = 0
        self.sim_seconds = 0.0
        self._order: list[int] = []
        self._arts: list[str] = []

    def add_one(self) -> None:
        t0 = time.perf_counter()
        if not self._order:
            self._order = list(self.rng.permutation(len(self.vols)))
        if not self._arts:
            self._arts = [str(a) for a in self.rng.permutation(list(POOL_ARTIFACTS))]
        v = self.vols[self._order.pop()]
        art = self._arts.pop()
        sev = float(self.rng.uniform(0.0, 1.0))
        seed = int(self.rng.integers(0, 2**31 - 1))
        e = make_pool_entry(v, art, sev, seed, self.cfg, self.sim_fn, **self.aug)
        self.entries.append(e)
        if len(self.entries) > self.capacity:
            self.entries.pop(0)
        self.made += 1
        self.sim_seconds += time.perf_counter() - t0

    def fill(self, n: int, seconds: float | None = None) -> int:
        t0 = time.perf_counter()
        k = 0
        while k < n and (seconds is None or time.perf_counter() - t0 < seconds):
            self.add_one()
            k += 1
        return k

    def sample(self, b: int, gen: torch.Generator, group: int = 1):
        """Triplets: anchor = clean slice j of an entry, negative n = the same plane of the corrupted volume,
        positive p / second negative n2 = clean / corrupted slice of another orientation of the same entry
        (same artifact level, different anatomy).

        ``group`` > 1: ``b // group`` entries, each giving ``group`` consecutive triplets (distinct planes
        ``j`` while the entry has enough), for the group-level loss of :func:`encoder_loss`.
        """
        g = max(1, int(group))
        if g == 1:
            ei = torch.randint(0, len(self.entries), (b,), generator=gen).tolist()
            js = [None] * b
        else:
            ng = max(1, b // g)
            eg = torch.randint(0, len(self.entries), (ng,), generator=gen).tolist()
            ei, js = [], []
            for e_i in eg:
                n = len(self.entries[e_i]["axis"])
                perm = torch.randperm(n, generator=gen).tolist()
                while len(perm) < g:
                    perm += torch.randperm(n, generator=gen).tolist()
                ei += [e_i] * g
                js += perm[:g]
        xa, xp, xn, xn2, sev, tgt = [], [], [], [], [], []
        for e_i, j in zip(ei, js):
            e = self.entries[e_i]
            n = len(e["axis"])
            if j is None:
                j = int(torch.randint(0, n, (1,), generator=gen))
            others = np.nonzero(e["axis"] != e["axis"][j])[0]
            pool = others if len(others) else np.arange(n)
            j2 = int(pool[int(torch.randint(0, len(pool), (1,), generator=gen))])
            xa.append(e["clean"][j])
            xn.append(e["corrupt"][j])
            xp.append(e["clean"][j2])
            xn2.append(e["corrupt"][j2])
            sev.append(e["severity"])
            tgt.append(e["targets"])
        st = lambda xs: torch.stack(xs).float()  # noqa: E731
        return st(xa), st(xp), st(xn), st(xn2), torch.tensor(sev, dtype=torch.float32), torch.stack(tgt)


def _recalibrate_bn(model: nn.Module, batches: list[torch.Tensor], dev) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``batches`` (mixed clean/corrupted
    slices, like training batches). Removes the epoch-to-epoch jitter of momentum-averaged statistics that
    made the eval-mode clean score jump between epochs."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return
    saved = [(m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x.to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


def _hidden(model: ArtifactEncoder, x: torch.Tensor, dev, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch].float().to(dev))["hidden"].float().cpu()
                          for i in range(0, len(x), batch)])


def fit_volume_head(
    model: ArtifactEncoder, entries: Sequence[dict], val_items: Sequence[dict], *, seed: int = 0,
    epochs: int = 400, lr: float = 3e-3, weight_decay: float = 1e-3, batch_size: int = 32, patience: int = 60,
    slices_per_axis: int = 8, max_seconds: float | None = None, device="cpu",
) -> dict:
    """Fit a :class:`VolumeHead` on the frozen encoder and attach it (``model.volume_head``).

    Training examples: every pool entry (:func:`make_pool_entry`) gives its clean volume (target score 0,
    severities 0) and its corrupted volume (target ``SCORE_SCALE * SS``, the simulator's per-head
    severities); the slices of each are reduced to :func:`pool_volume_features` of a random subset of up
    to ``slices_per_axis`` slices per orientation (the scorer's count). Loss per entry: squared error of
    both scores to their targets, the triplet term ``relu(S_clean - S_corrupt + SS)``, per-head BCE, and
    the latent decoder's squared error (the latent must carry score target and severities). Early stopping
    on the validation items' ``val_loss`` (as in :func:`train_encoder`: calibration MSE + heads BCE) with
    ``patience`` epochs; the best head is kept. Returns its metrics.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(seed + 613)
    torch.manual_seed(seed + 613)
    tr = []
    for e in entries:
        ax = torch.as_tensor(np.asarray(e["axis"]), dtype=torch.long)
        tr.append((_hidden(model, e["clean"], dev), _hidden(model, e["corrupt"], dev), ax, float(e["severity"]),
                   e["targets"].float()))
    if not tr:
        raise ValueError("no training entries for the volume head")
    from .score import slice_axes

    va = []
    for it in val_items:
        axis = torch.from_numpy(slice_axes(len(it["slices"])))
        va.append((pool_volume_features(_hidden(model, it["slices"], dev), axis), float(it["severity"]),
                   it["targets"].float()))
    t_feat = time.perf_counter() - t0
    head = VolumeHead(3 * cfg.hidden, cfg.volume_hidden, cfg.n_heads, cfg.latent_dim)
    full = torch.stack([pool_volume_features(h, ax) for c, n, ax, _, _ in tr for h in (c, n)])
    head.feat_mean.copy_(full.mean(0))
    head.feat_std.copy_(full.std(0).clamp_min(1e-4))
    head = head.to(dev)
    vF = torch.stack([f for f, _, _ in va]).to(dev)
    vS = torch.tensor([s for _, s, _ in va], device=dev)
    vT = torch.stack([t for _, _, t in va]).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    k = int(slices_per_axis)

    def subset(h, ax):
        keep = []
        for a in range(3):
            idx = torch.nonzero(ax == a)[:, 0]
            if len(idx) > k:
                idx = idx[torch.randperm(len(idx), generator=gen)[:k]]
            keep.append(idx)
        keep = torch.cat(keep)
        return h[keep], ax[keep]

    def val_loss() -> tuple[float, float]:
        head.eval()
        with torch.no_grad():
            o = head(vF)
            calib = float(((o["score"] - SCORE_SCALE * vS) ** 2).mean())
            bce = float(F.binary_cross_entropy_with_logits(o["severity_logits"], vT))
        head.train()
        return calib + bce, _pearson(vS.cpu().numpy(), o["score"].cpu().numpy())

    best = {"val_loss": float("inf"), "epoch": 0}
    best_state = None
    bad = 0
    history = []
    head.train()
    epoch = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(tr), generator=gen).tolist()
        tot = 0.0
        for i in range(0, len(order), batch_size):
            fc, fn, ss, tg = [], [], [], []
            for j in order[i:i + batch_size]:
                c, n, ax, s_, t_ = tr[j]
                fc.append(pool_volume_features(*subset(c, ax)))
                fn.append(pool_volume_features(*subset(n, ax)))
                ss.append(s_)
                tg.append(t_)
            b = len(fc)
            o = head(torch.stack(fc + fn).to(dev))
            ss_t = torch.tensor(ss, device=dev)
            tg_t = torch.stack(tg).to(dev)
            sc, sn = o["score"][:b], o["score"][b:]
            target = torch.cat([torch.zeros(b, device=dev), SCORE_SCALE * ss_t])
            tgt_heads = torch.cat([torch.zeros_like(tg_t), tg_t])
            lat_t = torch.cat([target[:, None], tgt_heads], 1)
            loss = (((o["score"] - target) ** 2).mean()
                    + F.relu(sc - sn + SCORE_SCALE * ss_t / 2).mean()
                    + F.binary_cross_entropy_with_logits(o["severity_logits"], tgt_heads)
                    + 0.5 * F.mse_loss(o["latent_pred"], lat_t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * b
        vl, vr = val_loss()
        history.append({"epoch": epoch, "train_loss": tot / len(tr), "val_loss": vl, "val_pearson": vr})
        if vl < best["val_loss"] - 1e-4:
            best = {"val_loss": vl, "epoch": epoch, "val_pearson": vr}
            best_state = {k_: v.detach().clone() for k_, v in head.state_dict().items()}
            bad = 0
        else:
            bad += 1
            if bad >= patience:
                break
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    model.volume_head = head
    model.config.volume_head = True
    res = {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "best_val_pearson": best.get("val_pearson"),
           "epochs_run": epoch, "n_entries": len(tr), "n_val_items": len(va), "feature_seconds": t_feat,
           "seconds": time.perf_counter() - t0, "history": history}
    log.info("volume head: best epoch %d/%d, val loss %.4f, val r %.3f (%d entries, %.1f s)", best["epoch"], epoch,
             best["val_loss"], best.get("val_pearson") or float("nan"), len(tr), res["seconds"])
    return res


def _val_items(vols, cfg, severities, seed, sim_fn) -> list[dict]:
    """Fixed validation set on the inference path: each held-out volume clean and 3D-corrupted with every
    single artifact type at each of ``severities`` plus one mixture; slices with the scorer's geometry."""
    single = [a for a in TRAIN_ARTIFACTS if a != "mix"]
    rng = np.random.default_rng(seed + 7919)
    items = []
    sim = sim_fn or _simulate_volume
    for v in vols:
        aff = np.diag([*v.spacing, 1.0])
        s, _ = extract_from_array(v.data, aff, cfg)
        items.append({"volume": v.path, "artifact": "none", "severity": 0.0, "slices": torch.from_numpy(s[:, None]),
                      "targets": torch.zeros(len(HEADS))})
        jobs = [(a, float(sv)) for a in single for sv in severities] + [("mix", float(max(severities)))]
        for a, sv in jobs:
            corr, params = sim(v.data, a, sv, int(rng.integers(0, 2**31 - 1)), v.spacing)
            s, _ = extract_from_array(corr, aff, cfg)
            hs = params.get("head_severities", {})
            items.append({"volume": v.path, "artifact": a, "severity": sv, "slices": torch.from_numpy(s[:, None]),
                          "targets": torch.tensor([float(hs.get(h, 0.0)) for h in HEADS], dtype=torch.float32)})
    return items


def train_encoder(
    volumes: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    epochs: int = 40,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
    patience: int = 8,
    image_size: int = 128,
    pixel_mm: float = 1.5,
    steps_per_epoch: int = 40,
    train_slices_per_axis: int = 12,
    val_severities: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    threads: int | None = 2,
    max_minutes: float | None = None,
    pool_size: int = 240,
    pool_init_per_volume: int = 2,
    sim_time_fraction: float = 0.45,
    pool_refresh: int | None = None,
    contrast_augment: float = 0.6,
    mask_augment: float = 0.3,
    resample_augment: float = 0.5,
    slice_sim_fraction: float = 0.0,
    slice_group: int = 1,
    bn_recalib_batches: int = 6,
    ema_decay: float | None = 0.995,
    volume_head: bool = True,
    weight_decay: float = 1e-4,
    match_ssim: bool = False,
    encoder: dict | None = None,
    model_id: str | None = None,
    manifest: str | os.PathLike | None = None,
    val_volumes: Sequence[str | os.PathLike] | None = None,
    simulate_fn=None,
    simulate_slices_fn=None,
    val_slices: int | None = None,
) -> dict:
    """Train the encoder on the inference path; write ``encoder.safetensors`` + ``model.json`` to ``out_dir``.

    Training data (see :func:`make_pool_entry`): every training volume is loaded once (canonical, normalised).
    A pool of at most ``pool_size`` corrupted volumes is built with the 3D simulator at native resolution
    (random type incl. ``"mix"``, severity U(0,1), deterministic seeds; ``pool_init_per_volume`` per volume
    first) and their slices are extracted with the scorer's code, so normalisation happens after corruption
    exactly as at scoring. After every epoch the pool is refreshed (oldest out) for ``sim_time_fraction`` of
    the wall time (e.g. 0.45: 45 % simulating, 55 % training). Volume augmentations before the simulation:
    ``contrast_augment`` (tissue remapping or gamma/inversion), ``mask_augment`` (skull-stripped look),
    ``resample_augment`` (random 1.0–1.7 mm grid); see :func:`_augment_volume`. ``slice_sim_fraction`` > 0
    replaces that fraction of each batch's negatives with the cheap 2D simulator on the clean slices (off by
    default). ``slice_group`` > 1 draws each batch as groups of
    that many triplets from one corrupted volume and puts the severity terms of the loss on the group means
    (see :func:`encoder_loss`); the batch is rounded down to a multiple of it.

    Validation (held-out whole volumes: ``val_fraction`` of them chosen with ``seed``, or ``val_volumes``):
    the volumes are corrupted once in 3D (every single type at ``val_severities`` plus a mixture, own seed),
    scored per volume like :func:`artifactqc.score.score_volume` (trimmed mean of the slice outputs: the
    volume head is fitted afterwards), and ``val_loss`` = mean (score - 2 SS)^2 + mean BCE of the volume-level severities. With ``ema_decay`` the
    validated, kept and saved weights are an exponential moving average of the trained ones (per step).
    With ``volume_head`` (default) :func:`fit_volume_head` runs on the best weights and the final pool at the
    end (``max_minutes`` keeps up to 90 s for it). BatchNorm statistics are
    recomputed exactly before each validation (``bn_recalib_batches`` training batches). Early stopping on
    ``val_loss`` with ``patience``; ``max_minutes`` caps the whole run. Broken or too-small training files
    are skipped with a warning (recorded in ``model.json``). ``simulate_fn(data, artifact, severity, seed,
    spacing) -> (array, params)`` overrides the 3D simulator and ``simulate_slices_fn`` the 2D one (tests).
    ``match_ssim`` makes the 3D simulator match every training and validation sample's masked SSIM to its
    severity (``simulate_volume(match_ssim=True)``: the severity label is then that sample's measured loss
    of fidelity, not the type-mean calibration's expectation; 2-3 simulations per sample).
    ``val_slices`` is accepted for backwards compatibility and ignored. Returns the metrics dict.
    """
    from .score import predict_volume

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover
        pass
    dev = resolve_device(device)
    group = max(1, int(slice_group))
    if group > 1 and slice_sim_fraction > 0:
        raise ValueError("slice_group > 1 cannot be combined with slice_sim_fraction > 0 (2D-simulated negatives "
                         "have per-slice severities)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if max_minutes is None else t_start + 60.0 * float(max_minutes)

    vols = [str(v) for v in volumes]
    if val_volumes is not None:
        val_set = [str(v) for v in val_volumes]
        train_set = [v for v in vols if v not in set(val_set)]
    else:
        order = rng.permutation(len(vols))
        n_val = max(1, int(round(val_fraction * len(vols)))) if len(vols) > 1 else 0
        val_set = sorted(vols[i] for i in order[:n_val])
        train_set = sorted(vols[i] for i in order[n_val:])
    if not train_set or not val_set:
        raise ValueError(f"need at least one training and one validation volume (got {len(vols)} volumes)")

    slice_cfg = SliceConfig(image_size=image_size, pixel_mm=pixel_mm)  # scoring geometry (stored in model.json)
    train_cfg = SliceConfig(image_size=image_size, pixel_mm=pixel_mm, slices_per_axis=int(train_slices_per_axis))

    def load(paths, with_brain):
        used, skipped = [], []
        for p in paths:
            try:
                used.append(_load_clean_volume(p, train_cfg, with_brain))
            except Exception as exc:  # a broken training file must not kill training
                msg = str(exc) if isinstance(exc, TrainingVolumeError) else f"{p}: {_err(exc)}"
                log.warning("skipping training volume %s", msg)
                skipped.append({"path": p, "error": msg})
        return used, skipped

    log.info("loading %d training and %d validation volumes", len(train_set), len(val_set))
    tr_vols, skipped_tr = load(train_set, mask_augment > 0)
    va_vols, skipped_va = load(val_set, False)
    if not tr_vols:
        raise ValueError(f"no usable training volumes ({len(skipped_tr)} skipped: see the warnings)")
    if not va_vols:
        raise ValueError(f"no usable validation volumes ({len(skipped_va)} skipped: see the warnings)")
    log.info("loaded %d + %d volumes (%.1f s)", len(tr_vols), len(va_vols), time.perf_counter() - t_start)

    t0 = time.perf_counter()
    simulator = "artifactqc.simulate.simulate_volume" if simulate_fn is None else repr(simulate_fn)
    if simulate_fn is None and match_ssim:
        simulate_fn = functools.partial(_simulate_volume, match_ssim=True)
        simulator += "(match_ssim=True)"
    val_items = _val_items(va_vols, slice_cfg, tuple(val_severities), seed, simulate_fn)
    log.info("validation set: %d volumes (%d clean), 3D-simulated in %.1f s", len(val_items), len(va_vols),
             time.perf_counter() - t0)

    aug = {"contrast": contrast_augment, "mask": mask_augment, "resample": resample_augment}
    pool = _Pool(tr_vols, train_cfg, pool_size, seed, simulate_fn, aug)
    n_init = min(pool.capacity, max(2, int(pool_init_per_volume) * len(tr_vols)))
    t0 = time.perf_counter()
    init_budget = None if deadline is None else 0.35 * (deadline - time.perf_counter())
    pool.fill(n_init, init_budget)
    log.info("initial pool: %d corrupted volumes in %.1f s (%.2f s each)", len(pool.entries),
             time.perf_counter() - t0, (time.perf_counter() - t0) / max(1, len(pool.entries)))

    gen = torch.Generator().manual_seed(seed)
    bn_gen_seed = seed + 31
    # the volume head is fitted after the encoder (fit_volume_head), on its frozen features
    enc_cfg = dataclasses.replace(EncoderConfig.from_dict(encoder or {}), volume_head=False)
    model = ArtifactEncoder(enc_cfg).to(dev)
    # exponential moving average of the weights (validated, kept and saved instead of the raw weights)
    ema = None
    if ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(ema_decay)), use_buffers=False)
    head_reserve = 0.0 if not volume_head or deadline is None else min(90.0, 0.08 * (deadline - time.perf_counter()))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * steps_per_epoch)
    t_loop = time.perf_counter()
    step = 0

    def set_lr() -> float:
        """Warm-up (first 10 %) then cosine decay to 2 % of ``lr`` over the run's progress: the larger of the
        step fraction and, with ``max_minutes``, the elapsed fraction of the remaining time budget (so a
        time-capped run still anneals)."""
        prog = step / total_steps
        if deadline is not None:
            prog = max(prog, (time.perf_counter() - t_loop) / max(1e-6, deadline - t_loop))
        prog = min(prog, 1.0)
        f = min(1.0, (prog + 1.0 / total_steps) / 0.1) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        return lr * f

    sim2d = simulate_slices_fn or _simulate
    single = [a for a in TRAIN_ARTIFACTS if a != "mix"]

    def evaluate(net: nn.Module, recalibrate: bool = True) -> dict:
        if recalibrate:
            bgen = torch.Generator().manual_seed(bn_gen_seed)
            batches = []
            for _ in range(int(bn_recalib_batches)):
                xa, xp, xn, xn2, _, _ = pool.sample(batch_size, bgen)
                batches.append(torch.cat([xa, xp, xn, xn2]))
            _recalibrate_bn(net, batches, dev)
        net.eval()
        rows = [predict_volume(net, it["slices"].numpy(), device=dev) for it in val_items]
        net.train()
        sc = np.array([r["score"] for r in rows])
        sv = np.array([[r[f"severity_{h}"] for h in HEADS] for r in rows])
        ss = np.array([it["severity"] for it in val_items])
        tg = np.stack([it["targets"].numpy() for it in val_items])
        arts = [it["artifact"] for it in val_items]
        calib = float(((sc - SCORE_SCALE * ss) ** 2).mean())
        p = np.clip(sv, 1e-6, 1 - 1e-6)
        heads = float(-(tg * np.log(p) + (1 - tg) * np.log(1 - p)).mean())
        per_type = {}
        for a in single:
            m = np.array([x in (a, "none") for x in arts])
            per_type[a] = _spearman(ss[m], sc[m])
        hi = np.array([x not in ("mix", "none") for x in arts]) & (ss >= 0.5)
        acc = float((sv[hi].argmax(1) == tg[hi].argmax(1)).mean()) if hi.any() else float("nan")
        clean = sc[np.array([x == "none" for x in arts])]
        return {
            "val_loss": calib + heads,
            "val_calib_mse": calib,
            "val_heads_bce": heads,
            "val_pearson": _pearson(ss, sc),
            "val_spearman_by_type": per_type,
            "val_head_acc_ss05": acc,
            "val_clean_score_mean": float(clean.mean()),
            "val_clean_score_sd": float(clean.std()),
            "val_score_at_0.5": float(sc[np.abs(ss - 0.5) < 0.11].mean()) if (np.abs(ss - 0.5) < 0.11).any()
            else float("nan"),
        }

    history = []
    best = {"val_loss": float("inf"), "epoch": -1}
    best_state = None
    bad_epochs = 0
    model.train()
    stop_reason = "epochs"
    for epoch in range(1, epochs + 1):
        t_ep = time.perf_counter()
        sums: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            b = max(1, batch_size // group) * group
            xa, xp, xn, xn2, sev, tgt = pool.sample(b, gen, group)
            if slice_sim_fraction > 0:
                k = int(round(slice_sim_fraction * b))
                if k > 0:
                    sel, gamma, inv = _contrast_augment(xa[:k], gen, contrast_augment)
                    ca = _apply_contrast(xa[:k], sel, gamma, inv)
                    cp = _apply_contrast(xp[:k], sel, gamma, inv)
                    arts = [TRAIN_ARTIFACTS[i] for i in torch.randint(0, len(TRAIN_ARTIFACTS), (k,), generator=gen)]
                    s2 = torch.rand(k, generator=gen)
                    neg, t2 = sim2d(torch.cat([ca, cp]), arts + arts, torch.cat([s2, s2]), gen)
                    xa, xp = torch.cat([ca, xa[k:]]), torch.cat([cp, xp[k:]])
                    xn, xn2 = torch.cat([neg[:k], xn[k:]]), torch.cat([neg[k:], xn2[k:]])
                    sev, tgt = torch.cat([s2, sev[k:]]), torch.cat([t2[:k].float(), tgt[k:]])
            cur_lr = set_lr()
            step += 1
            out = model(torch.cat([xa, xp, xn, xn2]).to(dev))
            parts_out = [{k_: v[i * b:(i + 1) * b] for k_, v in out.items()} for i in range(4)]
            loss, parts = encoder_loss(*parts_out, sev.to(dev), tgt.to(dev), group=group)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k_, v in parts.items():
                sums[k_] = sums.get(k_, 0.0) + v
        t_train = time.perf_counter() - t_ep
        train_metrics = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
        val = evaluate(ema.module if ema is not None else model)
        # refresh part of the pool: simulate for sim_time_fraction of the wall time
        t_sim = time.perf_counter()
        f = min(max(float(sim_time_fraction), 0.0), 0.95)
        budget = t_train * f / (1.0 - f)
        if deadline is not None:
            budget = min(budget, max(0.0, deadline - time.perf_counter() - 1.5 * t_train))
        if pool_refresh is not None:  # deterministic: a fixed number of new corrupted volumes per epoch
            added = pool.fill(int(pool_refresh))
        else:
            added = pool.fill(10**9, budget) if budget > 0 else 0
        rec = {"epoch": epoch, **train_metrics, **val, "seconds": time.perf_counter() - t_ep, "train_seconds": t_train,
               "sim_seconds": time.perf_counter() - t_sim, "pool_added": added, "pool_made": pool.made,
               "lr": cur_lr}
        history.append(rec)
        sp = " ".join(f"{k[:4]}={v:.2f}" for k, v in val["val_spearman_by_type"].items())
        log.info(
            "epoch %d/%d loss %.4f | val loss %.4f r %.3f headacc %.2f clean %.3f±%.3f s@0.5 %.2f | spearman %s | "
            "train %.0fs sim %.0fs (+%d, pool %d, made %d)",
            epoch, epochs, train_metrics["train_loss"], val["val_loss"], val["val_pearson"], val["val_head_acc_ss05"],
            val["val_clean_score_mean"], val["val_clean_score_sd"], val["val_score_at_0.5"], sp, t_train,
            rec["sim_seconds"], added, len(pool.entries), pool.made,
        )
        if val["val_loss"] < best["val_loss"] - 1e-4:
            best = {"val_loss": val["val_loss"], "epoch": epoch}
            net = ema.module if ema is not None else model
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                stop_reason = f"early stopping: no improvement for {patience} epochs"
                log.info(stop_reason)
                break
        if deadline is not None and time.perf_counter() + 1.2 * t_train + head_reserve > deadline:
            stop_reason = f"time limit of {max_minutes} min"
            log.info("stopping: %s", stop_reason)
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    head_metrics = None
    if volume_head:
        budget = None if deadline is None else max(20.0, deadline - time.perf_counter())
        head_metrics = fit_volume_head(model, pool.entries, val_items, seed=seed, max_seconds=budget, device=dev)
        # the head was fitted on the features of the current BatchNorm statistics: keep them
        head_metrics["final"] = evaluate(model, recalibrate=False)
    model.cpu()
    manifest_sha = sha256_file(manifest) if manifest and Path(manifest).is_file() else None
    hp = dict(val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience,
              image_size=image_size, pixel_mm=pixel_mm, steps_per_epoch=steps_per_epoch,
              train_slices_per_axis=train_slices_per_axis, val_severities=list(val_severities),
              pool_size=pool_size, pool_init_per_volume=pool_init_per_volume, sim_time_fraction=sim_time_fraction,
              pool_refresh=pool_refresh,
              contrast_augment=contrast_augment, mask_augment=mask_augment, resample_augment=resample_augment,
              slice_sim_fraction=slice_sim_fraction, slice_group=slice_group,
              bn_recalib_batches=bn_recalib_batches, ema_decay=ema_decay, volume_head=volume_head,
              weight_decay=weight_decay, match_ssim=match_ssim, max_minutes=max_minutes, device=str(dev),
              threads=threads)
    metrics = {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "stop_reason": stop_reason,
        "train_seconds": time.perf_counter() - t_start,
        "simulation_seconds": pool.sim_seconds,
        "n_corrupted_volumes": pool.made,
        "n_val_items": len(val_items),
        "final": history[best["epoch"] - 1] if best["epoch"] > 0 else None,
        "volume_head": head_metrics,
    }
    meta = {
        "model_id": model_id or out_dir.name,
        "training": {
            "hyperparameters": hp,
            "manifest": str(manifest) if manifest else None,
            "manifest_sha256": manifest_sha,
            "train_volumes": [v.path for v in tr_vols],
            "val_volumes": [v.path for v in va_vols],
            "skipped_volumes": skipped_tr + skipped_va,
            "data_path": "3D simulation at native resolution, then slices.extract_from_array (inference path)",
            "simulator": simulator,
            "artifacts": list(TRAIN_ARTIFACTS),
            "epochs": history,
            **metrics,
        },
    }
    save_model(model, out_dir, slice_cfg, meta)
    log.info("saved %s (best epoch %d, val loss %.4f) in %.1f s", out_dir / "encoder.safetensors", best["epoch"],
             best["val_loss"], metrics["train_seconds"])
    return metrics


def train_from_cli(
    paths: Sequence[str], list_file: str | None, out_dir: str, *, demo: bool = False, seed: int = 0,
    device: str = "auto", model_id: str | None = None, **overrides,
) -> dict:
    """``artifactqc train`` / the workflow rule: volumes from ``paths`` and/or a list/manifest file.

    ``demo=True`` starts from :func:`demo_config`; ``overrides`` replace single settings.
    """
    from .score import read_path_list

    vols = list(paths or []) + (read_path_list(list_file) if list_file else [])
    if not vols:
        raise ValueError("no training volumes given")
    cfg = demo_config() if demo else {}
    cfg.update(overrides)
    return train_encoder(vols, out_dir, seed=seed, device=device, model_id=model_id, manifest=list_file, **cfg)
