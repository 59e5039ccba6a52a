"""An embedded, realistic multi-site demo cohort built only from data that installed packages ship.

Size: one module of ~730 lines on purpose. Everything here serves :func:`build_demo` (sheet, head model,
rendering, config) and nothing else in the package imports it; a third of it is this description. Split it
when a second user of the head model or the renderer appears.

``make demo`` must run on a machine with no development data, so the demo cohort is synthesised from
nilearn's copy of the MNI152 2009a symmetric template (T1 and GM/WM probability maps, 1 mm, found through
the installed package, never the network) plus what this module generates:

* a **head model** in template space: the brain of the template, and around it a smooth shell of
  extracerebral CSF, skull and scalp grown from the brain mask (the template itself is skull-stripped),
  rendered as a T1-weighted and a T2-weighted image (T2: CSF bright, GM mid, WM dark, from the tissue maps,
  CSF = brain mask not covered by GM/WM);
* **subjects**: a random rigid+scale pose (a few degrees, scale 0.92-1.08, a few mm) and a smooth random
  elastic deformation (cubic B-spline control grid), plus a random gamma (contrast) per subject, so that
  volumes differ like different people;
* **sites**: each site has its own grid (voxel size, field of view, on-disk orientation), contrast,
  on-disk data type and intensity scale, thermal noise level (Rician) and, for thick-slice sites, a slab
  slice profile (the signal is averaged over each slab, then decimated);
* **artifacts** on a fraction of the volumes of some sites, from :func:`artifactqc.simulate.simulate_volume`
  with a recorded severity (ground truth: ``label = 'fail'`` when severity >= ``fail_threshold``);
* **broken files** (a truncated ``.nii.gz``, an all-zero volume) so that the failures table is exercised.

Everything is deterministic for ``spec['seed']``: each volume draws from its own random stream seeded by the
seed and its ``volume_id``, so results do not depend on ``n_jobs`` or on the order volumes are built in, and
``.nii.gz`` files are byte-identical between runs (nibabel writes gzip with mtime 0).

Spec (the ``demo:`` section of ``config/demo.yaml``; :data:`DEFAULT_SPEC` is the default)::

    seed: int                       # master seed
    session: str                    # session label used for every volume ("1")
    template_resolution_mm: 1       # 1 (full), or 2/3 to block-average the template first (fast tests)
    head_shell_mm: [3, 7, 13]       # outer edges of extracerebral CSF, skull, scalp (mm from the brain)
    subject_variation:
      rotation_deg: float           # max |rotation| about each axis
      scale: [lo, hi]               # isotropic head scale range
      translation_mm: float         # max |shift| of the head in the scanner along each axis
      elastic_mm: float             # s.d. of control-point displacements
      elastic_spacing_mm: float     # control-point spacing of the elastic deformation
      gamma: [lo, hi]               # intensity gamma range (contrast jitter)
    artifacts: [str, ...]           # artifact names passed to simulate.simulate_volume, cycled per site
    severity_range: [lo, hi]        # injected severities are stratified over this range
    fail_threshold: 0.5             # label 'fail' when injected severity >= this
    sites:                          # one entry per site, in order
      - name: str                   # [A-Za-z0-9]+, used in ids and as the folder under root
        role: reference | target    # informative: the reference site is clean and used for training
        contrast: T1w | T2w
        n_subjects: int
        voxel_mm: [a, b, c]         # voxel size along the ON-DISK axes 0, 1, 2
        orientation: str            # on-disk axis codes, e.g. RAS, LPS, PIR
        fov_mm: [x, y, z]           # field of view along world R, A, S (mm)
        fov_shift_mm: [x, y, z]     # centre of the field of view relative to the head centre
        dtype: float32 | int16 | uint8
        scale: float                # intensity of white matter (T1w) / CSF (T2w) on disk
        noise: float                # Rician noise s.d. as a fraction of that intensity
        slab_average: bool          # thick slices: average over the slab along the thick axis
        artifact_fraction: float    # fraction of subjects that get an injected artifact
        broken: [truncated, zeros]  # extra deliberately broken files for this site

Sheet columns (:func:`demo_sheet`): ``volume_id, site, subject, session, contrast, path, label,
injected_artifact, injected_severity``. Broken files have an empty label.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Default ``demo:`` spec: 4 sites, 29 volumes + 2 broken files (~130 MB); plain YAML-able types only. Sites B and C
#: carry 9 injected artifacts (severities stratified over 0.3-1.0): 7 of them at severity >= 0.5 (label 'fail':
#: noise, ghosting and bias twice, motion once, on both sites), 2 milder ones labelled 'pass'
#: (tests/test_builtin.py checks this).
DEFAULT_SPEC: dict = {
    "seed": 20261123,
    "session": "1",
    "template_resolution_mm": 1,
    "head_shell_mm": [3.0, 7.5, 13.0],
    "subject_variation": {
        "rotation_deg": 5.0,
        "scale": [0.92, 1.08],
        "translation_mm": 6.0,
        "elastic_mm": 2.5,
        "elastic_spacing_mm": 36.0,
        "gamma": [0.85, 1.15],
    },
    "artifacts": ["motion", "ghosting", "noise", "bias"],
    "severity_range": [0.3, 1.0],
    "fail_threshold": 0.5,
    "sites": [
        {
            "name": "siteA",
            "role": "reference",
            "contrast": "T1w",
            "n_subjects": 6,
            "voxel_mm": [1.0, 1.0, 1.0],
            "orientation": "RAS",
            "fov_mm": [168.0, 206.0, 178.0],
            "fov_shift_mm": [0.0, 0.0, 0.0],
            "dtype": "float32",
            "scale": 1.0,
            "noise": 0.015,
            "slab_average": False,
            "artifact_fraction": 0.0,
            "broken": [],
        },
        {
            "name": "siteB",
            "role": "target",
            "contrast": "T1w",
            "n_subjects": 10,
            "voxel_mm": [1.2, 1.2, 1.2],
            "orientation": "LPS",
            "fov_mm": [158.0, 192.0, 150.0],
            "fov_shift_mm": [0.0, 4.0, 12.0],
            "dtype": "int16",
            "scale": 1000.0,
            "noise": 0.04,
            "slab_average": False,
            "artifact_fraction": 0.5,
            "broken": ["truncated", "zeros"],
        },
        {
            "name": "siteC",
            "role": "target",
            "contrast": "T2w",
            "n_subjects": 8,
            "voxel_mm": [1.0, 1.0, 1.5],
            "orientation": "PIR",
            "fov_mm": [168.0, 206.0, 178.0],
            "fov_shift_mm": [0.0, 0.0, 0.0],
            "dtype": "uint8",
            "scale": 200.0,
            "noise": 0.025,
            "slab_average": False,
            "artifact_fraction": 0.5,
            "broken": [],
        },
        {
            "name": "siteD",
            "role": "target",
            "contrast": "T1w",
            "n_subjects": 5,
            "voxel_mm": [1.0, 1.0, 5.0],
            "orientation": "LAS",
            "fov_mm": [170.0, 210.0, 150.0],
            "fov_shift_mm": [0.0, 0.0, 10.0],
            "dtype": "int16",
            "scale": 700.0,
            "noise": 0.02,
            "slab_average": True,
            "artifact_fraction": 0.0,
            "broken": [],
        },
    ],
}

SHEET_COLUMNS = [
    "volume_id",
    "site",
    "subject",
    "session",
    "contrast",
    "path",
    "label",
    "injected_artifact",
    "injected_severity",
]

_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9]+$")
_DTYPES = {"float32": np.float32, "int16": np.int16, "uint8": np.uint8}
_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


# --------------------------------------------------------------------------------------------- spec / sheet


def _merged_spec(spec: dict | None) -> dict:
    """``DEFAULT_SPEC`` with the top-level keys of ``spec`` (and of ``subject_variation``) overriding it."""
    out = copy.deepcopy(DEFAULT_SPEC)
    if spec:
        spec = copy.deepcopy(dict(spec))
        sv = spec.pop("subject_variation", None)
        out.update(spec)
        if sv:
            out["subject_variation"] = {**DEFAULT_SPEC["subject_variation"], **sv}
    return out


def _check_spec(spec: dict) -> None:
    names = [s["name"] for s in spec["sites"]]
    if len(set(names)) != len(names):
        raise ValueError(f"demo spec: site names must be unique, got {names}")
    for s in spec["sites"]:
        if not _NAME_RE.match(str(s["name"])):
            raise ValueError(f"demo spec: site name {s['name']!r} must match [A-Za-z0-9]+")
        if s["dtype"] not in _DTYPES:
            raise ValueError(f"demo spec: site {s['name']}: dtype must be one of {sorted(_DTYPES)}")
        if s["contrast"] not in ("T1w", "T2w"):
            raise ValueError(f"demo spec: site {s['name']}: contrast must be T1w or T2w")
        codes = str(s["orientation"]).upper()
        if len(codes) != 3 or sorted(_axis_of(c) for c in codes) != [0, 1, 2]:
            raise ValueError(f"demo spec: site {s['name']}: bad orientation {s['orientation']!r}")
        for b in s.get("broken", []) or []:
            if b not in ("truncated", "zeros"):
                raise ValueError(f"demo spec: site {s['name']}: broken kinds are 'truncated' and 'zeros'")
        if s.get("artifact_fraction", 0) and not spec.get("artifacts"):
            raise ValueError("demo spec: artifact_fraction > 0 needs a non-empty 'artifacts' list")


def _axis_of(code: str) -> int:
    return {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}[code]


def _stream(seed: int, *keys: str) -> np.random.Generator:
    """An independent random stream for (seed, keys): stable across processes and build orders."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _site_injections(spec: dict, site: dict) -> dict[int, tuple[str, float]]:
    """Which subject indices of a site carry an artifact, which one and how severe (pure, from the seed)."""
    n = int(site["n_subjects"])
    k = int(round(float(site.get("artifact_fraction", 0.0)) * n))
    if k and not simulate_available():
        log.warning("artifactqc.simulate is not available: the demo cohort is built without injected artifacts")
        k = 0
    k = min(max(k, 0), n)
    if k == 0:
        return {}
    rng = _stream(spec["seed"], "inject", site["name"])
    chosen = sorted(rng.choice(n, size=k, replace=False).tolist())
    lo, hi = (float(v) for v in spec["severity_range"])
    # stratified severities: one per equal-width stratum of [lo, hi], so a site gets both mild and severe ones
    sev = lo + (hi - lo) * (np.arange(k) + rng.uniform(0.1, 0.9, size=k)) / k
    rng.shuffle(sev)
    arts = list(spec["artifacts"])
    offset = int(rng.integers(len(arts)))
    return {
        int(i): (arts[(offset + j) % len(arts)], round(float(s), 3)) for j, (i, s) in enumerate(zip(chosen, sev))
    }


def demo_sheet(spec: dict | None, root: str | os.PathLike) -> pd.DataFrame:
    """The cohort sheet of the demo, computed from the spec alone (no file I/O; fast; deterministic).

    One row per volume: ``volume_id`` (``<site>-sub<NN>``; broken files ``<site>-broken-<kind>``),
    ``site``, ``subject``, ``session``, ``contrast``, ``path`` (``root/<site>/<volume_id>.nii.gz``),
    ``label`` ('pass'/'fail'; empty for broken files), ``injected_artifact`` ('' when clean) and
    ``injected_severity`` (0.0 when clean). ``spec`` keys missing from it are taken from
    :data:`DEFAULT_SPEC`.
    """
    spec = _merged_spec(spec)
    _check_spec(spec)
    root = Path(root)
    thr = float(spec["fail_threshold"])
    rows = []
    for site in spec["sites"]:
        name = site["name"]
        inj = _site_injections(spec, site)
        for i in range(int(site["n_subjects"])):
            subject = f"{i + 1:02d}"
            vid = f"{name}-sub{subject}"
            art, sev = inj.get(i, ("", 0.0))
            rows.append(
                dict(
                    volume_id=vid,
                    site=name,
                    subject=subject,
                    session=str(spec["session"]),
                    contrast=site["contrast"],
                    path=str(root / name / f"{vid}.nii.gz"),
                    label="fail" if art and sev >= thr else "pass",
                    injected_artifact=art,
                    injected_severity=float(sev),
                )
            )
        for j, kind in enumerate(site.get("broken", []) or []):
            vid = f"{name}-broken-{kind}"
            rows.append(
                dict(
                    volume_id=vid,
                    site=name,
                    subject=f"{90 + j:02d}",
                    session=str(spec["session"]),
                    contrast=site["contrast"],
                    path=str(root / name / f"{vid}.nii.gz"),
                    label="",
                    injected_artifact="",
                    injected_severity=0.0,
                )
            )
    sheet = pd.DataFrame(rows, columns=SHEET_COLUMNS)
    dup = sheet["volume_id"][sheet["volume_id"].duplicated()]
    if len(dup):
        raise ValueError(f"demo spec gives duplicate volume ids: {sorted(set(dup))}")
    bad = [v for v in sheet["volume_id"] if not _ID_RE.match(v)]
    if bad:
        raise ValueError(f"demo spec gives invalid volume ids: {bad}")
    return sheet


# --------------------------------------------------------------------------------------------- head model


def template_dir() -> Path:
    """Folder of nilearn's bundled MNI152 2009a template files (located without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: the demo cohort is built from its MNI152 template")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in _TEMPLATE_FILES.values() if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's template files are missing from {d}: {missing}")
    return d


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f <= 1:
        return a
    shp = [(s // f) * f for s in a.shape]
    a = a[: shp[0], : shp[1], : shp[2]]
    return a.reshape(shp[0] // f, f, shp[1] // f, f, shp[2] // f, f).mean(axis=(1, 3, 5))


def _upsample2(a: np.ndarray, shape) -> np.ndarray:
    """Linear 2x upsampling of a[::2, ::2, ::2]-sampled data back to ``shape`` (cheap, separable)."""
    for ax in range(3):
        n = shape[ax]
        a = np.moveaxis(a, ax, 0)
        out = np.empty((n, *a.shape[1:]), dtype=np.float32)
        out[0::2] = a[: (n + 1) // 2]
        mid = 0.5 * (a[:-1] + a[1:])
        out[1::2] = np.concatenate([mid, a[-1:]], axis=0)[: n // 2]
        a = np.moveaxis(out, 0, ax)
    return a


class HeadModel:
    """T1w/T2w head images in (padded) template space, with their voxel→world affine.

    Intensities: T1w normalised so that white matter is 1; T2w so that CSF is 1. Outside the brain
    mask of the template, a smooth shell (extracerebral CSF, skull, scalp; outer edges ``shell_mm``)
    is grown from the brain mask so that the volumes look like heads, not skull-stripped brains.
    """

    def __init__(self, resolution_mm: int = 1, shell_mm=(3.0, 7.5, 13.0)):
        import nibabel as nib
        from scipy import ndimage as ndi

        d = template_dir()
        imgs = {k: nib.load(str(d / f)) for k, f in _TEMPLATE_FILES.items()}
        f = int(resolution_mm)
        t1 = _block_mean(np.asarray(imgs["t1"].dataobj, dtype=np.float32), f)
        gm = _block_mean(np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0, f)
        wm = _block_mean(np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0, f)
        aff = np.asarray(imgs["t1"].affine, dtype=np.float64).copy()
        if f > 1:
            aff[:3, :3] *= f
            aff[:3, 3] += aff[:3, :3] @ np.full(3, (1.0 - f) / (2.0 * f))  # block centre
        shell = np.asarray(shell_mm, dtype=float)
        pad = int(np.ceil((shell[-1] + 4.0) / f))
        t1, gm, wm = (np.pad(a, pad) for a in (t1, gm, wm))
        aff[:3, 3] -= aff[:3, :3] @ np.full(3, pad)
        vox = float(f)

        brain = t1 > 0.5 * (t1.max() / 255.0)  # the template is brain-masked (zero outside)
        wm_level = float(np.median(t1[wm > 0.9])) if np.any(wm > 0.9) else float(np.percentile(t1[brain], 95))
        t1n = t1 / wm_level
        gm = np.where(brain, gm, 0.0)
        wm = np.where(brain, wm, 0.0)
        csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)

        # The extracerebral shell is smooth, so it is built at 2x coarser sampling (for a 1 mm template)
        # and upsampled linearly; that keeps the head model a few seconds to build.
        c = 2 if f == 1 else 1
        coarse = ndi.binary_fill_holes(brain[::c, ::c, ::c])
        dist = ndi.distance_transform_edt(~coarse).astype(np.float32) * (vox * c)

        def ramp(x, edge, width=1.2):
            return 1.0 / (1.0 + np.exp(-(x - edge) / width))

        e_csf, e_skull, e_scalp = shell
        w_csf = 1 - ramp(dist, e_csf)
        w_skull = ramp(dist, e_csf) * (1 - ramp(dist, e_skull))
        w_scalp = ramp(dist, e_skull) * (1 - ramp(dist, e_scalp))
        # slow modulation so the scalp is not perfectly uniform (fat/muscle mixture)
        rng = np.random.default_rng(7)
        mod = ndi.gaussian_filter(rng.standard_normal(dist.shape).astype(np.float32), 6.0 / (vox * c))
        mod = 1.0 + 0.25 * mod / (mod.std() + 1e-6)
        # T1w: CSF dark, compact bone very dark, scalp fat bright
        t1_shell = 0.28 * w_csf + 0.06 * w_skull + 0.85 * mod * w_scalp
        # T2w (fast spin echo): CSF bright, bone dark, scalp fat fairly bright
        t2_shell = 0.95 * w_csf + 0.04 * w_skull + 0.55 * mod * w_scalp
        if c > 1:
            t1_shell = _upsample2(t1_shell, brain.shape)
            t2_shell = _upsample2(t2_shell, brain.shape)
        self.t1 = np.where(brain, t1n, t1_shell).astype(np.float32)
        t2_brain = 1.0 * csf + 0.52 * gm + 0.33 * wm
        self.t2 = np.where(brain, t2_brain, t2_shell).astype(np.float32)
        self.affine = aff
        self.inv_affine = np.linalg.inv(aff)
        centre_vox = [
            float((np.arange(n) * brain.sum(axis=tuple(a for a in range(3) if a != ax))).sum() / brain.sum())
            for ax, n in enumerate(brain.shape)
        ]
        self.brain_centre = (aff @ np.r_[centre_vox, 1.0])[:3]
        self.resolution_mm = vox

    def image(self, contrast: str) -> np.ndarray:
        return self.t1 if contrast == "T1w" else self.t2


@lru_cache(maxsize=4)
def head_model(resolution_mm: int = 1, shell_mm: tuple = (3.0, 7.5, 13.0)) -> HeadModel:
    """Cached :class:`HeadModel` (built once per process; a few seconds at 1 mm)."""
    return HeadModel(resolution_mm, shell_mm)


def _head_for(spec: dict) -> HeadModel:
    return head_model(int(spec["template_resolution_mm"]), tuple(float(x) for x in spec["head_shell_mm"]))


# --------------------------------------------------------------------------------------------- rendering


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def canonical_grid(site: dict) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of a site's grid before reorientation (axes along world R, A, S)."""
    codes = str(site["orientation"]).upper()
    vox_disk = np.asarray(site["voxel_mm"], dtype=float)
    vox = np.empty(3)
    for disk_axis, code in enumerate(codes):
        vox[_axis_of(code)] = vox_disk[disk_axis]
    fov = np.asarray(site["fov_mm"], dtype=float)
    shape = tuple(int(max(2, round(f / v))) for f, v in zip(fov, vox))
    centre = np.asarray(site.get("fov_shift_mm", [0, 0, 0]), dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = np.diag(vox)
    aff[:3, 3] = centre - vox * (np.asarray(shape) - 1) / 2.0
    return shape, aff  # type: ignore[return-value]


def _reorient(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    start = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(tuple(codes.upper()))
    tr = nib.orientations.ornt_transform(start, target)
    out = nib.orientations.apply_orientation(data, tr)
    new_aff = affine @ nib.orientations.inv_ornt_aff(tr, data.shape)
    return np.ascontiguousarray(out), new_aff


def _subject_sampling_coords(
    head: HeadModel, sv: dict, rng: np.random.Generator, shape, affine: np.ndarray, z_offsets_mm=(0.0,)
) -> np.ndarray:
    """Template voxel coordinates (3, n_sub, *shape) at which to sample the head for one subject.

    Scanner point p maps to template point q = c + S^-1 R^T (p - t), then q + u(q) with a smooth
    elastic displacement u (cubic B-spline through random control points).
    """
    from scipy import ndimage as ndi

    angles = np.deg2rad(rng.uniform(-1, 1, 3) * float(sv["rotation_deg"]))
    scale = rng.uniform(*[float(v) for v in sv["scale"]])
    trans = rng.uniform(-1, 1, 3) * float(sv["translation_mm"])
    R = _rotation(angles)
    c = head.brain_centre
    # scanner -> template world (affine part), composed with the grid affine
    M = np.eye(4)
    M[:3, :3] = R.T / scale
    M[:3, 3] = c - (R.T / scale) @ trans
    vox_to_tvox = head.inv_affine @ M @ affine  # grid voxel -> template voxel (affine part)

    # elastic field on a control grid in template voxel space, sampled at the template grid spacing / 4
    tshape = np.asarray(head.t1.shape)
    spacing_vox = float(sv["elastic_spacing_mm"]) / head.resolution_mm
    n_ctrl = np.maximum(4, np.ceil(tshape / spacing_vox).astype(int) + 1)
    ctrl = rng.standard_normal((3, *n_ctrl)) * (float(sv["elastic_mm"]) / head.resolution_mm)
    step = 6.0 / head.resolution_mm
    fine_shape = np.ceil(tshape / step).astype(int) + 1
    fine = np.stack(
        [
            ndi.zoom(ctrl[k], fine_shape / n_ctrl, order=3, mode="nearest", grid_mode=True)
            for k in range(3)
        ]
    ).astype(np.float32)

    # affine part, built by broadcasting 1D index vectors (no full index grids)
    nz = len(z_offsets_mm)
    coords = np.empty((3, nz, *shape), dtype=np.float32)
    i0, i1, i2 = (np.arange(n, dtype=np.float32) for n in shape)
    for s, dz in enumerate(z_offsets_mm):
        zoff = float(dz) / affine[2, 2]
        for k in range(3):
            A = vox_to_tvox[k]
            coords[k, s] = (
                (A[0] * i0)[:, None, None] + (A[1] * i1)[None, :, None] + (A[2] * (i2 + zoff) + A[3])[None, None, :]
            )
    # elastic part: evaluated on every 2nd grid point and repeated (the field varies over ~elastic_spacing_mm,
    # so the error is a few hundredths of a mm) -- 8x fewer interpolations
    sub = coords[:, nz // 2, ::2, ::2, ::2].reshape(3, -1) / step
    disp = np.stack([ndi.map_coordinates(fine[k], sub, order=1, mode="nearest") for k in range(3)])
    sshape = tuple((n + 1) // 2 for n in shape)
    disp = disp.reshape(3, *sshape)
    x0, x1, x2 = (np.arange(n) // 2 for n in shape)
    for k in range(3):
        coords[k] += disp[k][x0][:, x1][:, :, x2][None]
    return coords


def _rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return clean
    n1 = rng.standard_normal(clean.shape, dtype=np.float32)
    n2 = rng.standard_normal(clean.shape, dtype=np.float32)
    return np.sqrt((clean + sigma * n1) ** 2 + (sigma * n2) ** 2).astype(np.float32)


def simulate_available() -> bool:
    """Whether :mod:`artifactqc.simulate` is installed (checked without importing it, i.e. without torch)."""
    try:
        return importlib.util.find_spec("artifactqc.simulate") is not None
    except (ImportError, ValueError):
        return False


def _apply_artifact(data: np.ndarray, artifact: str, severity: float, seed: int, spacing) -> np.ndarray:
    """Inject a simulated artifact with :func:`artifactqc.simulate.simulate_volume`.

    The clean image is divided by its 99.5th percentile (simulate expects intensities ~[0, 1]) and scaled
    back afterwards; ``spacing`` is the voxel size of ``data`` (RAS order).
    """
    from .simulate import simulate_volume  # imports torch: only when an artifact is injected

    ref = float(np.percentile(data[data > 0], 99.5)) if np.any(data > 0) else 1.0
    out, _params = simulate_volume(data / ref, artifact, float(severity), seed=int(seed), spacing=tuple(spacing))
    out = np.asarray(out, dtype=np.float32) * ref
    return np.clip(out, 0.0, None)


def render_volume(
    spec: dict | None, site_name: str, subject_index: int, inject: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Render one demo volume in memory: (on-disk array with the site's dtype, affine).

    Clean images are produced on the site's grid in RAS order: the subject's head is sampled from the
    head model (linear interpolation; for ``slab_average`` sites at 1 mm-ish sub-slab positions that are
    then averaged), gamma-jittered, optionally given an artifact (before noise, as in acquisition),
    given Rician noise, scaled, cast to the on-disk type and reoriented.
    """
    from scipy import ndimage as ndi

    spec = _merged_spec(spec)
    site = next(s for s in spec["sites"] if s["name"] == site_name)
    sheet_vid = f"{site_name}-sub{subject_index + 1:02d}"
    rng = _stream(spec["seed"], "volume", sheet_vid)
    head = _head_for(spec)
    shape, aff = canonical_grid(site)
    vox = np.abs(np.diag(aff)[:3])
    thick = int(np.argmax(vox))
    if site.get("slab_average") and vox[thick] > 1.5 * np.min(vox):
        n_sub = int(round(vox[thick] / max(np.min(vox), head.resolution_mm)))
        offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * vox[thick]
        if thick != 2:
            raise ValueError("slab_average is implemented for axial thick slices (thick axis S/I)")
    else:
        offsets = np.zeros(1)
    coords = _subject_sampling_coords(head, spec["subject_variation"], rng, shape, aff, offsets)
    img = head.image(site["contrast"])
    samples = ndi.map_coordinates(img, coords.reshape(3, -1), order=1, mode="constant", cval=0.0)
    clean = samples.reshape(len(offsets), *shape).mean(axis=0).astype(np.float32)
    g_lo, g_hi = (float(v) for v in spec["subject_variation"]["gamma"])
    gamma = rng.uniform(g_lo, g_hi)
    clean = np.power(np.clip(clean, 0.0, None), gamma, dtype=np.float32)

    inj = _site_injections(spec, site).get(subject_index) if inject else None
    if inj is not None:
        art, sev = inj
        clean = _apply_artifact(clean, art, sev, int(rng.integers(2**31 - 1)), vox)

    noisy = _rician(clean, float(site["noise"]), rng)
    scaled = noisy * float(site["scale"])
    dt = _DTYPES[site["dtype"]]
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        out = np.clip(np.rint(scaled), max(info.min, 0), info.max).astype(dt)
    else:
        # values on a grid of scale/256 (8 bits below white matter, like an 8-bit image converted to float):
        # full float32 mantissas of noise do not compress, and the demo must stay small (~100 MB)
        q = float(site["scale"]) / 256.0
        out = (np.rint(scaled / q) * q).astype(dt)
    return _reorient(out, aff, site["orientation"])


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(data.dtype)
    img.header["descrip"] = b"artifactqc demo (synthetic, MNI152 2009a-derived)"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def _worker_init() -> None:
    """Worker processes: one thread each for OpenMP/BLAS/torch (the pool already uses the cores)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def _build_one(spec: dict, row: dict) -> str:
    path = Path(row["path"])
    site, vid = row["site"], row["volume_id"]
    if vid.startswith(f"{site}-broken-"):
        kind = vid.split("-broken-", 1)[1]
        site_spec = next(s for s in spec["sites"] if s["name"] == site)
        if kind == "zeros":
            shape, aff = canonical_grid(site_spec)
            data = np.zeros(shape, dtype=_DTYPES[site_spec["dtype"]])
            _write_nifti(*_reorient(data, aff, site_spec["orientation"]), path)
        elif kind == "truncated":
            data, aff = render_volume(spec, site, 0, inject=False)
            _write_nifti(data, aff, path)
            raw = path.read_bytes()
            path.write_bytes(raw[: int(len(raw) * 0.4)])  # header intact, voxel data cut short
        else:  # pragma: no cover - _check_spec rejects it
            raise ValueError(kind)
    else:
        data, aff = render_volume(spec, site, int(row["subject"]) - 1)
        _write_nifti(data, aff, path)
    return vid


def build_demo(spec: dict | None, root: str | os.PathLike, n_jobs: int = 1) -> pd.DataFrame:
    """Write every volume of :func:`demo_sheet` under ``root`` and ``root/sheet.tsv``; return the sheet.

    Deterministic for ``spec['seed']`` whatever ``n_jobs`` is. The head model is built once in this
    process before worker processes are forked, so they share it (if torch is already loaded here,
    workers are spawned instead and build their own).
    """
    spec = _merged_spec(spec)
    sheet = demo_sheet(spec, root)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _head_for(spec)  # build before forking
    rows = sheet.to_dict("records")
    if n_jobs > 1 and len(rows) > 1:
        import multiprocessing as mp
        import sys

        # fork shares the head model with the workers; but a child of a process that has already run torch
        # (OpenMP thread pools) can deadlock when it runs torch itself (artifact injection), so in that
        # case spawn fresh workers instead
        injects = bool((sheet["injected_artifact"] != "").any())
        method = "spawn" if injects and "torch" in sys.modules else "fork"
        ctx = mp.get_context(method)
        with ProcessPoolExecutor(max_workers=int(n_jobs), mp_context=ctx, initializer=_worker_init) as ex:
            for vid in ex.map(_build_one, [spec] * len(rows), rows):
                log.debug("wrote %s", vid)
    else:
        for r in rows:
            log.debug("wrote %s", _build_one(spec, r))
    sheet.to_csv(root / "sheet.tsv", sep="\t", index=False)
    return sheet


# --------------------------------------------------------------------------------------------- config / CLI


def load_spec(config: str | os.PathLike | None) -> dict:
    """The demo spec from a YAML config: its ``demo:`` section (or the whole file if it has no such key).

    ``None`` gives :data:`DEFAULT_SPEC`. Keys missing from the file fall back to the defaults.
    """
    if config is None:
        return copy.deepcopy(DEFAULT_SPEC)
    import yaml

    with open(config) as f:
        doc = yaml.safe_load(f) or {}
    section = doc.get("demo", doc) if isinstance(doc, dict) else {}
    return _merged_spec(section or None)


def spec_yaml(spec: dict | None = None) -> str:
    """``spec`` (default :data:`DEFAULT_SPEC`) as a YAML ``demo:`` section, for config files."""
    import yaml

    return yaml.safe_dump({"demo": _merged_spec(spec)}, sort_keys=False, default_flow_style=None)


def build_demo_from_config(config: str | os.PathLike | None, out: str | os.PathLike, n_jobs: int = 1) -> pd.DataFrame:
    """CLI entry: :func:`build_demo` with the spec read by :func:`load_spec`; logs time and size."""
    import time

    t0 = time.perf_counter()
    sheet = build_demo(load_spec(config), out, n_jobs=n_jobs)
    size = sum(Path(p).stat().st_size for p in sheet["path"])
    log.info(
        "demo cohort: %d files (%d labelled fail) in %s, %.1f MB, %.1f s",
        len(sheet),
        int((sheet["label"] == "fail").sum()),
        out,
        size / 2**20,
        time.perf_counter() - t0,
    )
    return sheet
