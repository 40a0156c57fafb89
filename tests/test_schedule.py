import pytest

from progan_fast.schedule import PAPER_BATCH, build_schedule, images_before


def test_phases_go_from_4px_with_a_fade_before_each_new_resolution():
    phases = build_schedule(32, kimg_per_phase=1.0, batch=10)
    assert [(p.res, p.name) for p in phases] == [
        (4, "stable"), (8, "fade"), (8, "stable"), (16, "fade"), (16, "stable"), (32, "fade"), (32, "stable")]
    assert all(p.steps == 100 and p.batch == 10 for p in phases)
    assert [p.index for p in phases] == list(range(7))


def test_fractional_kimg_rounds_up_to_whole_batches():
    (phase,) = build_schedule(4, kimg_per_phase=0.05, batch=32)
    assert phase.steps == 2


def test_alpha_rises_from_zero_to_one_in_fades_only():
    fade = build_schedule(8, 0.1, 10)[1]
    assert fade.fading and fade.alpha(0) == 0.0 and fade.alpha(5) == 0.5 and fade.alpha(10) == 1.0
    assert build_schedule(8, 0.1, 10)[2].alpha(3) is None


def test_paper_batch_table_is_used_without_override():
    phases = build_schedule(64, 1.0)
    assert {p.res: p.batch for p in phases} == {r: PAPER_BATCH[r] for r in (4, 8, 16, 32, 64)}
    assert PAPER_BATCH[4] == 128 and PAPER_BATCH[64] == 32


def test_images_before_counts_whole_phases_and_steps():
    phases = build_schedule(8, 0.1, 10)
    assert images_before(phases, 0) == 0
    assert images_before(phases, 1, 3) == 100 + 30
    assert images_before(phases, len(phases)) == 300


@pytest.mark.parametrize("max_res", [16, 64])
def test_a_larger_schedule_extends_a_smaller_one(max_res):
    small, big = build_schedule(8, 0.5), build_schedule(max_res, 0.5)
    assert big[: len(small)] == small
