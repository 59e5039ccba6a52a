"""`simulate` as a user's tool: the written file is in the input's units and grid (issue 21).

On a real scaled-uint8 T1w volume (IXI, values 0..~3500) for every artifact type: same affine and shape,
float32, severity 0 = the input's values exactly, the output's range within the input's plus the artifact's
own excursion, Rician (non-negative) noise by default, SSIM to the input strictly decreasing with severity,
and the sidecar recording the intensity map and every parameter. The same checks run through the CLI in a
subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from artifactqc import simulate as S

VOLUME = "volumes/NiChart/IXI012-HH-1211_T1.nii.gz"  # in FIXTURES.txt: scaled uint8, 2 mm
SEVERITIES = (0.0, 0.3, 0.6, 0.9)
CLI = str(Path(sys.executable).with_name("artifactqc"))


def _user_ssim(ref: np.ndarray, test: np.ndarray) -> float:
    """SSIM in the input's units (data range = the input's range), inside the input's head mask."""
    from artifactqc.io import foreground_mask

    mask = foreground_mask(ref)
    rng = float(ref.max() - ref.min())
    return float(S.ssim_map(ref / rng, test / rng)[mask].mean())


def _excursion(artifact: str, side: dict, src: np.ndarray) -> tuple[float, float]:
    """The range an artifact may legitimately add beyond the input's [min, max]."""
    span = float(src.max() - src.min())
    scale = side["intensity_map"]["scale"]
    if artifact == "noise":  # Rician: non-negative; 6 sd of each channel above the input's maximum
        return 0.0, 6.0 * side["sigma"] * scale
    if artifact == "anisotropy":  # averages with non-negative weights + linear interpolation: convex
        return 0.0, 0.0
    if artifact == "bias":  # x * field: non-negative, at most the largest field value
        return 0.0, float(src.max()) * (float(np.exp(6.0 * side["log_field_std"])) - 1.0)
    if artifact == "ghosting":  # the ghost comb moves up to `intensity` of the signal (real part of the IFT)
        return side["intensity"] * span, side["intensity"] * span
    return 0.3 * span, 0.3 * span  # motion: k-space mixing of moved copies (ringing of the real part)


def _check_series(src: np.ndarray, affine: np.ndarray, outputs: dict, artifact: str) -> None:
    ssims = []
    for sev, (img, side) in sorted(outputs.items()):
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
        data = np.asarray(img.dataobj)
        assert data.dtype == np.float32 and data.shape == src.shape
        assert side["intensity_map"]["offset"] == 0.0 and side["intensity_map"]["scale"] > 0
        assert side["output_range"] == pytest.approx([float(data.min()), float(data.max())])
        if sev == 0:
            assert np.array_equal(data, src), "severity 0 must return the input's values unchanged"
            continue
        below, above = _excursion(artifact, side, src)
        assert data.min() >= src.min() - below - 1e-3, (artifact, sev, data.min())
        assert data.max() <= src.max() + above + 1e-3, (artifact, sev, data.max())
        if artifact == "noise":
            assert side["variant"] == "rician" and data.min() >= 0
        ssims.append(_user_ssim(src, data))
    assert all(a > b for a, b in zip(ssims, ssims[1:])), (artifact, ssims)
    assert ssims[0] < 1.0 and ssims[-1] > 0.3, (artifact, ssims)  # same image space: not ~0 as before


@pytest.fixture(scope="module")
def real(shared_data):
    path = shared_data / VOLUME
    img = nib.load(path)
    return path, np.asarray(img.get_fdata(dtype=np.float32)), img.affine


@pytest.mark.realdata
@pytest.mark.parametrize("artifact", S.ARTIFACTS)
def test_simulate_file_keeps_the_input_space(real, tmp_path, artifact):
    path, src, affine = real
    outputs = {}
    for sev in SEVERITIES:
        dst = tmp_path / f"{artifact}_{sev}.nii.gz"
        side = S.simulate_file(path, dst, artifact, sev, seed=4)
        assert json.loads(dst.with_name(f"{artifact}_{sev}.json").read_text()) == json.loads(json.dumps(side))
        outputs[sev] = (nib.load(dst), side)
    _check_series(src, affine, outputs, artifact)


@pytest.mark.realdata
@pytest.mark.parametrize("artifact", S.ARTIFACTS)
def test_cli_simulate_keeps_the_input_space(real, tmp_path, artifact):
    path, src, affine = real
    outputs = {}
    for sev in (0.0, 0.3, 0.8) if artifact == "noise" else (0.3, 0.8):
        dst = tmp_path / f"{artifact}_{sev}.nii.gz"
        cmd = [CLI, "simulate", "--artifact", artifact, "--severity", str(sev), "--seed", "4", str(path), str(dst)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        side = json.loads(dst.with_name(f"{artifact}_{sev}.json").read_text())
        assert side["artifact"] == artifact and side["severity"] == sev and side["input"] == str(path)
        outputs[sev] = (nib.load(dst), side)
    _check_series(src, affine, outputs, artifact)


def test_intensity_map_round_trip_and_zero_kept():
    from artifactqc.intensity import IntensityMap

    x = np.random.default_rng(0).gamma(2.0, 100.0, (20, 20, 20)).astype(np.float32)
    m = IntensityMap.calibration_scale(x)
    assert m.offset == 0.0 and m.forward(np.zeros(1))[0] == 0.0
    np.testing.assert_allclose(m.inverse(m.forward(x)), x, rtol=1e-5)
    neg = IntensityMap.calibration_scale(x - 500.0)
    assert neg.offset != 0.0
    np.testing.assert_allclose(neg.inverse(neg.forward(x - 500.0)), x - 500.0, rtol=1e-5, atol=1e-3)
