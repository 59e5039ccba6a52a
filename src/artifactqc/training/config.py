"""Training settings: the hyper-parameters of :func:`artifactqc.training.loop.train_encoder`
(:class:`TrainConfig`), the demo's small setting (:func:`demo_config`) and the artifact types trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Simulator artifact names used in training (``"mix"`` = mixture of 2-3 types).
TRAIN_ARTIFACTS = ("noise", "ghosting", "bias", "anisotropy", "motion", "mix")


#: One round of artifact types drawn for the training pool: motion twice (the weakest type after slice
#: extraction: SSIM 0.76 at SS 1, v3 Spearman 0.58), every other type once.
POOL_ARTIFACTS = ("noise", "ghosting", "bias", "anisotropy", "motion", "motion", "mix")


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
