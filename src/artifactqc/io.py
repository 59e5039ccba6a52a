"""Reading and validating NIfTI volumes, canonical orientation and intensity normalisation.

Every check that can be made from the header is made *before* the voxel data is read, so a
corrupt or enormous file costs a few hundred bytes of I/O. Problems are raised as
:class:`VolumeError`, whose ``error_type`` is one of :data:`ERROR_TYPES` and whose message names
the file and says what is wrong in words a data manager can act on.

This module never imports torch or a model.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

#: Every ``error_type`` a failures row can carry for a volume problem.
ERROR_TYPES = (
    "missing_file",
    "permission_denied",
    "not_nifti",
    "truncated",
    "nonfinite_voxels",
    "all_zero",
    "constant",
    "multi_volume",
    "single_slice",
    "too_large",
    "bad_affine",
    "read_error",
)

try:  # Intel ISA-L's gzip (python-isal): decompresses ~2x faster than zlib, same results
    from isal import igzip as _igzip
    from isal.isal_zlib import error as _IsalError

    _gunzip = _igzip.decompress
    _GZIP_ERRORS: tuple = (EOFError, zlib.error, gzip.BadGzipFile, _IsalError)
except ImportError:  # pragma: no cover - isal is a dependency; plain gzip is the fallback
    _gunzip = gzip.decompress
    _GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)

_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")
_NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")


class VolumeError(Exception):
    """A volume that cannot be used, with a machine-readable ``error_type``."""

    def __init__(self, path: str | os.PathLike, error_type: str, message: str):
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}")
        self.path = str(path)
        self.error_type = error_type
        self.message = message
        super().__init__(f"{self.path}: {message}")


@dataclass
class Volume:
    """A loaded 3D volume: float32 data, its affine and what the header said."""

    path: str
    data: np.ndarray
    affine: np.ndarray
    dtype: str  # on-disk data type
    zooms: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        return orientation_code(self.affine)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def orientation_code(affine: np.ndarray) -> str:
    """Three-letter axis code such as ``RAS`` or ``LPI`` for an affine."""
    return "".join(nib.aff2axcodes(affine))


def _read_head(path: Path, n: int = 544) -> bytes:
    with open(path, "rb") as f:
        head = f.read(n)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                head = g.read(n)
        except (OSError, EOFError, zlib.error) as exc:
            raise VolumeError(path, "truncated", f"gzip stream is broken before the header ends ({exc})")
    return head


def _check_magic(path: Path, head: bytes) -> None:
    """Raise ``not_nifti`` unless the first bytes are a NIfTI-1 or NIfTI-2 header."""
    if len(head) >= 348:
        for order in ("<", ">"):
            size = struct.unpack(order + "i", head[:4])[0]
            if size == 348 and head[344:348] in _NIFTI1_MAGICS:
                return
            if size == 540 and len(head) >= 544 and head[4:8] in _NIFTI2_MAGICS:
                return
    shown = head[:16]
    raise VolumeError(
        path,
        "not_nifti",
        f"not a NIfTI-1/NIfTI-2 file (no valid header; first bytes {shown!r})",
    )


def check_file(path: str | os.PathLike) -> Path:
    """Existence, permission and NIfTI-magic checks; returns the path."""
    p = Path(path)
    if not p.exists():
        raise VolumeError(p, "missing_file", "file does not exist")
    if p.is_dir():
        raise VolumeError(p, "not_nifti", "is a directory, not a NIfTI file")
    if not os.access(p, os.R_OK):
        raise VolumeError(p, "permission_denied", "file exists but is not readable (permission denied)")
    try:
        head = _read_head(p)
    except PermissionError:
        raise VolumeError(p, "permission_denied", "file exists but is not readable (permission denied)")
    _check_magic(p, head)
    return p


def inspect_header(path: str | os.PathLike, max_mem_mb: float = 4096.0) -> nib.Nifti1Image:
    """Open a NIfTI lazily and validate everything the header can tell, without reading voxels.

    Checks dimensionality (3D, or 4D with a singleton 4th axis), that the float32 copy of the data
    fits ``max_mem_mb``, and that the affine is finite and invertible.
    """
    p = check_file(path)
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for damaged headers
        raise VolumeError(p, "not_nifti", f"header cannot be parsed by nibabel ({type(exc).__name__}: {exc})")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise VolumeError(
            p,
            "multi_volume",
            f"shape {shape} holds {int(np.prod(shape[3:]))} volumes: expected one 3D volume",
        )
    if len(shape) < 3 or min(shape) <= 1:
        raise VolumeError(p, "single_slice", f"shape {shape} is a single 2D slice, not a 3D volume")
    need_mb = float(np.prod(shape, dtype=np.float64)) * 4 / 2**20
    if need_mb > max_mem_mb:
        raise VolumeError(
            p,
            "too_large",
            f"shape {shape} needs {need_mb:,.0f} MB as float32, more than the limit of {max_mem_mb:,.0f} MB "
            "(ingest.max_mem_mb in config)",
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise VolumeError(p, "bad_affine", "affine contains NaN or Inf")
    det = np.linalg.det(affine[:3, :3])
    if not np.isfinite(det) or abs(det) < 1e-6:
        raise VolumeError(p, "bad_affine", f"affine is not invertible (determinant {det:.3g})")
    return img


def load_volume(path: str | os.PathLike, max_mem_mb: float = 4096.0, check_content: bool = True) -> Volume:
    """Validate, then read a volume as float32 (singleton 4th axis squeezed).

    With ``check_content`` the data must be finite and not all zero.
    """
    img = inspect_header(path, max_mem_mb=max_mem_mb)
    p = Path(path)
    try:
        if p.name.endswith(".gz") and isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            # one-shot decompression and parsing from memory: ~2x faster than nibabel's streamed read of a
            # .nii.gz (with isal; gzip's one-shot is still ~10 % faster), identical voxels
            img = type(img).from_bytes(_gunzip(p.read_bytes()))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except EOFError as exc:
        raise VolumeError(p, "truncated", f"file is truncated: the voxel data ends early ({exc})")
    except _GZIP_ERRORS as exc:
        raise VolumeError(p, "truncated", f"file is truncated or corrupt: the gzip data does not decompress ({exc})")
    except (OSError, ValueError) as exc:
        msg = str(exc)
        if "size" in msg or "bytes" in msg or "length" in msg or "Compressed" in msg:
            raise VolumeError(p, "truncated", f"file is truncated: the voxel data ends early ({exc})")
        raise VolumeError(p, "read_error", f"voxel data cannot be read ({type(exc).__name__}: {exc})")
    data = data.reshape(data.shape[:3])
    if check_content:
        # min/max propagate NaN and show +-Inf: two fast reductions instead of a boolean volume (the full
        # mask is built only to count the bad voxels of a file that fails)
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int((~np.isfinite(data)).sum())
            raise VolumeError(p, "nonfinite_voxels", f"{bad:,} voxels are NaN or Inf")
        if lo == 0.0 and hi == 0.0:
            raise VolumeError(p, "all_zero", "every voxel is zero")
        if lo == hi:
            raise VolumeError(p, "constant", f"every voxel has the same value ({lo:g}): no image content")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(
        path=str(p),
        data=data,
        affine=np.asarray(img.affine, dtype=np.float64),
        dtype=str(img.get_data_dtype()),
        zooms=zooms,  # type: ignore[arg-type]
    )


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip axes to the closest RAS+ orientation (no resampling)."""
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt("RAS")
    transform = nib.orientations.ornt_transform(ornt, target)
    out = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(out), new_affine


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) from an affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


#: a volume with one voxel side at least this many times both others is a thick-slice (2D) acquisition
#: (the definition of ``benchmarks/crosssite``)
THICK_RATIO = 1.9


def acquisition_axis(voxel_mm, ratio: float = THICK_RATIO) -> int | None:
    """The axis along which a thick-slice acquisition's slices are stacked (its one voxel side at least
    ``ratio`` times both others), or ``None`` for a 3D acquisition (or two thick sides)."""
    z = np.asarray(voxel_mm, dtype=np.float64)
    if z.shape != (3,) or not np.all(np.isfinite(z) & (z > 0)):
        return None
    a = int(np.argmax(z))
    others = np.delete(z, a)
    return a if z[a] >= ratio * others.max() else None


def canonical_voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) in the closest RAS+ axis order (the order of :func:`to_canonical`)."""
    ornt = nib.orientations.io_orientation(affine)
    order = [int(np.nonzero(ornt[:, 0] == c)[0][0]) for c in range(3)]
    return voxel_sizes(affine)[order]


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Voxels above a low threshold of the positive intensities (head vs. air, roughly)."""
    pos = data[data > 0]
    if pos.size == 0:
        return np.zeros(data.shape, dtype=bool)
    thr = 0.1 * float(np.percentile(pos, 98))
    return data > thr


def mask_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Bounding box of a non-empty ``mask`` grown by ``margin`` voxels (clipped to the array), as slices."""
    box = []
    for ax in range(mask.ndim):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))[0]
        box.append(slice(max(0, int(idx[0]) - margin), min(mask.shape[ax], int(idx[-1]) + margin + 1)))
    return tuple(box)


def normalize_intensity(
    data: np.ndarray, p_low: float = 0.5, p_high: float = 99.5, mask: np.ndarray | None = None
) -> np.ndarray:
    """Robust scaling: percentiles ``p_low``/``p_high`` of the foreground map to 0 and 1.

    Unlike min-max scaling this is stable under outlier voxels, integer rescaling (×1000, int16)
    and changes of field of view. The result is clipped to [0, 1.5] so that bright outliers keep
    some signal without dominating.
    """
    data = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(data)
    vals = data[mask] if mask.any() else data.ravel()
    lo, hi = np.percentile(vals, [p_low, p_high])
    if hi <= lo:
        hi = lo + 1.0
    out = (data - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.5).astype(np.float32)


def intensity_percentiles(data: np.ndarray, qs=(1, 50, 99)) -> list[float]:
    """Percentiles of all voxels (as recorded in ``volumes.parquet``)."""
    return [float(v) for v in np.percentile(data, qs)]


def save_like(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, header=None) -> None:
    """Write ``data`` as NIfTI with the given affine (and header fields, if given)."""
    img = nib.Nifti1Image(np.asarray(data), affine, header=header)
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
