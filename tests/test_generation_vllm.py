"""The vLLM data generator against HF generate on the same model (greedy), in a real Ray task."""

import pytest
import ray

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "system", "content": "You speak like a pirate."}, {"role": "user", "content": "Describe a storm."}],
    [{"role": "user", "content": "List three fruits."}],
]


@ray.remote(max_calls=1)
def _generate_both(model_path: str, new_tokens: int):
    from cycle_oracle.data.generation import hf_generate_fn, vllm_generate_fn
    from cycle_oracle.models import load_causal_lm, load_tokenizer
    from cycle_oracle.rollout import configure_cpu_environment

    configure_cpu_environment(1, None, 1)
    tok = load_tokenizer(model_path)
    hf = hf_generate_fn(load_causal_lm(model_path), tok, batch_size=2)(CHATS, new_tokens)
    fast = vllm_generate_fn(model_path, seed=0, max_model_len=256)
    return hf, fast(CHATS, new_tokens), fast.model_id


def test_vllm_generate_matches_hf_greedy(tiny_path):
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        hf, fast, model_id = ray.get(_generate_both.remote(str(tiny_path), 8), timeout=900)
    finally:
        ray.shutdown()
    assert model_id.endswith("@vllm")  # cached apart from HF-written data
    assert len(fast) == len(CHATS) and all(isinstance(t, str) for t in fast)
    # Greedy decoding of the same fp32 weights: kernels differ in the last bits, so a near-tie may
    # flip late tokens; the replies must still agree on most chats.
    assert sum(a == b for a, b in zip(hf, fast)) >= 2, (hf, fast)
