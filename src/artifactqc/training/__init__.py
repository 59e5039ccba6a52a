"""Training the encoder on the inference path (builds on :mod:`artifactqc.encoder`, never the reverse).

:mod:`.loop` (``train_encoder``: the run as a sequence of named steps), :mod:`.config` (hyper-parameters),
:mod:`.volumes` (clean training volumes), :mod:`.augment` (volume augmentation), :mod:`.pool` (corrupted
training items), :mod:`.losses`, :mod:`.validate` (held-out set, BatchNorm recalibration),
:mod:`.volume_head` (fitting the volume head).
"""
