"""RolloutActor: a vLLM engine (cycle_oracle.rollout.RolloutEngine) behind Ray, and the CPU side
of the policy it serves (cycle_oracle.rollout.RolloutPolicy: the prompt embeddings it sends and the
weight sync; with `weight_sync: adapter` that is the input embedding table alone, no model copy).
"""

from __future__ import annotations

import os
import tempfile

import ray
import torch

from cycle_oracle.batch import RolloutBatch


@ray.remote
class RolloutActor:
    def __init__(self, model: str, config: dict, layer: int, injection_norm: float, actor_index: int = 0,
                 log_file: str | None = None):
        """`model`: the recipe's model spec (`models.model_spec`), resolved here, on this actor's node."""
        from actors.logs import send_output_to
        from cycle_oracle.config import RecipeConfig
        from cycle_oracle.models import resolve_model_path

        send_output_to(log_file)
        from cycle_oracle.rollout import configure_cpu_environment

        model_path = str(resolve_model_path(model))

        self.cfg = RecipeConfig.model_validate(config)
        ro = self.cfg.rollout
        threads = self.cfg.resources.rollout.threads
        torch.set_num_threads(threads)
        configure_cpu_environment(threads, ro.thread_binding, ro.kv_cache_gb)
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

        from cycle_oracle.devices import check_dtype, role_device
        from cycle_oracle.rollout import RolloutEngine, RolloutPolicy

        check_dtype(self.cfg.model.dtype, role_device(self.cfg.resources.rollout.num_gpus), engine="vllm", role="rollout")
        self.version = 0
        self.policy = RolloutPolicy(model_path, self.cfg, layer, injection_norm, tempfile.mkdtemp(prefix="cycle-oracle-adapter-"))
        self.tokenizer = self.policy.tokenizer
        self.engine = RolloutEngine(
            model_path,
            seed=self.cfg.seed + actor_index,
            max_model_len=ro.max_model_len,
            max_num_seqs=ro.max_num_seqs,
            prefix_caching=ro.prefix_caching,
            enable_lora=ro.weight_sync == "adapter",
            max_lora_rank=self.cfg.decoder_lora.r,
            dtype=self.cfg.model.dtype,
        )

    def info(self) -> dict:
        return {"pid": os.getpid(), "version": self.version, "node": ray.get_runtime_context().get_node_id()}

    def prompt_embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.policy.prompt_embeds(vectors)

    def sample(self, vectors: torch.Tensor, seeds: list[int], n: int, temperature: float, top_p: float, max_new_tokens: int) -> RolloutBatch:
        """[B, d] activations -> a RolloutBatch of B x n descriptions, tagged with the served weight version."""
        from cycle_oracle.rollout import SamplingRequest

        embeds = self.prompt_embeds(vectors)
        requests = [SamplingRequest(embeds[i], seeds[i], n) for i in range(len(seeds))]
        return self.engine.sample(requests, temperature, top_p, max_new_tokens, stop_token_ids=[self.tokenizer.eos_token_id],
                                  vectors=vectors, version=self.version)

    def sync(self, adapter: dict[str, torch.Tensor], version: int) -> int:
        """Serve the policy with this LoRA adapter state (merged into the weights, or hot-swapped)."""
        self.policy.sync(adapter, self.engine)
        self.version = version
        return version
