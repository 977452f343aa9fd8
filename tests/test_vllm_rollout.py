"""HF vs vLLM on the same decoder + adapter + injected activations, in real Ray actors.

Engines start here (about a minute each on 2 cores): the default LoRA-free engine that serves
merged weights, the `adapter` engine (vLLM's LoRA path) for the stress test, and a rollout group
of two merged engines.
"""

import pytest
import ray
import torch

from cycle_oracle.config import RecipeConfig
from cycle_oracle.decoder import build_batch, completion_logprobs
from cycle_oracle.injection import DecoderPrompt, description_prompt
from cycle_oracle.models import adapter_state, attach_lora, load_causal_lm, load_tokenizer
from cycle_oracle.rollout import Sampling

pytestmark = pytest.mark.slow
TEMPERATURE = 0.7
NORM = 2.0


def _config(weight_sync: str) -> dict:
    return RecipeConfig(
        kind="grpo",
        model={"name": "tiny-random-llama", "layer": 1},
        rollout={"weight_sync": weight_sync, "max_model_len": 256, "kv_cache_gb": 1},
        resources={"rollout": {"threads": 1, "num_cpus": 0.5}},
        decoder_lora={"r": 4, "alpha": 8},
    ).model_dump(mode="json")


def _random_adapter(tiny_path, seed: int):
    torch.manual_seed(seed)
    model = attach_lora(load_causal_lm(tiny_path), RecipeConfig(kind="grpo", decoder_lora={"r": 4, "alpha": 8}).decoder_lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _hf_logprobs(model, prompt: DecoderPrompt, vector: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    batch = build_batch([prompt], [token_ids], pad_id=0)
    with torch.no_grad():
        return completion_logprobs(model, batch, vector[None], NORM, TEMPERATURE)[0]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_hf_and_vllm_agree_and_read_the_activation(ray_local, tiny_path, tiny_tokenizer):
    from actors.rollout import RolloutActor

    actor = RolloutActor.options(num_cpus=0.5).remote(str(tiny_path), _config("merged"), 1, NORM)
    model = _random_adapter(tiny_path, seed=1)
    assert ray.get(actor.serve.remote(adapter_state(model), 1), timeout=600) == 1
    prompt = description_prompt(tiny_tokenizer, 1, RecipeConfig(kind="grpo").injection, RecipeConfig(kind="grpo").description_instruction)
    torch.manual_seed(0)
    vectors = torch.randn(2, 128) * 5
    batch = ray.get(actor.rollout.remote(vectors, [11, 12], Sampling(3, TEMPERATURE, 1.0, 8)), timeout=600)
    assert batch.versions.tolist() == [1] * 6 and len(batch) == 6 and batch.num_activations == 2 and batch.group_size == 3
    assert batch.vectors is None, "the engine returns texts, tokens and log-probs; the caller attaches the activations"
    worst = 0.0
    for row in range(2):
        for j in range(3):
            ids = batch.token_ids[row * 3 + j]
            hf_own = _hf_logprobs(model, prompt, vectors[row], ids)
            hf_other = _hf_logprobs(model, prompt, vectors[1 - row], ids)
            vllm = torch.tensor(batch.sampler_logprobs[row * 3 + j])
            worst = max(worst, float((hf_own - vllm).abs().max()))
            assert not torch.allclose(hf_other, vllm, atol=1e-3), "vLLM served another activation's prefix"
    assert worst < 2e-3, f"vLLM vs HF processed logprobs differ by {worst}"

    # A new version is served after sync: same seeds, different adapter -> different logprobs.
    model2 = _random_adapter(tiny_path, seed=2)
    ray.get(actor.serve.remote(adapter_state(model2), 2), timeout=600)
    batch2 = ray.get(actor.rollout.remote(vectors, [11, 12], Sampling(3, TEMPERATURE, 1.0, 8)), timeout=600)
    assert batch2.versions.tolist() == [2] * 6
    ids2, lp2 = batch2.token_ids[0], torch.tensor(batch2.sampler_logprobs[0])
    hf_new = _hf_logprobs(model2, prompt, vectors[0], ids2)
    hf_old = _hf_logprobs(model, prompt, vectors[0], ids2)
    assert float((hf_new - lp2).abs().max()) < 2e-3
    assert not torch.allclose(hf_old, lp2, atol=1e-3)
    ray.kill(actor)


def test_adapter_path_stress(ray_local, tiny_path, tiny_tokenizer):
    """vLLM's LoRA path with prompt embeds over many calls, identical and differing embeddings
    (the combination that crashed upstream with prefix caching on; our default keeps it off)."""
    from actors.rollout import RolloutActor

    actor = RolloutActor.options(num_cpus=0.5).remote(str(tiny_path), _config("adapter"), 1, NORM)
    model = _random_adapter(tiny_path, seed=3)
    ray.get(actor.serve.remote(adapter_state(model), 1), timeout=600)
    prompt = description_prompt(tiny_tokenizer, 1, RecipeConfig(kind="grpo").injection, RecipeConfig(kind="grpo").description_instruction)
    torch.manual_seed(0)
    same = torch.randn(1, 128).expand(4, 128).contiguous()
    for call in range(12):
        vectors = same if call % 2 == 0 else torch.randn(4, 128)
        batch = ray.get(actor.rollout.remote(vectors, [call * 10 + i for i in range(4)], Sampling(2, TEMPERATURE, 1.0, 6)), timeout=600)
        assert batch.num_activations == 4
    diff = (_hf_logprobs(model, prompt, vectors[0], batch.token_ids[0]) - torch.tensor(batch.sampler_logprobs[0])).abs().max()
    assert float(diff) < 2e-3, f"adapter path logprobs differ from HF by {float(diff)}"
    ray.kill(actor)


@ray.remote
def _serve_adapter_folder(model_path: str, folder: str, embeds: torch.Tensor, seeds: list[int]):
    """vLLM's LoRA path serving a PEFT folder as it lies in a checkpoint (in a Ray worker: LLM()
    only inside actors or tasks)."""
    from cycle_oracle.rollout import RolloutEngine, SamplingRequest, configure_cpu_environment

    configure_cpu_environment(1, None, 1)
    engine = RolloutEngine(model_path, seed=0, max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=4)
    engine.set_adapter(folder)
    return engine.generate([SamplingRequest(embeds[i], seeds[i]) for i in range(len(seeds))], Sampling(2, TEMPERATURE, 1.0, 6))


def test_vllm_serves_a_checkpoint_decoder_folder_as_is(ray_local, tiny_path, tiny_tokenizer, tmp_path):
    from cycle_oracle.checkpoint import CheckpointRecord, save_checkpoint
    from cycle_oracle.injection import decoder_inputs
    from cycle_oracle.models import lora_config

    model = _random_adapter(tiny_path, seed=4)
    settings = RecipeConfig(kind="grpo", decoder_lora={"r": 4, "alpha": 8})
    config = lora_config(settings.decoder_lora)
    config.base_model_name_or_path = str(tiny_path)
    rec = CheckpointRecord("grpo", 1, "tiny-random-llama", 1, settings.injection.model_dump(mode="json"), NORM, 1, 1)
    ckpt = save_checkpoint(tmp_path, rec, {"decoder_adapter": adapter_state(model)}, adapter_configs={"decoder_adapter": config})
    prompt = description_prompt(tiny_tokenizer, 1, settings.injection, settings.description_instruction)
    torch.manual_seed(0)
    vectors = torch.randn(2, 128) * 5
    embeds = decoder_inputs(model.get_input_embeddings(), [prompt.input_ids] * 2, [prompt.placeholder_positions] * 2, vectors, NORM, "replace")
    batch = ray.get(_serve_adapter_folder.options(num_cpus=0.5).remote(str(tiny_path), str(ckpt / "decoder_adapter"), embeds.detach(), [5, 6]), timeout=900)
    for i in range(len(batch)):
        hf = _hf_logprobs(model, prompt, vectors[i // 2], batch.token_ids[i])
        assert float((hf - torch.tensor(batch.sampler_logprobs[i])).abs().max()) < 2e-3


def test_the_rollout_group_samples_in_order_describes_once_and_checks_its_syncs(ray_local, tiny_path):
    """RolloutGroup over two actors: a batch comes back in activation order with the served version
    (the activations stay with the caller); a sync is checked against a scorer's log-probs (here HF
    on the same adapter) and a mismatch fails naming the bound; `describer` serves its adapter on
    demand and writes a pool's descriptions once."""
    from actors.placement import Placement
    from actors.rollout import RolloutGroup

    cfg = RecipeConfig.model_validate({**_config("merged"), "kind": "grpo", "grpo": {"sync_check_every": 1}, "sampling": {"max_new_tokens": 6, "temperature": TEMPERATURE},
                                       "resources": {"rollout": {"num_actors": 2, "num_cpus": 0.25, "threads": 1},
                                                     "learner": {"num_cpus": 0.25}, "encoder": {"num_cpus": 0.25}}})
    placement = Placement(cfg, 300)
    torch.manual_seed(0)
    vectors = torch.randn(4, 128) * 5
    group = RolloutGroup(str(tiny_path), cfg, 1, NORM, placement, probe=vectors)
    model, other = _random_adapter(tiny_path, seed=5), _random_adapter(tiny_path, seed=6)
    prompt = description_prompt(load_tokenizer(str(tiny_path)), 1, cfg.injection, cfg.description_instruction)

    def hf_error(probe):  # what the learner's sync_error measures, with HF on the served adapter
        diff = torch.cat([(_hf_logprobs(model, prompt, probe.vectors[i], ids) - torch.tensor(probe.sampler_logprobs[i])).abs()
                          for i, ids in enumerate(probe.token_ids)])
        return {"mean": float(diff.mean()), "p99": float(torch.quantile(diff, 0.99)), "max": float(diff.max()), "tokens": float(len(diff))}

    try:
        synced = group.sync(adapter_state(model), hf_error)
        assert synced["weight_version"] == 1 and synced["sync_logprob_error_p99"] <= synced["sync_bound_p99"]
        sampling = Sampling(2, TEMPERATURE, 1.0, 6)
        batch = group.sample(vectors, [21, 22, 23, 24], sampling)
        alone = ray.get(group.actors[0].rollout.remote(vectors, [21, 22, 23, 24], sampling), timeout=600)
        assert batch.token_ids == alone.token_ids and batch.versions.tolist() == [1] * 8 and batch.vectors is None
        with pytest.raises(RuntimeError, match="failed verification: served logprobs differ"):
            group.sync(adapter_state(model), lambda probe: {"mean": 1.0, "p99": 1.0, "max": 1.0, "tokens": 6.0})

        trained, start = group.describer(), group.describer(adapter_state(other))
        first = trained(vectors)
        version = group.version
        assert start(vectors) != first and group.version == version + 1, "the other decoder was served to describe"
        assert trained(vectors) == first and group.version == version + 1, "a described pool is not described again"
    finally:
        group.shutdown()
        placement.remove()
