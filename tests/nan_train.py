"""``progan_fast.train`` with D's output made NaN on chosen training steps (a test helper).

In-process: ``poison(steps)`` patches the classes until the returned undo is called. Under
torchrun: ``torchrun ... tests/nan_train.py TRAIN_ARGS`` with ``NAN_STEPS=3,4`` (steps of this
invocation, from 0) and optionally ``NAN_RANK=1`` (poison only that rank).
"""

from __future__ import annotations

import os
import sys

import torch

from progan_fast import step as stepmod
from progan_fast.networks import Discriminator


def poison(steps: set[int] | None, rank_only: int | None = None):
    """Make every D output NaN during the listed steps (``None``: every step from the first)."""
    original_call, original_forward = stepmod.Iteration.__call__, Discriminator.forward
    state = {"step": -1, "on": False}
    this_rank = int(os.environ.get("RANK", "0"))

    def call(self):
        state["step"] += 1
        state["on"] = (steps is None or state["step"] in steps) and rank_only in (None, this_rank)
        try:
            return original_call(self)
        finally:
            state["on"] = False

    def forward(self, img, res, alpha=None):
        out = original_forward(self, img, res, alpha)
        return out * float("nan") if state["on"] else out

    stepmod.Iteration.__call__, Discriminator.forward = call, forward

    def undo():
        stepmod.Iteration.__call__, Discriminator.forward = original_call, original_forward

    return undo


if __name__ == "__main__":
    from progan_fast import train

    steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
    rank_only = int(os.environ["NAN_RANK"]) if "NAN_RANK" in os.environ else None
    poison(steps, rank_only)
    torch.set_num_threads(1)
    sys.exit(train.main(sys.argv[1:]))
