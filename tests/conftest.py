"""Shared fixtures. Real development data is read from ../shared/data and never copied in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ARTIFACTQC_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def shared_data_or_skip() -> Path:
    """The development data folder, or skip the test with a message saying where it was looked for."""
    if not (SHARED_DATA / "MANIFEST.tsv").is_file():
        pytest.skip(
            f"real development data not found at {SHARED_DATA} "
            "(set ARTIFACTQC_SHARED_DATA or place shared/data beside the checkout)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_or_skip()


@pytest.fixture(scope="session")
def fixture_paths(shared_data) -> list[Path]:
    """The fast subset listed in FIXTURES.txt."""
    lines = (shared_data / "FIXTURES.txt").read_text().split()
    return [shared_data / line for line in lines if line.strip()]


def save_tiny_model(dest: Path, *, seed: int = 0, pixel_mm: float = 4.0, meta: dict | None = None) -> Path:
    """A small, randomly initialised encoder saved through the package's checkpoint code (plumbing tests)."""
    import torch

    from artifactqc.encoder.network import ArtifactEncoder, EncoderConfig
    from artifactqc.encoder.checkpoint import save_model
    from artifactqc.encoder.slices import SliceConfig

    torch.manual_seed(seed)
    model = ArtifactEncoder(EncoderConfig(widths=(8, 16), extra=(False, False), stem_width=4, hidden=16, latent_dim=2))
    save_model(model, dest, SliceConfig(image_size=32, pixel_mm=pixel_mm, slices_per_axis=3), meta or {"model_id": "t"})
    return Path(dest)
