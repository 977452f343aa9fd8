"""One metrics logger for every recipe: `metrics.jsonl` in the run folder and wandb (offline by
default, disabled when WANDB_MODE=disabled as in tests), with the same names in both.

A record is {"stage": "warmup" | "grpo" | "encoder_warmstart" | "eval", "step": int, <name>: value}; in
wandb the key is "<stage>/<name>". Names used across the project:
  loss, loss/<task>, lr, tokens_per_s, examples_seen                         (warmup)
  reward_mean, reward_std, cosine, centred_cosine, fve, kl, entropy, clip_fraction,
  importance_weight_mean, importance_weight_max, importance_capped_fraction, logp_mismatch,
  description_tokens, truncation_rate, distinct_1, distinct_2, same_start_share,
  zero_spread_fraction, encoder_loss, weight_version, time_rollout, time_score, time_learn,
  time_sync, time_idle, time_step                                            (grpo)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: str | Path, logging_settings, config: dict, run_name: str | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self._wandb = None
        mode = os.environ.get("WANDB_MODE") or logging_settings.wandb_mode
        if mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(
                    project=logging_settings.wandb_project, mode=mode, dir=str(out_dir), config=config,
                    name=run_name or Path(out_dir).name, reinit="finish_previous",
                )
            except Exception as err:  # logging must never kill a run
                print(f"[metrics] wandb disabled: {type(err).__name__}: {err}")

    def log(self, stage: str, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"stage": stage, "step": step, **clean}, default=str) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)})

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
