"""The progressive-growing schedule: which resolution, phase, alpha, batch and learning rate at every step.

Resolutions go 4, 8, ..., ``max_res``. Every resolution above 4 starts with a *fade* phase
(alpha rises linearly from 0 to 1 while the new layers blend in) followed by a *stabilize*
phase; 4x4 has only a stabilize phase. Each phase shows ``kimg_per_phase * 1000`` images
(rounded up to whole batches), except that with ``total_kimg`` the final phase (the stabilize
phase at ``max_res``) shows every image left until ``total_kimg`` in total, as the official code's
``train.total_kimg`` does (its TrainingSchedule keeps the last resolution once the last fade is
over). Without it the schedule ends one stabilize phase after the last fade.

Batch and learning rate are per resolution (a fade phase uses its new resolution's, as the official
TrainingSchedule does): a table ``{res: value}``. :data:`OFFICIAL_V2` holds the official code's
tables per number of GPUs; :func:`official_tables` picks one for a number of ranks.

The position is ``(phase index, step in phase)``: a pure function of the configuration, so a
resumed run continues exactly, and a run grown to a larger ``max_res`` (without ``total_kimg``)
simply has more phases after the ones it finished.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

RESOLUTIONS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: The official code's config presets "preset-v2-1gpu", "-2gpus", "-4gpus", "-8gpus" (config.py of
#: tkarras/progressive_growing_of_gans): the global minibatch (``sched.minibatch_base``, overridden per
#: resolution by ``sched.minibatch_dict``) and the learning rate (base 0.001, overridden by
#: ``sched.G_lrate_dict``; ``D_lrate_dict`` is a copy of it in every preset), per number of GPUs.
#: Every v2 preset has ``train.total_kimg = 12000`` and the default 600 kimg phases. The fp32
#: ``max_minibatch_per_gpu = {256: 16, 512: 8, 1024: 4}`` never lowers these tables' batches.
OFFICIAL_V2 = {
    1: dict(minibatch_base=4, minibatch_dict={4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4},
            lrate_dict={1024: 0.0015}),
    2: dict(minibatch_base=8, minibatch_dict={4: 256, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8},
            lrate_dict={512: 0.0015, 1024: 0.002}),
    4: dict(minibatch_base=16, minibatch_dict={4: 512, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16},
            lrate_dict={256: 0.0015, 512: 0.002, 1024: 0.003}),
    8: dict(minibatch_base=32, minibatch_dict={4: 512, 8: 256, 16: 128, 32: 64, 64: 32},
            lrate_dict={128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003}),
}
OFFICIAL_LRATE_BASE = 0.001
OFFICIAL_TOTAL_KIMG = 12000.0

#: Batch per resolution of the official single-GPU preset (kept for the benchmark and old configs).
PAPER_BATCH = {r: OFFICIAL_V2[1]["minibatch_dict"].get(r, OFFICIAL_V2[1]["minibatch_base"]) for r in RESOLUTIONS}


def official_gpus(ranks: int) -> int:
    """The official preset used for ``ranks`` processes: the largest of 1, 2, 4, 8 GPUs not above it."""
    return max(g for g in OFFICIAL_V2 if g <= max(ranks, 1))


def official_tables(ranks: int) -> tuple[dict[int, int], dict[int, float]]:
    """``(batch table, learning-rate table)`` of the official preset for ``ranks`` processes.

    For 1, 2, 4 or 8 ranks that is the preset of as many GPUs. For another count it is the preset of
    :func:`official_gpus` with every batch rounded down to a multiple of ``ranks``, which is what the
    official TrainingSchedule does with any ``num_gpus`` (``minibatch -= minibatch % num_gpus``).
    """
    preset = OFFICIAL_V2[official_gpus(ranks)]
    batch = {}
    for r in RESOLUTIONS:
        b = preset["minibatch_dict"].get(r, preset["minibatch_base"])
        batch[r] = b - b % ranks if ranks > 1 else b
    lr = {r: preset["lrate_dict"].get(r, OFFICIAL_LRATE_BASE) for r in RESOLUTIONS}
    return batch, lr


@dataclass(frozen=True)
class Phase:
    index: int
    res: int
    fading: bool
    batch: int
    steps: int
    lr: float = 1e-3  # Adam's learning rate, G's and D's, in this phase

    @property
    def name(self) -> str:
        return "fade" if self.fading else "stable"

    def alpha(self, step: int) -> float | None:
        """Fade weight at the start of ``step`` (0 at the first step, reaching 1 at the end);
        None in a stabilize phase."""
        return min(1.0, step / self.steps) if self.fading else None


def _per_res(value, default: Mapping | None, what: str):
    """A per-resolution lookup from a number (every resolution), a table, or None (``default``)."""
    if value is None:
        value = default
    if isinstance(value, Mapping):
        return lambda res: value[res]
    if value is None:
        raise ValueError(f"no {what} given")
    return lambda res: value


def build_schedule(max_res: int, kimg_per_phase: float, batch: int | Mapping[int, int] | None = None,
                   lr: float | Mapping[int, float] = 1e-3, total_kimg: float | None = None) -> list[Phase]:
    """The phases up to ``max_res``. ``batch``: one number, a ``{res: batch}`` table, or None for
    :data:`PAPER_BATCH`; ``lr`` likewise (one number or a table). ``total_kimg``: see the module
    docstring; ValueError if it does not reach past the last fade."""
    batch_at = _per_res(batch, PAPER_BATCH, "batch")
    lr_at = _per_res(lr, None, "learning rate")
    phases: list[Phase] = []
    res = 4
    while res <= max_res:
        b = batch_at(res)
        steps = max(1, math.ceil(kimg_per_phase * 1000 / b))
        for fading in ((False,) if res == 4 else (True, False)):
            phases.append(Phase(len(phases), res, fading, b, steps, lr_at(res)))
        res *= 2
    if total_kimg is not None:
        final = phases[-1]
        left = round(total_kimg * 1000) - images_before(phases, final.index)
        if left <= 0:
            raise ValueError(
                f"--total-kimg {total_kimg:g} ends before the last fade does ({images_before(phases, final.index) / 1000:g} "
                f"kimg at --max-res {max_res} and {kimg_per_phase:g} kimg a phase); pass more, or a smaller --max-res "
                f"or --kimg-per-phase")
        phases[-1] = Phase(final.index, final.res, final.fading, final.batch, math.ceil(left / final.batch), final.lr)
    return phases


def images_before(phases: list[Phase], phase_index: int, step: int = 0) -> int:
    """Images shown before ``step`` of phase ``phase_index``."""
    return sum(p.steps * p.batch for p in phases[:phase_index]) + step * (
        phases[phase_index].batch if phase_index < len(phases) else 0
    )


def describe(phases: list[Phase]) -> str:
    """The schedule in one line per resolution: phase lengths (the final phase's real one), batch, lr."""
    lines = []
    for res in sorted({p.res for p in phases}):
        at = [p for p in phases if p.res == res]
        parts = " + ".join(f"{p.name} {p.steps * p.batch / 1000:g}" for p in at)
        lines.append(f"{res:>4}px: {parts} kimg, batch {at[0].batch}, lr {at[0].lr:g}")
    lines.append(f"total: {images_before(phases, len(phases)) / 1000:g} kimg")
    return "\n".join(lines)
