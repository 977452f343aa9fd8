"""Warmup SFT case: `DecoderLearner.sft_micro_step` as the warmup recipe runs it (one optimizer step
= `decoder_optim.grad_accum` calls of `micro_batch_size` examples), on examples drawn from the
recipe's own warmup data (the data cache the main job writes; built here when missing) by the
recipe's mixture, with the necessary FLOPs of each step (`flops.sft_flops`: the frozen target's
read up to each read position, the decoder's forward + backward over prompt + answer, the LM head
on the answer tokens) and the padding the passes computed on beside them."""

from __future__ import annotations

import random
import statistics
import time

from bench import flops as bf
from bench.inputs import case_model, single_rank_learner
from bench.load import LoadProbe, peak_rss_mb, wait_quiet


def padded_tokens(lengths: list[int], budget: int | None) -> int:
    """Tokens the micro-batches of `lengths` compute on, padding included (`batch.micro_batches`:
    longest first, rows x longest <= budget)."""
    from cycle_oracle.batch import micro_batches

    return sum(len(g) * max(lengths[i] for i in g) for g in micro_batches(lengths, budget) if g)


def case_sft(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    from cycle_oracle.data.mixture import WarmupMixture
    from cycle_oracle.data.read_positions import to_example
    from recipes.common import warmup_data

    info, cfg, layer = case_model(case)
    shape = info["shape"]
    t0 = time.perf_counter()
    train, _heldout, report = warmup_data(cfg, info["path"], case["threads"])
    data_s = time.perf_counter() - t0
    learner, start_s = single_rank_learner(case, info, cfg, layer, "warmup")
    lora = shape.lora_params(cfg.decoder_lora.r)
    mixture = WarmupMixture({k: v for k, v in train.items() if v}, cfg.warmup.mixture, cfg.seed)
    rng = random.Random(cfg.seed)
    ga, mbs = cfg.decoder_optim.grad_accum, cfg.decoder_optim.micro_batch_size
    steps = [[[to_example(it, rng, cfg.injection.num_placeholders) for it in mixture.sample(mbs)] for _ in range(ga)]
             for _ in range(case["warm_steps"] + case["reps"])]

    def run_step(calls) -> tuple[float, dict]:
        work: dict[str, float] = {}
        t = time.perf_counter()
        for examples in calls:
            r = learner.sft_micro_step(examples)
            for k, v in r.items():
                if k.startswith("work/"):
                    work[k[5:]] = work.get(k[5:], 0.0) + v
        return time.perf_counter() - t, work

    warm = [run_step(calls)[0] for calls in steps[: case["warm_steps"]]]  # first steps: allocator, thread pool, compilation
    waited = wait_quiet(case["quiet_wait_s"]) if case.get("quiet_wait_s") else None
    records = []
    with LoadProbe() as probe:
        for calls in steps[case["warm_steps"]:]:
            seconds, work = run_step(calls)
            f = bf.sft_flops(shape, layer, lora, work)
            prompts_answers = [learner._sft_prompts(ex) for ex in calls]
            lengths = [len(p.input_ids) + len(a) for ps, ans in prompts_answers for p, a in zip(ps, ans)]
            records.append({"seconds": seconds, "work": work, "flops": f["total"], "flops_read": f["read"], "flops_per_s": f["total"] / seconds,
                            "tokens": work["tokens"], "trained_tokens": work["head_tokens"], "read_tokens": work["read_tokens"],
                            "padded_tokens": sum(padded_tokens([len(p.input_ids) + len(a) for p, a in zip(ps, ans)], cfg.memory.micro_batch_tokens)
                                                 for ps, ans in prompts_answers), "longest": max(lengths)})
    med = statistics.median(r["seconds"] for r in records)
    rates = [r["flops_per_s"] for r in records]
    out = {"case": "sft", "dtype": cfg.model.dtype, "layer": layer, "threads": case["threads"], "start_s": start_s, "data_s": data_s, "data_cached": report.get("seconds", 0) < 5,
           "lora_params": lora, "micro_batch_size": mbs, "grad_accum": ga, "micro_batch_tokens": cfg.memory.micro_batch_tokens,
           "warm_step_s": warm, "steps": records,
           "seconds": med, "seconds_best": min(r["seconds"] for r in records), "reps": len(records),
           "flops_per_s": statistics.median(rates), "flops_per_s_best": max(rates),
           "examples_per_s": mbs * ga / med, "trained_tokens_per_s": statistics.median(r["trained_tokens"] / r["seconds"] for r in records),
           "padding_share": 1 - sum(r["tokens"] for r in records) / max(sum(r["padded_tokens"] for r in records), 1),
           "read_share_of_flops": sum(r["flops_read"] for r in records) / sum(r["flops"] for r in records),
           **probe.record(), "quiet_wait": waited, "peak_rss_mb": peak_rss_mb()}
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return out
