"""What the command lines share: the errors they report, and ``--device``.

A CLI prints such an error as one line ``PROG: error: MESSAGE``, with no traceback:
:class:`UsageError` (every CLI, exit code 2), :class:`TrainingDiverged` and :class:`StepOutOfMemory`
(``train``, exit code 1).
They live down here, below the trainer, the run folder and the settings that raise them, so that
raising one never means importing a CLI.
"""

from __future__ import annotations

import torch

from . import distributed


class UsageError(Exception):
    """A problem with what the user asked for; ``str(e)`` is the one-line message (exit code 2)."""


class TrainingDiverged(Exception):
    """Losses became non-finite; nothing non-finite was checkpointed (exit code 1)."""


class StepOutOfMemory(Exception):
    """The device ran out of memory in a training step; the checkpoints already written are intact
    (exit code 1). ``str(e)`` names the phase and the ``--batch`` that continues with less."""


#: What PyTorch raises when an allocation fails on the device (``torch.cuda.OutOfMemoryError`` is
#: the same class; ``torch.OutOfMemoryError`` from torch 2.5 on).
DEVICE_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def resolve_device(name: str, world: distributed.World = distributed.SINGLE) -> torch.device:
    """``--device`` for this rank (``cuda:LOCAL_RANK`` under torchrun)."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    try:
        return distributed.device_for(world, name)
    except distributed.DistributedError as e:
        raise UsageError(str(e)) from None
