"""GRPO maths: group advantages, token log-probs, KL estimators, truncated
importance weights and the clipped policy loss.

Pure torch functions, no model, no Ray. Shapes use:
  B = activations in the batch, K = descriptions sampled per activation (the group),
  N = sequences (usually B * K), T = generated tokens per sequence (padded), V = vocabulary.
A `mask` is [N, T] with 1 (or True) on generated tokens and 0 on padding.

How the pieces fit in one GRPO step:
  rewards [B, K] (cosine between the activation and its reconstruction)
    -> optionally apply_kl_penalty_to_rewards (KL placement "reward")
    -> group_advantages -> advantages [B, K] -> flatten to [N]
  logits of the learner -> token_logprobs -> logp [N, T]
    -> grpo_policy_loss(logp, old_logp, advantages, mask, ...)
       (KL placement "loss" adds kl_coef * kl_estimate per token here)

KL estimators (Schulman, "Approximating KL divergence", 2020), for tokens x sampled
from pi, with logp = log pi(x) and ref_logp = log pi_ref(x):
  k1 = logp - ref_logp
  k2 = 0.5 * (logp - ref_logp)^2
  k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1
Values: E_pi[k1] = E_pi[k3] = KL(pi || pi_ref) exactly; E_pi[k2] equals it only to
second order. k3 is non-negative per token, so it is the one we log.

Which gradient each placement gives (expectation over x ~ pi; in "loss" placement the
sampling is not differentiated, only the estimator's value is):
  k1 as reward penalty (detached, r - kl_coef * k1):
      kl_coef * E_pi[k1 * grad log pi]          = kl_coef * grad KL(pi || pi_ref)   (reverse)
  k2 in the loss:
      E_pi[grad k2] = E_pi[(logp - ref_logp) * grad log pi] = grad KL(pi || pi_ref)   (reverse)
  k3 in the loss:
      E_pi[grad k3] = E_pi[(1 - pi_ref/pi) * grad log pi] = -sum_x pi_ref(x) grad log pi(x)
                    = grad KL(pi_ref || pi)                                           (forward)
  k1 in the loss:
      E_pi[grad k1] = E_pi[grad log pi] = grad sum_x pi(x) = 0   (no KL pull at all)
So the estimator that has the right *value* (k3) is not the one with the right
*gradient* in the loss (k2). Default: k2 in the loss.

For sequences the per-token "loss" placements regularise each next-token distribution
given its (non-differentiated) prefix; they drop the terms by which a token choice
changes the KL of later tokens. The "reward" placement with the sequence sum of k1
keeps those terms (it is the score-function gradient of the sequence-level KL).
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
KLPlacement = Literal["loss", "reward"]

DEFAULT_KL_ESTIMATOR: KLEstimator = "k2"
DEFAULT_KL_PLACEMENT: KLPlacement = "loss"

_KL_ESTIMATORS = ("k1", "k2", "k3")
_KL_PLACEMENTS = ("loss", "reward")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1.

    masked_mean = sum(x * mask) / sum(mask)   (over `dim`, or over everything if None)

    x, mask: same shape (mask bool or 0/1). An all-zero mask gives 0, not NaN.
    """
    mask = mask.to(x.dtype)
    # where() instead of x * mask so non-finite padding values cannot leak into the sum.
    masked_x = torch.where(mask > 0, x, torch.zeros_like(x))
    if dim is None:
        return masked_x.sum() / mask.sum().clamp(min=1.0)
    return masked_x.sum(dim) / mask.sum(dim).clamp(min=1.0)


def unusable_rewards(rewards: torch.Tensor, usable: torch.Tensor, penalty: float | str, margin: float) -> torch.Tensor:
    """Rewards [B, K] with every unusable sample (empty, or a penalised truncation) penalised.

    penalty "group_min": r_bk = min_{j usable} r_bj - margin, below every usable sample of its
      group, so an unusable sample never wins its group; a group with no usable sample gets
      -1 - margin everywhere (all equal: zero advantage).
    penalty c (a number): r_bk = c.
    """
    out = rewards.clone().float()
    if isinstance(penalty, str):
        if penalty != "group_min":
            raise ValueError(f"truncation_penalty {penalty!r}; expected 'group_min' or a number")
        floor = torch.where(usable, out, torch.full_like(out, float("inf"))).min(dim=1, keepdim=True).values
        floor = torch.where(torch.isinf(floor), torch.full_like(floor, -1.0), floor) - margin
        return torch.where(usable, out, floor.expand_as(out))
    return torch.where(usable, out, torch.full_like(out, float(penalty)))


def group_advantages(
    rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, float]:
    """Group-normalised advantages over the K samples of each activation.

    rewards: [B, K] -> advantages: [B, K]
      A_i = (r_i - mean(r)) / (std(r) + eps)     if scale_by_std (GRPO)
      A_i =  r_i - mean(r)                        otherwise (Dr. GRPO: no std division,
                                                  which up-weights low-spread groups)
    mean and std are over the K samples of the same activation; std uses Bessel's
    correction (K - 1), as TRL's GRPOTrainer does.

    A group whose rewards all lie within eps of each other (max - min <= eps) carries
    no signal: its advantages are set to exactly 0 (rather than amplifying noise by a
    tiny std). zero_spread_fraction = share of such groups; it is the share of the
    batch that contributes no policy gradient.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, K], got shape {tuple(rewards.shape)}")
    group_mean = rewards.mean(dim=1, keepdim=True)
    centred = rewards - group_mean
    # K == 1: a lone sample has no spread (std undefined); it is zeroed just below.
    if scale_by_std and rewards.shape[1] > 1:
        group_std = rewards.std(dim=1, keepdim=True)
        advantages = centred / (group_std + eps)
    else:
        advantages = centred
    spread = rewards.max(dim=1, keepdim=True).values - rewards.min(dim=1, keepdim=True).values
    zero_spread = spread <= eps  # [B, 1]
    advantages = torch.where(zero_spread, torch.zeros_like(advantages), advantages)
    zero_spread_fraction = zero_spread.float().mean().item()
    return advantages, zero_spread_fraction


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of the given tokens under the temperature-scaled policy.

    logits: [N, T, V] (already aligned so logits[:, t] predicts token_ids[:, t]),
    token_ids: [N, T] -> [N, T]
      logp[n, t] = log_softmax(logits[n, t] / temperature)[token_ids[n, t]]
    Divide by the same temperature vLLM sampled with, otherwise the learner's log-probs
    describe a different distribution from the one the tokens came from.
    Uses TRL's selective_log_softmax: it gathers without materialising [N, T, V]
    log-probs and, on GPU, applies the temperature inside a fused kernel.
    """
    # Imported here: trl.trainer.utils pulls in transformers/accelerate (~10 s on CPU),
    # and the rest of this module (advantages, KL, loss) needs only torch.
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, token_ids, temperature=temperature)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each next-token distribution under the temperature-scaled policy.

    logits: [N, T, V] -> [N, T]
      H[n, t] = -sum_v p_v * log p_v,   p = softmax(logits[n, t] / temperature)
    Uses TRL's entropy_from_logits (chunked to bound memory).
    """
    from trl.trainer.utils import entropy_from_logits  # lazy: see token_logprobs

    return entropy_from_logits(logits / temperature)


def token_logprobs_and_entropy(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` and `token_entropy` from one read of the logits where the hardware allows.

    logits: [N, T, V], token_ids: [N, T] -> (logp [N, T] with grad, H [N, T] detached)
      logp[n, t] = log p_x,   H[n, t] = -sum_v p_v log p_v,   p = softmax(logits[n, t] / temperature)
    TRL's selective_log_softmax_and_entropy: one fused Triton kernel over the logits on GPU, its
    two-pass torch fallback elsewhere. The entropy is only logged, so it carries no graph.
    """
    from trl.trainer.utils import selective_log_softmax_and_entropy  # lazy: see token_logprobs

    return selective_log_softmax_and_entropy(logits, token_ids, entropy_requires_grad=False, temperature=temperature)


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = DEFAULT_KL_ESTIMATOR
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    logp = log pi(x), ref_logp = log pi_ref(x), any shape (e.g. [N, T]) -> same shape.
      k1 = logp - ref_logp                                    (unbiased, can be negative)
      k2 = 0.5 * (logp - ref_logp)^2                          (biased, >= 0)
      k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1       (unbiased, >= 0)
    Gradients by placement are in the module docstring: k2 in the loss and k1 as a
    (detached) reward penalty give grad KL(pi || pi_ref); k3 in the loss gives
    grad KL(pi_ref || pi); k1 in the loss has zero expected gradient.
    """
    log_ratio = logp - ref_logp  # log pi/pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        # With d = ref_logp - logp: k3 = exp(d) - d - 1 = expm1(d) - d (accurate near d = 0).
        ref_minus_logp = -log_ratio
        return torch.expm1(ref_minus_logp) - ref_minus_logp
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {_KL_ESTIMATORS}")


def truncated_importance_weights(
    learner_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 3.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights correcting the sampler/learner mismatch.

    learner_logp: [N, T] log-probs of the sampled tokens recomputed by the learner with
                  the rollout-time weights ("old" log-probs, no grad needed),
    sampler_logp: [N, T] log-probs vLLM reported when sampling,
    mask: [N, T]  -> weights [N, T] (detached), stats
      w = min(exp(learner_logp - sampler_logp), cap)
    vLLM and the training stack compute slightly different probabilities (kernels,
    precision), so the rollout is off-policy for the learner even at step 0; weighting
    each token's loss by w corrects for it, and the cap bounds the variance (truncated
    importance sampling, Yao et al. 2025). Padding positions get weight 0.

    stats (over mask):
      weight_mean, weight_max, capped_fraction (share of tokens with raw weight > cap),
      logp_mismatch = mean |learner_logp - sampler_logp|.
    """
    with torch.no_grad():
        valid = mask > 0
        log_ratio = (learner_logp - sampler_logp).float()
        raw_weights = torch.exp(log_ratio)
        weights = raw_weights.clamp(max=cap)
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        if valid.any():
            weight_max = weights[valid].max().item()
        else:
            weight_max = 0.0
        stats = {
            "weight_mean": masked_mean(weights, valid).item(),
            "weight_max": weight_max,
            "capped_fraction": masked_mean((raw_weights > cap).float(), valid).item(),
            "logp_mismatch": masked_mean(log_ratio.abs(), valid).item(),
        }
    return weights.detach(), stats


def sequence_kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence k1 KL, detached: logp, ref_logp, mask [N, T] -> [N]
      KL_n = sum_t mask[n, t] * (logp[n, t] - ref_logp[n, t])
    """
    with torch.no_grad():
        k1_per_token = kl_estimate(logp, ref_logp, "k1")
        return torch.where(mask > 0, k1_per_token, torch.zeros_like(k1_per_token)).sum(-1)


def apply_kl_penalty_to_rewards(rewards: torch.Tensor, sequence_kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Sequence rewards minus a detached KL penalty (KL placement "reward").

    rewards: [N] (or any shape with N elements, e.g. [B, K]); sequence_kl: [N] from `sequence_kl_k1`
      r'_n = r_n - kl_coef * KL_n
    The penalty is detached: it acts only through the score-function gradient
    (advantage * grad log pi), which in expectation is kl_coef * grad KL(pi || pi_ref) of
    the whole sequence. Apply before group_advantages; with std scaling the penalty is
    rescaled together with the reward.
    """
    return rewards - kl_coef * sequence_kl.detach().to(rewards.dtype).view_as(rewards)


def grpo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    importance_weights: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = DEFAULT_KL_ESTIMATOR,
    kl_placement: KLPlacement = DEFAULT_KL_PLACEMENT,
    num_tokens_for_mean: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped GRPO loss with token-level aggregation.

    logp: [N, T] current learner log-probs (with grad), old_logp: [N, T] log-probs of the
    policy that produced the rollout (as recomputed by the learner, no grad),
    advantages: [N] (one per sequence, broadcast over its tokens), mask: [N, T].
    Per token:
      ratio = exp(logp - old_logp)
      surrogate = -min(ratio * A, clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)
      per_token = w * surrogate + kl_coef * kl_estimate(logp, ref_logp)   (KL only if
                  kl_placement == "loss"; w = truncated importance weight or 1)
    Aggregation (DAPO's token-level mean): every generated token in the batch has the
    same weight, so long descriptions are not down-weighted per token:
      loss = sum_{n,t} mask * per_token / sum_{n,t} mask
    With gradient accumulation over micro-batches, pass num_tokens_for_mean = the token
    count of the whole batch so the micro-batch losses add up to the batch mean.

    Clip-higher (DAPO): clip_eps_high > clip_eps_low (e.g. 0.28 vs 0.2) lets
    low-probability tokens with positive advantage grow further, against entropy collapse.

    With one epoch and one minibatch per rollout, old_logp == logp.detach(): ratio is 1,
    clipping is inert (clip_fraction 0) and the surrogate's gradient is the plain policy
    gradient -A * grad logp. With kl_placement == "reward" the KL was already applied to
    the rewards and kl_coef is ignored here (KL is still logged if ref_logp is given).

    metrics: policy_loss, clip_fraction (share of tokens where the clipped branch is
    taken, i.e. the token gets no gradient: ratio > 1 + eps_high with A > 0, or
    ratio < 1 - eps_low with A < 0), clip_fraction_low / clip_fraction_high,
    ratio_mean, and kl = mean k3 (the unbiased, non-negative estimator) if ref_logp given.
    """
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; expected one of {_KL_ESTIMATORS}")
    if kl_placement not in _KL_PLACEMENTS:
        raise ValueError(f"unknown KL placement {kl_placement!r}; expected one of {_KL_PLACEMENTS}")
    use_kl_in_loss = kl_placement == "loss" and kl_coef != 0.0
    if use_kl_in_loss and ref_logp is None:
        raise ValueError("kl_coef > 0 with placement 'loss' needs ref_logp")

    valid = mask > 0
    token_advantages = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1]
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    surrogate = -torch.min(ratio * token_advantages, clipped_ratio * token_advantages)
    if importance_weights is not None:
        surrogate = surrogate * importance_weights.detach()
    per_token_loss = surrogate
    if use_kl_in_loss:
        per_token_loss = per_token_loss + kl_coef * kl_estimate(logp, ref_logp, kl_estimator)

    if num_tokens_for_mean is None:
        loss = masked_mean(per_token_loss, valid)
    else:
        loss = torch.where(valid, per_token_loss, torch.zeros_like(per_token_loss)).sum() / num_tokens_for_mean

    with torch.no_grad():
        # Clipping is "active" only where min() picks the clipped branch (zero gradient).
        clipped_high = (ratio > 1.0 + clip_eps_high) & (token_advantages > 0)
        clipped_low = (ratio < 1.0 - clip_eps_low) & (token_advantages < 0)
        clip_fraction_high = masked_mean(clipped_high.float(), valid).item()
        clip_fraction_low = masked_mean(clipped_low.float(), valid).item()
        metrics = {
            "policy_loss": masked_mean(surrogate, valid).item(),
            "clip_fraction": clip_fraction_high + clip_fraction_low,  # disjoint events
            "clip_fraction_high": clip_fraction_high,
            "clip_fraction_low": clip_fraction_low,
            "ratio_mean": masked_mean(ratio, valid).item(),
        }
        if ref_logp is not None:
            metrics["kl"] = masked_mean(kl_estimate(logp, ref_logp, "k3"), valid).item()
    return loss, metrics
