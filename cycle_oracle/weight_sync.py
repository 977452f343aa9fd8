"""Is the served policy the learner's? The weight-sync check: after a sync, every rollout actor
samples a fixed probe and the learner scores the same tokens; their log-probs must agree.

    error_s = statistic s of |log pi_learner(x_t) - log pi_served(x_t)| over the probe's tokens,
              s in (mean, p99), the worst over the rollout actors

The learner and the engine run different kernels, so they never agree exactly. `SyncCheck` judges
the first check by per-dtype ceilings (`SYNC_TOLERANCE`, or `grpo.sync_tolerance`) and takes its
errors as the run's kernel-noise floor (both sides hold the same weights then); every later check
passes while
    error_s <= min(ceiling_s, SYNC_NOISE_MULTIPLE * max(floor_s, SYNC_NOISE_MIN)).
Pure logic, no Ray: the rollout group (`actors/rollout.py`) runs the probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SYNC_TOLERANCE = {"float32": {"mean": 1e-3, "p99": 5e-3}, "bfloat16": {"mean": 0.1, "p99": 0.5}, "float16": {"mean": 0.1, "p99": 0.5}}
"""The ceilings of the weight-sync check: the largest mean and 99th percentile of
|log pi_learner - log pi_served| over the sync probe's tokens that any sync may show, per model
dtype (the learner and the engine run different kernels): about twice the largest values measured
on the CPU with SmolLM2 (docs/BENCHMARKS.md, "Weight-sync mismatch"; float16 is unmeasured and
borrows bfloat16's). `grpo.sync_tolerance` replaces them. The first check is judged by them alone;
later ones by `SyncCheck`'s multiple of the noise floor that first check measured, under them."""
SYNC_NOISE_MULTIPLE = 10.0
"""After the first check, a sync passes while its mean and p99 stay within this multiple of the
kernel-noise floor the first check measured (and within `SYNC_TOLERANCE`). Measured across the
syncs of one CPU run the noise moved by up to 1.7x (p99, bf16); a sync that serves another adapter
moves the log-probs by far more than 10x the noise."""
SYNC_NOISE_MIN = 1e-6
"""The smallest noise floor counted (kernels that agree to rounding would otherwise allow nothing)."""
SYNC_PROBE = {"activations": 4, "tokens": 16}
"""The probe: the first `activations` rows of the activation store, `tokens` tokens sampled from each
(seeds `PROBE_SEED` + i, the recipe's temperature)."""
PROBE_SEED = 12345


class SyncCheck:
    """The weight-sync check's bounds, calibrated on the run's own kernels (module docstring).

    At the first check the learner and the engine hold the same weights, so their mismatch is the
    kernel noise floor of this model, dtype, hardware and probe (on a GPU it can be far below the
    CPU-measured ceilings, which in bf16 pass any sync that moves the served log-probs by less than
    0.1 per token on average). Each check logs the floor (`sync_noise_floor_*`) and the bounds it was
    judged by (`sync_bound_*`)."""

    STATS = ("mean", "p99")

    def __init__(self, ceiling: dict[str, float], multiple: float = SYNC_NOISE_MULTIPLE):
        self.ceiling = dict(ceiling)
        self.multiple = multiple
        self.floor: dict[str, float] | None = None

    def bounds(self) -> dict[str, float]:
        """The bounds the next check is judged by."""
        if self.floor is None:
            return dict(self.ceiling)
        return {s: min(self.ceiling[s], self.multiple * max(self.floor[s], SYNC_NOISE_MIN)) for s in self.STATS}

    def judge(self, error: dict[str, float], what: str) -> dict[str, float]:
        """Check one sync's worst error ({mean, p99, max, tokens}); the first passing check sets the
        floor. Raises naming each statistic over its bound -> the floor and bound metrics."""
        bounds = self.bounds()
        bad = {s: error[s] for s in self.STATS if error[s] > bounds[s]}
        if bad:
            if self.floor is None:
                why = "the ceilings (first check: grpo.sync_tolerance sets other ones)"
            else:
                why = (f"{self.multiple:g} x the kernel-noise floor measured at the first check (mean {self.floor['mean']:.2e}, "
                       f"p99 {self.floor['p99']:.2e}), at most the ceilings {self.ceiling}")
            raise RuntimeError(f"{what} failed verification: served logprobs differ from the learner's by "
                               + ", ".join(f"{s} {v:.2e} > {bounds[s]:.2e}" for s, v in bad.items())
                               + f" over {error.get('tokens', 0):.0f} probe tokens; the bounds are {why}")
        if self.floor is None:
            self.floor = {s: float(error[s]) for s in self.STATS}
        return {"sync_noise_floor_mean": self.floor["mean"], "sync_noise_floor_p99": self.floor["p99"],
                "sync_bound_mean": bounds["mean"], "sync_bound_p99": bounds["p99"]}


def policy_changed(before: tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]] | None,
                   token_ids: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]]) -> float:
    """1.0 when the served log-probs moved since the previous probe `before` (token ids, log-probs):
    any probe sample whose tokens repeat must show other log-probs; 1.0 when nothing repeats or
    there was no previous probe, 0.0 when every repeated sample kept its log-probs (the sync served
    nothing new)."""
    if before is None:
        return 1.0
    old_tokens, old_lp = before
    same = [i for i in range(len(token_ids)) if old_tokens[i] == token_ids[i]]
    if not same:
        return 1.0
    return float(any(not torch.allclose(torch.tensor(old_lp[i]), torch.tensor(logprobs[i]), atol=1e-6) for i in same))
