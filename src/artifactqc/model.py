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
  costs nothing at inference (a fixed affine map);
* an MLP to a hidden vector ``h``; from ``h``: the **score** ``softplus(.) >= 0``, five **per-artifact
  severities** ``sigmoid(.)`` in [0, 1] (order :data:`HEADS` = noise, ghosting, motion, bias, resolution),
  and a **latent** vector ``z`` (``latent_dim``, default 4) for the density stage.

Score calibration: the target score of a slice with simulated severity SS is ``SCORE_SCALE * SS`` with
``SCORE_SCALE = 2`` (linear, so SS 0.5 -> score 1 = the review threshold; clean -> 0).

Loss per batch of B triplets (anchor ``a`` = clean slice, positive ``p`` = another clean slice of the same
volume, usually another orientation, negatives ``n``/``n2`` = ``a``/``p`` with the *same* simulated
artifact and severity SS_i):

* triplet term with a **per-sample** margin ``m_i = SCORE_SCALE * SS_i / 2``:
  ``relu(S_a - S_n + m_i) + relu(S_p - S_n2 + m_i)`` (the published code used the batch-mean severity);
* **squared** L2 on clean scores ``S_a^2 + S_p^2`` (the published code used an L1 penalty), plus a squared
  error pulling corrupted scores to ``SCORE_SCALE * SS_i`` (calibration);
* per-head BCE of the five severities against the simulator's known per-head severities (0 for clean);
* latent terms: a linear decoder from ``z`` must predict score target and the five severities (so ``z``
  carries the artifact information), and an InfoNCE term makes ``z(n_i)`` closest to ``z(n2_i)`` (same
  artifact level, different anatomy; the Zuo et al. positives) among the batch.

Checkpoints are ``encoder.safetensors`` + ``model.json``; :func:`load_model` refuses anything else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .io import sha256_file
from .slices import SliceConfig, extract_slices

log = logging.getLogger(__name__)

#: Names of the per-artifact severity heads, in output order.
HEADS = ("noise", "ghosting", "motion", "bias", "resolution")
#: Target score = SCORE_SCALE * severity, so severity 0.5 -> 1 (the review threshold).
SCORE_SCALE = 2.0
#: Simulator artifact names used in training (``"mix"`` = mixture of 2-3 types).
TRAIN_ARTIFACTS = ("noise", "ghosting", "bias", "anisotropy", "motion", "mix")


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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        f = f.flatten(2)
        pooled = torch.cat([f.mean(-1), f.std(-1, correction=0)], dim=1)
        h = self.mlp(pooled)
        z = self.latent_head(h)
        return {
            "score": F.softplus(self.score_head(h)[:, 0]),
            "severity_logits": self.severity_head(h),
            "latent": z,
            "latent_pred": self.latent_decoder(z),
        }


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
    weights: dict | None = None,
) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts for one batch (see the module docstring).

    ``severity`` [B]: simulated severity SS_i of the negatives; ``targets`` [B, 5]: per-head severities.
    """
    w = {"triplet": 1.0, "clean": 1.0, "calib": 1.0, "heads": 1.0, "latent": 0.5, "nce": 0.1}
    w.update(weights or {})
    target_score = SCORE_SCALE * severity
    margin = target_score / 2.0  # per-sample margin
    s_a, s_p, s_n, s_n2 = out_a["score"], out_p["score"], out_n["score"], out_n2["score"]
    triplet = (F.relu(s_a - s_n + margin) + F.relu(s_p - s_n2 + margin)).mean()
    clean = (s_a.pow(2) + s_p.pow(2)).mean()  # true squared L2
    calib = ((s_n - target_score).pow(2) + (s_n2 - target_score).pow(2)).mean()
    zeros = torch.zeros_like(targets)
    heads = (
        F.binary_cross_entropy_with_logits(out_n["severity_logits"], targets)
        + F.binary_cross_entropy_with_logits(out_n2["severity_logits"], targets)
        + 0.5 * F.binary_cross_entropy_with_logits(out_a["severity_logits"], zeros)
        + 0.5 * F.binary_cross_entropy_with_logits(out_p["severity_logits"], zeros)
    ) / 3.0
    lat_t = torch.cat([target_score[:, None], targets], 1)
    lat_t0 = torch.zeros_like(lat_t)
    latent = (
        F.mse_loss(out_n["latent_pred"], lat_t) + F.mse_loss(out_n2["latent_pred"], lat_t)
        + 0.5 * F.mse_loss(out_a["latent_pred"], lat_t0) + 0.5 * F.mse_loss(out_p["latent_pred"], lat_t0)
    ) / 3.0
    nce = info_nce(out_n["latent"], out_n2["latent"])
    parts = {"triplet": triplet, "clean": clean, "calib": calib, "heads": heads, "latent": latent, "nce": nce}
    total = sum(w[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ------------------------------------------------------------------------------------ checkpoint I/O

def _git_describe() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


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
        "aggregation": "trimmed mean (10% each side) over slices",
        "artifactqc_version": __version__,
        "git_describe": _git_describe(),
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


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "auto") -> ArtifactEncoder:
    """Load ``encoder.safetensors`` + ``model.json`` from a directory (eval mode, on ``device``).

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
    model.to(dev).eval()
    model.model_info = info
    model.slice_cfg = SliceConfig.from_dict(info.get("slices", {}))
    model.device = dev
    return model


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Training hyper-parameters; :func:`demo_config` is the ≤10 min / 2-core setting."""

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
    train_slices_per_axis: int = 24
    val_slices: int = 480
    threads: int = 2
    max_minutes: float | None = None
    contrast_augment: float = 0.5
    encoder: dict = field(default_factory=dict)


def demo_config(**overrides) -> dict:
    """Small, CPU-friendly settings: trains in well under 10 min on 2 cores."""
    d = dict(epochs=12, steps_per_epoch=25, batch_size=24, patience=6, max_minutes=9.0, train_slices_per_axis=16,
             val_slices=240)
    d.update(overrides)
    return d


def _contrast_augment(x: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """Random per-sample gamma (0.5–2) and, for a quarter of those, foreground inversion (T1 <-> T2-like).

    Keeps the background at 0. Applied identically to anchor and positive (same volume, same contrast).
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

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _simulate(x, arts, sev, gen):
    from . import simulate

    return simulate.simulate_slices(x, arts, sev, generator=gen, return_targets=True)


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
    train_slices_per_axis: int = 24,
    val_slices: int = 480,
    threads: int | None = 2,
    max_minutes: float | None = None,
    contrast_augment: float = 0.5,
    weight_decay: float = 1e-4,
    encoder: dict | None = None,
    model_id: str | None = None,
    manifest: str | os.PathLike | None = None,
    val_volumes: Sequence[str | os.PathLike] | None = None,
    simulate_fn=None,
) -> dict:
    """Train the encoder on clean volumes with on-the-fly simulated artifacts; write the checkpoint.

    Whole volumes are held out for validation (``val_fraction`` of them, chosen with ``seed``, or the
    explicit ``val_volumes``). Clean slices of every volume are extracted once (:mod:`artifactqc.slices`)
    and cached in memory; each step draws anchors/positives from the cache and corrupts them with
    ``simulate.simulate_slices`` (``simulate_fn`` overrides it, for tests only). Validation uses a fixed
    set of freshly simulated slices (its own seed, never training batches). Early stopping on the
    validation loss with ``patience`` epochs; the best epoch's weights are saved to
    ``out_dir/encoder.safetensors`` with ``out_dir/model.json``. Returns the metrics dict.
    """
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
    sim = simulate_fn or _simulate
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

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

    slice_cfg = SliceConfig(image_size=image_size, pixel_mm=pixel_mm)

    def cache(paths, per_axis):
        cfg = SliceConfig(image_size=image_size, pixel_mm=pixel_mm, slices_per_axis=per_axis)
        arrays, owners, axes, used, skipped = [], [], [], [], []
        for p in paths:
            try:
                s, _ = extract_slices(p, cfg)
            except Exception as exc:  # a broken training file must not kill training
                log.warning("skipping %s: %s: %s", p, type(exc).__name__, exc)
                skipped.append({"path": p, "error": f"{type(exc).__name__}: {exc}"})
                continue
            # drop nearly empty slices (little foreground)
            keep = (s > 0.1).mean(axis=(1, 2)) > 0.03
            s = s[keep]
            arrays.append(torch.from_numpy(np.ascontiguousarray(s)))
            owners += [len(used)] * len(s)
            axes += list(np.repeat(np.arange(3), per_axis)[keep])
            used.append(p)
        if not arrays:
            raise ValueError("no usable volumes")
        return torch.cat(arrays)[:, None], np.asarray(owners), np.asarray(axes), used, skipped

    log.info("caching clean slices of %d training and %d validation volumes", len(train_set), len(val_set))
    tr_x, tr_own, tr_axis, train_used, skipped_tr = cache(train_set, train_slices_per_axis)
    va_x, va_own, _, val_used, skipped_va = cache(val_set, max(4, train_slices_per_axis // 2))
    by_vol = [np.nonzero(tr_own == i)[0] for i in range(len(train_used))]
    log.info("cached %d training slices, %d validation slices (%.1f s)", len(tr_x), len(va_x),
             time.perf_counter() - t_start)

    # fixed validation set: fresh simulation with its own seed, never a training batch
    vgen = torch.Generator().manual_seed(seed + 7919)
    vrng = np.random.default_rng(seed + 7919)
    nv = int(val_slices)
    idx = vrng.integers(0, len(va_x), nv)
    v_clean = va_x[idx]
    single = [a for a in TRAIN_ARTIFACTS if a != "mix"]
    v_arts = [single[i % len(single)] if i % 6 else "mix" for i in range(nv)]
    v_sev = torch.from_numpy(vrng.uniform(0, 1, nv).astype(np.float32))
    v_neg, v_tgt = sim(v_clean, v_arts, v_sev, vgen)

    gen = torch.Generator().manual_seed(seed)
    enc_cfg = EncoderConfig.from_dict(encoder or {})
    model = ArtifactEncoder(enc_cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)

    def evaluate() -> dict:
        model.eval()
        outs = {"score": [], "sev": []}
        clean_scores = []
        with torch.no_grad():
            for i in range(0, nv, 128):
                o = model(v_neg[i:i + 128].to(dev))
                outs["score"].append(o["score"].cpu())
                outs["sev"].append(torch.sigmoid(o["severity_logits"]).cpu())
                c = model(v_clean[i:i + 128].to(dev))
                clean_scores.append(c["score"].cpu())
        s = torch.cat(outs["score"])
        sv = torch.cat(outs["sev"])
        cs = torch.cat(clean_scores)
        calib = float(((s - SCORE_SCALE * v_sev) ** 2).mean() + (cs**2).mean())
        heads = float(F.binary_cross_entropy(sv.clamp(1e-6, 1 - 1e-6), v_tgt))
        ss = v_sev.numpy()
        sc = s.numpy()
        per_type = {}
        for a in single:
            m = np.array([x == a for x in v_arts])
            per_type[a] = _spearman(ss[m], sc[m])
        hi = np.array([x != "mix" for x in v_arts]) & (ss >= 0.5)
        acc = float((sv[hi].argmax(1).numpy() == v_tgt[hi].argmax(1).numpy()).mean()) if hi.any() else float("nan")
        model.train()
        return {
            "val_loss": calib + heads,
            "val_pearson": _pearson(ss, sc),
            "val_spearman_by_type": per_type,
            "val_head_acc_ss05": acc,
            "val_clean_score_mean": float(cs.mean()),
            "val_clean_score_sd": float(cs.std()),
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
            b = batch_size
            vi = torch.randint(0, len(by_vol), (b,), generator=gen).numpy()
            ia = np.empty(b, dtype=np.int64)
            ip = np.empty(b, dtype=np.int64)
            for k, v in enumerate(vi):
                cand = by_vol[v]
                j = cand[int(torch.randint(0, len(cand), (1,), generator=gen))]
                others = cand[tr_axis[cand] != tr_axis[j]]
                pool = others if len(others) else cand
                ia[k] = j
                ip[k] = pool[int(torch.randint(0, len(pool), (1,), generator=gen))]
            xa, xp = tr_x[ia], tr_x[ip]
            sel, gamma, inv = _contrast_augment(xa, gen, contrast_augment)
            xa = _apply_contrast(xa, sel, gamma, inv)
            xp = _apply_contrast(xp, sel, gamma, inv)
            art_idx = torch.randint(0, len(TRAIN_ARTIFACTS), (b,), generator=gen).tolist()
            arts = [TRAIN_ARTIFACTS[i] for i in art_idx]
            sev = torch.rand(b, generator=gen)
            # one simulation call for both views: same artifact and severity, independent random draws
            neg, tgt = sim(torch.cat([xa, xp]), arts + arts, torch.cat([sev, sev]), gen)
            xn, xn2, tgt = neg[:b], neg[b:], tgt[:b]
            out = model(torch.cat([xa, xp, xn, xn2]).to(dev))
            parts_out = [{k: v[i * b:(i + 1) * b] for k, v in out.items()} for i in range(4)]
            loss, parts = encoder_loss(*parts_out, sev.to(dev), tgt.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        train_metrics = {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}
        val = evaluate()
        rec = {"epoch": epoch, **train_metrics, **val, "seconds": time.perf_counter() - t_ep,
               "lr": sched.get_last_lr()[0]}
        history.append(rec)
        sp = " ".join(f"{k[:4]}={v:.2f}" for k, v in val["val_spearman_by_type"].items())
        log.info(
            "epoch %d/%d loss %.4f | val loss %.4f r %.3f headacc %.2f clean %.3f±%.3f | spearman %s | %.1fs",
            epoch, epochs, train_metrics["train_loss"], val["val_loss"], val["val_pearson"],
            val["val_head_acc_ss05"], val["val_clean_score_mean"], val["val_clean_score_sd"], sp, rec["seconds"],
        )
        if val["val_loss"] < best["val_loss"] - 1e-4:
            best = {"val_loss": val["val_loss"], "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                stop_reason = f"early stopping: no improvement for {patience} epochs"
                log.info(stop_reason)
                break
        if max_minutes is not None and (time.perf_counter() - t_start) / 60 > max_minutes:
            stop_reason = f"time limit of {max_minutes} min"
            log.info("stopping: %s", stop_reason)
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.cpu()
    manifest_sha = sha256_file(manifest) if manifest and Path(manifest).is_file() else None
    hp = dict(val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience,
              image_size=image_size, pixel_mm=pixel_mm, steps_per_epoch=steps_per_epoch,
              train_slices_per_axis=train_slices_per_axis, val_slices=val_slices, contrast_augment=contrast_augment,
              weight_decay=weight_decay, max_minutes=max_minutes, device=str(dev), threads=threads)
    metrics = {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "stop_reason": stop_reason,
        "train_seconds": time.perf_counter() - t_start,
        "n_train_slices": int(len(tr_x)),
        "n_val_slices": int(len(va_x)),
        "final": history[best["epoch"] - 1] if best["epoch"] > 0 else None,
    }
    meta = {
        "model_id": model_id or out_dir.name,
        "training": {
            "hyperparameters": hp,
            "manifest": str(manifest) if manifest else None,
            "manifest_sha256": manifest_sha,
            "train_volumes": train_used,
            "val_volumes": val_used,
            "skipped_volumes": skipped_tr + skipped_va,
            "simulator": "artifactqc.simulate.simulate_slices" if simulate_fn is None else repr(simulate_fn),
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
