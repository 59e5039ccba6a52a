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

#: What a thick-slice training item draws instead of ``anisotropy`` (thicker slices along the acquisition's own
#: slice axis do not show on the acquisition planes the item is graded on).
THICK_ARTIFACTS = ("noise", "ghosting", "bias", "motion")


@dataclass
class TrainConfig:
    """Training hyper-parameters: the keyword settings of :func:`artifactqc.training.loop.train_encoder`
    (recorded in ``model.json``); :func:`demo_config` is the ≤10 min / 2-core setting.

    Training data (see :func:`artifactqc.training.pool.make_pool_entry`): every training volume is loaded
    once (canonical, scaled). A pool of at most ``pool_size`` corrupted volumes is built with the 3D simulator
    at native resolution (random type incl. ``"mix"``, severity U(0,1), deterministic seeds;
    ``pool_init_per_volume`` per volume first) and their slices are extracted with the scorer's code, so
    normalisation happens after corruption exactly as at scoring. After every epoch the pool is refreshed
    (oldest out) for ``sim_time_fraction`` of the wall time (e.g. 0.45: 45 % simulating, 55 % training), or by
    exactly ``pool_refresh`` volumes when that is set (deterministic). Volume augmentations before the
    simulation: ``contrast_augment`` (tissue remapping or gamma/inversion), ``mask_augment`` (skull-stripped
    look), ``resample_augment`` (random 1.0–1.7 mm grid), ``thick_augment`` (a 2D protocol's 3–6 mm slices on
    their own grid; such an item keeps only its acquisition-plane slices, as the scorer grades it; off by
    default); see :mod:`artifactqc.training.augment`. ``zoom_augment``: that fraction of the items is
    sampled at finer pixels over the same field of view (:data:`artifactqc.training.pool.ZOOM_PIXEL_FRACTIONS`),
    so that the encoder learns that the larger anatomy of a finer grid is not an artifact;
    ``synth_augment``: that fraction of the items is a label-map synthesis of a new anatomy and contrast
    (:func:`artifactqc.training.augment.synthesize_volume`: the volume deformed, its intensity classes
    re-rendered; off by default) instead of the contrast augmentation.
    ``thick_pixel_ratio`` > 0 is the model's slice geometry for thick-slice scans
    (``SliceConfig.thick_pixel_ratio``, kept in ``model.json``); both off by default.
    ``slice_sim_fraction`` > 0 replaces that fraction of each batch's negatives with the cheap 2D simulator on
    the clean slices (off by default). ``slice_group`` > 1 draws each batch as groups of that many triplets
    from one corrupted volume and puts the severity terms of the loss on the group means (see
    :func:`artifactqc.training.losses.encoder_loss`); the batch is rounded down to a multiple of it.

    Validation (held-out whole volumes: ``val_fraction`` of them chosen with ``seed``, or the run's
    ``val_volumes``): the volumes are corrupted once in 3D (every single type at ``val_severities`` plus a
    mixture, own seed), scored per volume like :func:`artifactqc.encoder.score.score_volume` (trimmed mean of
    the slice outputs: the volume head is fitted afterwards), and ``val_loss`` = mean (score - 2 SS)^2 + mean
    BCE of the volume-level severities. With ``ema_decay`` the validated, kept and saved weights are an
    exponential moving average of the trained ones (per step). With ``volume_head`` (default)
    :func:`artifactqc.training.volume_head.fit_volume_head` runs on the best weights and the final pool at
    the end (``max_minutes`` keeps up to 90 s for it). BatchNorm statistics are recomputed exactly before
    each validation (``bn_recalib_batches`` training batches). Early stopping on ``val_loss`` with
    ``patience``. With a fixed ``pool_refresh`` the run is counted in steps and is deterministic for a seed,
    config, data and thread count on CPU: ``max_minutes`` is then only a safety stop checked after each epoch
    (``stop_reason`` starts with "safety stop", ``stopped_by_clock``, a warning), and the volume-head fit is
    not cut by it. Without ``pool_refresh`` (the time-shared mode) ``max_minutes`` caps the whole run and
    also paces the learning rate. ``match_ssim`` makes the 3D simulator match every
    training and validation sample's masked SSIM to its severity (``simulate_volume(match_ssim=True)``: the
    severity label is then that sample's measured loss of fidelity, not the type-mean calibration's
    expectation; 2-3 simulations per sample). ``encoder`` holds :class:`artifactqc.encoder.network.EncoderConfig`
    fields. ``threads`` sets torch's thread count (``None``: unchanged).

    Paired training (:mod:`artifactqc.training.pairs`; both off by default): ``render_pairs`` is the fraction
    of new pool items made as *twins* (one anatomy re-rendered twice with random per-tissue intensities, the
    same artifact on both; loss :func:`~artifactqc.training.losses.consistency_loss` with weight
    ``consistency``), ``rank_pairs`` the fraction made as *ranking pairs* (one anatomy, one artifact type and
    seed at two severities; :func:`~artifactqc.training.losses.ranking_loss` with weight ``rank`` and margin
    ``rank_margin`` × the calibrated score difference; with ``rank_heads`` > 0 also the heads whose simulated
    severity rises, :func:`~artifactqc.training.losses.head_ranking_loss`, with that weight). A pair counts as
    two entries of ``pool_refresh``.
    Every batch then adds, per enabled kind, ``pair_batch`` × ``batch_size`` planes drawn as pairs of
    ``pair_planes`` planes each (the same planes in both members).

    ``init`` (a model folder, or ``"builtin"`` for the model shipped with the package; ``None``: from scratch)
    fine-tunes: the encoder starts from that model's weights, with its architecture (``encoder`` is then
    ignored) and its slice geometry (``image_size``, ``pixel_mm``); the volume head is fitted anew. The init
    model's folder, ``model_id`` and ``weights_sha256`` go into ``model.json`` (``training.init_model``).
    """

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
    threads: int | None = 2
    max_minutes: float | None = None
    pool_size: int = 240
    pool_init_per_volume: int = 2
    sim_time_fraction: float = 0.45
    pool_refresh: int | None = None
    contrast_augment: float = 0.6
    mask_augment: float = 0.3
    resample_augment: float = 0.5
    thick_augment: float = 0.0
    zoom_augment: float = 0.0
    synth_augment: float = 0.0
    thick_pixel_ratio: float = 0.0
    slice_sim_fraction: float = 0.0
    slice_group: int = 1
    bn_recalib_batches: int = 6
    ema_decay: float | None = 0.995
    volume_head: bool = True
    match_ssim: bool = False
    render_pairs: float = 0.0
    consistency: float = 1.0
    rank_pairs: float = 0.0
    rank: float = 1.0
    rank_margin: float = 0.5
    rank_heads: float = 0.0
    pair_batch: float = 0.25
    pair_planes: int = 4
    encoder: dict | None = field(default_factory=dict)
    init: str | None = None

    def __post_init__(self):
        for name in ("render_pairs", "rank_pairs", "pair_batch", "thick_augment", "zoom_augment",
                     "synth_augment"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.render_pairs + self.rank_pairs > 1.0:
            raise ValueError(f"render_pairs + rank_pairs must be at most 1, got {self.render_pairs} + {self.rank_pairs}")
        for name in ("zoom_augment", "synth_augment"):
            if getattr(self, name) > 0 and self.render_pairs + self.rank_pairs > 0:
                raise ValueError(f"{name} cannot be combined with render_pairs or rank_pairs")
        if float(self.thick_pixel_ratio) < 0:
            raise ValueError(f"thick_pixel_ratio must be >= 0 (0 = off), got {self.thick_pixel_ratio}")
        if int(self.pair_planes) < 1:
            raise ValueError(f"pair_planes must be at least 1, got {self.pair_planes}")
        for name in ("consistency", "rank", "rank_margin", "rank_heads"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def pairs(self) -> bool:
        """Whether the pool makes paired entries (``render_pairs`` or ``rank_pairs`` > 0)."""
        return self.render_pairs > 0 or self.rank_pairs > 0

    @classmethod
    def from_settings(cls, settings: dict) -> "TrainConfig":
        """The config from keyword settings (defaults for the rest); an unknown name is a ``TypeError``."""
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"train_encoder() got unexpected keyword argument(s) {unknown}")
        return cls(**settings)

    def recorded(self) -> dict:
        """The hyper-parameters as recorded in ``model.json`` (``training.hyperparameters``; ``device`` and
        ``threads`` are added by the run), in their historical order."""
        keys = ("val_fraction", "epochs", "batch_size", "lr", "seed", "patience", "image_size", "pixel_mm",
                "steps_per_epoch", "train_slices_per_axis", "val_severities", "pool_size", "pool_init_per_volume",
                "sim_time_fraction", "pool_refresh", "contrast_augment", "mask_augment", "resample_augment",
                "thick_augment", "zoom_augment", "synth_augment", "thick_pixel_ratio", "slice_sim_fraction",
                "slice_group", "bn_recalib_batches", "ema_decay", "volume_head",
                "weight_decay", "match_ssim", "max_minutes", "render_pairs", "consistency", "rank_pairs", "rank",
                "rank_margin", "rank_heads", "pair_batch", "pair_planes", "init")
        d = {k: getattr(self, k) for k in keys}
        d["val_severities"] = list(self.val_severities)
        return d


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
