"""Tissue re-rendering: a scaled volume's intensity classes (:func:`tissue_classes`, k-means on an
edge-preserving :func:`median3`) given random new intensities, each class keeping its own texture
(:class:`TissueRenderer`). Used by the re-rendering twins of :mod:`artifactqc.training.pairs` and by the
label-map synthesis of :func:`artifactqc.training.augment.synthesize_volume`.

Known limits of the rendering (intensity classes, not a segmentation): a tissue whose intensity drifts
across the volume (an uncorrected bias field: N4 first helps) can span two classes and then renders as
patches of two intensities; a volume whose classes all overlap (a broad T2w histogram) merges into one class,
and its renderings differ only in overall contrast and texture scale.
"""

from __future__ import annotations

import numpy as np

from ..encoder.slices import scale_for_simulation, subsample_step

#: Foreground threshold of the scaled volumes (as :func:`artifactqc.training.augment._tissue_remap`): below it
#: the background keeps its intensities, above it the tissue is re-rendered.
FOREGROUND = 0.08

#: Neighbouring intensity classes closer than this many (summed) standard deviations are one tissue that
#: k-means cut in two (a lone Gaussian peak split in two halves gives about 1.3): they are merged, otherwise
#: the rendering would give one tissue two different intensities and amplify its noise.
MERGE_RATIO = 1.5

def tissue_classes(data: np.ndarray, k: int = 4, max_samples: int = 20_000) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """Intensity classes of the head: 1D k-means (scikit-learn, ``k`` clusters, initialised at foreground
    quantiles so it is deterministic) on a regular subsample of the voxels above :data:`FOREGROUND`.

    Returns ``(means, sds, weights)`` sorted by mean (at most ``k`` classes: neighbours closer than
    :data:`MERGE_RATIO` are merged). On a T1w head the classes are roughly CSF/dark
    background tissue, GM, WM and bright fat/vessels; they need not be anatomical tissues, only groups of
    similar intensity whose ordering the rendering changes.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    step = subsample_step(data.size, 8 * max_samples)
    fgv = data[::step, ::step, ::step]
    fgv = fgv[fgv > FOREGROUND].astype(np.float64)
    if fgv.size > max_samples:
        fgv = fgv[:: int(np.ceil(fgv.size / max_samples))]
    if fgv.size < 10 * k:
        raise ValueError(f"too few foreground voxels ({fgv.size}) for {k} tissue classes")
    init = np.percentile(fgv, (np.arange(k) + 0.5) / k * 100.0)[:, None]
    init = init + np.arange(k)[:, None] * 1e-6  # distinct centres
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=50).fit(fgv[:, None])
    lab = km.labels_
    centres = km.cluster_centers_[:, 0]
    order = np.argsort(centres)
    means = list(centres[order])
    sds = [float(fgv[lab == i].std()) if (lab == i).sum() > 1 else 0.0 for i in order]
    weights = [float((lab == i).mean()) for i in order]
    while len(means) > 1:  # merge neighbours that split one tissue (k-means cuts a lone peak in two)
        ratio = [(means[i + 1] - means[i]) / max(sds[i] + sds[i + 1], 1e-9) for i in range(len(means) - 1)]
        i = int(np.argmin(ratio))
        if ratio[i] >= MERGE_RATIO:
            break
        w = weights[i] + weights[i + 1]
        mu = (weights[i] * means[i] + weights[i + 1] * means[i + 1]) / max(w, 1e-12)
        var = sum(weights[j] * (sds[j] ** 2 + (means[j] - mu) ** 2) for j in (i, i + 1)) / max(w, 1e-12)
        means[i:i + 2], sds[i:i + 2], weights[i:i + 2] = [mu], [float(np.sqrt(var))], [w]
    return np.array(means), np.array(sds), np.array(weights)


def median3(data: np.ndarray) -> np.ndarray:
    """Separable median of 3 along each axis in turn: removes most voxel noise but keeps step edges where they
    are (a median never blurs a step), at a fraction of a 3×3×3 median's cost (min/max only)."""
    out = np.asarray(data, dtype=np.float32)
    for ax in range(out.ndim):
        pad = np.pad(out, [(1, 1) if i == ax else (0, 0) for i in range(out.ndim)], mode="edge")
        sl = lambda a, b: pad[tuple(slice(a, pad.shape[i] - b) if i == ax else slice(None)  # noqa: E731
                                    for i in range(out.ndim))]
        x0, x1, x2 = sl(0, 2), sl(1, 1), sl(2, 0)
        out = np.maximum(np.minimum(x0, x1), np.minimum(np.maximum(x0, x1), x2))
    return out


def render_tissues(data: np.ndarray, rng: np.random.Generator, k: int = 4, texture: tuple[float, float] = (0.6, 1.4),
                   max_slope: float = 3.0) -> tuple[np.ndarray, str]:
    """Re-render a scaled volume with a random intensity per tissue class (:class:`TissueRenderer`; several
    renderings of one volume should share one renderer). Returns ``(data, description)``."""
    return TissueRenderer(data, k).render(rng, texture, max_slope)


class TissueRenderer:
    """Random re-renderings of one scaled volume with a new intensity per tissue class.

    Classes (:func:`tissue_classes`, ``k`` at most) and memberships come from the edge-preserving
    :func:`median3` of the volume, so that voxel noise does not flip a voxel between classes; the texture
    comes from the volume itself. In :meth:`render` every class ``c`` (mean ``mu_c``) gets a random new mean
    ``nu_c``, drawn independently, so any ordering occurs: a T1w's CSF < GM < WM can become T2w-like
    CSF > GM > WM, FLAIR-like GM > WM > CSF or a flat PD-like contrast (the new means are stretched to span a
    random ``[0.1-0.3, 0.8-1.0]`` so the contrast never collapses), and keeps its texture scaled by a random
    ``a_c`` in ``texture``: a voxel of intensity ``x`` in class ``c`` becomes ``nu_c + a_c (x - mu_c)``.
    Memberships are 1 within a class's core (``mu_c ± 2 sd_c`` of the smoothed intensity, at most 30 % of the
    way to a neighbouring class) and blend linearly between two cores: a partial-volume voxel stays the same
    mix of its tissues in the new contrast. Air (voxels at or below :data:`FOREGROUND`) keeps its value and is
    the darkest "class" of that blend (identity map). A blend steeper than ``max_slope`` (per unit of smoothed
    intensity) moves the next class's new mean instead, so that no map amplifies residual noise into a noise
    artifact. Geometry and head mask stay. The result is rescaled like every training volume
    (:func:`scale_for_simulation`).

    Cost: the median, the k-means and the voxels' position between the knots once per volume, then a few
    array passes per rendering.
    """

    def __init__(self, data: np.ndarray, k: int = 4):
        self.data = np.asarray(data, dtype=np.float32)
        sm = median3(self.data)
        self.means, self.sds, _ = tissue_classes(sm, k)
        m, s = self.means, self.sds
        gaps = np.diff(m)
        left = np.minimum(2.0 * s, 0.3 * np.r_[m[0] - FOREGROUND, gaps])
        right = np.minimum(2.0 * s, 0.3 * np.r_[gaps, np.inf])
        top = max(float(sm.max()), float(m[-1] + right[-1]) + 0.05, 1.5)
        # knots in the smoothed intensity: air, then each class's core [mu - left, mu + right], then the top
        kx = np.r_[FOREGROUND, np.ravel(np.c_[m - left, m + right]), top]
        self.kx = np.maximum.accumulate(kx + np.arange(len(kx)) * 1e-6)  # strictly increasing knots
        self.fg = self.data > FOREGROUND
        xs = np.clip(sm[self.fg], self.kx[0], self.kx[-1])
        i = np.clip(np.searchsorted(self.kx, xs, side="right") - 1, 0, len(self.kx) - 2)
        self.i = i.astype(np.int32)
        self.t = ((xs - self.kx[i]) / (self.kx[i + 1] - self.kx[i])).astype(np.float32)
        self.x = self.data[self.fg]

    def _at(self, values: np.ndarray) -> np.ndarray:
        """A knot function (linear between knots) at every foreground voxel's smoothed intensity."""
        v = values.astype(np.float32)
        return v[self.i] + self.t * (v[self.i + 1] - v[self.i])

    def render(self, rng: np.random.Generator, texture: tuple[float, float] = (0.6, 1.4),
               max_slope: float = 3.0) -> tuple[np.ndarray, str]:
        """One random rendering (see the class docstring). Returns ``(data, description)``."""
        k = len(self.means)
        nu = rng.uniform(0.0, 1.0, size=k)
        lo, hi = rng.uniform(0.1, 0.3), rng.uniform(0.8, 1.0)
        nu = lo + (nu - nu.min()) / max(nu.max() - nu.min(), 1e-6) * (hi - lo) if k > 1 else np.array([hi])
        a = rng.uniform(*texture, size=k)
        kn = [FOREGROUND]  # new mean at the knots; a blend steeper than max_slope moves the next class's mean
        for c in range(k):
            lim = max_slope * max(self.kx[1 + 2 * c] - self.kx[2 * c], 1e-6)
            kn += [kn[-1] + float(np.clip(nu[c] - kn[-1], -lim, lim))] * 2
        kn.append(kn[-1])
        ka = np.r_[1.0, np.repeat(a, 2), a[-1]]
        km = np.r_[FOREGROUND, np.repeat(self.means, 2), self.means[-1]]
        y = self._at(np.array(kn)) + self._at(ka) * (self.x - self._at(km))
        out = self.data.copy()
        out[self.fg] = np.maximum(y, FOREGROUND + 1e-3)  # tissue stays tissue: the head mask is kept
        return scale_for_simulation(out), "render" + "-".join(f"{v:.2f}" for v in nu)
