"""The workflow's training job: train the encoder into a staging folder and publish it atomically.

Snakemake's ``train_encoder`` rule calls :func:`train_model_folder`. The trainer stops within seconds when
the run that started it is killed (:func:`artifactqc.jobguard.exit_when_orphaned`), and the model folder
only ever holds a complete model (:func:`artifactqc.jobguard.staging_dir`).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from ..jobguard import exit_when_orphaned, staging_dir


def train_model_folder(manifest: str | os.PathLike, weights_out: str | os.PathLike, **train_kwargs) -> dict:
    """Train on ``manifest`` (see :func:`artifactqc.training.loop.train_from_cli` for ``train_kwargs``) and place
    ``encoder.safetensors`` + ``model.json`` in the folder of ``weights_out``. Returns the metrics."""
    out = Path(weights_out).parent
    # first, before the seconds of importing torch: a run killed meanwhile ends this job at once
    exit_when_orphaned(on_exit=functools.partial(shutil.rmtree, out / f".partial-{os.getpid()}", ignore_errors=True))
    from .loop import train_from_cli

    with staging_dir(out) as stage:
        return train_from_cli([], str(manifest), str(stage), **train_kwargs)
