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


def simulate_file(
    in_path,
    out_path,
    artifact: str,
    severity: float,
    seed: int = 0,
    sidecar=None,
    noise_variant: str = "rician",
    match_ssim: bool = False,
) -> dict:
    """Corrupt one NIfTI and write it in the input's units and grid, plus a JSON sidecar of every parameter.

    The output has the input's affine, voxel order and header (data type float32, ``scl_slope`` 1) and its
    intensity units: the volume is mapped onto the calibrated scale with a recorded
    :class:`~artifactqc.intensity.IntensityMap` (:meth:`~artifactqc.intensity.IntensityMap.calibration_scale`:
    zero stays zero for a magnitude image), corrupted with :func:`simulate_volume`, and mapped back with the
    exact inverse; nothing is clipped. Severity 0 writes the input's values unchanged. Noise is
    ``noise_variant`` (default Rician: the magnitude of complex Gaussian noise, non-negative by construction).
    Returns the params written to the sidecar (``<out>.json`` unless ``sidecar`` is given).
    """
    import json
    from pathlib import Path

    import nibabel as nib

    from ..intensity import IntensityMap
    from ..io import load_volume, save_like

    vol = load_volume(in_path)
    imap = IntensityMap.calibration_scale(vol.data)
    out_n, params = simulate_volume(imap.forward(vol.data), artifact, severity, seed=seed, spacing=vol.zooms,
                                    match_ssim=match_ssim, noise_variant=noise_variant)
    out = vol.data.astype(np.float32, copy=True) if float(severity) == 0.0 else imap.inverse(out_n)
    hdr = nib.load(str(in_path)).header.copy()
    hdr.set_data_dtype(np.float32)
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    save_like(out, vol.affine, out_path, header=hdr)
    params = {
        "input": str(in_path),
        "output": str(out_path),
        "units": "input's intensity units (normalised -> simulated -> mapped back)",
        "intensity_map": imap.as_dict(),
        "noise_variant": noise_variant,
        "input_range": [float(vol.data.min()), float(vol.data.max())],
        "output_range": [float(out.min()), float(out.max())],
        **params,
    }
    if sidecar is None:
        name = Path(out_path).name
        for ext in (".nii.gz", ".nii"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        sidecar = Path(out_path).with_name(name + ".json")
    Path(sidecar).write_text(json.dumps(params, indent=2))
    return params
