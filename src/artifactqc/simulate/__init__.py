"""Artifact simulation with calibrated severities: noise, ghosting, bias field, anisotropy, motion, mixtures.

Two paths share one severity scale:

* :func:`simulate_volume` (:mod:`.volume`) corrupts a 3D volume (numpy, intensities normalised to about [0, 1] with
  :func:`artifactqc.io.normalize_intensity`) and returns every applied parameter. Ghosting, bias field and
  motion use TorchIO's *deterministic* transforms (``tio.Ghosting``, ``tio.BiasField``, ``tio.Motion``)
  with explicitly drawn parameters; noise (Rician / coloured k-space noise) and anisotropy are implemented
  here because TorchIO has no Rician noise and its ``RandomAnisotropy`` has no slice profile or
  anti-aliasing. Anisotropy (:func:`thick_slices_lastdim`) acquires contiguous thick slices along one axis:
  slice thickness = slice spacing = ``thickness_factor`` voxels (fractional), slice centres anchored on a
  random voxel, each slice integrating the linearly interpolated image against a Gaussian slice profile,
  then linear interpolation back to the grid. The result is continuous in the thickness (no steps at
  integer factors) and a factor of 1 is the identity. The axis of ghosting, motion (phase encoding) and
  anisotropy is any of the three for a 3D volume and one of the two in-plane axes for a thick-slice (2D)
  acquisition (``spacing`` with one side >= 1.9x the others, :func:`artifactqc.io.acquisition_axis`), whose
  slices have no phase encoding across them.
* :func:`simulate_slices` (:mod:`.slices`) is the batched 2D path used for training (torch, CPU, thousands of slices/s).

:func:`simulate_file` (:mod:`.files`, the ``artifactqc simulate`` CLI) is the user's tool: it maps the volume
onto the calibrated scale with a recorded :class:`artifactqc.intensity.IntensityMap` (zero kept at zero),
runs :func:`simulate_volume` and maps back, so the written file has the input's grid and intensity units;
severity 0 writes the input unchanged and noise is Rician unless asked otherwise.

Severity
--------
Every artifact type has one *physical* parameter (:data:`PARAM_NAMES`) driven by the severity ``s`` in
[0, 1] through a monotone piecewise-linear map (:data:`CALIBRATION_3D`, :data:`CALIBRATION_2D`, knots at
:data:`SEVERITY_KNOTS`). The maps were fitted by ``benchmarks/simulate/run.py calibrate`` on real volumes
so that, for every type, the mean SSIM to the clean image inside the head/brain mask follows the common
target curve :func:`target_ssim` ``= 1 - TARGET_SSIM_DROP * s``: the same severity means about the same
loss of fidelity whatever the artifact. Severity 0 is the exact identity. Other random draws (axis, number
of ghosts, field shape, motion timing and direction, noise variant) do not change the severity; they are
normalised away where possible (e.g. the bias field is scaled to a given std of its log inside the mask,
motion to a given RMS displacement). What is not normalised away makes one sample's SSIM scatter about the
target (on the encoder benchmark's 7 held-out volumes, r(SS, 1 - SSIM) = 0.85 over all rows); with
``simulate_volume(match_ssim=True)`` the parameter is searched per sample (:func:`apply_matched`) so that the
sample's own masked SSIM is ``target_ssim(s)`` within 5 % of the loss (r 0.999), at 2-3 simulations per sample.

Mixtures
--------
``artifact="mix"`` applies 2-3 distinct types in acquisition order (:data:`APPLY_ORDER`: bias, motion,
ghosting, anisotropy, noise). The combined severity assumes that SSIM losses compose multiplicatively:
``1 - D*S = prod_i (1 - D*s_i)`` with ``D = TARGET_SSIM_DROP`` (see :func:`combine_severities`), i.e. the
mixture has the severity of a single artifact with the same expected SSIM. Given a requested combined
``S``, the component severities are a random (Dirichlet) split of that SSIM budget, so the params record
``severity == S`` exactly and ``component_severities`` for the per-artifact heads.

Layout
------
One module per artifact type (:mod:`.noise`, :mod:`.ghosting`, :mod:`.bias`, :mod:`.anisotropy`,
:mod:`.motion`: each holds its 3D and 2D implementation with an explicit physical parameter), the severity
scale and calibration tables (:mod:`.calibration`), SSIM (:mod:`.ssim`), the 3D registry
(:mod:`.apply`), per-sample SSIM matching (:mod:`.matching`), the 3D entry point with mixtures
(:mod:`.volume`), the batched 2D path (:mod:`.slices`) and the file-level entry point (:mod:`.files`).
This package re-exports the public names, so ``from artifactqc.simulate import simulate_volume`` works.
"""

from .anisotropy import thick_slices_lastdim
from .apply import apply_artifact
from .calibration import (
    APPLY_ORDER,
    ARTIFACTS,
    CALIBRATION_2D,
    CALIBRATION_3D,
    CALIBRATION_SOURCE,
    HEAD_NAMES,
    HEAD_ORDER,
    MATCH_ABS_TOLERANCE,
    MATCH_MAX_EVALS,
    MATCH_MAX_FACTOR,
    MATCH_TOLERANCE,
    PARAM_NAMES,
    SEVERITY_KNOTS,
    TARGET_SSIM_DROP,
    combine_severities,
    param_to_severity,
    severity_to_param,
    split_severity,
    target_ssim,
)
from .files import severity_ladder, simulate_file
from .matching import apply_matched
from .noise import NOISE_VARIANTS
from .slices import apply_slices, simulate_slices, slice_targets
from .ssim import head_mask, ssim_map, ssim_masked, ssim_slices
from .volume import simulate_volume

__all__ = [
    "ARTIFACTS",
    "HEAD_NAMES",
    "HEAD_ORDER",
    "PARAM_NAMES",
    "APPLY_ORDER",
    "TARGET_SSIM_DROP",
    "SEVERITY_KNOTS",
    "CALIBRATION_3D",
    "CALIBRATION_2D",
    "CALIBRATION_SOURCE",
    "MATCH_TOLERANCE",
    "MATCH_ABS_TOLERANCE",
    "MATCH_MAX_EVALS",
    "MATCH_MAX_FACTOR",
    "NOISE_VARIANTS",
    "severity_to_param",
    "param_to_severity",
    "target_ssim",
    "combine_severities",
    "split_severity",
    "ssim_map",
    "head_mask",
    "ssim_masked",
    "ssim_slices",
    "thick_slices_lastdim",
    "apply_artifact",
    "apply_matched",
    "simulate_volume",
    "apply_slices",
    "slice_targets",
    "simulate_slices",
    "severity_ladder",
    "simulate_file",
]
