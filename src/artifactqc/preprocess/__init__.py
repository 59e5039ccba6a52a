"""Preprocessing of the encoder's training volumes (scoring reads raw files): :mod:`.selection` (which volumes
train), :mod:`.n4` (bias-field correction), :mod:`.superres` (self-supervised super-resolution of thick slices).
"""
