"""The artifact encoder's network: :class:`ArtifactEncoder` (per slice), :class:`VolumeHead` (per volume),
the pooling between them and the output conventions (:data:`HEADS`, :data:`SCORE_SCALE`).

Architecture (:class:`ArtifactEncoder`), for 2D slices ``[B, 1, S, S]`` (default S = 128, 1.5 mm pixels,
see :mod:`artifactqc.encoder.slices`):

* stem: 4×4 conv, stride 2 (every pixel is seen, so noise texture reaches the features), norm, LeakyReLU;
* four 3×3 stride-2 conv blocks (norm, LeakyReLU) with channels ``widths`` (two of them followed by a 3×3
  stride-1 conv): the receptive field grows to ~90 px (135 mm), and mean+std pooling over space (std pooling
  keeps "how uneven" features such as bias and ghosts) gives global context for ghost copies, bias
  gradients and blur;
* norm = BatchNorm by default (``EncoderConfig.norm``; "group"/"instance" available). Measured here, GroupNorm
  made the network ~3× slower on CPU, and any per-sample norm (Instance/GroupNorm) normalises away the
  absolute energy of a feature map, i.e. exactly the noise level a QC model must see; BatchNorm keeps it and
  costs nothing at inference (a fixed affine map, folded into the convs by
  :func:`artifactqc.encoder.checkpoint.optimize_for_inference`). Its running statistics are recomputed
  exactly over several training batches before each validation and before saving
  (:func:`artifactqc.training.validate._recalibrate_bn`), so eval-mode scores do not jump between epochs
  with the momentum average;
* an MLP to a hidden vector ``h``; from ``h``: the **score** ``softplus(.) >= 0``, five **per-artifact
  severities** ``sigmoid(.)`` in [0, 1] (order :data:`HEADS` = noise, ghosting, motion, bias, resolution),
  and a **latent** vector ``z`` (``latent_dim``, default 4) for the density stage;
* a **volume head** (:class:`VolumeHead`, default for new models): the per-slice ``h`` of a volume are pooled
  (:func:`pool_volume_features`: mean over slices, max and min over the three orientation means) and a
  small MLP gives the volume's score, severities and latent. It is fitted after the encoder, on its frozen
  features of whole corrupted training volumes (:func:`artifactqc.training.volume_head.fit_volume_head`),
  so the score is regressed on the volume's simulated severity, and it can compare orientations
  (anisotropic blur or ghosts affect one axis, resampling all three). Models without it (``volume_head``
  false in ``model.json``) score with the 10 % trimmed mean of the per-slice outputs.

Score calibration: the target score of a slice with simulated severity SS is ``SCORE_SCALE * SS`` with
``SCORE_SCALE = 2`` (linear, so SS 0.5 -> score 1 = the review threshold; clean -> 0).

This module imports no training code (:mod:`artifactqc.training` builds on it, never the reverse).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


#: Names of the per-artifact severity heads, in output order.
HEADS = ("noise", "ghosting", "motion", "bias", "resolution")


#: Target score = SCORE_SCALE * severity, so severity 0.5 -> 1 (the review threshold).
SCORE_SCALE = 2.0


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
