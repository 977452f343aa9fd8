"""The main job's ETA (`recipes/eta.py`): what the pure cost model does (the plan it reads from a
recipe, its stages, its scaling) and the lines the driver prints. Its constants are measurements
(the module docstring), so the tests derive expectations from them rather than pinning a reference
run's minutes, which the docs update as the job changes."""

import dataclasses
import re
import time
from pathlib import Path

import pytest

from cycle_oracle.config import load_recipe
from recipes.eta import DATA_BUILD_STEPS, GRPO_STEP_STEPS, REPORT_STEPS, STAGES, JobClock, JobPlan, estimate, eta_line, left_note, minutes

REPO = Path(__file__).resolve().parents[1]
REFERENCE_STEP_S = 4.3


@pytest.fixture(scope="module")
def plan() -> JobPlan:
    """The main recipe's plan without its warmup budget (tests of the budget set their own)."""
    return dataclasses.replace(JobPlan.from_config(load_recipe(REPO / "recipes" / "warmup_then_grpo.yaml")), warmup_max_minutes=None)


def test_the_plan_reads_the_recipe():
    """Each number of the plan is the recipe's (another recipe, another plan)."""
    cfg = load_recipe(REPO / "recipes" / "warmup_then_grpo.yaml", ["warmup.steps=7", "warmup.eval_items=5", "warmup.encoder_steps=3",
                                                                  "grpo.steps=2", "eval.text_encoder_steps=4", "eval.pool_size=9", "grpo.max_minutes=1.5",
                                                                  "warmup.max_minutes=2.5"])
    assert JobPlan.from_config(cfg) == JobPlan(warmup_steps=7, eval_items=5, encoder_steps=3, grpo_steps=2, text_encoder_steps=4,
                                               pool_size=9, grpo_max_minutes=1.5, warmup_max_minutes=2.5)


def test_the_estimate_covers_every_stage_in_order(plan):
    """Every stage has its seconds, the stages add up to the total, and the time left after a stage
    is what the later ones take (the warmup steps count one warmup step each)."""
    est = estimate(plan, REFERENCE_STEP_S, data_cached=False)
    assert list(est.seconds) == list(STAGES) and all(v > 0 for v in est.seconds.values())
    assert est.total_s == pytest.approx(sum(est.seconds.values()))
    assert est.seconds["warmup_steps"] == pytest.approx(plan.warmup_steps * REFERENCE_STEP_S)
    assert est.seconds["data_build"] == pytest.approx(DATA_BUILD_STEPS * REFERENCE_STEP_S)
    for i, stage in enumerate(STAGES):
        assert est.seconds_left(stage) == pytest.approx(sum(est.seconds[s] for s in STAGES[i + 1:]))


def test_every_stage_scales_with_the_measured_step_time(plan):
    slow, fast = estimate(plan, 2 * REFERENCE_STEP_S, data_cached=False), estimate(plan, REFERENCE_STEP_S, data_cached=False)
    assert slow.total_s == pytest.approx(2 * fast.total_s)
    assert all(slow.seconds[s] == pytest.approx(2 * fast.seconds[s]) for s in STAGES)


@pytest.mark.parametrize("field", ["warmup_steps", "eval_items", "encoder_steps", "grpo_steps", "text_encoder_steps", "pool_size"])
def test_fewer_steps_or_items_take_less_time(plan, field):
    smaller = dataclasses.replace(plan, **{field: getattr(plan, field) // 2})
    assert estimate(smaller, REFERENCE_STEP_S, True).total_s < estimate(plan, REFERENCE_STEP_S, True).total_s


def test_the_data_build_counts_only_when_not_cached(plan):
    built, cached = estimate(plan, REFERENCE_STEP_S, data_cached=False), estimate(plan, REFERENCE_STEP_S, data_cached=True)
    assert cached.seconds["data_build"] == 0
    assert built.total_s - cached.total_s == pytest.approx(DATA_BUILD_STEPS * REFERENCE_STEP_S)
    assert built.seconds_left("data_build") == cached.seconds_left("data_build")  # later stages do not depend on it


def test_grpo_max_minutes_caps_the_grpo_stage(plan):
    long = dataclasses.replace(plan, grpo_steps=1000, grpo_max_minutes=None)  # the main recipe has its own cap
    capped = dataclasses.replace(long, grpo_max_minutes=10)
    assert estimate(capped, REFERENCE_STEP_S, True).seconds["grpo"] < 11 * 60 < estimate(long, REFERENCE_STEP_S, True).seconds["grpo"]


def test_seconds_left(plan):
    est = estimate(plan, REFERENCE_STEP_S, data_cached=False)
    assert est.seconds_left("report") == 0
    assert est.seconds_left("final_evals") == pytest.approx(REPORT_STEPS * REFERENCE_STEP_S)
    assert est.seconds_left("data_build") == pytest.approx(est.total_s - est.seconds["data_build"])
    after_five = est.seconds_left_in_warmup(5)
    assert after_five == pytest.approx(est.seconds_left("warmup_steps") + (plan.warmup_steps - 5) * REFERENCE_STEP_S)
    assert est.seconds_left_in_warmup(plan.warmup_steps) == est.seconds_left("warmup_steps")


def test_warmup_max_minutes_caps_the_warmup_steps(plan):
    """A warmup budget shorter than its steps bounds the stage (and the time left in it) at the budget
    plus the step that passes it; a budget the steps fit in changes nothing."""
    capped = estimate(dataclasses.replace(plan, warmup_steps=1000, warmup_max_minutes=10), REFERENCE_STEP_S, True)
    assert capped.seconds["warmup_steps"] == pytest.approx(600 + REFERENCE_STEP_S)
    assert capped.seconds_left_in_warmup(5) == pytest.approx(capped.seconds_left("warmup_steps") + 600 + REFERENCE_STEP_S - 5 * REFERENCE_STEP_S)
    roomy = dataclasses.replace(plan, warmup_max_minutes=10 + plan.warmup_steps * REFERENCE_STEP_S / 60)
    assert estimate(roomy, REFERENCE_STEP_S, True).seconds == estimate(plan, REFERENCE_STEP_S, True).seconds


def test_the_printed_phrases():
    now = time.mktime((2026, 12, 2, 14, 0, 0, 0, 0, -1))
    assert eta_line(33.4 * 60, 31 * 60, 5, 4.26, now) == \
        "[job] ETA: about 33 min for the whole job (finish near 14:31), from the first 5 warmup steps at 4.3 s each"
    assert minutes(30) == "0.5" and minutes(8.24 * 60) == "8.2" and minutes(12.6 * 60) == "13"
    assert left_note(30) == " (about 0.5 min left)" and left_note(None) == ""


def test_the_clock_prints_one_eta_line_after_the_first_steps(plan, capsys):
    clock = JobClock(plan, start=time.time() - 400, first_steps=5)  # 400 s: data build + set-up
    assert clock.left_note("warmup_evals") == ""  # nothing measured yet (a reused warmup, before GRPO)
    for step in range(1, 11):
        clock.warmup_step(step, 9.0 if step == 1 else 4.3)  # a slow first step does not move the median
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    expected = estimate(plan, 4.3, data_cached=True)  # 400 s behind us, then the model's time left after 5 steps
    total = minutes(400 + expected.seconds_left_in_warmup(5))
    assert re.fullmatch(rf"\[job\] ETA: about {re.escape(total)} min for the whole job \(finish near \d\d:\d\d\), "
                        r"from the first 5 warmup steps at 4\.3 s each", lines[0]), lines[0]
    assert clock.left_note("final_evals") == " (about 0.5 min left)"
    left = estimate(plan, 4.3, True).seconds_left("warmup_evals")
    assert clock.left_note("warmup_evals") == f" (about {minutes(left)} min left)"


def test_a_reused_warmup_takes_the_step_time_from_grpo(plan):
    clock = JobClock(plan, start=0.0)
    clock.grpo_step_end(None, 1)
    assert clock.step_s() is None  # one step end: no step time yet
    clock.grpo_ends = [100.0, 120.0, 138.0, 160.0]  # steps of 20, 18 and 22 s
    assert clock.step_s() == pytest.approx(20 / GRPO_STEP_STEPS)
