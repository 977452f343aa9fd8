"""Rollout cases: the vLLM RolloutEngine (B x K sweep, engine settings, LoRA adapter / merged
weight sync) and the HF `generate` baseline on the same prompts, lengths and batches."""

from __future__ import annotations

import os
import tempfile
import time

from bench import flops as bf
from bench.inputs import prompt_embeds, prompt_setup, random_vectors
from bench.load import measure, peak_rss_mb


def rollout_flop_fields(shape, batch, k, prompt_len, new_tokens) -> dict:
    """flops: generated tokens only (2N incl. LM head + attention per generated token: the headline
    MFU); flops_work: + every sample's prompt prefill (what the engine computes with prefix caching
    off); flops_useful: + one prefill per activation (the K samples share a prompt)."""
    work = bf.rollout_flops(shape, batch, k, prompt_len, new_tokens)
    shared = bf.rollout_flops(shape, batch, k, prompt_len, new_tokens, shared_prefill=True)
    return {"flops": work["generated"], "flops_work": work["total"], "flops_useful": shared["total"]}


def _lora_model(path: str, rank: int, alpha: int, seed: int = 0):
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch
    from cycle_oracle.config import LoraSettings
    from cycle_oracle.models import attach_lora, load_causal_lm

    torch.manual_seed(seed)
    model = attach_lora(load_causal_lm(path), LoraSettings(r=rank, alpha=alpha))
    for name, p in model.named_parameters():  # a non-trivial adapter (B = 0 at init would be a no-op)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def count_adapter_loads() -> list:
    """Count vLLM's worker-side adapter loads from here on (each `WorkerLoRAManager._load_adapter` call
    reads a PEFT folder from disk and builds the LoRA tensors) -> [count, seconds spent in them].
    Call it in the process that runs the engine core (in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from vllm.lora.worker_manager import WorkerLoRAManager

    count = [0, 0.0]
    load = WorkerLoRAManager._load_adapter

    def counted(self, lora_request):
        t0 = time.perf_counter()
        try:
            return load(self, lora_request)
        finally:
            count[0] += 1
            count[1] += time.perf_counter() - t0

    WorkerLoRAManager._load_adapter = counted
    return count


def mapped_libraries(paths, maps: str | None = None) -> dict[str, bool]:
    """For each library path: is it mapped into this process (/proc/self/maps, symlinks resolved)?"""
    if maps is None:
        try:
            maps = open("/proc/self/maps").read()
        except OSError:
            maps = ""
    mapped = {line.split(maxsplit=5)[5] for line in maps.splitlines() if len(line.split(maxsplit=5)) == 6}
    return {p: os.path.realpath(p) in mapped or p in mapped for p in paths}


def case_engine(case: dict) -> dict:
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from cycle_oracle.rollout import configure_cpu_environment

    threads = case["threads"]
    binding = case.get("binding")
    configure_cpu_environment(threads, binding, case.get("kv_cache_gb", 1))
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    import torch

    torch.set_num_threads(threads)
    info, cfg, layer, tok, prompt, emb, norm = prompt_setup(case)
    shape = info["shape"]
    lora = case.get("lora")  # None | "adapter" | "merged"
    rank = cfg.decoder_lora.r

    from cycle_oracle.rollout import RolloutEngine, Sampling, SamplingRequest
    import vllm
    from vllm import SamplingParams

    if case.get("compilation_mode") is not None:  # what-if: RolloutEngine does not expose it, so wrap vllm.LLM
        base_llm = vllm.LLM

        def llm_with_mode(*a, **kw):
            kw.setdefault("compilation_config", {"mode": case["compilation_mode"]})
            return base_llm(*a, **kw)

        vllm.LLM = llm_with_mode

    out: dict = {"case": case["name"], "binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), "threads": threads,
                 "compilation_mode": case.get("compilation_mode", "default (CPU: dynamo trace once + inductor; LoRA engines: none)"),
                 "prefix_caching": bool(case.get("prefix_caching")), "lora": lora, "prompt_len": len(prompt.input_ids),
                 "new_tokens": case["new_tokens"], "max_num_seqs": case.get("max_num_seqs", 64),
                 # "n": K samples as one request with n=K (what RolloutEngine.generate sends); "separate": K requests with n=1
                 "requests": "separate" if case.get("separate_requests") else "n",
                 # adapter mode as a GRPO step runs it: a weight sync (set_adapter) before every timed generate call
                 "sync_every_call": bool(case.get("sync_every_call"))}
    if case.get("preload"):  # the case's interpreter was started with LD_PRELOAD (bench.case.run_case, case["env"])
        out["preload"] = {"libs": case["preload"], "ld_preload": os.environ.get("LD_PRELOAD"), "mapped": mapped_libraries(case["preload"])}
    loads = count_adapter_loads() if lora == "adapter" else None
    t0 = time.perf_counter()
    engine = RolloutEngine(info["path"], seed=0, max_model_len=512, max_num_seqs=out["max_num_seqs"],
                           prefix_caching=bool(case.get("prefix_caching")), enable_lora=(lora == "adapter"),
                           max_lora_rank=rank, dtype="float32")
    out["engine_start_s"] = time.perf_counter() - t0
    out["peak_rss_mb_after_start"] = peak_rss_mb()
    eos = tok.eos_token_id

    peft_model, adapter_dir = None, None
    if lora in ("adapter", "merged"):
        peft_model = _lora_model(info["path"], rank, cfg.decoder_lora.alpha)
    if lora == "adapter":
        adapter_dir = tempfile.mkdtemp(prefix="bench-adapter-")
        peft_model.save_pretrained(adapter_dir)
        engine.set_adapter(adapter_dir)
    if lora == "merged":
        from cycle_oracle.models import merged_lora_weights

        t0 = time.perf_counter()
        merged = merged_lora_weights(peft_model)
        t_merge = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.load_merged_weights(merged)
        out["weight_sync"] = {"merge_s": t_merge, "reload_s": time.perf_counter() - t0,
                              "tensors": len(merged), "mb": sum(t.numel() * t.element_size() for t in merged.values()) / 2**20}
    if peft_model is not None:
        del peft_model

    calls = [0]

    def run(batch: int, k: int, new_tokens: int, seed: int) -> tuple[float, int, list[int]]:
        """One generate call of batch x k samples: batch requests with n=k, or (separate_requests)
        each prompt repeated k times as requests with n=1 and their own seeds."""
        embeds = prompt_embeds(emb, prompt, random_vectors(batch, shape.d_model, seed), norm, cfg.injection.mode)
        n, copies = (1, k) if case.get("separate_requests") else (k, 1)
        params = [SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=0,
                                 seed=seed * 1000 + i * copies + j, stop_token_ids=[eos], detokenize=True)
                  for i in range(batch) for j in range(copies)]
        prompts = [{"prompt_embeds": embeds[i].detach().float()} for i in range(batch) for _ in range(copies)]
        t0 = time.perf_counter()
        if out["sync_every_call"]:  # timed with the call: the engine's loads of the new version count
            engine.set_adapter(adapter_dir)
        outs = engine.llm.generate(prompts, params, lora_request=engine.lora_request(), use_tqdm=False)
        dt = time.perf_counter() - t0
        calls[0] += 1
        lengths = [len(c.token_ids) for o in outs for c in o.outputs]
        return dt, sum(lengths), lengths

    t0 = time.perf_counter()
    run(1, 1, 8, 999)  # first-call warm-up (graph capture / kernel selection / allocator)
    out["warmup_s"] = time.perf_counter() - t0
    points = []
    for batch, k in case["points"]:
        seeds = iter(range(batch * 100 + k * 10, 10**9))
        rec, (tokens, lengths) = measure(lambda: (lambda r: (r[0], (r[1], r[2])))(run(batch, k, case["new_tokens"], next(seeds))),
                                         case["reps"], case.get("quiet_wait_s", 0))
        dt = rec["seconds"]
        f = rollout_flop_fields(shape, batch, k, len(prompt.input_ids), case["new_tokens"])
        points.append({"B": batch, "K": k, **rec, "generated_tokens": tokens, "equal_lengths": len(set(lengths)) == 1,
                       "tokens_per_s": tokens / dt, "samples_per_s": batch * k / dt, **f, "flops_per_s": f["flops"] / dt})
    out["points"] = points
    if case.get("sample_api_point"):  # the project API (RolloutEngine.generate): natural lengths, EOS allowed
        batch, k = case["sample_api_point"]
        embeds = prompt_embeds(emb, prompt, random_vectors(batch, shape.d_model, 7), norm, cfg.injection.mode)
        reqs = [SamplingRequest(embeds[i], 100 + i) for i in range(batch)]
        def once():
            t0 = time.perf_counter()
            res = engine.generate(reqs, Sampling(k, 1.0, 1.0, case["new_tokens"]), stop_token_ids=[eos])
            return time.perf_counter() - t0, res.completion_lengths()

        rec, lengths = measure(once, 1, case.get("quiet_wait_s", 0))
        out["sample_api"] = {"B": batch, "K": k, **rec, "generated_tokens": sum(lengths), "mean_length": sum(lengths) / len(lengths),
                             "tokens_per_s": sum(lengths) / rec["seconds"]}
    if loads is not None:  # adapter reads from disk over the whole case (warm-up, points, sample API)
        out["adapter_loads"], out["adapter_load_s"] = loads
        out["generate_calls"] = calls[0]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def case_hf(case: dict) -> dict:
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch

    torch.set_num_threads(case["threads"])
    from cycle_oracle.models import load_causal_lm

    info, cfg, layer, tok, prompt, emb, norm = prompt_setup(case)
    shape = info["shape"]
    model = load_causal_lm(info["path"])
    eos = tok.eos_token_id
    T = case["new_tokens"]

    def run(batch: int, k: int, seed: int):
        embeds = prompt_embeds(model.get_input_embeddings(), prompt, random_vectors(batch, shape.d_model, seed), norm, cfg.injection.mode)
        embeds = embeds.repeat_interleave(k, dim=0)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=T, min_new_tokens=T, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t0, ids.shape[0] * ids.shape[1], ids.shape[1]

    run(1, 1, 999)
    points = []
    for batch, k in case["points"]:
        seeds = iter(range(batch * 100 + k * 10, 10**9))
        rec, (tokens, length) = measure(lambda: (lambda r: (r[0], (r[1], r[2])))(run(batch, k, next(seeds))), case["reps"], case.get("quiet_wait_s", 0))
        dt = rec["seconds"]
        f = rollout_flop_fields(shape, batch, k, len(prompt.input_ids), T)
        points.append({"B": batch, "K": k, **rec, "generated_tokens": tokens, "equal_lengths": length == T,
                       "tokens_per_s": tokens / dt, "samples_per_s": batch * k / dt, **f, "flops_per_s": f["flops"] / dt})
    return {"case": "hf_generate", "threads": case["threads"], "prompt_len": len(prompt.input_ids), "new_tokens": T,
            "sampling": "do_sample, temperature 1, top_p 1, top_k off, min_new_tokens = max_new_tokens, KV cache on",
            "points": points, "peak_rss_mb": peak_rss_mb()}
