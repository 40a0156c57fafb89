"""``config.validate``: the one check of every setting's value, with the message the CLI prints."""

from pathlib import Path

import pytest

from progan_fast.cli import UsageError
from progan_fast.config import PRESETS, RunOptions, TrainConfig, validate


def options(**changes) -> RunOptions:
    return RunOptions(out=Path("unused"), **changes)


def test_the_defaults_and_both_presets_are_valid():
    validate(TrainConfig(), options())
    for preset in PRESETS.values():
        validate(TrainConfig(**preset), options())


@pytest.mark.parametrize("changes, message", [
    (dict(max_res=48), "--max-res 48 is not supported"),
    (dict(loss="hinge"), "--loss must be one of"),
    (dict(batch=0), "--batch must be at least 1, not 0"),
    (dict(kimg_per_phase=0.0), "--kimg-per-phase must be a positive number"),
    (dict(kimg_per_phase=float("inf")), "--kimg-per-phase must be a positive number"),
    (dict(fmap_max=0), "--fmap-max must be at least 1, not 0"),
    (dict(mbstd_group_size=0), "--mbstd-group-size must be at least 1, not 0"),
    (dict(lr=1.5), "--lr must be in (0, 1), not 1.5"),
])
def test_a_bad_run_setting_is_refused_by_name(changes, message):
    with pytest.raises(UsageError) as e:
        validate(TrainConfig(**changes), options())
    assert message in str(e.value)


@pytest.mark.parametrize("changes, message", [
    (dict(log_kimg=0.0), "--log-kimg must be positive"),
    (dict(sample_kimg=-1.0), "--sample-kimg must be positive"),
    (dict(checkpoint_kimg=0.0), "--checkpoint-kimg must be positive"),
    (dict(swd_kimg=0.0), "--swd-kimg must be positive"),
    (dict(swd_images=1), "--swd-images must be at least 2, not 1"),
    (dict(keep_checkpoints=0), "--keep-checkpoints must be at least 1"),
    (dict(amp="fp8"), "--amp-dtype must be one of bf16, fp16, not 'fp8'"),
    (dict(profile_steps=0), "--profile must be at least 1 step, not 0"),
    (dict(max_skipped_steps=0), "--max-skipped-steps must be at least 1, not 0"),
])
def test_a_bad_option_is_refused_by_name(changes, message):
    with pytest.raises(UsageError) as e:
        validate(TrainConfig(), options(**changes))
    assert message in str(e.value)
