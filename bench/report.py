"""The results file's conventions, the targets it is checked against, and its Markdown summary."""

from __future__ import annotations

import os

TARGETS = {"rollout_mfu": 0.40, "rollout_vs_hf": 2.0, "learner_mfu": 0.60, "warmup_mfu": 0.60, "orchestration_sync_share": 0.10}
"""Issue 18's targets: rollout MFU on generated tokens only, learner MFU on the passes the step needs;
issue 29's: the warmup's SFT step and the learner at 60% of the matmul rate of the dtype they compute
in (medians of repeats against the same run's reference, where the case measured them)."""


CONVENTIONS = {
    "flops": "forward = 2 * N_blocks per token + 2 * d * V per token whose logits are computed (generated tokens; learner "
             "completion tokens; never prefill except its last position, never the encoder) + attention 4 * n_layers * "
             "d_attn * (keys attended) per token (= 2 * n_layers * d_attn * T per token over a causal sequence of length T). "
             "Embedding lookups are free. LoRA backward: input grads only for the frozen base (1x forward) + LoRA weight grads + attention's second operand.",
    "rollout_flops": "flops/mfu: generated tokens only (per generated token 2 N_blocks + 2 d V + attention over its context); "
                     "flops_work/mfu_work: + the prefill of every sample's prompt (B*K prefills: what the engine computes with "
                     "prefix caching off); flops_useful/mfu_useful: + one prefill per activation (B prefills)",
    "learner_flops": "the passes update_shard makes: old-policy forward (only with more than one update per rollout) + reference "
                     "forward (bare assistant header + completion, base model) + policy forward and backward, over prompt + "
                     "completion tokens (padding excluded)",
    "mfu": "model FLOP/s / dense 2048^2 matmul FLOP/s measured with the same thread count in the same run, in the dtype the case "
           "computes in (fp32; bf16 for a bf16 learner or warmup case); mfu_median: the median step's FLOP/s / the matmul's median",
    "warmup_flops": "the warmup SFT step's necessary FLOPs: the frozen target's forward through the read layer up to each example's "
                    "last read position + the decoder's forward and backward (frozen base, LoRA) over prompt + answer, the LM head "
                    "on the answer tokens (padding excluded)",
    "tokens_per_s": "rollout: generated tokens / wall time of one generate call (best of reps); learner: completion "
                    "(trained) tokens / GRPO step time; encoder: description tokens (with prefix) / call time",
    "load": "load1_start/end = 1-min load average; foreign_cores = CPU-seconds used by other processes during the "
            "measurement / wall seconds (0 = quiet machine); own_cores = ours",
}


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
    learners = [(name, c, p) for name, c in (("recipe", results.get("learner") or {}), *results.get("learner_variants", {}).items())
                for p in c.get("points", [])]
    key = "mfu_median" if any(p.get("mfu_median") is not None for _, _, p in learners) else "mfu"
    scored = [(n, c, p) for n, c, p in learners if p.get(key) is not None]
    if scored:
        name, c, lp = max(scored, key=lambda x: x[2][key])
        t["learner_mfu"] = {"target": TARGETS["learner_mfu"], "best": lp[key], "measure": key,
                            "at": f"{lp['n_samples']} samples, {name} ({c.get('dtype', 'float32')})", "met": lp[key] >= TARGETS["learner_mfu"]}
    sfts = [(name, c) for name, c in (("recipe", results.get("warmup") or {}), *results.get("warmup_variants", {}).items())
            if c.get("mfu_median") is not None]
    if sfts:
        name, c = max(sfts, key=lambda x: x[1]["mfu_median"])
        t["warmup_mfu"] = {"target": TARGETS["warmup_mfu"], "best": c["mfu_median"], "measure": "mfu_median",
                           "at": f"{name} ({c.get('dtype', 'float32')})", "met": c["mfu_median"] >= TARGETS["warmup_mfu"]}
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


def _load_cell(p: dict) -> str:
    if "load1_start" not in p:
        return "-"
    return f"{p['load1_start']:.2f} / {p.get('foreign_cores', 0):.2f}"


def _engine_extras(c: dict) -> str:
    """The settings of an engine case beyond binding / prefix cache / LoRA (older files lack the keys)."""
    extras = []
    if c.get("max_num_seqs", 64) != 64:
        extras.append(f"max_num_seqs {c['max_num_seqs']}")
    if c.get("requests") == "separate":
        extras.append("K requests of n=1")
    if isinstance(c.get("compilation_mode"), int):
        extras.append(f"compilation mode {c['compilation_mode']}")
    pre = c.get("preload")
    if pre:
        mapped = pre.get("mapped", {})
        extras.append("LD_PRELOAD " + ", ".join(f"{os.path.basename(lib)}{'' if mapped.get(lib) else ' (not mapped)'}" for lib in pre["libs"]))
    return "; ".join(extras) or "-"


def _profiled_cases(r: dict):
    """(name, case record) of every case that ran under py-spy (`--profile`)."""
    for section in ("rollout", "hf", "encoder", "warmup", "learner"):
        rec = r.get(section) or {}
        if rec.get("profile"):
            yield section, rec
        for name, case in (rec.get("cases") or {}).items():
            if case.get("profile"):
                yield name, case
    for section in ("warmup", "learner"):
        for name, case in (r.get(f"{section}_variants") or {}).items():
            if case.get("profile"):
                yield f"{section}_{name}", case


def _profiles_markdown(r: dict, top: int = 8) -> list[str]:
    """Where each profiled case's main thread spent its samples: categories and the top leaf frames."""
    L: list[str] = []
    for name, case in _profiled_cases(r):
        p = case["profile"]
        if not L:
            L += ["## Profiles (py-spy --native, 25 Hz, main thread; timings of this invocation are perturbed)", ""]
        L += [f"### {name}: {p['samples']} samples in the measured calls ({p['focus_share_of_all_samples']:.0%} of the process's)", "",
              "| category | share |", "|---|---|"]
        L += [f"| {k} | {v:.1%} |" for k, v in p["categories"].items()]
        L += ["", "| top leaf frame | share |", "|---|---|"]
        L += [f"| `{x['frame'][:110]}` | {x['share']:.1%} |" for x in p["top_leaves"][:top]]
        L += ["", "| top Python frame (inclusive) | share |", "|---|---|"]
        L += [f"| `{x['frame'][:110]}` | {x['share']:.1%} |" for x in p["top_python_inclusive"][:top]]
        L.append("")
    return L


def _warmup_markdown(r: dict) -> list[str]:
    """The warmup SFT case and its variants: one row each."""
    w = r.get("warmup")
    if not w:
        return []
    variants = {"recipe": w, **r.get("warmup_variants", {})}
    L = [f"## Warmup SFT: DecoderLearner.sft_micro_step ({w.get('micro_batch_size', '?')} examples x {w.get('grad_accum', '?')} calls a step, "
         f"micro-batches of <= {w.get('micro_batch_tokens')} tokens; DeepSpeed start {w.get('start_s', 0):.0f} s)", "",
         "Examples drawn from the recipe's warmup data by its mixture; FLOPs: the read of each context up to its read position + forward "
         "and backward over prompt + answer. MFU against the matmul reference of the variant's dtype (`median`: median step / the "
         "reference's median).", "",
         "| variant | dtype | median step s (best) | examples/s | trained tokens/s | MFU (median) | MFU (median step / best matmul) | padding | read share of FLOPs | peak RSS MB | load |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for vname, v in variants.items():
        if "steps" not in v:
            L.append(f"| {vname} | error: {v.get('error')} ||||||||||")
            continue
        extra = [o for o in v.get("overrides", []) if not o.startswith(("model.name=", "injection.scale=", "warmup.corpus.paths="))] \
            + ([f"torch.compile {v['compile']} (first steps {sum(v.get('warm_step_s', [])):.0f} s)"] if v.get("compile") else []) \
            + [f"{k}={x}" for k, x in (v.get("env") or {}).items()]
        L.append(f"| {vname}{' (' + ', '.join(extra) + ')' if extra else ''} | {v['dtype']} | {v['seconds']:.2f} ({v['seconds_best']:.2f}) | "
                 f"{v['examples_per_s']:.2f} | {v['trained_tokens_per_s']:.0f} | {_f(v.get('mfu_median'), 1, True)} | {_f(v.get('mfu'), 1, True)} | "
                 f"{_f(v.get('padding_share'), 1, True)} | {_f(v.get('read_share_of_flops'), 1, True)} | {v.get('peak_rss_mb', 0):.0f} | {_load_cell(v)} |")
    return L + [""]


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
                L.append(f"| {x['dtype']} {x['m']}x{x['k']} @ {x['k']}x{x['n']} ({key}) | {x['flops_per_s'] / 1e9:.1f} G | {_load_cell(x)} |")
        for x in mach.get("decode_gemm", []):
            L.append(f"| fp32 [{x['m']} x {x['k']}] @ [{x['k']} x {x['n']}] (decode-shaped) | {x['flops_per_s'] / 1e9:.1f} G | {_load_cell(x)} |")
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
                     f"{_f(h['tokens_per_s'], 0) if h else '-'} | {_f(p['tokens_per_s'] / h['tokens_per_s'], 2) if h else '-'} | {_load_cell(p)} |")
        if "sample_api" in base:
            s = base["sample_api"]
            L += ["", f"Through `RolloutEngine.generate` (natural lengths, EOS allowed), B={s['B']} K={s['K']}: "
                      f"{s['tokens_per_s']:.0f} tokens/s, mean length {s['mean_length']:.1f} (load {_load_cell(s)})."]
        L.append("")
    if ro:
        L += ["### Engine settings (separate engine starts)", "",
              "| case | binding | prefix cache | LoRA | other | B x K | gen tokens/s | vs default | MFU (gen) | engine start s | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        base_by = {(p["B"], p["K"]): p for p in (base or {}).get("points", [])}
        for name, c in ro.items():
            if "error" in c or "skipped" in c:
                L.append(f"| {name} | {'error: ' + str(c['error']) if 'error' in c else 'skipped: ' + c['skipped']} ||||||||||")
                continue
            for p in c["points"]:
                if name == "bind01_nocache_nolora" and (p["B"], p["K"]) not in {(pp["B"], pp["K"]) for cc in ro.values() if cc is not c for pp in cc.get("points", [])}:
                    continue
                b0 = base_by.get((p["B"], p["K"]))
                L.append(f"| {name} | {c['binding']} | {'on' if c['prefix_caching'] else 'off'} | {c['lora'] or 'none'} | {_engine_extras(c)} | {p['B']}x{p['K']} | "
                         f"{p['tokens_per_s']:.0f} | {_f(p['tokens_per_s'] / b0['tokens_per_s'], 2) if b0 else '-'} | {_f(p.get('mfu'), 1, True)} | "
                         f"{c['engine_start_s']:.0f} | {_load_cell(p)} |")
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
        L += [f"| {p['B']} | {p['K']} | {p['tokens_per_s']:.0f} | {_f(p.get('mfu'), 1, True)} | {_f(p.get('mfu_work'), 1, True)} | {_load_cell(p)} |" for p in hf["points"]]
        L.append("")
    enc = r.get("encoder")
    if enc and "points" in enc:
        L += [f"## Encoder (first {enc['layer']} blocks + LoRA r{enc['lora_rank']}, {enc.get('dtype', 'float32')}; MFU against the matmul reference of that dtype)", "",
              "| texts | tokens/text | op | seconds | texts/s | tokens/s | MFU | load |", "|---|---|---|---|---|---|---|---|"]
        for p in enc["points"]:
            for op in ("score", "update"):
                x = p[op]
                L.append(f"| {p['n_texts']} | {p['mean_tokens']:.0f} | {op} | {x['seconds']:.2f} | {x['texts_per_s']:.1f} | {x['tokens_per_s']:.0f} | {_f(x.get('mfu'), 1, True)} | {_load_cell(x)} |")
        L.append("")
    L += _warmup_markdown(r)
    le = r.get("learner")
    variants = {"recipe": le, **r.get("learner_variants", {})} if le else {}
    if le and "points" in le:
        L += [f"## Learner: DecoderLearner.update_shard (prompt {le['prompt_len']} + completion {le['completion_len']} tokens, "
              f"KL reference {le['kl_reference']}, ZeRO {le['zero_stage']}; DeepSpeed start {le['start_s']:.0f} s)", "",
              "MFU against the matmul reference of the variant's dtype; `median`: the median step against the reference's median.", "",
              "| variant | dtype | samples | step s | trained tokens/s | MFU (step) | median step s / MFU | old fwd s / MFU | ref fwd s / MFU | policy fwd+bwd+step s / MFU | peak RSS MB | load |",
              # an old fwd of "-": the step makes no old-policy pass (one update per rollout); its FLOPs are not counted
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for vname, v in variants.items():
            if "points" not in v:
                L.append(f"| {vname} | error: {v.get('error')} |||||||||")
                continue
            extra = [o for o in v.get("overrides", []) if not o.startswith("model.name=")] \
                + ([f"torch.compile {v['compile']} (first step {v.get('warm_step_s', 0):.0f} s)"] if v.get("compile") else []) \
                + [f"{k}={x}" for k, x in (v.get("env") or {}).items()]
            for p in v["points"]:
                pc = p["pieces"]
                median = f"{p['seconds_median']:.2f} / {_f(p.get('mfu_median'), 1, True)}" if p.get("seconds_median") else "-"
                L.append(f"| {vname}{' (' + ', '.join(extra) + ')' if extra else ''} | {v.get('dtype', 'float32')} | {p['n_samples']} | {p['seconds']:.2f} | "
                         f"{p['trained_tokens_per_s']:.0f} | {_f(p.get('mfu'), 1, True)} | {median} | "
                         + " | ".join(f"{pc[k]['seconds']:.2f} / {_f(pc[k].get('mfu'), 1, True)}" if k in pc else "-"
                                      for k in ("old_forward", "ref_forward", "policy_update"))
                         + f" | {v.get('peak_rss_mb', 0):.0f} | {_load_cell(p)} |")
        L.append("")
    e2e = r.get("e2e", {})
    if e2e:
        L += [f"## End-to-end GRPO step ({m.get('e2e_recipe', '')} via `cycle-oracle run`; mean share of time_step over steps "
              f"2..{m.get('args', {}).get('e2e_steps', '')})", "",
              "`rollout` is the driver's wait for the step's samples (with overlap_rollout it is the part not hidden behind the "
              "previous step); `idle` = time_step minus the four timed phases (driver work, advantages, logging, Ray calls).", "",
              *([f"Recipe overrides: `{' '.join(m['e2e_overrides'])}`.", ""] if m.get("e2e_overrides") else []),
              "| run | rollout actors | step s | rollout | score+enc update | learn | sync | idle | orchestration+sync | samples/s (step) | samples/s (rollout wait) | wall s | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, x in e2e.items():
            if "fractions" not in x:
                L.append(f"| {name} | failed (rc {x.get('returncode')}) ||||||||||||")
                continue
            fr = x["fractions"]
            L.append(f"| {name} | {x['rollout']['num_actors']} x {x['rollout']['threads']} thr | {x['mean_seconds']['step']:.1f} | "
                     + " | ".join(_f(fr[k], 0, True) for k in ("rollout", "score", "learn", "sync", "idle", "orchestration_plus_sync"))
                     + f" | {x['samples_per_s_step']:.3f} | {_f(x['samples_per_s_rollout'], 2)} | {x['wall_s']:.0f} | {_load_cell(x)} |")
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
    L += _profiles_markdown(r)
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
