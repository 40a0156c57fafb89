"""The progressive-growing schedule: which resolution, phase, alpha and batch at every step.

Resolutions go 4, 8, ..., ``max_res``. Every resolution above 4 starts with a *fade* phase
(alpha rises linearly from 0 to 1 while the new layers blend in) followed by a *stabilize*
phase; 4x4 has only a stabilize phase. Each phase shows ``kimg_per_phase * 1000`` images
(rounded up to whole batches). Batch sizes per resolution follow the official code's single-GPU
preset ("preset-v2-1gpu": 128 up to 16x16, then halving; ``--batch`` overrides).

The position is ``(phase index, step in phase)``: a pure function of the configuration, so a
resumed run continues exactly, and a run grown to a larger ``max_res`` simply has more phases
after the ones it finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Batch per resolution of the official ProGAN single-GPU preset (config.py, preset-v2-1gpu).
PAPER_BATCH = {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4, 1024: 4}


@dataclass(frozen=True)
class Phase:
    index: int
    res: int
    fading: bool
    batch: int
    steps: int

    @property
    def name(self) -> str:
        return "fade" if self.fading else "stable"

    def alpha(self, step: int) -> float | None:
        """Fade weight at the start of ``step`` (0 at the first step, reaching 1 at the end);
        None in a stabilize phase."""
        return min(1.0, step / self.steps) if self.fading else None


def build_schedule(max_res: int, kimg_per_phase: float, batch: int | None = None) -> list[Phase]:
    phases: list[Phase] = []
    res = 4
    while res <= max_res:
        b = batch if batch is not None else PAPER_BATCH[res]
        steps = max(1, math.ceil(kimg_per_phase * 1000 / b))
        for fading in ((False,) if res == 4 else (True, False)):
            phases.append(Phase(len(phases), res, fading, b, steps))
        res *= 2
    return phases


def images_before(phases: list[Phase], phase_index: int, step: int = 0) -> int:
    """Images shown before ``step`` of phase ``phase_index``."""
    return sum(p.steps * p.batch for p in phases[:phase_index]) + step * (
        phases[phase_index].batch if phase_index < len(phases) else 0
    )
