"""Model directories: save and load ``encoder.safetensors`` + ``model.json`` (safetensors only: pickle
checkpoints are refused), and BatchNorm folding for inference (:func:`optimize_for_inference`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..io import sha256_file
from ..provenance import git_describe
from .network import HEADS, SCORE_SCALE, ArtifactEncoder, EncoderConfig, resolve_device
from .slices import SliceConfig


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
