"""Report figures (matplotlib, Agg backend). Each ``plot_*`` function writes one PNG and returns its path.

The functions take the tables of ``DESIGN.md`` (``volumes``, ``failures``, ``scores``) as pandas DataFrames
and never import snakemake, so a workflow script only loads the tables and calls one function:

* :func:`plot_cohort_overview` — volumes per site and contrast, failures by ``error_type`` (and stage).
* :func:`plot_score_distributions` — per-site score violins + points, review threshold at 1, flags marked.
* :func:`plot_latent_plane` — first two latent dims (or their first two principal components when k > 2)
  with the flow's log-density contour at each τ level, flagged volumes marked.
* :func:`plot_thumbnail_strip` — worst and best ``k`` volumes of one site, three orthogonal mid-slices each
  (canonical RAS orientation, robust windowing), labelled with volume id and score;
  :func:`plot_thumbnail_strips` does every site.
* :func:`plot_image_ruler` — one reference slice at increasing simulated severity of one artifact with
  the model's score under each rung, and flagged volumes placed on the ruler by their score;
  :func:`ruler_ladder` builds the rungs with :func:`artifactqc.simulate.severity_ladder`.
* :func:`plot_roc_curves` — ROC curves with AUROC and its CI in the legend.
* :func:`markdown_table` / :func:`html_table` — render a small DataFrame (e.g. the MRIQC comparison).

Colours come from the Okabe–Ito palette (distinguishable with the common colour-vision deficiencies);
flagged volumes are also marked by shape, never by colour alone.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

#: Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
FLAG_COLOR = "#D55E00"  # vermillion
OK_COLOR = "#0072B2"  # blue
DPI = 110


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out


def _ok(df):
    if "status" in df.columns:
        return df[df["status"].astype(str) == "ok"]
    return df


# ------------------------------------------------------------------------------------------ overview
def plot_cohort_overview(volumes, failures, out, site_col: str = "site", contrast_col: str = "contrast") -> Path:
    """Left: stacked bars of volumes per site by contrast (all ingested rows, failed ones hatched).
    Right: failures by ``error_type``, stacked by ``stage``; "no failures" when the table is empty."""
    import pandas as pd

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    v = volumes.copy()
    v[contrast_col] = v[contrast_col].fillna("unknown").astype(str) if contrast_col in v else "unknown"
    ok = v["status"].astype(str) == "ok" if "status" in v.columns else pd.Series(True, index=v.index)
    sites = sorted(v[site_col].astype(str).unique())
    contrasts = sorted(v[contrast_col].unique())
    bottom = np.zeros(len(sites))
    x = np.arange(len(sites))
    for i, c in enumerate(contrasts):
        for good, hatch in ((True, None), (False, "//")):
            sel = v[(v[contrast_col] == c) & (ok == good)]
            cnt = sel.groupby(sel[site_col].astype(str)).size().reindex(sites, fill_value=0).to_numpy()
            if cnt.sum() == 0:
                continue
            ax1.bar(x, cnt, bottom=bottom, color=OKABE_ITO[i % len(OKABE_ITO)], hatch=hatch,
                    edgecolor="white" if good else "black", linewidth=0.5,
                    label=c if good else f"{c} (failed ingest)")
            bottom += cnt
    for xi, b in zip(x, bottom):
        ax1.text(xi, b, f"{int(b)}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, sites, rotation=30 if len(sites) > 4 else 0, ha="right" if len(sites) > 4 else "center")
    ax1.set_xlabel("site")
    ax1.set_ylabel("volumes")
    ax1.set_title(f"Cohort: {len(v)} volumes, {len(sites)} sites")
    ax1.legend(fontsize=8, title="contrast", title_fontsize=8, frameon=True, framealpha=0.9,
               loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax1.set_ylim(0, max(1, bottom.max()) * 1.15)
    ax1.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))

    if failures is None or len(failures) == 0:
        ax2.text(0.5, 0.5, "no failures", ha="center", va="center", fontsize=14, transform=ax2.transAxes)
        ax2.set_axis_off()
        ax2.set_title("Failures by reason")
    else:
        f = failures.copy()
        f["error_type"] = f["error_type"].fillna("unknown").astype(str)
        f["stage"] = f["stage"].fillna("?").astype(str) if "stage" in f else "?"
        tab = f.groupby(["error_type", "stage"]).size().unstack(fill_value=0)
        tab = tab.loc[tab.sum(axis=1).sort_values().index]
        left = np.zeros(len(tab))
        y = np.arange(len(tab))
        for i, st in enumerate(tab.columns):
            ax2.barh(y, tab[st].to_numpy(), left=left, color=OKABE_ITO[(i + 1) % len(OKABE_ITO)], label=st)
            left += tab[st].to_numpy()
        for yi, lv in zip(y, left):
            ax2.text(lv, yi, f" {int(lv)}", va="center", fontsize=8)
        ax2.set_yticks(y, tab.index)
        ax2.set_xlabel("volumes")
        ax2.set_xlim(0, left.max() * 1.2)
        ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax2.set_title(f"Failures by reason ({len(f)} rows)")
        ax2.legend(fontsize=8, title="stage", title_fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return _save(fig, out)


# ---------------------------------------------------------------------------------- distributions
def plot_score_distributions(scores, out, threshold: float = 1.0, site_col: str = "site",
                             score_col: str = "score", flag_col: str = "flagged", seed: int = 0) -> Path:
    """Per-site violin of the score with every volume as a jittered point; the review threshold as a dashed
    line; flagged volumes (``flag_col``) drawn as vermillion triangles, others as blue dots."""
    df = _ok(scores)
    df = df[np.isfinite(df[score_col].astype(float))]
    sites = sorted(df[site_col].astype(str).unique())
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(sites) + 2), 4.5))
    rng = np.random.default_rng(seed)
    data = [df.loc[df[site_col].astype(str) == s, score_col].astype(float).to_numpy() for s in sites]
    pos = np.arange(1, len(sites) + 1)
    vio_pos = [p for p, d in zip(pos, data) if len(d) >= 2]
    vio_dat = [d for d in data if len(d) >= 2]
    if vio_dat:
        parts = ax.violinplot(vio_dat, positions=vio_pos, widths=0.8, showextrema=False, showmedians=True)
        for b in parts["bodies"]:
            b.set_facecolor("#BBBBBB")
            b.set_alpha(0.5)
        parts["cmedians"].set_color("black")
    shown_flag = shown_ok = False
    for p, s in zip(pos, sites):
        sub = df[df[site_col].astype(str) == s]
        y = sub[score_col].astype(float).to_numpy()
        xj = p + rng.uniform(-0.18, 0.18, len(y))
        fl = sub[flag_col].fillna(False).to_numpy(dtype=bool) if flag_col in sub else np.zeros(len(y), bool)
        ax.scatter(xj[~fl], y[~fl], s=14, color=OK_COLOR, alpha=0.8, label=None if shown_ok else "not flagged", zorder=3)
        ax.scatter(xj[fl], y[fl], s=40, marker="^", color=FLAG_COLOR, edgecolor="black", linewidth=0.5,
                   label=None if shown_flag or not fl.any() else "flagged", zorder=4)
        shown_ok = True
        shown_flag = shown_flag or bool(fl.any())
    ax.axhline(threshold, color="black", ls="--", lw=1.2, label=f"review threshold ({threshold:g})")
    ax.set_xticks(pos, [f"{s}\n(n={len(d)})" for s, d in zip(sites, data)], fontsize=8)
    ax.set_xlabel("site")
    ax.set_ylabel("artifact score (1 = review threshold)")
    ax.set_title("Artifact score by site")
    ax.set_ylim(bottom=min(0.0, float(np.nanmin(df[score_col])) - 0.05) if len(df) else 0)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


# ------------------------------------------------------------------------------------ latent plane
def plot_latent_plane(scores, out, flow=None, taus: Sequence[float] = (5, 3), flag_col: str = "flagged",
                      site_col: str = "site", grid: int = 120) -> Path:
    """Latent plane with density contours at each τ.

    k = 2: the latent dims themselves. k > 2: the first two principal components of the (ok) latents; the
    contours are then those of the flow's density on the plane through the latent mean spanned by the two
    PCs (other PCs at 0) — a slice of the k-dimensional density, not its marginal, so points may lie outside
    a contour yet have a high density in full space; the caption says so. Point colour = density percentile,
    flagged volumes circled in vermillion with their id.
    """
    from ..density.flow import latent_columns_of

    df = _ok(scores)
    cols = (flow.latent_columns if flow is not None and flow.latent_columns else None) or latent_columns_of(df)
    X = df[cols].to_numpy(dtype=np.float64)
    keep = np.isfinite(X).all(axis=1)
    df, X = df[keep], X[keep]
    k = X.shape[1]
    mu = X.mean(axis=0)
    if k == 2:
        basis = np.eye(2)
        labels = (cols[0], cols[1])
        var_txt = ""
    else:
        _, s, vt = np.linalg.svd(X - mu, full_matrices=False)
        basis = vt[:2].T  # k x 2
        ev = s**2 / max((s**2).sum(), 1e-12)
        labels = (f"PC1 ({100 * ev[0]:.0f} % var.)", f"PC2 ({100 * ev[1]:.0f} % var.)")
        var_txt = " (PCA of latents; contours on the PC1–PC2 plane through the mean)"
    P = (X - mu) @ basis
    fig, ax = plt.subplots(figsize=(7, 6))
    if flow is not None and len(P):
        pad = 0.25 * (P.max(0) - P.min(0) + 1e-9)
        g0 = np.linspace(P[:, 0].min() - pad[0], P[:, 0].max() + pad[0], grid)
        g1 = np.linspace(P[:, 1].min() - pad[1], P[:, 1].max() + pad[1], grid)
        G0, G1 = np.meshgrid(g0, g1)
        pts = mu + np.stack([G0.ravel(), G1.ravel()], 1) @ basis.T
        L = flow.log_density(pts).reshape(G0.shape)
        finite = np.isfinite(L)
        lo = np.percentile(L[finite], 2) if finite.any() else -1
        ax.contourf(G0, G1, np.clip(L, lo, None), levels=14, cmap="Greys", alpha=0.45)
        levels = flow.tau_levels(taus)
        styles = ["-", "--", ":", "-."]
        for i, (t, lev) in enumerate(sorted(levels.items(), reverse=True)):
            cs = ax.contour(G0, G1, L, levels=[lev], colors="black", linestyles=styles[i % 4], linewidths=1.4)
            ax.clabel(cs, fmt={lev: f"τ={t:g}%"}, fontsize=8)
            ax.plot([], [], color="black", ls=styles[i % 4], label=f"τ = {t:g} % density level")
    pct = df["density_pct"].to_numpy(dtype=float) if "density_pct" in df else None
    fl = df[flag_col].fillna(False).to_numpy(dtype=bool) if flag_col in df else np.zeros(len(df), bool)
    sc = ax.scatter(P[:, 0], P[:, 1], c=pct if pct is not None else OK_COLOR, cmap="viridis", vmin=0, vmax=100,
                    s=22, edgecolor="white", linewidth=0.3, zorder=3)
    if pct is not None:
        fig.colorbar(sc, ax=ax, label="density percentile in reference (%)", shrink=0.8)
    if fl.any():
        ax.scatter(P[fl, 0], P[fl, 1], s=120, facecolor="none", edgecolor=FLAG_COLOR, linewidth=1.8, zorder=4,
                   label=f"flagged ({int(fl.sum())})")
        ids = df["volume_id"].astype(str).to_numpy() if "volume_id" in df else np.arange(len(df)).astype(str)
        for (a, b), name in list(zip(P[fl], ids[fl]))[:25]:
            ax.annotate(name, (a, b), xytext=(4, 4), textcoords="offset points", fontsize=6.5, color=FLAG_COLOR)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"Latent plane, k={k}, n={len(df)}" + var_txt, fontsize=10)
    ax.legend(fontsize=8, loc="best", frameon=True)
    fig.tight_layout()
    return _save(fig, out)


# --------------------------------------------------------------------------------------- thumbnails
def _resize(img: np.ndarray, out_shape) -> np.ndarray:
    from scipy.ndimage import zoom

    f = (out_shape[0] / img.shape[0], out_shape[1] / img.shape[1])
    return zoom(img, f, order=1, prefilter=False)


def mid_slices(path, height: int = 96, max_mem_mb: float = 4096.0) -> np.ndarray:
    """Three orthogonal mid-slices (sagittal | coronal | axial) of a volume, side by side, as one 2D image.

    The volume is read with :func:`artifactqc.io.load_volume`, reordered to RAS (:func:`io.to_canonical`),
    windowed robustly (0.5/99.5 % of the foreground → [0, 1]) and each slice is resampled to physical
    aspect (voxel sizes from the affine) with a common height of ``height`` pixels; superior is up.
    """
    from .. import io

    vol = io.load_volume(path, max_mem_mb=max_mem_mb)
    data, aff = io.to_canonical(vol.data, vol.affine)
    vs = io.voxel_sizes(aff)
    img = io.normalize_intensity(data)
    img = np.clip(img, 0, 1)
    cx, cy, cz = (s // 2 for s in img.shape)
    planes = [
        (img[cx, :, :], (vs[1], vs[2])),  # sagittal: y (A) horizontal, z (S) vertical
        (img[:, cy, :], (vs[0], vs[2])),  # coronal: x (R) horizontal
        (img[:, :, cz], (vs[0], vs[1])),  # axial: x horizontal, y (A) vertical
    ]
    tiles = []
    for sl, (dh, dv) in planes:
        sl = np.rot90(sl)  # array rows = first axis -> rot so the second axis points up
        h_mm, w_mm = sl.shape[0] * dv, sl.shape[1] * dh
        w = max(4, int(round(height * w_mm / h_mm)))
        tiles.append(_resize(sl, (height, w)))
        tiles.append(np.ones((height, 2), dtype=np.float32))  # white separator
    return np.concatenate(tiles[:-1], axis=1)


def plot_thumbnail_strip(scores, site, out, k: int = 4, path_col: str = "path", score_col: str = "score",
                         site_col: str = "site", height: int = 96) -> Path:
    """Worst ``k`` (top row) and best ``k`` (bottom row) volumes of ``site`` by score, three orthogonal
    mid-slices each (sag | cor | ax), titled with volume id, score and flag. Unreadable volumes are shown
    as a grey tile with the reason."""
    df = _ok(scores)
    df = df[(df[site_col].astype(str) == str(site)) & np.isfinite(df[score_col].astype(float))]
    df = df.sort_values(score_col, ascending=False)
    worst = df.head(k)
    best = df.iloc[::-1].head(k)
    best = best[~best.index.isin(worst.index)] if len(df) < 2 * k else best
    rows = [("worst", worst), ("best", best)]
    ncol = max(1, k)
    fig, axes = plt.subplots(2, ncol, figsize=(3.3 * ncol, 2 * 1.55 + 0.6), squeeze=False)
    for r, (name, sub) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(sub):
                ax.set_axis_off()
                continue
            row = sub.iloc[c]
            try:
                tile = mid_slices(row[path_col], height=height)
                ax.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            except Exception as exc:  # keep the strip even if one file went away
                ax.imshow(np.full((height, height * 3), 0.5), cmap="gray", vmin=0, vmax=1)
                ax.text(0.5, 0.5, f"unreadable:\n{type(exc).__name__}", ha="center", va="center",
                        transform=ax.transAxes, fontsize=7)
            flagged = bool(row.get("flagged", False)) if hasattr(row, "get") else False
            vid = str(row.get("volume_id", row.name))
            ax.set_title(f"{vid}\nscore {float(row[score_col]):.2f}" + ("  ▲flagged" if flagged else ""),
                         fontsize=7.5, color=FLAG_COLOR if flagged else "black")
            for sp in ax.spines.values():
                sp.set_edgecolor(FLAG_COLOR if flagged else "#999999")
                sp.set_linewidth(2 if flagged else 0.5)
        axes[r, 0].set_ylabel(f"{name} {min(k, len(sub))}", fontsize=9)
        axes[r, 0].set_axis_on()
    fig.suptitle(f"Site {site}: highest and lowest artifact scores (n={len(df)}; sagittal | coronal | axial, RAS)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_thumbnail_strips(scores, out_dir, k: int = 4, site_col: str = "site", **kw) -> list[Path]:
    """:func:`plot_thumbnail_strip` for every site; files ``thumbnails_<site>.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return [plot_thumbnail_strip(scores, s, out_dir / f"thumbnails_{s}.png", k=k, site_col=site_col, **kw)
            for s in sorted(_ok(scores)[site_col].astype(str).unique())]


# ------------------------------------------------------------------------------------------- rulers
def ruler_ladder(reference_slice: np.ndarray, artifact: str, score_fn: Callable[[np.ndarray], float] | None = None,
                 severities: Sequence[float] | None = None, seed: int = 0):
    """Rungs for :func:`plot_image_ruler`: ``[(severity, image, score), …]`` built with
    :func:`artifactqc.simulate.severity_ladder` on a normalised 2D (or 3D) reference; ``score_fn`` maps a
    rung's image to the model's score (NaN when not given). For a 3D input the displayed image is the
    axial mid-slice, the score is computed on the volume."""
    from .. import simulate

    sev = simulate.SEVERITY_KNOTS[::2] if severities is None else severities
    out = []
    for s, img in simulate.severity_ladder(reference_slice, artifact, sev, seed=seed):
        sc = float(score_fn(img)) if score_fn is not None else float("nan")
        show = img if img.ndim == 2 else img[:, :, img.shape[2] // 2]
        out.append((float(s), show, sc))
    return out


def plot_image_ruler(rungs, out, artifact: str, contrast: str = "", flagged=None, threshold: float = 1.0,
                     score_col: str = "score") -> Path:
    """An image ruler: the reference slice at increasing simulated severity (top, each titled with its
    severity and the model's score) and below it a score axis with the rungs as ticks and every flagged
    volume placed by its score (``flagged``: DataFrame with ``volume_id`` and ``score``, or a list of
    ``(name, score)``). Rung images are shown with the same fixed window [0, 1] (normalised intensities)."""
    import pandas as pd

    n = len(rungs)
    fig = plt.figure(figsize=(max(7, 1.6 * n), 4.4))
    gs = fig.add_gridspec(2, n, height_ratios=[2.2, 1.0], hspace=0.35)
    for i, (sev, img, sc) in enumerate(rungs):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(np.rot90(np.asarray(img)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        over = np.isfinite(sc) and sc > threshold
        ax.set_title(f"sev {sev:.1f}\nscore {sc:.2f}", fontsize=8, color=FLAG_COLOR if over else "black")
        if over:
            for sp in ax.spines.values():
                sp.set_edgecolor(FLAG_COLOR)
                sp.set_linewidth(2)
    axr = fig.add_subplot(gs[1, :])
    rs = np.array([r[2] for r in rungs], dtype=float)
    if isinstance(flagged, pd.DataFrame):
        fl = list(zip(flagged["volume_id"].astype(str), flagged[score_col].astype(float)))
    else:
        fl = list(flagged or [])
    allv = np.concatenate([rs[np.isfinite(rs)], [threshold], [v for _, v in fl if np.isfinite(v)]])
    lo, hi = float(np.min(allv)), float(np.max(allv))
    span = max(hi - lo, 0.2)
    axr.set_xlim(lo - 0.08 * span, hi + 0.08 * span)
    axr.set_ylim(-1.2, 1.9)
    axr.axhline(0, color="black", lw=1)
    last_x = {0: -np.inf, 1: -np.inf}
    for j, (sev, _, sc) in enumerate(sorted(rungs, key=lambda r: (r[2], r[0]))):
        if np.isfinite(sc):
            axr.plot([sc, sc], [-0.25, 0.25], color="black", lw=1.5)
            # stagger labels on two levels; drop a label that would overlap its neighbour on both levels
            for lvl in (0, 1):
                if sc - last_x[lvl] > 0.035 * span:
                    axr.text(sc, 0.35 + 0.45 * lvl, f"{sev:.1f}", ha="center", fontsize=7)
                    last_x[lvl] = sc
                    break
    axr.text(0.0, 1.02, "severity rungs (ticks, labelled with severity)", transform=axr.transAxes, fontsize=7, va="bottom")
    axr.axvline(threshold, color=FLAG_COLOR, ls="--", lw=1, label=f"review threshold ({threshold:g})")
    if fl:
        fl = sorted(fl, key=lambda t: t[1])
        ys = -0.45 - 0.3 * (np.arange(len(fl)) % 3)
        for (name, v), y in zip(fl, ys):
            axr.plot(v, y, marker="v", color=FLAG_COLOR, ms=7, markeredgecolor="black", mew=0.5)
            axr.text(v, y, "  " + name, ha="left", va="center", fontsize=6.5, color=FLAG_COLOR)
        axr.plot([], [], "v", color=FLAG_COLOR, label=f"flagged volumes ({len(fl)})")
    axr.set_yticks([])
    for sp in ("left", "right", "top"):
        axr.spines[sp].set_visible(False)
    axr.set_xlabel("model artifact score")
    axr.legend(fontsize=7, frameon=False, loc="upper right")
    fig.suptitle(f"Image ruler: {artifact}" + (f" ({contrast})" if contrast else ""), fontsize=11)
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------- ROC
def plot_roc_curves(curves: Mapping[str, Mapping], out, title: str = "ROC curves") -> Path:
    """ROC curves. ``curves[name] = {"fpr": …, "tpr": …, "auc": float, "ci": (lo, hi)}`` (``ci`` optional);
    the legend shows ``name  AUROC 0.91 [0.85, 0.96]``, sorted by AUROC. Curves with few points
    (a binary flag) are drawn with markers."""
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    ax.plot([0, 1], [0, 1], color="#999999", ls=":", lw=1, label="chance")
    items = sorted(curves.items(), key=lambda kv: -float(kv[1].get("auc", np.nan) if np.isfinite(kv[1].get("auc", np.nan)) else -1))
    styles = ["-", "--", "-.", ":"]
    for i, (name, c) in enumerate(items):
        fpr, tpr = np.asarray(c["fpr"], float), np.asarray(c["tpr"], float)
        auc = c.get("auc", np.nan)
        ci = c.get("ci")
        lab = f"{name}  AUROC {auc:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None else "")
        ax.plot(fpr, tpr, color=OKABE_ITO[i % len(OKABE_ITO)], ls=styles[(i // len(OKABE_ITO)) % 4], lw=1.8,
                marker="o" if len(fpr) <= 4 else None, ms=4, label=lab)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(fontsize=7.5, loc="lower right", frameon=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


# -------------------------------------------------------------------------------------------- tables
def _fmt(v, floatfmt: str) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else format(float(v), floatfmt)
    return str(v)


def markdown_table(df, floatfmt: str = ".3g", index: bool = False) -> str:
    """A GitHub-flavoured markdown table of ``df`` (floats with ``floatfmt``, NaN as empty; ``|`` escaped)."""
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |",
             "|" + "|".join("---:" if np.issubdtype(d[c].dtype, np.number) else "---" for c in d.columns) + "|"]
    for row in d.itertuples(index=False):
        lines.append("| " + " | ".join(esc(_fmt(v, floatfmt)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def html_table(df, floatfmt: str = ".3g", caption: str | None = None, index: bool = False) -> str:
    """A self-contained HTML table (escaped) for the Snakemake report."""
    d = df.reset_index() if index else df
    out = ['<table style="border-collapse:collapse;font-family:sans-serif;font-size:12px">']
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<tr>" + "".join(f'<th style="border-bottom:1px solid #000;padding:2px 6px">{html.escape(str(c))}</th>'
                                for c in d.columns) + "</tr>")
    for row in d.itertuples(index=False):
        out.append("<tr>" + "".join(f'<td style="padding:2px 6px;text-align:right">{html.escape(_fmt(v, floatfmt))}</td>'
                                    for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out) + "\n"
