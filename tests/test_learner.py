"""The DeepSpeed decoder learner on the tiny model (real DeepSpeed ZeRO-2 on CPU with gloo, one rank)."""

import pytest
import torch

from cycle_oracle.config import RecipeConfig
from cycle_oracle.batch import RolloutBatch
from cycle_oracle.learner import DecoderLearner, SftExample, init_distributed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    return RecipeConfig(
        kind="warmup", model={"name": "tiny-random-llama", "layer": 1}, decoder_lora={"r": 4, "alpha": 8},
        decoder_optim={"lr": 1e-2, "warmup_steps": 0, "decay": "constant", "grad_accum": 1, "zero_stage": 2},
        grpo={"kl_coef": 0.1},
    )


@pytest.fixture(scope="module")
def dist():
    import torch.distributed as td

    from actors.placement import free_port

    init_distributed(0, 1, "127.0.0.1", free_port(), "gloo")
    yield
    td.destroy_process_group()


def _batch(v: torch.Tensor, sequences: list[list[int]], advantages: list[float], temperature: float = 1.0) -> RolloutBatch:
    """A RolloutBatch of one group: every sequence describes activation v, sampler logprobs 0."""
    n = len(sequences)
    return RolloutBatch(vectors=v[None].expand(n, -1).clone(), token_ids=sequences, sampler_logprobs=[[0.0] * len(s) for s in sequences],
                        texts=[""] * n, truncated=torch.zeros(n, dtype=torch.bool), versions=torch.zeros(n, dtype=torch.long),
                        group_size=n, temperature=temperature, advantages=torch.tensor(advantages))


def _examples(tok):
    ctx = tok.encode("The quick brown fox jumps over the lazy dog.")
    return [SftExample("token_prediction", ctx, 5, "What comes next?", "jumps over"),
            SftExample("latentqa", ctx, 7, "How will the assistant speak?", "Like a pirate")]


def test_sft_learns_and_resume_reproduces_next_loss(dist, cfg, tiny_path, tiny_tokenizer):
    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=20)
    ex = _examples(tiny_tokenizer)
    losses = [learner.sft_micro_step(ex)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0], losses
    saved = learner.save_state()
    adapter = learner.adapter()
    nxt = learner.sft_micro_step(ex)
    prompts, answers = learner._sft_prompts(ex)  # what the FLOP count of a step is computed from (bench/flops.py sft_flops)
    lengths = [len(p.input_ids) + len(a) for p, a in zip(prompts, answers)]
    assert (nxt["work/sequences"], nxt["work/tokens"], nxt["work/key_pairs"]) == (2, sum(lengths), sum(t * (t + 1) // 2 for t in lengths))
    assert nxt["work/head_tokens"] == nxt["tokens"] == sum(len(a) for a in answers)
    assert nxt["work/read_tokens"] == sum(e.position + 1 for e in ex)  # the target reads each context up to its read position
    frozen_bytes = sum(p.numel() * p.element_size() for p in learner.model.parameters() if not p.requires_grad)
    assert sum(len(b) for b in saved.values()) < frozen_bytes / 2, "the frozen base must stay out of the learner state"

    torch.manual_seed(123)  # a different init: only the checkpoint can make the losses agree
    fresh = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=20)
    fresh.load_state(saved)
    for k, v in adapter.items():
        torch.testing.assert_close(fresh.adapter()[k], v)
    again = fresh.sft_micro_step(ex)
    assert abs(again["loss"] - nxt["loss"]) < 1e-5, (again, nxt)
    assert fresh.optimizer_steps == learner.optimizer_steps


def test_a_loaded_adapter_survives_the_next_optimizer_step(dist, cfg, tiny_path, tiny_tokenizer):
    """GRPO starts from the warmup adapter by loading it into a fresh learner; ZeRO-2 keeps an fp32
    master copy that it writes back after each step, so a module-only load would be undone."""
    torch.manual_seed(0)
    trained = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=20)
    for _ in range(3):
        trained.sft_micro_step(_examples(tiny_tokenizer))
    warm = trained.adapter()
    torch.manual_seed(1)
    # as GRPO starts from a warmup with `kl_reference: warmup`: the warmup adapter is also the reference
    fresh = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=20, reference_adapter=warm)
    fresh.load_adapter(warm)
    v = torch.randn(128)
    ids = tiny_tokenizer.encode(" a short description of it", add_special_tokens=False)
    sample = _batch(v, [ids], [1.0])
    assert abs(fresh.sequence_kl(sample)[0]) < 1e-4, "the policy is the reference before any update: KL must be 0"
    fresh.sft_micro_step(_examples(tiny_tokenizer))  # one small update on top of the loaded adapter
    after = fresh.adapter()
    moved = max(float((after[k] - warm[k]).abs().max()) for k in warm)
    size = max(float(warm[k].abs().max()) for k in warm)
    assert moved < 0.5 * size, f"the step moved the adapter by {moved} (its weights reach {size}): the load was undone"
    assert abs(fresh.sequence_kl(sample)[0]) > 1e-6, "after an update the policy differs from the reference"


def test_a_grpo_update_moves_the_policy_toward_the_advantage(dist, cfg, tiny_path, tiny_tokenizer):
    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=10)
    v = torch.randn(128)
    good = tiny_tokenizer.encode(" good answer", add_special_tokens=False)
    bad = tiny_tokenizer.encode(" bad reply", add_special_tokens=False)
    samples = _batch(v, [good, bad], [1.0, -1.0])
    before, _, _ = learner.policy_logprobs(samples)
    samples.sampler_logprobs = [lp[: len(ids)].tolist() for ids, lp in zip(samples.token_ids, before)]
    m = learner.update_shard(samples)
    after, mask, _ = learner.policy_logprobs(samples)
    assert m.clip_fraction == 0.0  # one epoch: ratio 1, clipping inert
    assert abs(m.logp_mismatch) < 1e-5
    assert float((after[0] - before[0]).sum()) > 0 > float((after[1] - before[1]).sum())
    kl = learner.sequence_kl(samples)
    assert len(kl) == 2 and all(x == x for x in kl)


def test_several_read_positions_fill_the_placeholders_in_order(dist, tiny_path, tiny_tokenizer):
    """num_placeholders=3: a LatentQA example's three positions go to the three placeholders; a
    one-position example repeats its activation; any other count is refused."""
    cfg3 = RecipeConfig(kind="warmup", model={"name": "tiny-random-llama", "layer": 1}, decoder_lora={"r": 4, "alpha": 8},
                        injection={"num_placeholders": 3}, decoder_optim={"lr": 1e-3, "warmup_steps": 0, "decay": "constant"})
    learner = DecoderLearner(str(tiny_path), cfg3, 1, 1.0, total_steps=2)
    ctx = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    single = learner.read_activations([ctx], [4])  # [1, d]
    many = learner.read_activations([ctx, ctx], [[2, 4, 6], [4, 4, 4]])  # [2, 3, d]
    assert many.shape == (2, 3, single.shape[-1])
    torch.testing.assert_close(many[0, 1], single[0])
    assert not torch.allclose(many[0, 0], many[0, 2])
    _, vectors = learner._sft_batch([SftExample("latentqa", ctx, (2, 4, 6), "Q?", "A"), SftExample("description", ctx, 4, "Q?", "A")])
    torch.testing.assert_close(vectors[0], many[0])
    torch.testing.assert_close(vectors[1], many[1])
    with pytest.raises(ValueError, match="expected 1 or injection.num_placeholders=3"):
        learner._sft_batch([SftExample("latentqa", ctx, (2, 4), "Q?", "A")])

    # centring: one task's slots lose their mean over the given contexts, other tasks are untouched
    other = tiny_tokenizer.encode("A slow green turtle walks under the busy bridge today.")
    info = learner.set_read_offset("latentqa", [ctx, other], [(2, 4, 6), (3, 5, 7)])
    both = learner.read_activations([ctx, other], [[2, 4, 6], [3, 5, 7]])
    mean = both.mean(0)
    kept = ((both - mean).pow(2).sum(-1).mean() / both.pow(2).sum(-1).mean()).item()
    assert info["contexts"] == 2 and abs(info["energy_share_kept"] - kept) < 1e-5
    _, centred = learner._sft_batch([SftExample("latentqa", ctx, (2, 4, 6), "Q?", "A"), SftExample("description", ctx, 4, "Q?", "A")])
    torch.testing.assert_close(centred[0], many[0] - mean)
    torch.testing.assert_close(centred[1], many[1])
    with pytest.raises(ValueError, match="one position list per context"):
        learner.set_read_offset("latentqa", [ctx], [])


def _grpo_cfg(**grpo):
    return RecipeConfig(kind="grpo", model={"name": "tiny-random-llama", "layer": 1}, decoder_lora={"r": 4, "alpha": 8},
                        decoder_optim={"lr": 1e-3, "warmup_steps": 0, "decay": "constant", "zero_stage": 0},
                        grpo={"kl_coef": 0.0, **grpo})


def _uneven_batch(tok) -> RolloutBatch:
    """Three samples whose token counts differ a lot (2 ranks get 1+3 vs 7 tokens, or so)."""
    texts = [" yes", " a much longer description of the thing here", " short one"]
    seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    v = torch.randn(128, generator=torch.Generator().manual_seed(3))
    return _batch(v, seqs, [1.0, -1.0, 0.5])


def _gradients_of_one_update(learner, batch) -> dict[str, torch.Tensor]:
    """The (data-parallel averaged) gradient DeepSpeed holds when update_shard calls engine.step."""
    grads = {}
    original = learner.engine.step

    def step(*a, **k):
        for name, p in learner.engine.module.named_parameters():
            if p.requires_grad and p.grad is not None:
                grads[name] = p.grad.detach().clone()
        return original(*a, **k)

    learner.engine.step = step
    learner.update_shard(batch)
    learner.engine.step = original
    return grads


def _rank_gradients(rank: int, port: int, model_path: str, out_dir: str) -> None:
    """One of 2 data-parallel ranks (spawned process): its shard of the uneven batch, one GRPO step."""
    import torch.distributed as td

    from cycle_oracle.batch import shard_indices
    from cycle_oracle.models import load_tokenizer

    torch.set_num_threads(1)
    init_distributed(rank, 2, "127.0.0.1", port, "gloo")
    torch.manual_seed(0)
    learner = DecoderLearner(model_path, _grpo_cfg(), 1, 1.0, total_steps=4, stage="grpo")
    batch = _uneven_batch(load_tokenizer(model_path))
    grads = _gradients_of_one_update(learner, batch.select(shard_indices(len(batch), 2)[rank]))
    torch.save(grads, f"{out_dir}/rank{rank}.pt")
    td.destroy_process_group()


def test_two_learners_on_uneven_shards_compute_the_single_learner_gradient(dist, tiny_path, tiny_tokenizer, tmp_path):
    """The loss is a token mean over the whole data-parallel batch (all-reduced token count), not
    per rank: a rank with fewer tokens must not weigh more per token."""
    import torch.multiprocessing as mp

    from actors.placement import free_port

    torch.manual_seed(0)
    single = DecoderLearner(str(tiny_path), _grpo_cfg(), 1, 1.0, total_steps=4, stage="grpo")
    reference = _gradients_of_one_update(single, _uneven_batch(tiny_tokenizer))
    mp.start_processes(_rank_gradients, args=(free_port(), str(tiny_path), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(grads) == set(reference) and reference
        for name, g in reference.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=f"rank {rank} {name}")


def test_every_rank_makes_the_asked_number_of_minibatch_steps(dist, tiny_path, tiny_tokenizer):
    """6 samples in 4 minibatches: `chunk` gave 3 (ranks could disagree and hang); now exactly 4."""
    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), _grpo_cfg(minibatches_per_epoch=4, batch_activations=3, samples_per_activation=2),
                             1, 1.0, total_steps=8, stage="grpo")
    seqs = [tiny_tokenizer.encode(f" sample number {i}", add_special_tokens=False) for i in range(6)]
    before = learner.optimizer_steps
    learner.update_shard(_batch(torch.randn(128), seqs, [1.0, -1.0, 0.5, -0.5, 0.2, -0.2]))
    assert learner.optimizer_steps - before == 4


def test_lora_dropout_does_not_move_the_ratio(dist, tiny_path, tiny_tokenizer):
    """Old log-probs and the gradient pass use one mode (dropout off): with one epoch and one
    minibatch the ratio is exactly 1, whatever the LoRA dropout."""
    cfg = RecipeConfig(kind="grpo", model={"name": "tiny-random-llama", "layer": 1}, decoder_lora={"r": 4, "alpha": 8, "dropout": 0.5},
                       decoder_optim={"lr": 1e-3, "warmup_steps": 0, "decay": "constant"}, grpo={"kl_coef": 0.0})
    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=4, stage="grpo")
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # dropout on A's input only matters once B is non-zero
    m = learner.update_shard(_uneven_batch(tiny_tokenizer))
    assert m.ratio_mean == pytest.approx(1.0, abs=1e-6) and m.clip_fraction == 0.0

def test_a_checkpoint_decoder_is_a_peft_adapter_folder(dist, cfg, tiny_path, tiny_tokenizer, tmp_path):
    """`<checkpoint>/decoder_adapter/` loads with PeftModel.from_pretrained as-is and gives the
    learner's log-probs."""
    from peft import PeftModel

    from cycle_oracle.checkpoint import CheckpointRecord, load_trained, save_checkpoint
    from cycle_oracle.decoder import build_batch, completion_logprobs
    from cycle_oracle.models import load_causal_lm, lora_config

    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=20)
    for _ in range(3):
        learner.sft_micro_step(_examples(tiny_tokenizer))
    config = lora_config(cfg.decoder_lora)
    config.base_model_name_or_path = str(tiny_path)
    rec = CheckpointRecord("warmup", 3, "tiny-random-llama", 1, cfg.injection.model_dump(mode="json"), 1.0, 0, 1)
    ckpt = save_checkpoint(tmp_path, rec, {"decoder_adapter": learner.adapter()}, adapter_configs={"decoder_adapter": config})
    assert (ckpt / "decoder_adapter" / "adapter_config.json").is_file()
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_path), str(ckpt / "decoder_adapter")).eval()
    v = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    seqs = [tiny_tokenizer.encode(t, add_special_tokens=False) for t in (" a short description", " another one here")]
    batch = _batch(v[0], seqs, [0.0, 0.0], temperature=0.7)
    batch.vectors = v
    ours, mask, _ = learner.policy_logprobs(batch)
    dec = build_batch([learner.description_prompt] * 2, seqs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = completion_logprobs(peft, dec, v, 1.0, 0.7)
    torch.testing.assert_close(theirs * mask, ours * mask, atol=1e-5, rtol=1e-5)
    loaded = load_trained(tmp_path).tensors["decoder_adapter"]
    assert set(loaded) == set(learner.adapter())
    for k, t in learner.adapter().items():
        torch.testing.assert_close(loaded[k], t)


def test_one_update_per_rollout_skips_the_old_policy_pass_with_the_same_gradient(dist, tiny_path, tiny_tokenizer):
    """epochs 1 x minibatches 1: no separate old-policy forward; the loss and gradient equal the
    two-pass computation (old log-probs from a no-grad forward, then the clipped surrogate)."""
    from cycle_oracle.grpo import grpo_policy_loss, truncated_importance_weights

    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), _grpo_cfg(), 1, 1.0, total_steps=4, stage="grpo")
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = _uneven_batch(tiny_tokenizer)
    batch.sampler_logprobs = [[-1.5] * len(ids) for ids in batch.token_ids]  # an off-policy sampler: IS weights matter
    calls = {"n": 0}
    original = learner.policy_logprobs

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    # the two-pass computation, by hand
    old, mask, _ = learner.policy_logprobs(batch)
    weights, _ = truncated_importance_weights(old, learner._sampler_logprobs(batch, old), mask, learner.cfg.grpo.importance_cap)
    learner.engine.zero_grad()
    logp, mask, _ = learner.policy_logprobs(batch, grad=True)
    loss, _ = grpo_policy_loss(logp, old, batch.advantages, mask, importance_weights=weights)
    loss.backward()
    reference = {n: p.grad.detach().clone() for n, p in learner.engine.module.named_parameters() if p.requires_grad and p.grad is not None}
    learner.engine.zero_grad()
    for p in learner.engine.module.parameters():
        p.grad = None

    learner.policy_logprobs = counting
    grads = _gradients_of_one_update(learner, batch)
    assert calls["n"] == 1, "one forward (with grad) per update, no old-policy pass"
    assert set(grads) == set(reference) and reference
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def _memory_cfg(stage: int = 0, **memory):
    cfg = _grpo_cfg()
    return cfg.model_copy(update={"memory": cfg.memory.model_copy(update=memory),
                                  "decoder_optim": cfg.decoder_optim.model_copy(update={"zero_stage": stage})})


def _random_lora_b(learner, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(learner.model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _gradients_of(learner, call) -> dict[str, torch.Tensor]:
    """The gradient DeepSpeed holds when `call()` reaches engine.step (ZeRO stage 0: in p.grad)."""
    grads = {}
    original = learner.engine.step

    def step(*a, **k):
        grads.update({n: p.grad.detach().clone() for n, p in learner.engine.module.named_parameters() if p.requires_grad and p.grad is not None})
        return original(*a, **k)

    learner.engine.step = step
    try:
        call()
    finally:
        learner.engine.step = original
    return grads


def test_micro_batched_gradients_equal_the_one_pass_gradient(dist, tiny_path, tiny_tokenizer):
    """A minibatch cut into token-budget micro-batches whose gradients accumulate before one step
    (with gradient checkpointing and a 2-position logits chunk, too) gives the one-pass gradient,
    for GRPO and for the warmup's SFT; checkpointing really recomputes the blocks."""
    from cycle_oracle.models import decoder_blocks

    learners = {}
    for name, memory in {"one_pass": {}, "micro": {"micro_batch_tokens": 16},
                         "micro_ckpt": {"micro_batch_tokens": 16, "gradient_checkpointing": True, "logits_chunk_tokens": 2}}.items():
        torch.manual_seed(0)
        learners[name] = DecoderLearner(str(tiny_path), _memory_cfg(**memory), 1, 1.0, total_steps=4, stage="grpo")
        _random_lora_b(learners[name])
    batch = _uneven_batch(tiny_tokenizer)
    batch.sampler_logprobs = [[-1.5] * len(ids) for ids in batch.token_ids]
    calls = {"n": 0}
    block = decoder_blocks(learners["micro_ckpt"].model)[0]
    forward = block.forward

    def counting(*a, **k):  # (forward hooks do not fire on a checkpoint's recompute; the method runs)
        calls["n"] += 1
        return forward(*a, **k)

    block.forward = counting

    grpo = {name: _gradients_of(l, lambda l=l: l.update_shard(batch)) for name, l in learners.items()}
    assert calls["n"] == 2 * len(batch), "checkpointing recomputes each micro-batch's blocks in the backward pass"
    examples = _examples(tiny_tokenizer)
    sft = {name: _gradients_of(l, lambda l=l: l.sft_micro_step(examples)) for name, l in learners.items()}
    for grads in (grpo, sft):
        reference = grads["one_pass"]
        assert reference and any(float(g.abs().sum()) > 0 for g in reference.values())
        for name in ("micro", "micro_ckpt"):
            assert set(grads[name]) == set(reference)
            for k, g in reference.items():
                torch.testing.assert_close(grads[name][k], g, atol=1e-6, rtol=1e-4, msg=f"{name} {k}")


def _rank_update(rank: int, port: int, model_path: str, out_dir: str, micro: int | None) -> None:
    """One of 2 ZeRO-2 ranks (spawned): its shard of the uneven batch, one GRPO step -> its adapter."""
    import torch.distributed as td

    from cycle_oracle.batch import shard_indices
    from cycle_oracle.models import load_tokenizer

    torch.set_num_threads(1)
    init_distributed(rank, 2, "127.0.0.1", port, "gloo")
    torch.manual_seed(0)
    learner = DecoderLearner(model_path, _memory_cfg(stage=2, micro_batch_tokens=micro), 1, 1.0, total_steps=4, stage="grpo")
    _random_lora_b(learner)
    batch = _uneven_batch(load_tokenizer(model_path))
    learner.update_shard(batch.select(shard_indices(len(batch), 2)[rank]))
    torch.save(learner.adapter(), f"{out_dir}/rank{rank}.pt")
    td.destroy_process_group()


def test_zero2_ranks_needing_different_micro_batch_counts_agree_and_match_one_learner(dist, tiny_path, tiny_tokenizer, tmp_path):
    """Rank 0 holds two sequences (two micro-batches under the budget), rank 1 one: ZeRO-2 reduces at
    every backward, so the ranks must make the same number of passes (rank 1 adds a zero-weight
    one) or they hang; the update equals one learner's on the whole batch."""
    import time

    import torch.multiprocessing as mp

    from actors.placement import free_port

    torch.manual_seed(0)
    single = DecoderLearner(str(tiny_path), _memory_cfg(stage=2), 1, 1.0, total_steps=4, stage="grpo")
    _random_lora_b(single)
    single.update_shard(_uneven_batch(tiny_tokenizer))
    reference = single.adapter()
    ctx = mp.start_processes(_rank_update, args=(free_port(), str(tiny_path), str(tmp_path), 16), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ZeRO-2 ranks did not finish: their backward passes did not pair up")
    for rank in (0, 1):
        adapter = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in reference.items():
            torch.testing.assert_close(adapter[k], v, atol=1e-6, rtol=1e-4, msg=f"rank {rank} {k}")


def test_a_bf16_learner_trains_with_fp32_master_weights_and_fp32_logprobs(dist, tiny_path, tiny_tokenizer):
    cfg = _memory_cfg(stage=2, micro_batch_tokens=16)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=4, stage="grpo")
    assert learner.engine.bfloat16_enabled()
    assert {p.dtype for p in learner.model.parameters()} == {torch.bfloat16}
    batch = _uneven_batch(tiny_tokenizer)
    logp, mask, _ = learner.policy_logprobs(batch)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
    before = learner.adapter()
    m = learner.update_shard(batch)
    assert all(v == v for v in m.metrics().values()), m  # no NaN
    assert any(not torch.equal(before[k], v) for k, v in learner.adapter().items()), "the bf16 step must move the adapter"
    assert learner.sft_micro_step(_examples(tiny_tokenizer))["loss"] > 0


def test_the_first_optimizer_step_without_warmup_uses_the_peak_lr(dist, tiny_path, tiny_tokenizer):
    """`warmup_steps: 0` with cosine decay (every recipe's default): DeepSpeed's WarmupCosineLR set
    lr 0 before its first iteration, so GRPO's (and the warmup's) first update did nothing."""
    cfg = RecipeConfig(kind="grpo", model={"name": "tiny-random-llama", "layer": 1}, decoder_lora={"r": 4, "alpha": 8},
                       decoder_optim={"lr": 1e-3, "warmup_steps": 0, "decay": "cosine"}, grpo={"kl_coef": 0.0, "steps": 10})
    torch.manual_seed(0)
    learner = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=10, stage="grpo")
    assert learner.lr() == pytest.approx(1e-3)
    before = learner.adapter()
    learner.update_shard(_uneven_batch(tiny_tokenizer))
    moved = max(float((learner.adapter()[k] - v).abs().max()) for k, v in before.items())
    assert moved == pytest.approx(1e-3, rel=0.05), "Adam's first step moves each weight by about lr"


def test_with_the_kl_in_the_reward_the_update_makes_no_reference_pass(dist, tiny_path, tiny_tokenizer):
    """kl_placement reward: the driver shapes the rewards with `sequence_kl` (one policy and one
    reference pass); the update itself needs no reference log-probs (it used to compute them for a metric)."""
    calls = {}
    for placement in ("loss", "reward"):
        torch.manual_seed(0)
        learner = DecoderLearner(str(tiny_path), _grpo_cfg(kl_coef=0.1, kl_placement=placement), 1, 1.0, total_steps=4, stage="grpo")
        original, calls[placement] = learner.reference_logprobs, 0

        def counting(*a, _original=original, _placement=placement, **k):
            calls[_placement] += 1
            return _original(*a, **k)

        learner.reference_logprobs = counting
        learner.update_shard(_uneven_batch(tiny_tokenizer))
    assert calls == {"loss": 1, "reward": 0}


def test_supervised_mixing_adds_beta_times_the_sft_gradient(dist, tiny_path, tiny_tokenizer):
    """grpo.sft_mix_weight beta: the update's gradient is the GRPO gradient plus beta x the warmup
    SFT gradient of the mixed-in examples (one optimizer step)."""
    beta = 0.5
    learners = {}
    for name, weight in (("mixed", beta), ("grpo", 0.0), ("sft", 0.0)):
        torch.manual_seed(0)
        learners[name] = DecoderLearner(str(tiny_path), _grpo_cfg(sft_mix_weight=weight), 1, 1.0, total_steps=4, stage="grpo")
        _random_lora_b(learners[name])
    batch, examples = _uneven_batch(tiny_tokenizer), _examples(tiny_tokenizer)
    mixed = _gradients_of(learners["mixed"], lambda: learners["mixed"].update_shard(batch, examples))
    grpo = _gradients_of(learners["grpo"], lambda: learners["grpo"].update_shard(batch))
    sft = _gradients_of(learners["sft"], lambda: learners["sft"].sft_micro_step(examples))
    assert mixed.keys() == grpo.keys() == sft.keys() and mixed
    for k in mixed:
        torch.testing.assert_close(mixed[k], grpo[k] + beta * sft[k], atol=1e-6, rtol=1e-4, msg=k)


def test_a_context_is_read_up_to_its_last_read_position_only(dist, cfg, tiny_path, tiny_tokenizer, monkeypatch):
    """The warmup reads each context through the frozen target only up to its last read position
    (causal attention: the rest changes nothing read), so a LatentQA chat is not read to its end;
    the activations equal a read of the whole context."""
    import cycle_oracle.learner as learner_module
    from cycle_oracle.activations import pad_right, read_residual

    learner = DecoderLearner(str(tiny_path), cfg, 1, 1.0, total_steps=2)
    ctx = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog and keeps running far into the woods.")
    widths = []
    monkeypatch.setattr(learner_module, "read_residual", lambda model, ids, mask, layer: widths.append(ids.shape[1]) or read_residual(model, ids, mask, layer))
    got = learner.read_activations([ctx, ctx[:9]], [[2, 6], [3, 8]])
    assert widths == [9] and len(ctx) > 9  # up to position 8, not the longer context's end
    ids, mask = pad_right([ctx], tiny_tokenizer.pad_token_id)
    with learner.model.disable_adapter(), torch.no_grad():
        full = read_residual(learner.model, ids, mask, 1)[0]
    torch.testing.assert_close(got, full[torch.tensor([[2, 6], [3, 8]])], rtol=1e-4, atol=1e-4)
