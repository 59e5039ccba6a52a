"""Quality measures besides the encoder and their evaluation: :mod:`.iqm` (MRIQC-style image-quality metrics),
:mod:`.mriqc` (importing MRIQC's own tables), :mod:`.evaluate` (metrics with CIs against labels or
severities), :mod:`.compare` (score vs IQMs on simulated artifacts and vs MRIQC).
"""
