"""Learner case: DecoderLearner.update_shard as the recipe runs it (the old-policy pass only when an
update per rollout is not enough: epochs or minibatches > 1), FLOPs counted for the passes it makes;
the reference forward is also timed alone to split the step."""

from __future__ import annotations

import statistics
import time

from bench import flops as bf
from bench.inputs import case_model, corpus_token_rows, random_vectors, single_rank_learner
from bench.load import measure, peak_rss_mb


def piece_flops(f: dict, old_timed_alone: bool = False) -> dict:
    """FLOPs of each timed piece of a step from `learner_flops`: the reference forward, and the rest
    of the step (policy forward + backward + step), which holds the old-policy pass unless that was
    timed as a piece of its own (result files written before issue 18)."""
    return {"old_forward": f["old"], "ref_forward": f["ref"], "policy_update": f["policy"] + (0 if old_timed_alone else f["old"])}


def case_learner(case: dict) -> dict:
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    from cycle_oracle.batch import RolloutBatch

    info, cfg, layer = case_model(case)
    shape = info["shape"]
    learner, start_s = single_rank_learner(case, info, cfg, layer, "grpo")
    lora = shape.lora_params(cfg.decoder_lora.r)
    T = case["completion_len"]
    out = {"case": "learner", "dtype": cfg.model.dtype, "threads": case["threads"], "start_s": start_s, "prompt_len": len(learner.description_prompt.input_ids),
           "reference_prompt_len": len(learner.reference_prompt.input_ids), "completion_len": T, "lora_params": lora,
           "kl_reference": cfg.grpo.kl_reference if cfg.grpo.kl_coef > 0 else None, "zero_stage": cfg.grpo_decoder_optim().zero_stage, "points": []}
    temp = cfg.sampling.temperature
    for n in case["n_samples"]:
        rows = corpus_token_rows(learner.tokenizer, n, T)
        vecs = random_vectors(n, shape.d_model, n)
        adv = torch.randn(n, generator=torch.Generator().manual_seed(n))
        samples = RolloutBatch(vectors=vecs, token_ids=rows, sampler_logprobs=[[0.0] * T for _ in range(n)], texts=[""] * n,
                               truncated=torch.zeros(n, dtype=torch.bool), versions=torch.zeros(n, dtype=torch.long),
                               group_size=1, temperature=temp, advantages=adv.float())
        lp, _, _ = learner.policy_logprobs(samples)  # sampler logprobs = the current policy's (ratio 1)
        samples.sampler_logprobs = [lp[i, :T].tolist() for i in range(n)]
        g = cfg.grpo
        old_pass = g.epochs_per_rollout > 1 or g.minibatches_per_epoch > 1
        f = bf.learner_flops(shape, n, out["prompt_len"], T, lora, out["kl_reference"], out["reference_prompt_len"],
                             g.epochs_per_rollout, old_pass=old_pass)
        out["old_policy_pass"] = old_pass
        t_warm = time.perf_counter()
        learner.update_shard(samples)  # warm-up (and, with case["compile"], the compilation)
        out["warm_step_s"] = time.perf_counter() - t_warm
        def once():
            t0 = time.perf_counter()
            if out["kl_reference"]:
                learner.reference_logprobs(samples)  # timed alone: the step makes the same pass inside
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            learner.update_shard(samples)
            t_step = time.perf_counter() - t0
            return t_step, {"ref_forward": t_ref}

        rec, timings = measure(once, case["reps"], case.get("quiet_wait_s", 0))
        timings["step"] = rec["seconds"]
        # the step's own passes: the old-policy forward (only with old_pass; its time is inside the rest), the reference
        # forward (timed alone above), the policy forward + backward + AdamW step (the rest)
        timings["policy_update"] = max(timings["step"] - timings["ref_forward"], 1e-9)
        flops = piece_flops(f)
        pieces = {
            "ref_forward": {"seconds": timings["ref_forward"], "flops": flops["ref_forward"]},
            "policy_update": {"seconds": timings["policy_update"], "flops": flops["policy_update"],
                              "note": "step - ref: (old-policy forward, only with more than one update per rollout) + forward + backward + AdamW step"},
        }
        for p in pieces.values():
            p["flops_per_s"] = p["flops"] / p["seconds"] if p["seconds"] > 0 and p["flops"] else None
        median = statistics.median(rec["seconds_all"])  # the kept attempt's repeats
        out["points"].append({"n_samples": n, **rec, "flops": f["total"], "flops_per_s": f["total"] / timings["step"],
                              "seconds_median": median, "flops_per_s_median": f["total"] / median, "step_seconds": rec["seconds_all"],
                              "trained_tokens": f["trained_tokens"], "processed_tokens": f["processed_tokens"],
                              "trained_tokens_per_s": f["trained_tokens"] / timings["step"], "pieces": pieces})
    out["peak_rss_mb"] = peak_rss_mb()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return out
