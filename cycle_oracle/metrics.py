"""One metrics logger for every recipe: `metrics.jsonl` in the run folder and wandb (offline by
default, disabled when WANDB_MODE=disabled as in tests), with the same names in both.

A record is {"stage": <stage>, "step": int, <name>: value}; in wandb the key is "<stage>/<name>".
`METRICS` below is every name each stage logs (a `*` stands for a task or eval name); the logger
refuses a name that is not listed, so a renamed metric cannot silently split a curve.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

_RECONSTRUCTION = ("cosine", "centred_cosine", "fve", "mean_baseline_cosine")
_SYNC = ("time_sync", "time_sync_check", "weight_version", "sync_logprob_error", "sync_logprob_error_mean", "sync_logprob_error_p99", "sync_policy_changed",
         "sync_noise_floor_mean", "sync_noise_floor_p99", "sync_bound_mean", "sync_bound_p99")

METRICS: dict[str, tuple[str, ...]] = {
    "warmup": ("loss", "loss/*", "lr", "tokens_per_s", "examples_seen"),
    "warmup_eval": ("*/nll_*", "*/token_accuracy_*", "*/items", "*/sources", "*/ranking_*"),
    "encoder_warmstart": ("encoder_loss",),
    "grpo_setup": _SYNC,
    "grpo": (
        "reward_mean", "reward_std", *_RECONSTRUCTION, "encoder_loss",
        "kl", "entropy", "clip_fraction", "policy_loss", "ratio_mean",
        "importance_weight_mean", "importance_weight_max", "importance_capped_fraction", "logp_mismatch",
        "lr", "description_tokens", "truncation_rate", "zero_spread_fraction", "rollout_versions",
        "distinct_1", "distinct_2", "same_start_share", "copy_rate", "length_excess", "sft_loss",
        "time_rollout", "time_score", "time_learn", "time_idle", "time_step", *_SYNC,
    ),
    "describe": ("num_descriptions", "seconds"),
    "eval": ("retrieval/*", "probes/*", "arithmetic/*", "secrets/*", "oracles/*"),
}
"""stage -> the metric names (fnmatch patterns) it logs: the one list of names in the project."""


def unknown_metrics(stage: str, names) -> list[str]:
    """Names that `METRICS[stage]` does not list (all of them for an unknown stage)."""
    patterns = METRICS.get(stage, ())
    return [n for n in names if not any(fnmatchcase(n, p) for p in patterns)]


class MetricsLogger:
    def __init__(self, out_dir: str | Path, logging_settings, config: dict, run_name: str | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self._wandb = None
        mode = os.environ.get("WANDB_MODE") or logging_settings.wandb_mode
        if mode != "disabled":
            try:
                import wandb  # optional: only a run that logs to wandb

                self._wandb = wandb.init(
                    project=logging_settings.wandb_project, mode=mode, dir=str(out_dir), config=config,
                    name=run_name or Path(out_dir).name, reinit="finish_previous",
                    settings=wandb.Settings(silent=not logging_settings.verbose),  # our one line below instead of wandb's four
                )
                if not logging_settings.verbose:
                    folder = Path(self._wandb.dir).parent
                    print(f"[metrics] wandb {mode} run: " + (f"`wandb sync {folder}` uploads it" if mode == "offline" else str(self._wandb.url)))
            except Exception as err:  # logging must never kill a run
                print(f"[metrics] wandb disabled: {type(err).__name__}: {err}")

    def log(self, stage: str, step: int, metrics: dict) -> None:
        if stage not in METRICS:
            raise ValueError(f"unknown metrics stage {stage!r}; expected one of {sorted(METRICS)} (cycle_oracle/metrics.py)")
        if bad := unknown_metrics(stage, metrics):
            raise ValueError(f"metric name(s) {bad} are not listed for stage {stage!r} in cycle_oracle/metrics.py METRICS")
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"stage": stage, "step": step, **clean}, default=str) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)})

    def rewind(self, stage: str, step: int) -> list[int]:
        """Drop `stage`'s rows after `step` (a resumed or restarted run redoes those steps, so every
        step keeps one row); rewritten atomically. -> the steps dropped."""
        self._file.close()
        rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        keep = [r for r in rows if not (r.get("stage") == stage and r.get("step", 0) > step)]
        dropped = sorted({r["step"] for r in rows if r not in keep})
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        return dropped

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class PhaseTimer:
    """Wall-clock seconds of the named phases of one step (veRL's `marked_timer`):

        timer = PhaseTimer(("rollout", "score", "learn"))
        with timer.phase("learn"):
            ...
        timer.metrics()  # {"time_rollout": s, "time_score": s, "time_learn": s, "time_step": s, "time_idle": s}

    A phase entered twice adds up; a declared phase that never ran reports 0.0. `time_step` is the
    wall time since the timer was made, `time_idle` what of it no phase covers."""

    def __init__(self, phases: Sequence[str] = ()):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {name: 0.0 for name in phases}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def phase_metrics(self) -> dict[str, float]:
        """{"time_<phase>": seconds} of every phase."""
        return {f"time_{name}": s for name, s in self.seconds.items()}

    def metrics(self) -> dict[str, float]:
        """The phases, then `time_step` (since the timer was made) and `time_idle` (outside every phase)."""
        total = time.perf_counter() - self.start
        return {**self.phase_metrics(), "time_step": total, "time_idle": max(0.0, total - sum(self.seconds.values()))}
