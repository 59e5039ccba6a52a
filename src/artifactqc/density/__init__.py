"""Latent-density QC: :mod:`.flow` (the normalizing-flow model, its files, percentiles within the reference),
:mod:`.fit` (fitting it), :mod:`.flags` (τ flags, per-site percentiles and the ``flagged`` rule).
"""
