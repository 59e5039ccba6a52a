"""File-level entry point of the simulator (``artifactqc simulate``: NIfTI in, NIfTI + JSON sidecar out) and
severity ladders (rulers) of one volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .calibration import SEVERITY_KNOTS
from .slices import simulate_slices
from .volume import simulate_volume


def severity_ladder(
    data,
    artifact: str,
    severities: Sequence[float] = SEVERITY_KNOTS,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> list[tuple[float, np.ndarray]]:
    """The same image at increasing severity with fixed random draws (for image rulers).

    ``data`` is a 3D volume (uses :func:`simulate_volume`) or a 2D slice (uses :func:`simulate_slices`);
    every rung uses the same ``seed``, so only the severity changes (for ``"mix"``, the component types and
    their proportions stay fixed too).
    """
    arr = np.asarray(data, dtype=np.float32)
    out = []
    for s in severities:
        if arr.ndim == 3:
            img, _ = simulate_volume(arr, artifact, float(s), seed=seed, spacing=spacing)
        elif arr.ndim == 2:
            g = torch.Generator().manual_seed(int(seed))
            t = torch.from_numpy(arr)[None, None]
            img = simulate_slices(t, [artifact], torch.tensor([float(s)]), generator=g)[0, 0].numpy()
        else:
            raise ValueError(f"expected a 2D slice or 3D volume, got shape {arr.shape}")
        out.append((float(s), img))
    return out


def simulate_file(in_path, out_path, artifact: str, severity: float, seed: int = 0, sidecar=None) -> dict:
    """Read a NIfTI, normalise it, corrupt it and write NIfTI (same header/affine) + JSON sidecar.

    The output holds the corrupted *normalised* intensities (float32), in the input's voxel order and
    affine. Returns the params dict written to the sidecar (``<out>.json`` unless ``sidecar`` is given).
    """
    import json
    from pathlib import Path

    import nibabel as nib

    from ..io import load_volume, normalize_intensity, save_like

    vol = load_volume(in_path)
    data = normalize_intensity(vol.data)
    out, params = simulate_volume(data, artifact, severity, seed=seed, spacing=vol.zooms)
    hdr = nib.load(str(in_path)).header.copy()
    hdr.set_data_dtype(np.float32)
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    save_like(out.astype(np.float32), vol.affine, out_path, header=hdr)
    params = {"input": str(in_path), "output": str(out_path), "normalisation": "io.normalize_intensity", **params}
    if sidecar is None:
        name = Path(out_path).name
        for ext in (".nii.gz", ".nii"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        sidecar = Path(out_path).with_name(name + ".json")
    Path(sidecar).write_text(json.dumps(params, indent=2))
    return params
