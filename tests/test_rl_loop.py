"""RL-loop defects (each test fails on the code before its fix): the unusable-sample penalty, the
encoder's objective vs the reward, rank metrics, minibatch counts, metrics rows of redone steps."""

import dataclasses
import json

import pytest
import torch

from cycle_oracle.config import ConfigError, validate_recipe
from cycle_oracle.grpo import group_advantages, unusable_rewards


def test_an_unusable_sample_never_wins_its_group():
    """The old default gave an unusable sample 0 (centred space), above usable samples with
    negative rewards, so a truncation could win its group."""
    rewards = torch.tensor([[-0.3, -0.1, float("nan")], [0.4, float("nan"), 0.6], [float("nan")] * 3])
    usable = ~torch.isnan(rewards)
    cfg = validate_recipe({"kind": "grpo"}).grpo
    out = unusable_rewards(rewards, usable, cfg.truncation_penalty, cfg.truncation_penalty_margin)
    for b in range(2):
        assert out[b][~usable[b]].max() < out[b][usable[b]].min(), out[b]
        torch.testing.assert_close(out[b][usable[b]], rewards[b][usable[b]])
    assert torch.isfinite(out).all()
    advantages, _ = group_advantages(out, True)
    assert (advantages[0, 2] < advantages[0, :2]).all() and (advantages[1, 1] < advantages[1, [0, 2]]).all()
    assert torch.equal(advantages[2], torch.zeros(3)), "a group with nothing usable teaches nothing"
    fixed = unusable_rewards(rewards, usable, -0.5, 0.1)
    assert fixed[0, 2] == -0.5 and fixed[2].eq(-0.5).all()


def test_the_encoder_regresses_in_the_reward_space(tiny_path):
    """With reward_space centred the encoder's loss is 1 - cos(v_hat - mu, v - mu), the reward it is
    scored by (it used to regress raw cosine)."""
    from cycle_oracle.encoder import centred_cosine, cosine
    from cycle_oracle.encoder_trainer import EncoderTrainer

    texts = ["a cat sat on the mat", "the river flows north"]
    v = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)) * 3 + 5.0
    mean = torch.full((128,), 5.0)
    for space, measure in (("centred", lambda a, b: centred_cosine(a, b, mean)), ("raw", cosine)):
        cfg = validate_recipe({"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, "grpo": {"reward_space": space},
                               "encoder": {"lora": {"r": 2, "alpha": 4}}})
        torch.manual_seed(0)
        trainer = EncoderTrainer(str(tiny_path), cfg, 1, mean)
        v_hat, _ = trainer.reconstruct(texts)
        expected = float((1 - measure(v_hat, v)).mean())
        assert trainer.train_step(texts, v)["encoder_loss"] == pytest.approx(expected, abs=1e-5), space


def test_rank_stats_max_the_maxima_and_sum_the_tokens():
    """UpdateStats.combined: tokens summed, importance_weight_max maxed, the rest averaged; a rank
    that trained on no token reports an update that changed nothing (ratio 1, weights 1)."""
    from cycle_oracle.learner import UpdateStats

    ranks = [UpdateStats.of_means({"importance_weight_max": 1.2, "kl": 0.1, "importance_logp_mismatch": 0.01}, lr=1e-3, tokens=10.0, sft_loss=None),
             UpdateStats.of_means({"importance_weight_max": 2.9, "kl": 0.3, "importance_logp_mismatch": 0.03}, lr=1e-3, tokens=4.0, sft_loss=None)]
    out = UpdateStats.combined(ranks)
    assert (out.importance_weight_max, out.tokens, out.sft_loss) == (2.9, 14.0, None)
    assert out.kl == pytest.approx(0.2) and out.logp_mismatch == pytest.approx(0.02) and out.ratio_mean == 1.0
    assert set(out.metrics()) == {"policy_loss", "clip_fraction", "ratio_mean", "entropy", "kl", "importance_weight_mean",
                                  "importance_weight_max", "importance_capped_fraction", "logp_mismatch", "lr"}
    mixed = UpdateStats.combined([dataclasses.replace(r, sft_loss=v) for r, v in zip(ranks, (1.0, 3.0))])
    assert mixed.metrics()["sft_loss"] == 2.0


def test_minibatches_every_rank_can_fill_are_a_schema_check():
    ok = {"kind": "grpo", "grpo": {"batch_activations": 3, "samples_per_activation": 2, "minibatches_per_epoch": 3},
          "resources": {"learner": {"num_actors": 2}}}
    validate_recipe(ok)
    bad = {**ok, "grpo": {**ok["grpo"], "minibatches_per_epoch": 4}}
    with pytest.raises(ConfigError, match="minibatches_per_epoch=4.*only 3"):
        validate_recipe(bad)


def test_redone_steps_replace_their_metrics_rows(tmp_path):
    from cycle_oracle.config import LoggingSettings
    from cycle_oracle.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, LoggingSettings(wandb_mode="disabled"), {})
    for step in (1, 2, 3):
        log.log("grpo", step, {"reward_mean": float(step)})
    log.log("grpo_setup", 0, {"time_sync": 0.1})
    assert log.rewind("grpo", 1) == [2, 3]
    log.log("grpo", 2, {"reward_mean": 20.0})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("grpo", 1), ("grpo_setup", 0), ("grpo", 2)]
    assert rows[-1]["reward_mean"] == 20.0


def test_scoring_and_co_training_in_one_forward_gives_the_two_call_rewards_and_update(tiny_path):
    """score_and_train: rewards equal `score` before the update, and the update equals `train_step`
    on the usable descriptions plus the anchors (one encoder forward instead of two)."""
    from cycle_oracle.batch import RolloutBatch
    from cycle_oracle.encoder_trainer import EncoderTrainer

    cfg = validate_recipe({"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, "encoder": {"lora": {"r": 2, "alpha": 4}}})
    gen = torch.Generator().manual_seed(0)
    texts = ["a cat sat on the mat", "", "the river flows north", "prices rose again"]
    batch = RolloutBatch.of_texts(torch.randn(4, 128, generator=gen), texts)
    batch.usable = torch.tensor([True, False, True, True])
    anchors, anchor_vectors = ["source text one", "source two"], torch.randn(2, 128, generator=gen)
    mean = torch.randn(128, generator=gen) * 0.1
    trainers = []
    for _ in range(2):
        torch.manual_seed(0)
        trainers.append(EncoderTrainer(str(tiny_path), cfg, 1, mean))
    one, two = trainers
    before = one.state()[0]
    rewards, metrics, trained = one.score_and_train(batch, anchors, anchor_vectors)
    expected, expected_metrics = two.score(batch)
    keep = batch.usable.tolist()
    ref = two.train_step([t for t, u in zip(texts, keep) if u] + anchors, torch.cat([batch.vectors[batch.usable], anchor_vectors]))
    torch.testing.assert_close(rewards[batch.usable], expected[batch.usable], atol=1e-5, rtol=1e-5)
    assert torch.isnan(rewards[1]) and metrics.keys() == expected_metrics.keys()
    assert trained["encoder_loss"] == pytest.approx(ref["encoder_loss"], abs=1e-5)
    after_one, after_two = one.state()[0], two.state()[0]
    assert any(not torch.equal(after_one[k], before[k]) for k in before), "the update moved the encoder"
    for k, v in after_two.items():
        torch.testing.assert_close(after_one[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_the_text_encoder_starts_fresh_and_learns_from_source_text_only(tiny_path):
    """train_text_encoder resets to the fresh encoder (whatever it learned before) and fits
    (text, activation) pairs: two calls with the same seed give the same encoder."""
    from cycle_oracle.encoder_trainer import EncoderTrainer

    cfg = validate_recipe({"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, "encoder": {"lora": {"r": 2, "alpha": 4}}})
    torch.manual_seed(0)
    trainer = EncoderTrainer(str(tiny_path), cfg, 1, torch.zeros(128))
    texts = ["the old ferryman sat idle", "prices rose again today", "a cat sat on the mat", "the river froze that winter"]
    v = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    trainer.train_step(["something else entirely"] * 4, torch.randn(4, 128))  # co-training before: must not carry over
    first = trainer.train_text_encoder(texts, v, steps=6, batch_size=4)
    state = trainer.state()[0]
    again = trainer.train_text_encoder(texts, v, steps=6, batch_size=4)
    assert first == again and first["loss_last"] < first["loss_first"]
    for k, t in trainer.state()[0].items():
        torch.testing.assert_close(t, state[k])


def test_a_step_timer_reports_each_phase_and_the_time_outside_them():
    """PhaseTimer (the GRPO step's `time_*` metrics): a phase entered twice adds up, a declared phase
    that never ran is 0, `time_idle` is the step's time outside every phase."""
    import time

    from cycle_oracle.metrics import PhaseTimer

    timer = PhaseTimer(("rollout", "learn", "sync_check"))
    for _ in range(2):
        with timer.phase("learn"):
            time.sleep(0.03)
    time.sleep(0.03)  # outside every phase
    m = timer.metrics()
    assert list(m) == ["time_rollout", "time_learn", "time_sync_check", "time_step", "time_idle"]
    assert m["time_rollout"] == m["time_sync_check"] == 0.0 and m["time_learn"] >= 0.06
    assert m["time_idle"] >= 0.03 and m["time_step"] == pytest.approx(m["time_learn"] + m["time_idle"], abs=1e-3)
