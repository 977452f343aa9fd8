"""The main job's ETA (`kind: warmup_then_grpo`): a rough cost model of its stages, in units of
the measured warmup step so that a faster or slower machine scales every stage with it, and the
few `[job]` lines the driver prints from it (recipes/warmup_then_grpo.py).

The constants are measured on the 2-core CPU reference: the main job (recipes/warmup_then_grpo.yaml)
from a fresh clone on a quiet 2-core machine, 33.4 min in all (docs/RESULTS.md, "The main job from
a fresh clone"; docs/measurements/main_job_fresh_2026-12-02.json), where a warmup step took ~4.3 s:

    stage                                               measured        model, in warmup steps
    warmup data build (one-off; skipped when cached)    299 s           DATA_BUILD_STEPS = 70
    set-up before the first warmup step (the rest)      ~1.8 min        SETUP_STEPS = 25
    150 warmup steps                                    ~4.3 s each     1 each
    held-out eval (64 items) + encoder warm start (40)  ~8 min          40 + 0.6 an item + 0.8 an encoder step
    GRPO set-up + 8 steps                               ~3 min          6 + 4.5 a step (16-34 s each)
    final evals (text encoder 60 steps, pool 120)       ~4.4 min        0.8 an encoder step + 0.1 a pool item
    viewer + report                                     0.5 min         7

Together 464 steps: 33.3 min at 4.3 s (28.3 min with the data cached). How the eval minutes split
between items, encoder steps and a fixed part is a guess, checked only against the longer CPU
recipe (200 items + 100 encoder steps: 13-16 min at 3.2-4 s a step; the model says 13-16). All of it is rough: machine
load moves a stage by tens of percent, `eval.pool_size` is an upper bound of the pool, and on a
GPU the ratios between stages differ (treat the ETA there as an order of magnitude).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cycle_oracle.devices import matmul_rate
from cycle_oracle.files import atomic_write_text
from cycle_oracle.injection import description_prompt, reference_prompt
from cycle_oracle.models import load_tokenizer, resolve_layer, resolve_model_path

DATA_BUILD_STEPS = 70.0
SETUP_STEPS = 25.0
WARMUP_EVAL_FIXED_STEPS = 40.0
EVAL_ITEM_STEPS = 0.6
ENCODER_STEP_STEPS = 0.8
GRPO_SETUP_STEPS = 6.0
GRPO_STEP_STEPS = 4.5
POOL_ITEM_STEPS = 0.1
REPORT_STEPS = 7.0

STAGES = ("data_build", "setup", "warmup_steps", "warmup_evals", "grpo", "final_evals", "report")
"""The job's stages in the order they run."""


@dataclass(frozen=True)
class JobPlan:
    """What the job will do: the config numbers the cost model reads."""

    warmup_steps: int
    eval_items: int
    encoder_steps: int
    grpo_steps: int
    text_encoder_steps: int
    pool_size: int
    grpo_max_minutes: float | None = None
    warmup_max_minutes: float | None = None

    @classmethod
    def from_config(cls, cfg) -> JobPlan:
        return cls(warmup_steps=cfg.warmup.steps, eval_items=cfg.warmup.eval_items, encoder_steps=cfg.warmup.encoder_steps,
                   grpo_steps=cfg.grpo.steps, text_encoder_steps=cfg.eval.text_encoder_steps, pool_size=cfg.eval.pool_size,
                   grpo_max_minutes=cfg.grpo.max_minutes, warmup_max_minutes=cfg.warmup.max_minutes)


@dataclass(frozen=True)
class JobEstimate:
    """Estimated seconds of each stage (`STAGES`), for a warmup step of `step_s` seconds."""

    seconds: dict[str, float]
    step_s: float

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def seconds_left(self, after: str) -> float:
        """Seconds of the stages that run after stage `after`."""
        return sum(self.seconds[s] for s in STAGES[STAGES.index(after) + 1:])

    def seconds_left_in_warmup(self, steps_done: int) -> float:
        """Seconds left when `steps_done` warmup steps are done (the warmup's budget, if any, included)."""
        return max(0.0, self.seconds["warmup_steps"] - steps_done * self.step_s) + self.seconds_left("warmup_steps")


def estimate(plan: JobPlan, step_s: float, data_cached: bool) -> JobEstimate:
    """The cost model: every stage of `plan` in seconds, for a measured warmup step of `step_s`
    seconds; the data build counts only when its cache is missing (`data_cached=False`)."""
    grpo_s = (GRPO_SETUP_STEPS + GRPO_STEP_STEPS * plan.grpo_steps) * step_s
    if plan.grpo_max_minutes is not None:  # the loop stops after the step that passes the budget
        grpo_s = min(grpo_s, GRPO_SETUP_STEPS * step_s + 60 * plan.grpo_max_minutes)
    steps = {
        "data_build": 0.0 if data_cached else DATA_BUILD_STEPS,
        "setup": SETUP_STEPS,
        "warmup_steps": float(plan.warmup_steps),
        "warmup_evals": WARMUP_EVAL_FIXED_STEPS + EVAL_ITEM_STEPS * plan.eval_items + ENCODER_STEP_STEPS * plan.encoder_steps,
        "final_evals": ENCODER_STEP_STEPS * plan.text_encoder_steps + POOL_ITEM_STEPS * plan.pool_size,
        "report": REPORT_STEPS,
    }
    seconds = {s: grpo_s if s == "grpo" else steps[s] * step_s for s in STAGES}
    if plan.warmup_max_minutes is not None:  # likewise the warmup loop
        seconds["warmup_steps"] = min(seconds["warmup_steps"], 60 * plan.warmup_max_minutes + step_s)
    return JobEstimate(seconds, step_s)


def minutes(seconds: float) -> str:
    """'33' (10 min and more), '8.2', '0.5'."""
    m = seconds / 60
    return f"{m:.0f}" if m >= 10 else f"{m:.1f}"


def eta_line(total_s: float, left_s: float, steps: int, step_s: float, now: float) -> str:
    """The one ETA line, printed after the first `steps` warmup steps (`now`: time.time())."""
    finish = time.strftime("%H:%M", time.localtime(now + left_s))
    return (f"[job] ETA: about {minutes(total_s)} min for the whole job (finish near {finish}), "
            f"from the first {steps} warmup steps at {step_s:.1f} s each")


def left_note(left_s: float | None) -> str:
    """' (about X min left)' for the end of a `[job]` line, '' without an estimate."""
    return "" if left_s is None else f" (about {minutes(left_s)} min left)"


class JobClock:
    """The driver's ETA and the job's minutes account: the job's start, the step times it is told
    (explicit calls from the recipes' optional callbacks) and the estimates printed from them. The
    warmup step time is the median of this process's warmup steps; when the warmup was reused, GRPO's
    median step (the time between `on_step_end` calls) over GRPO_STEP_STEPS stands in for it; before
    either, no estimate. `stage_end` laps the job into contiguous stages (each from the previous
    stage's end to now, so they add up to the job's wall time), written to `<out>/minutes.json` by
    `write_minutes` (rendered by `python -m bench.minutes`)."""

    def __init__(self, plan: JobPlan, start: float, first_steps: int = 5):
        self.plan, self.start, self.first_steps = plan, start, first_steps
        self.warmup_times: list[float] = []
        self.grpo_ends: list[float] = []
        self.stages: list[dict] = []
        self._lap = start

    def stage_end(self, name: str, **counts) -> None:
        """The recipes' `on_stage`: stage `name` ended now; it ran since the previous stage ended (the
        job's start for the first). `counts`: what it worked on (steps, examples, items, ...)."""
        now = time.time()
        self.stages.append({"stage": name, "start_s": round(self._lap - self.start, 2), "seconds": round(now - self._lap, 2),
                            "load1": round(os.getloadavg()[0], 2), **counts})
        self._lap = now

    def warmup_step(self, step: int, seconds: float) -> None:
        """`warmup.run(on_step_time=...)`: step `step` (1-based) took `seconds`. Prints the ETA line
        once, after this process's first `first_steps` warmup steps (a resumed warmup with fewer
        left prints none)."""
        self.warmup_times.append(seconds)
        if len(self.warmup_times) == self.first_steps:
            now = time.time()
            est = estimate(self.plan, self.step_s(), data_cached=True)  # the data build is behind us
            left = est.seconds_left_in_warmup(step)
            print(eta_line(now - self.start + left, left, self.first_steps, est.step_s, now))

    def grpo_step_end(self, _roles, _step: int) -> None:
        """`grpo.run(on_step_end=...)`: a GRPO step (and its checkpoint) ended now."""
        self.grpo_ends.append(time.time())

    def step_s(self) -> float | None:
        if self.warmup_times:
            return statistics.median(self.warmup_times)
        gaps = [b - a for a, b in zip(self.grpo_ends, self.grpo_ends[1:])]
        return statistics.median(gaps) / GRPO_STEP_STEPS if gaps else None

    def left_note(self, after: str) -> str:
        """' (about X min left)' after stage `after`, '' while no step time is known."""
        step_s = self.step_s()
        return left_note(None if step_s is None else estimate(self.plan, step_s, data_cached=True).seconds_left(after))


MINUTES_SCHEMA = 1
"""Version of `minutes.json` (bench/minutes.py reads it)."""
SETUP_START_ENV = "CYCLE_ORACLE_SETUP_START"
"""scripts/main.sh exports the epoch seconds before it runs scripts/setup.sh, so that the account
starts at the fresh clone (the venv's set-up is then its first stage)."""


def matmul_reference(threads: int, size: int = 2048) -> dict:
    """The machine's dense matmul FLOP/s ([size, size] @ [size, size], the bench's MFU reference) in
    float32 and bfloat16 in this process on the CPU, with `threads` torch threads (the learner's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = {dtype: matmul_rate("cpu", dtype, size, size, size, min_seconds=1.0, max_reps=20) for dtype in ("float32", "bfloat16")}
    finally:
        torch.set_num_threads(before)
    return {"shape": [size, size, size], "threads": threads, "device": "cpu", "load1": round(os.getloadavg()[0], 2), **rates}


def learner_prompt_tokens(cfg) -> dict:
    """Token counts of the prompts the GRPO learner's passes put before each completion: the decoder's
    description prompt and the KL reference's (bench/flops.py counts the learner's FLOPs from them)."""
    path = Path(resolve_model_path(cfg.model.name, weights=False))
    tok = load_tokenizer(path)
    layer = resolve_layer(cfg.model.layer, int(json.loads((path / "config.json").read_text())["num_hidden_layers"]))
    prompt = description_prompt(tok, layer, cfg.injection, cfg.description_instruction)
    return {"prompt": len(prompt.input_ids), "reference_prompt": len(reference_prompt(tok).input_ids), "layer": layer}


def grpo_step_rows(run_dir: Path) -> list[dict]:
    """The GRPO run's per-step rows of metrics.jsonl (the last row of each step: redone steps replace theirs)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("stage") == "grpo":
                rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def write_minutes(clock: JobClock, cfg, out: Path, end: float | None = None) -> Path:
    """`<out>/minutes.json`: the job's stages (`JobClock.stage_end`), the set-up before this process
    (scripts/main.sh's SETUP_START_ENV, and the interpreter's start), the warmup's step times, the GRPO
    steps' times and completion lengths (from grpo/metrics.jsonl), what the learner's FLOPs depend
    on (the model's shape, LoRA rank, prompt lengths, dtype) and the machine's matmul rate measured
    now, after the job (on the CPU only: a GPU learner's rate is not measured by the driver)."""
    import psutil  # psutil: only the minutes account needs it

    end = time.time() if end is None else end
    out = Path(out)
    before: list[dict] = []
    created = psutil.Process().create_time()
    setup = os.environ.get(SETUP_START_ENV)
    if setup and float(setup) < created:
        before.append({"stage": "setup/venv (scripts/setup.sh)", "start_s": round(float(setup) - clock.start, 2),
                       "seconds": round(created - float(setup), 2)})
    before.append({"stage": "setup/interpreter_and_recipe", "start_s": round(created - clock.start, 2), "seconds": round(clock.start - created, 2)})
    model_config = json.loads((Path(resolve_model_path(cfg.model.name, weights=False)) / "config.json").read_text())
    g = cfg.grpo
    dtype = cfg.model.dtype
    warm_cfg = out / "warmup" / "config.yaml"
    if dtype == "auto" and warm_cfg.is_file():  # what the warmup resolved it to

        dtype = (yaml.safe_load(warm_cfg.read_text()) or {}).get("model", {}).get("dtype", dtype)
    probe = out / "warmup" / "dtype_probe.json"
    learner = cfg.resources.learner
    data = {
        "schema": MINUTES_SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(clock.start)),
        "wall_s": round(end - clock.start, 2), "stages": before + clock.stages,
        "model": {"name": cfg.model.name, "config": model_config, "dtype": dtype, "decoder_lora_r": cfg.decoder_lora.r,
                  "decoder_lora_targets": cfg.decoder_lora.target_modules},
        "warmup": {"step_seconds": [round(x, 3) for x in clock.warmup_times], "micro_batch_size": cfg.decoder_optim.micro_batch_size,
                   "grad_accum": cfg.decoder_optim.grad_accum, "ranks": learner.num_actors},
        "grpo": {"steps": [{k: r.get(k) for k in ("step", "time_step", "time_rollout", "time_score", "time_learn", "time_sync",
                                                    "time_sync_check", "time_idle", "description_tokens")} for r in grpo_step_rows(out / "grpo")],
                 "samples_per_step": g.batch_activations * g.samples_per_activation,
                 "kl_reference": g.kl_reference if g.kl_coef > 0 and g.kl_placement == "loss" else None,
                 "prompt_tokens": learner_prompt_tokens(cfg)},
        "dtype_probe": json.loads(probe.read_text()) if probe.is_file() else None,
        "matmul_reference": matmul_reference(learner.threads) if not learner.num_gpus else None,
    }
    path = out / "minutes.json"
    atomic_write_text(path, json.dumps(data, indent=1))
    return path
