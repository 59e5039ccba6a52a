"""The workflow's report: :mod:`.figures` (the plotting functions) and :mod:`.stage` (the end-of-workflow stage
that builds figures and the label evaluation from the cohort tables).
"""
