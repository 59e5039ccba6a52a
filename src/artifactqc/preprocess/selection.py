"""Which volumes train the encoder: selection of training volumes from the ingest table by quality criteria
(:func:`select_training`) and the manifest that maps each selected volume to its preprocessed file
(:func:`training_manifest`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .superres import needs_superres


def _as_zooms(v) -> list[float]:
    if isinstance(v, str):
        import json

        v = json.loads(v)
    return [float(x) for x in list(v)[:3]]


def _id_list(spec) -> set[str] | None:
    """Volume ids from a list, or a file (one id per line, or a table with a volume_id column)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, (list, tuple, set)):
        return {str(s) for s in spec}
    p = str(spec)
    if p.endswith((".tsv", ".csv", ".parquet")):
        import pandas as pd

        df = pd.read_parquet(p) if p.endswith(".parquet") else pd.read_csv(p, sep="\t" if p.endswith(".tsv") else ",", dtype=str)
        if "volume_id" in df.columns:
            return set(df["volume_id"].astype(str))
    with open(p) as fh:
        return {ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#") and ln.strip() != "volume_id"}


def select_training(
    volumes,
    include_sites=(),
    exclude_sites=(),
    include_contrasts=(),
    exclude_contrasts=(),
    include_list=None,
    exclude_list=None,
    ratio: float = 1.5,
):
    """Which ingested volumes enter encoder training.

    ``volumes`` is the ingested table (``volumes.parquet`` frame). Kept: ``status == ok``, not a
    duplicate, site in ``include_sites`` (empty = all) and not in ``exclude_sites``, same for
    contrasts, volume_id in ``include_list`` (``None``/'' = no restriction; a list or a file) and not
    in ``exclude_list``. Returns ``volume_id, site, subject, contrast, raw_path, voxel_mm,
    needs_superres`` sorted by volume_id (an empty frame if nothing is left).
    """
    import pandas as pd

    df = volumes.copy()
    keep = pd.Series(True, index=df.index)
    if "status" in df.columns:
        keep &= df["status"].astype(str) == "ok"
    if "duplicate_of" in df.columns:
        keep &= df["duplicate_of"].fillna("").astype(str) == ""
    if include_sites:
        keep &= df["site"].astype(str).isin([str(s) for s in include_sites])
    if exclude_sites:
        keep &= ~df["site"].astype(str).isin([str(s) for s in exclude_sites])
    if include_contrasts:
        keep &= df["contrast"].astype(str).isin([str(s) for s in include_contrasts])
    if exclude_contrasts:
        keep &= ~df["contrast"].astype(str).isin([str(s) for s in exclude_contrasts])
    inc, exc = _id_list(include_list), _id_list(exclude_list)
    if inc is not None:
        keep &= df["volume_id"].astype(str).isin(inc)
    if exc is not None:
        keep &= ~df["volume_id"].astype(str).isin(exc)
    sel = df[keep]
    zooms = [_as_zooms(v) for v in sel["voxel_mm"]] if len(sel) else []
    out = pd.DataFrame(
        {
            "volume_id": sel["volume_id"].astype(str).to_numpy(),
            "site": sel["site"].astype(str).to_numpy(),
            "subject": sel["subject"].astype(str).to_numpy() if "subject" in sel else "",
            "contrast": sel["contrast"].astype(str).to_numpy(),
            "raw_path": sel["path"].astype(str).to_numpy(),
            "voxel_mm": [",".join(f"{z:g}" for z in zs) for zs in zooms],
            "needs_superres": [needs_superres(zs, ratio) for zs in zooms],
        }
    )
    return out.sort_values("volume_id").reset_index(drop=True)


def select_training_file(volumes_path: str | os.PathLike, out_path: str | os.PathLike, **criteria) -> int:
    """:func:`select_training` from a volumes table file to a TSV; returns the number selected.

    An empty selection is an error (training on nothing would fail later and less clearly)."""
    import pandas as pd

    p = str(volumes_path)
    vols = pd.read_parquet(p) if p.endswith(".parquet") else pd.read_csv(p, sep="\t", dtype=str)
    sel = select_training(vols, **criteria)
    if sel.empty:
        raise ValueError(
            f"training selection is empty: no volume of {p} with status ok passes the include/exclude "
            f"settings {criteria} (config section `training`)"
        )
    from ..atomic import write_tsv

    write_tsv(sel, out_path)
    return len(sel)


def training_manifest(selection_path, preprocessed: dict[str, str], out_path) -> int:
    """The manifest the training rule reads: the selection with ``path`` = the preprocessed file of
    each volume (``preprocessed`` maps volume_id → path) and ``status`` = ok. Returns row count."""
    import pandas as pd

    sel = pd.read_csv(selection_path, sep="\t", dtype={"volume_id": str})
    missing = sorted(set(sel["volume_id"]) - set(preprocessed))
    if missing:
        raise ValueError(f"no preprocessed file for {len(missing)} selected volumes, e.g. {missing[:3]}")
    sel.insert(4, "path", [str(Path(preprocessed[v]).resolve()) for v in sel["volume_id"]])
    sel["status"] = "ok"
    from ..atomic import write_tsv

    write_tsv(sel, out_path)
    return len(sel)
