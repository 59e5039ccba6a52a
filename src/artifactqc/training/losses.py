"""The encoder's training loss: :func:`encoder_loss` (triplet with per-sample margin, clean-score and
calibration terms, per-head BCE, latent decoder and InfoNCE terms) and :func:`info_nce`.

Loss per batch of B triplets (anchor ``a`` = clean slice, positive ``p`` = another clean slice of the same
volume in another orientation, negatives ``n``/``n2`` = the same planes of the *same* corrupted volume, i.e.
same artifact and severity SS_i, different anatomy):

* triplet term with a **per-sample** margin ``m_i = SCORE_SCALE * SS_i / 2``:
  ``relu(S_a - S_n + m_i) + relu(S_p - S_n2 + m_i)`` (the published code used the batch-mean severity);
* **squared** L2 on clean scores ``S_a^2 + S_p^2`` (the published code used an L1 penalty), plus a squared
  error pulling corrupted scores to ``SCORE_SCALE * SS_i`` (calibration);
* per-head BCE of the five severities against the simulator's known per-head severities (0 for clean);
* latent terms: a linear decoder from ``z`` must predict score target and the five severities (so ``z``
  carries the artifact information), and an InfoNCE term makes ``z(n_i)`` closest to ``z(n2_i)`` (same
  artifact level, different anatomy; the Zuo et al. positives) among the batch.

With ``slice_group`` = G > 1 the batch is drawn as groups of G triplets from one corrupted volume and the
triplet, calibration and InfoNCE terms act on the group means (a small-volume score, like the scorer's mean
over slices) instead of on single slices, whose per-slice target ``2 SS`` is noisy: a slice often does not
show its volume's artifact (:func:`encoder_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..encoder.network import SCORE_SCALE


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE: ``z1[i]`` and ``z2[i]`` are positives, the rest of the batch negatives."""
    a = F.normalize(z1, dim=1)
    b = F.normalize(z2, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def encoder_loss(
    out_a: dict, out_p: dict, out_n: dict, out_n2: dict, severity: torch.Tensor, targets: torch.Tensor,
    weights: dict | None = None, group: int = 1,
) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts for one batch (see the module docstring).

    ``severity`` [B]: simulated severity SS_i of the negatives; ``targets`` [B, 5]: per-head severities.

    ``group`` > 1: the batch holds ``B / group`` groups of ``group`` consecutive triplets from the *same*
    corrupted volume (:meth:`_Pool.sample` with ``group``). The score terms that carry the simulated severity
    (triplet margin, calibration) and the InfoNCE term are then computed on the group means, i.e. on a
    small-volume score like the scorer's mean over slices, instead of on every slice: a single slice often
    does not show its volume's artifact (thick slices blur two of three orientations, ghosts run along one
    axis, a bias field is flat within some slices), so a per-slice target ``2 SS`` is label noise. Clean
    terms (squared score, heads -> 0) stay per slice: every clean slice is clean.
    """
    w = {"triplet": 1.0, "clean": 1.0, "calib": 1.0, "heads": 1.0, "latent": 0.5, "nce": 0.1}
    w.update(weights or {})
    g = max(1, int(group))
    if severity.shape[0] % g:
        raise ValueError(f"batch of {severity.shape[0]} is not a multiple of group {g}")

    def gm(x: torch.Tensor) -> torch.Tensor:  # mean over each group of consecutive rows
        return x if g == 1 else x.reshape(x.shape[0] // g, g, *x.shape[1:]).mean(1)

    sev_g = severity[::g]
    target_score = SCORE_SCALE * sev_g
    margin = target_score / 2.0  # per-sample (per-volume) margin
    s_a, s_p, s_n, s_n2 = out_a["score"], out_p["score"], out_n["score"], out_n2["score"]
    triplet = (F.relu(gm(s_a) - gm(s_n) + margin) + F.relu(gm(s_p) - gm(s_n2) + margin)).mean()
    clean = (s_a.pow(2) + s_p.pow(2)).mean()  # true squared L2
    if g == 1:
        calib = ((s_n - target_score).pow(2) + (s_n2 - target_score).pow(2)).mean()
    else:
        calib = 2.0 * (0.5 * (gm(s_n) + gm(s_n2)) - target_score).pow(2).mean()
    # heads stay per slice: with the BCE on group-mean probabilities (measured, v5) the argmax accuracy of the
    # heads on held-out volumes fell from 0.78 to 0.56
    corrupt_heads = (F.binary_cross_entropy_with_logits(out_n["severity_logits"], targets)
                     + F.binary_cross_entropy_with_logits(out_n2["severity_logits"], targets))
    zeros = torch.zeros_like(targets)
    heads = (
        corrupt_heads
        + 0.5 * F.binary_cross_entropy_with_logits(out_a["severity_logits"], zeros)
        + 0.5 * F.binary_cross_entropy_with_logits(out_p["severity_logits"], zeros)
    ) / 3.0
    lat_t = torch.cat([SCORE_SCALE * severity[:, None], targets], 1)
    lat_t0 = torch.zeros_like(lat_t)
    latent = (
        F.mse_loss(out_n["latent_pred"], lat_t) + F.mse_loss(out_n2["latent_pred"], lat_t)
        + 0.5 * F.mse_loss(out_a["latent_pred"], lat_t0) + 0.5 * F.mse_loss(out_p["latent_pred"], lat_t0)
    ) / 3.0
    nce = info_nce(gm(out_n["latent"]), gm(out_n2["latent"]))
    parts = {"triplet": triplet, "clean": clean, "calib": calib, "heads": heads, "latent": latent, "nce": nce}
    total = sum(w[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def consistency_loss(out_a: dict, out_b: dict) -> torch.Tensor:
    """Paired outputs that must agree (the same plane of two renderings of one anatomy with the same artifact,
    :func:`artifactqc.training.pairs.make_twin_entries`): mean squared difference of the scores plus that of
    the five heads' probabilities. Zero exactly when both outputs are equal."""
    score = (out_a["score"] - out_b["score"]).pow(2).mean()
    heads = (torch.sigmoid(out_a["severity_logits"]) - torch.sigmoid(out_b["severity_logits"])).pow(2).mean()
    return score + heads


def ranking_loss(s_lo: torch.Tensor, s_hi: torch.Tensor, sev_lo: torch.Tensor, sev_hi: torch.Tensor, planes: int,
                 margin: float = 0.5) -> torch.Tensor:
    """Margin ranking within one anatomy (:func:`artifactqc.training.pairs.make_rank_entries`): the scores
    ``s_lo``/``s_hi`` [P * planes] of the same planes at severities ``sev_lo < sev_hi`` [P] are averaged over
    each pair's ``planes``, and ``relu(SCORE_SCALE * (sev_hi - sev_lo) * margin - (S_hi - S_lo))`` is averaged
    over the pairs: zero once the more corrupted member scores higher by ``margin`` of the calibrated
    difference, whatever both score (a per-volume offset cancels)."""
    p = max(1, int(planes))
    m_lo = s_lo.reshape(-1, p).mean(1)
    m_hi = s_hi.reshape(-1, p).mean(1)
    return F.relu(SCORE_SCALE * (sev_hi - sev_lo) * float(margin) - (m_hi - m_lo)).mean()


def head_ranking_loss(logits_lo: torch.Tensor, logits_hi: torch.Tensor, t_lo: torch.Tensor, t_hi: torch.Tensor,
                      planes: int, margin: float = 0.5) -> torch.Tensor:
    """The ranking of :func:`ranking_loss` for the five heads: for every head whose simulated severity rises
    within a pair (``t_hi > t_lo``, [P, 5]), the pair's plane-mean probability must rise by ``margin`` times
    that rise: ``relu(margin (t_hi - t_lo) - (p_hi - p_lo))``, averaged over those heads (zero when none)."""
    p = max(1, int(planes))
    n = t_lo.shape[0]
    p_lo = torch.sigmoid(logits_lo).reshape(n, p, -1).mean(1)
    p_hi = torch.sigmoid(logits_hi).reshape(n, p, -1).mean(1)
    dt = t_hi - t_lo
    rises = (dt > 0).float()
    return (F.relu(float(margin) * dt - (p_hi - p_lo)) * rises).sum() / rises.sum().clamp(min=1.0)
