"""Unit tests for cycle_oracle.grpo.

Expected values are computed by hand or from first principles (exact sums over a small
categorical distribution), never by calling the function under test a second way.
"""

import math

import pytest
import torch

from cycle_oracle.grpo import (
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_KL_PLACEMENT,
    apply_kl_penalty_to_rewards,
    sequence_kl_k1,
    group_advantages,
    grpo_policy_loss,
    kl_estimate,
    masked_mean,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
    truncated_importance_weights,
)

F64 = torch.float64


# ---------------------------------------------------------------- group advantages


def test_group_advantages_hand_example():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [0.0, 0.0, 6.0]], dtype=F64)
    advantages, zero_spread_fraction = group_advantages(rewards, scale_by_std=True, eps=0.0)
    # Group 1: mean 2, sample std sqrt((1 + 0 + 1) / 2) = 1.
    # Group 3: mean 2, deviations (-2, -2, 4), sample var (4 + 4 + 16) / 2 = 12.
    s12 = math.sqrt(12.0)
    expected = torch.tensor(
        [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-2 / s12, -2 / s12, 4 / s12]], dtype=F64
    )
    torch.testing.assert_close(advantages, expected)
    assert zero_spread_fraction == pytest.approx(1 / 3)


def test_group_advantages_eps_in_denominator():
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    advantages, _ = group_advantages(rewards, eps=0.5)  # std 1 -> divide by 1.5
    torch.testing.assert_close(advantages, torch.tensor([[-1 / 1.5, 0.0, 1 / 1.5]], dtype=F64))


def test_group_advantages_zero_spread_within_eps_is_exactly_zero_and_counted():
    rewards = torch.tensor(
        [[0.7, 0.7 + 1e-8, 0.7, 0.7 - 1e-8], [0.1, 0.9, 0.1, 0.9], [0.3, 0.3, 0.3, 0.3]],
        dtype=F64,
    )
    advantages, zero_spread_fraction = group_advantages(rewards, eps=1e-6)
    assert torch.equal(advantages[0], torch.zeros(4, dtype=F64))
    assert torch.equal(advantages[2], torch.zeros(4, dtype=F64))
    assert advantages[1].abs().min() > 0.5  # the informative group is untouched
    assert zero_spread_fraction == pytest.approx(2 / 3)


def test_group_advantages_without_std_is_mean_centred_only():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0], [0.4, 0.4, 0.4]], dtype=F64)
    advantages, zero_spread_fraction = group_advantages(rewards, scale_by_std=False)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, -2.0, 4.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(advantages, expected)
    assert zero_spread_fraction == pytest.approx(1 / 3)


def test_group_of_one_sample_has_zero_advantage_not_nan():
    advantages, zero_spread_fraction = group_advantages(torch.tensor([[0.3], [0.8]]))
    assert torch.equal(advantages, torch.zeros(2, 1))
    assert zero_spread_fraction == 1.0


# ---------------------------------------------------------------- log-probs, entropy


def test_token_logprobs_hand_example_with_temperature():
    # p = softmax([0, log 3]) = (1/4, 3/4); at T = 0.5 logits double: p = (1/10, 9/10).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    token = torch.tensor([[1]])
    assert token_logprobs(logits, token, 1.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert token_logprobs(logits, token, 0.5).item() == pytest.approx(math.log(0.9), abs=1e-6)


def test_token_logprobs_matches_gathered_log_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator)
    token_ids = torch.randint(0, 7, (2, 3), generator=generator)
    temperature = 0.7
    expected = torch.log_softmax(logits / temperature, dim=-1)
    expected = expected.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, token_ids, temperature), expected)


def test_token_entropy_with_temperature():
    # Uniform logits: entropy log V at any temperature.
    uniform = torch.zeros(1, 2, 4)
    torch.testing.assert_close(token_entropy(uniform, 0.3), torch.full((1, 2), math.log(4.0)))
    # Two outcomes with p = (1/10, 9/10) at T = 0.5 (see above).
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    expected = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert token_entropy(logits, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_token_logprobs_and_entropy_one_call():
    # p = (1/10, 9/10) at T = 0.5 (see above); the token is outcome 1 in row 0, outcome 0 in row 1
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], requires_grad=True)
    logp, entropy = token_logprobs_and_entropy(logits, torch.tensor([[1, 0]]), 0.5)
    torch.testing.assert_close(logp.detach(), torch.tensor([[math.log(0.9), math.log(0.1)]]))
    h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    torch.testing.assert_close(entropy, torch.full((1, 2), h))
    assert logp.requires_grad and not entropy.requires_grad  # the entropy is logged, never differentiated
    logp.sum().backward()  # d log p_x / d z = (onehot(x) - p) / T
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([-0.1, 0.1]) / 0.5)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- KL estimators


def test_kl_estimator_values_hand_example():
    logp = torch.tensor([math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25)])
    log2 = math.log(2.0)
    assert kl_estimate(logp, ref_logp, "k1").item() == pytest.approx(log2)
    assert kl_estimate(logp, ref_logp, "k2").item() == pytest.approx(0.5 * log2**2)
    # k3 = pi_ref/pi - log(pi_ref/pi) - 1 = 0.5 + log 2 - 1
    assert kl_estimate(logp, ref_logp, "k3").item() == pytest.approx(log2 - 0.5)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref_logp, "k4")


def _small_categorical(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy parameters theta [5] and a fixed reference log pi_ref [5], float64."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(5, generator=generator, dtype=F64)
    ref_logp = torch.log_softmax(torch.randn(5, generator=generator, dtype=F64), dim=0)
    return theta, ref_logp


def _grad(objective_of_theta, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(objective_of_theta(theta), theta)
    return gradient


def _reverse_kl(theta, ref_logp):  # KL(pi || pi_ref) = sum_x pi (log pi - log pi_ref)
    logp = torch.log_softmax(theta, dim=0)
    return (logp.exp() * (logp - ref_logp)).sum()


def _forward_kl(theta, ref_logp):  # KL(pi_ref || pi) = sum_x pi_ref (log pi_ref - log pi)
    logp = torch.log_softmax(theta, dim=0)
    return (ref_logp.exp() * (ref_logp - logp)).sum()


def _expected_grad_in_loss(theta, ref_logp, estimator):
    """E_{x~pi}[grad f(x)] exactly: samples are not differentiated, only f's value is."""

    def surrogate(theta):
        logp = torch.log_softmax(theta, dim=0)
        sampling_probs = logp.exp().detach()
        return (sampling_probs * kl_estimate(logp, ref_logp, estimator)).sum()

    return _grad(surrogate, theta)


def _expected_grad_as_reward_penalty(theta, ref_logp):
    """E_{x~pi}[stopgrad(k1(x)) * grad log pi(x)] exactly (score-function gradient)."""

    def surrogate(theta):
        logp = torch.log_softmax(theta, dim=0)
        sampling_probs = logp.exp().detach()
        penalty = kl_estimate(logp, ref_logp, "k1").detach()
        return (sampling_probs * penalty * logp).sum()

    return _grad(surrogate, theta)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimator_gradients_by_placement(seed):
    theta, ref_logp = _small_categorical(seed)
    reverse_kl_grad = _grad(lambda t: _reverse_kl(t, ref_logp), theta)
    forward_kl_grad = _grad(lambda t: _forward_kl(t, ref_logp), theta)
    # The two targets must differ, or the test could not tell them apart.
    assert (reverse_kl_grad - forward_kl_grad).abs().max() > 1e-3

    torch.testing.assert_close(_expected_grad_in_loss(theta, ref_logp, "k2"), reverse_kl_grad)
    torch.testing.assert_close(_expected_grad_as_reward_penalty(theta, ref_logp), reverse_kl_grad)
    torch.testing.assert_close(_expected_grad_in_loss(theta, ref_logp, "k3"), forward_kl_grad)
    torch.testing.assert_close(
        _expected_grad_in_loss(theta, ref_logp, "k1"), torch.zeros(5, dtype=F64), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_k1_and_k3_are_unbiased_kl_values(seed):
    theta, ref_logp = _small_categorical(seed)
    logp = torch.log_softmax(theta, dim=0)
    probs = logp.exp()
    exact_kl = _reverse_kl(theta, ref_logp)
    torch.testing.assert_close((probs * kl_estimate(logp, ref_logp, "k1")).sum(), exact_kl)
    torch.testing.assert_close((probs * kl_estimate(logp, ref_logp, "k3")).sum(), exact_kl)
    assert (kl_estimate(logp, ref_logp, "k3") >= 0).all()


def test_k3_is_reverse_kl_only_if_sampling_is_differentiated():
    # Why placement matters: the full gradient of E_pi[k3] (score term included) is the
    # reverse-KL gradient, but "k3 in the loss" drops the score term and gets forward KL.
    theta, ref_logp = _small_categorical(3)

    def expected_k3(theta):
        logp = torch.log_softmax(theta, dim=0)
        return (logp.exp() * kl_estimate(logp, ref_logp, "k3")).sum()

    torch.testing.assert_close(
        _grad(expected_k3, theta), _grad(lambda t: _reverse_kl(t, ref_logp), theta)
    )


def test_kl_defaults():
    assert DEFAULT_KL_ESTIMATOR == "k2"
    assert DEFAULT_KL_PLACEMENT == "loss"


def test_apply_kl_penalty_to_rewards_sums_detached_k1_over_valid_tokens():
    logp = torch.tensor(
        [[math.log(0.5), math.log(0.5), 9.0], [math.log(0.1), math.log(0.8), math.log(0.2)]],
        requires_grad=True,
    )
    ref_logp = torch.tensor(
        [[math.log(0.25), math.log(0.5), 0.0], [math.log(0.2), math.log(0.4), math.log(0.2)]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.5])
    penalised = apply_kl_penalty_to_rewards(rewards, sequence_kl_k1(logp, ref_logp, mask), kl_coef=0.1)
    # Row 0: log 2 + 0 (padding ignored). Row 1: log(1/2) + log 2 + 0 = 0.
    expected = torch.tensor([1.0 - 0.1 * math.log(2.0), 0.5])
    torch.testing.assert_close(penalised, expected)
    assert not penalised.requires_grad


# ---------------------------------------------------------------- importance weights


def test_truncated_importance_weights_cap_and_stats():
    log_ratios = [math.log(2.0), math.log(5.0), 0.0, math.log(0.5), 40.0]  # last is padding
    sampler_logp = torch.full((1, 5), -1.0)
    learner_logp = sampler_logp + torch.tensor([log_ratios])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    weights, stats = truncated_importance_weights(learner_logp, sampler_logp, mask, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 3.0, 1.0, 0.5, 0.0]]))
    assert not weights.requires_grad
    assert stats["weight_mean"] == pytest.approx((2.0 + 3.0 + 1.0 + 0.5) / 4)
    assert stats["weight_max"] == pytest.approx(3.0)
    assert stats["capped_fraction"] == pytest.approx(0.25)
    assert stats["logp_mismatch"] == pytest.approx((math.log(2) + math.log(5) + 0 + math.log(2)) / 4)


def test_truncated_importance_weights_are_detached():
    learner_logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    weights, _ = truncated_importance_weights(learner_logp, torch.tensor([[-1.5, -2.0]]), torch.ones(1, 2))
    assert not weights.requires_grad


# ---------------------------------------------------------------- clipped surrogate loss


def test_ratio_one_gives_minus_token_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 7.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([1.0, -2.0])
    loss, metrics = grpo_policy_loss(logp, logp.detach(), advantages, mask)
    # Token-level mean: tokens carry A = 1, 1, 1, -2 -> loss = -(1 + 1 + 1 - 2) / 4.
    assert loss.item() == pytest.approx(-0.25)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    (gradient,) = torch.autograd.grad(loss, logp)
    # d/dlogp of -ratio * A / 4 at ratio 1 is -A / 4; padding gets nothing.
    expected = torch.tensor([[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(gradient, expected)


def test_clipped_token_has_zero_gradient_and_is_counted():
    old_logp = torch.tensor([[-1.0, -1.0, -1.0]])
    # Token 0: ratio 1.5 > 1.2 with A > 0 -> clipped. Token 1: ratio 1. Token 2: padding.
    logp = (old_logp + torch.tensor([[math.log(1.5), 0.0, 30.0]])).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = grpo_policy_loss(logp, old_logp, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["clip_fraction_high"] == pytest.approx(0.5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 1.0) / 2)
    (gradient,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(gradient, torch.tensor([[0.0, -0.5, 0.0]]))


def test_asymmetric_clip_higher():
    old_logp = torch.zeros(3, 1)
    ratios = torch.tensor([[1.25], [0.85], [0.7]])
    logp = ratios.log().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, -1.0])
    loss, metrics = grpo_policy_loss(
        logp, old_logp, advantages, torch.ones(3, 1), clip_eps_low=0.2, clip_eps_high=0.28
    )
    # 1.25 < 1.28: unclipped, -1.25. 0.85 > 0.8: unclipped, +0.85.
    # 0.7 < 0.8 with A < 0: -min(-0.7, -0.8) = 0.8, clipped.
    assert loss.item() == pytest.approx((-1.25 + 0.85 + 0.8) / 3)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["clip_fraction_low"] == pytest.approx(1 / 3)
    (gradient,) = torch.autograd.grad(loss, logp)
    # d(-ratio * A)/dlogp = -ratio * A, divided by 3 tokens.
    torch.testing.assert_close(gradient, torch.tensor([[-1.25 / 3], [0.85 / 3], [0.0]]))


def test_ratio_above_range_with_negative_advantage_is_not_clipped():
    logp = torch.tensor([[math.log(2.0)]], requires_grad=True)
    loss, metrics = grpo_policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(2.0)  # -min(-2, -1.2) = 2: pessimistic branch
    assert metrics["clip_fraction"] == 0.0
    (gradient,) = torch.autograd.grad(loss, logp)
    assert gradient.item() == pytest.approx(2.0)


def test_mask_excludes_padding_values():
    old_logp = torch.tensor([[-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])
    advantages = torch.tensor([0.7])
    a = torch.tensor([[-1.1, -0.9, -1.0]])
    b = a.clone()
    b[0, 2] = 50.0  # huge ratio at the padded position
    loss_a, metrics_a = grpo_policy_loss(a, old_logp, advantages, mask)
    loss_b, metrics_b = grpo_policy_loss(b, old_logp, advantages, mask)
    assert loss_a.item() == pytest.approx(loss_b.item())
    assert metrics_a == pytest.approx(metrics_b)


def test_importance_weights_scale_the_surrogate():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    weights = torch.tensor([[2.0, 0.5]])
    loss, _ = grpo_policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), importance_weights=weights)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)


def test_num_tokens_for_mean_overrides_denominator():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    loss, _ = grpo_policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), num_tokens_for_mean=8)
    assert loss.item() == pytest.approx(-2.0 / 8)


def test_kl_in_loss_and_in_reward_placement():
    logp = torch.tensor([[math.log(0.5), math.log(0.5), 3.0]], requires_grad=True)
    ref_logp = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    zero_advantage = torch.tensor([0.0])
    log2 = math.log(2.0)

    loss, metrics = grpo_policy_loss(
        logp, logp.detach(), zero_advantage, mask, ref_logp=ref_logp, kl_coef=0.5, kl_estimator="k2"
    )
    # k2 per valid token: 0.5 * log(2)^2 and 0 -> mean * 0.5.
    assert loss.item() == pytest.approx(0.5 * (0.5 * log2**2 + 0.0) / 2)
    # Logged KL is mean k3: (0.5 + log 2 - 1 + 0) / 2.
    assert metrics["kl"] == pytest.approx((log2 - 0.5) / 2)

    loss_reward_placement, _ = grpo_policy_loss(
        logp, logp.detach(), zero_advantage, mask, ref_logp=ref_logp, kl_coef=0.5, kl_placement="reward"
    )
    assert loss_reward_placement.item() == pytest.approx(0.0)

    with pytest.raises(ValueError):
        grpo_policy_loss(logp, logp.detach(), zero_advantage, mask, kl_coef=0.5)
    with pytest.raises(ValueError):
        grpo_policy_loss(logp, logp.detach(), zero_advantage, mask, kl_placement="advantage")


def test_micro_batches_fit_the_budget_and_cover_every_sample_once():
    from cycle_oracle.batch import micro_batches

    lengths = [5, 40, 12, 7, 33, 9, 18]
    groups = micro_batches(lengths, 48)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # padded size: rows x the longest row
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 48
    assert micro_batches(lengths, None) == [sorted(range(7), key=lambda i: -lengths[i])]
    assert micro_batches([100, 3], 50) == [[0], [1]]  # longer than the budget: alone


def test_micro_batches_agree_on_a_count_by_halving_then_padding():
    from cycle_oracle.batch import micro_batches

    three = micro_batches([4, 4, 4, 4], None, count=3)
    assert len(three) == 3 and sorted(i for g in three for i in g) == [0, 1, 2, 3]
    assert micro_batches([4], None, count=3) == [[0], [], []]  # a rank short of samples: empty (zero-weight) passes
    with pytest.raises(ValueError, match="fewer"):
        micro_batches([10, 10, 10], 10, count=2)


def test_copy_and_length_penalties_lower_the_reward_of_copying_and_long_descriptions():
    from cycle_oracle.reward_shaping import copy_rates, length_excess, shaped_rewards

    source = "the old ferryman sat idle for the first time"
    texts = ["the old ferryman sat idle", "a man without work by the river", "short"]
    copy = copy_rates(texts, [source] * 3, 2)
    assert copy[0] == 1.0 and copy[1] == 0.0 and copy[2] == 0.0  # one word: no bigram, no penalty
    excess = length_excess([40, 10, 33], 32)
    assert excess.tolist() == [8.0, 0.0, 1.0]
    rewards = torch.tensor([0.5, 0.4, float("nan")])
    out = shaped_rewards(rewards, copy, 0.3, excess, 0.01)
    assert out[0] == pytest.approx(0.5 - 0.3 - 0.08) and out[1] == pytest.approx(0.4) and math.isnan(out[2])
    torch.testing.assert_close(shaped_rewards(rewards[:2], copy[:2], 0.0, excess[:2], 0.0), rewards[:2])


def test_negative_penalty_coefficients_are_refused():
    from cycle_oracle.config import ConfigError, validate_recipe

    for key in ("copy_penalty", "length_penalty"):
        with pytest.raises(ConfigError, match=f"grpo.{key}"):
            validate_recipe({"kind": "grpo", "grpo": {key: -0.1}})
