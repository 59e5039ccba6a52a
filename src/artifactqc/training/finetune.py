"""Fine-tuning: training that starts from a saved model (``TrainConfig.init``) instead of from scratch.

:func:`load_init` reads the init model (a folder, or ``builtin`` for the model shipped with the package)
through :func:`artifactqc.encoder.checkpoint.load_model` (safetensors only, sha256 checked against its
``model.json``) and returns the training settings adjusted to that model (its architecture and slice
geometry), its encoder weights (without the volume head, which a fine-tune fits anew) and the record that
goes into the new ``model.json`` (``training.init_model``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..encoder.checkpoint import ModelLoadError, load_model, resolve_model_dir
from .config import TrainConfig

log = logging.getLogger(__name__)


class InitModelError(ValueError):
    """The ``init`` model cannot be fine-tuned from (missing, corrupt, or not an artifactqc encoder)."""


def load_init(cfg: TrainConfig) -> tuple[TrainConfig, dict[str, torch.Tensor] | None, dict | None]:
    """``(cfg, state, record)`` for ``cfg.init``; ``(cfg, None, None)`` without one.

    ``cfg`` comes back with ``encoder`` = the init model's architecture (without volume head) and its
    ``image_size`` / ``pixel_mm`` / ``thick_pixel_ratio``; ``state`` holds its encoder weights (CPU tensors,
    volume head left out); ``record`` = ``{"folder", "model_id", "weights_sha256", "artifactqc_version"}``. Raises
    :class:`InitModelError` naming the folder or file and the problem.
    """
    if not cfg.init:
        return cfg, None, None
    try:
        folder = resolve_model_dir(cfg.init)
        model = load_model(folder, device="cpu", optimize=False)
    except (ModelLoadError, OSError) as exc:
        raise InitModelError(f"init model {cfg.init!r}: {exc}") from exc
    info = model.model_info
    if not info.get("weights_sha256"):
        raise InitModelError(f"{folder / 'model.json'}: no weights_sha256; a model to fine-tune from must record "
                             "the sha256 of its weights (it goes into the new model's provenance)")
    arch = {**info.get("architecture", {}), "volume_head": False}
    arch.pop("class", None)
    slices = info.get("slices", {})
    new = dataclasses.replace(cfg, encoder=arch, image_size=int(slices.get("image_size", cfg.image_size)),
                              pixel_mm=float(slices.get("pixel_mm", cfg.pixel_mm)),
                              thick_pixel_ratio=float(slices.get("thick_pixel_ratio", cfg.thick_pixel_ratio)))
    geometry = ("image_size", "pixel_mm", "thick_pixel_ratio")
    if any(getattr(new, k) != getattr(cfg, k) for k in geometry):
        log.info("fine-tuning from %s: slice geometry %s taken from the init model", folder,
                 {k: getattr(new, k) for k in geometry})
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("volume_head.")}
    record = {"folder": str(folder), "model_id": info.get("model_id"), "weights_sha256": info["weights_sha256"],
              "artifactqc_version": info.get("artifactqc_version")}
    log.info("fine-tuning from %s (model %s, sha256 %s…)", folder, record["model_id"], record["weights_sha256"][:12])
    return new, state, record
