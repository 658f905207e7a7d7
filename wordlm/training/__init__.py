"""The training layer: ``trainer`` (the training loop: ``Trainer``, its state, resume), ``checkpoint`` (the keeper
that writes and reads checkpoints), ``distributed`` (the processes of a torchrun launch) and ``signals`` (stop
requests).

It may import the model and data layers and the top-level leaves (``errors``, ``files``, and ``evaluation`` for
validation); never ``wordlm.tracking``, ``wordlm.run``, ``wordlm.experiment`` or Sacred. Importing the package
imports none of its modules.
"""
