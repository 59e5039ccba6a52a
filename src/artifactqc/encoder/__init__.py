"""Scoring: the encoder network, its checkpoint files, the slice sampler and volume scoring.

:mod:`.network` (architecture and output conventions), :mod:`.checkpoint` (safetensors model directories,
BatchNorm folding), :mod:`.slices` (volume -> model input slices), :mod:`.score` (volumes -> score rows).
Nothing here imports :mod:`artifactqc.training` (checked by ``tests/test_architecture.py``).
"""
