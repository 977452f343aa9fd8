"""The `bench` package: the FLOPs arithmetic (relations, not speeds), the matmul probe at a tiny
size, the load probe, the Markdown summary of a synthetic result, and its entry points."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench.case
import bench.flops as bf
import bench.machine
import bench.main
import bench.paper
import bench.report

REPO = Path(__file__).resolve().parents[1]


def test_parameter_counts_match_real_models(tiny_model, tiny_path):
    shape = bf.shape_from_hf_config(json.loads((Path(tiny_path) / "config.json").read_text()), "tiny")
    blocks = sum(p.numel() for n, p in tiny_model.named_parameters() if ".layers." in n or n.endswith("model.norm.weight"))
    assert shape.blocks_params() == blocks
    assert shape.total_params() == sum(p.numel() for p in tiny_model.parameters())  # tied embeddings counted once
    # Published sizes: SmolLM2-135M (134.5M with tied embeddings) and Qwen3-8B (8.19B).
    assert abs(bf.SMOLLM2_135M.total_params() - 134.5e6) / 134.5e6 < 0.01
    assert abs(bf.QWEN3_8B.total_params() - 8.19e9) / 8.19e9 < 0.01
    assert bf.QWEN3_8B.head_params == 4096 * 151936


def test_lora_parameters_on_a_real_adapter(tiny_model, tiny_path):
    from cycle_oracle.config import LoraSettings
    from cycle_oracle.models import attach_lora

    shape = bf.shape_from_hf_config(json.loads((Path(tiny_path) / "config.json").read_text()))
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.lora_params(4) == trainable


def test_attention_convention():
    s = bf.SMOLLM2_135M
    T = 100
    full = bf.attention_flops(s, 0, T)
    assert full == 2 * s.n_layers * s.d_attn * T * (T + 1)  # ~ 2 * L * d * T per token
    # split anywhere: prefix + suffix = whole
    assert bf.attention_flops(s, 0, 40) + bf.attention_flops(s, 40, T) == full
    # forward over a sequence = 2 N per token + attention + head on the asked positions
    assert bf.forward_flops(s, T, 0) == 2 * s.blocks_params() * T + full
    assert bf.forward_flops(s, T, 3) - bf.forward_flops(s, T, 0) == 3 * 2 * s.head_params


def test_generation_flops_relations():
    s = bf.SMOLLM2_135M
    g = bf.generation_flops(s, 50, 40)
    # the same tokens as one teacher-forced forward over prompt + generated (minus the last token),
    # with logits at the last prompt position and every fed-back generated token
    assert g["total"] == bf.forward_flops(s, 50 + 39, 40)
    r1 = bf.rollout_flops(s, 2, 4, 50, 40)
    r2 = bf.rollout_flops(s, 4, 4, 50, 40)
    assert r2["total"] == 2 * r1["total"]
    shared = bf.rollout_flops(s, 2, 4, 50, 40, shared_prefill=True)
    assert shared["generated"] == r1["generated"] and shared["prefill"] * 4 == r1["prefill"]
    # the generated-token convention: about (2 N_blocks + 2 d V + attention) per generated token
    per_token = r1["generated"] / r1["generated_tokens"]
    assert 2 * (s.blocks_params() + s.head_params) < per_token < 2 * (s.blocks_params() + s.head_params) * 1.1
    assert r1["generated_tokens"] == 2 * 4 * 40


def test_learner_and_encoder_relations():
    s = bf.SMOLLM2_135M
    lora = s.lora_params(8)
    f = bf.learner_flops(s, 16, 60, 40, lora, "base", 5)
    fwd = bf.forward_flops(s, 100, 40, lora_params=lora)
    assert f["old"] == 16 * fwd
    # forward + backward; backward = input grads (as many FLOPs as the forward) + LoRA weight grads + attention's second operand
    assert f["policy"] == 16 * (2 * fwd + 2 * lora * 100 + bf.attention_flops(s, 0, 100))
    # per token about 4 N + 6 N_lora (a frozen base has no weight gradients), not the 6 N of full training
    blocks, head = s.blocks_params(), s.head_params
    assert 16 * (4 * blocks * 100 + 6 * lora * 100 + 4 * head * 40) < f["policy"] < 16 * (4 * blocks * 100 + 6 * lora * 100 + 4 * head * 40) * 1.1
    assert 0 < f["ref"] < f["old"]  # the base reference reads a short header instead of the oracle prompt
    assert bf.learner_flops(s, 16, 60, 40, lora, None)["ref"] == 0
    assert bf.learner_flops(s, 16, 60, 40, lora, "warmup")["ref"] == 16 * bf.forward_flops(s, 100, 40)
    e = bf.encoder_flops(s, 15, 8, 50, s.lora_params(8, layers=15))
    assert e["score"] == 8 * bf.forward_flops(s, 50, 0, layers=15, lora_params=s.lora_params(8, layers=15))
    assert 2.0 * e["score"] < e["update"] < 2.3 * e["score"]  # forward + backward of a frozen base: about 2x a forward
    assert bf.encoder_flops(s, 30, 1, 50)["score"] > 1.9 * bf.encoder_flops(s, 15, 1, 50)["score"]


def test_paper_step():
    out = bf.grpo_step_on_paper(bf.GrpoPaperSetup())
    roles = {k: v for k, v in out["flops"].items() if k != "total"}
    assert out["flops"]["total"] == sum(roles.values())
    assert abs(sum(out["share"].values()) - 1) < 1e-9
    assert out["flops"]["learner_policy"] > out["flops"]["learner_old"] > out["flops"]["learner_ref"]
    twice = bf.grpo_step_on_paper(bf.GrpoPaperSetup(gpus=16))
    assert abs(twice["seconds_at_mfu"]["total"] * 2 - out["seconds_at_mfu"]["total"]) < 1e-12
    assert out["rollout_decode_bandwidth_bound_s"] > 0
    assert bf.mfu(1e12, 2.0, 1e12) == 0.5


def test_matmul_probe_and_load_probe():
    r = bench.machine.matmul_flops(64, "float32", threads=1, reps=3)
    assert r["flops_per_s"] > 0 and r["best_s"] <= r["median_s"]
    assert r["flops_per_s"] >= r["flops_per_s_median"]
    for key in ("load1_start", "load1_end", "foreign_cores", "own_cores"):
        assert key in r and r[key] >= 0
    rect = bench.machine.matmul_flops(32, "float32", threads=1, reps=2, m=4, k=16)
    assert (rect["m"], rect["k"], rect["n"]) == (4, 16, 32)


def test_markdown_and_targets_from_a_synthetic_result():
    pt = {"B": 2, "K": 2, "tokens_per_s": 100.0, "samples_per_s": 2.0, "mfu": 0.3, "load1_start": 0.1, "foreign_cores": 0.0}
    results = {
        "meta": {"model": {"name": "m"}, "date_utc": "now", "cpu": "cpu", "cpus": 2, "memory_gb": 1, "git": "x", "versions": {}},
        "rollout": {"cases": {"bind01_nocache_nolora": {"binding": "0-1", "prefix_caching": False, "lora": None, "prompt_len": 50,
                                                        "new_tokens": 8, "engine_start_s": 1.0, "peak_rss_mb": 1.0, "points": [pt]}}},
        "hf": {"points": [dict(pt, tokens_per_s=25.0)]},
        "learner": {"points": [{"n_samples": 4, "mfu": 0.65}]},
        "e2e": {"e2e_plain": {"fractions": {"orchestration_plus_sync": 0.2}}},
        "paper": bench.paper.paper_section(),
    }
    t = bench.report.evaluate_targets(results)
    assert t["rollout_vs_hf"]["best"] == 4.0 and t["rollout_vs_hf"]["met"]
    assert not t["rollout_mfu"]["met"] and t["learner_mfu"]["met"]
    assert not t["orchestration_sync_share/e2e_plain"]["met"]
    results["targets"] = t
    del results["learner"], results["e2e"]  # partial records (enough for the targets)
    md = bench.report.to_markdown(results)
    assert "| 2 | 2 | 100 |" in md and "4.00" in md and "## Targets" in md and "Qwen3-8B" in md


def test_main_takes_the_options_without_the_program_name(tmp_path):
    """`bench.main.main(argv)` (what `cycle-oracle bench --sections ... --out ...` calls) runs the
    sections it is given, with or without the `--` separator the CLI may pass through."""
    out = tmp_path / "paper.json"
    assert bench.main.main(["--sections", "paper", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["sections"] == ["paper"] and "paper" in result
    out2 = tmp_path / "paper2.json"
    assert bench.main.main(["--", "--sections", "paper", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["meta"]["args"]["out"] == str(out2)


def test_python_dash_m_bench_runs():
    """`python -m bench` (how every case subprocess starts) is the same program."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: cycle-oracle bench" in proc.stdout and "--sections" in proc.stdout


def test_a_case_runs_as_the_bench_module_in_a_fresh_interpreter(monkeypatch):
    """run_case starts `python -m bench --_case JSON --_result FILE` from the repo root and reads FILE."""
    seen = {}

    def fake_run(cmd, cwd, env, **kw):
        seen.update(cmd=cmd, cwd=cwd, env=env)
        Path(cmd[cmd.index("--_result") + 1]).write_text(json.dumps({"case": "x", "points": []}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.case.subprocess, "run", fake_run)
    out = bench.case.run_case({"kind": "hf", "name": "x"})
    assert seen["cmd"][:3] == [sys.executable, "-m", "bench"]
    assert json.loads(seen["cmd"][seen["cmd"].index("--_case") + 1]) == {"kind": "hf", "name": "x"}
    assert Path(seen["cwd"]) == REPO and seen["env"]["PYTHONPATH"] == str(REPO)
    assert out["points"] == [] and "case_wall_s" in out and "error" not in out


def test_the_case_side_runs_the_kind_it_is_given(monkeypatch, tmp_path):
    """`--_case JSON --_result FILE`: the case's kind picks the function, its record lands in FILE."""
    monkeypatch.setitem(bench.case.CASES, "echo", lambda case: {"case": case["name"], "seconds": 1.5})
    result = tmp_path / "result.json"
    assert bench.main.main(["--_case", json.dumps({"kind": "echo", "name": "e"}), "--_result", str(result)]) == 0
    assert json.loads(result.read_text()) == {"case": "e", "seconds": 1.5}


def test_engine_settings_table_renders_old_and_new_case_records():
    """The Engine settings table: records from before max_num_seqs / requests / preload existed,
    the new cases' settings in the `other` column, a crashed case (error) and a skipped one."""
    pt = {"B": 4, "K": 4, "seconds": 1.0, "tokens_per_s": 100.0, "samples_per_s": 2.0, "mfu": 0.2}
    old = {"binding": "0-1", "prefix_caching": False, "lora": None, "prompt_len": 50, "new_tokens": 8, "engine_start_s": 3.0,
           "peak_rss_mb": 1.0, "compilation_mode": "default", "points": [pt]}
    cases = {"bind01_nocache_nolora": old, "eager_nolora": dict(old, compilation_mode=0, points=[dict(pt, tokens_per_s=50.0)]),
             "prefix_caching_on": {"case": "prefix_caching_on", "error": "exit -11", "stderr_tail": "Segmentation fault"},
             "max_num_seqs_16": dict(old, max_num_seqs=16, requests="n"),
             "separate_requests": dict(old, max_num_seqs=64, requests="separate"),
             "preload_iomp": dict(old, preload={"libs": ["/v/lib/libiomp5.so", "/usr/lib/libtcmalloc.so.4"],
                                                "mapped": {"/v/lib/libiomp5.so": True, "/usr/lib/libtcmalloc.so.4": False}})}
    results = {"meta": {"model": {"name": "m"}, "date_utc": "now", "cpu": "cpu", "cpus": 2, "memory_gb": 1, "git": "x", "versions": {}},
               "rollout": {"cases": cases}}
    md = bench.report.to_markdown(results)
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ") and " | " in line}
    assert "| 0-1 | off | none | compilation mode 0 | 4x4 | 50 | 0.50 |" in rows["eager_nolora"]
    assert "| max_num_seqs 16 | 4x4 | 100 | 1.00 |" in rows["max_num_seqs_16"]
    assert "| K requests of n=1 |" in rows["separate_requests"]
    assert "| LD_PRELOAD libiomp5.so, libtcmalloc.so.4 (not mapped) |" in rows["preload_iomp"]
    assert "error: exit -11" in rows["prefix_caching_on"]
    assert "| none | - | 4x4 |" in rows["bind01_nocache_nolora"]
    header = next(line for line in md.splitlines() if line.startswith("| case | binding"))
    assert rows["prefix_caching_on"].count("|") == header.count("|")
    cases["preload_iomp"] = {"case": "preload_iomp", "skipped": "no libtcmalloc / libiomp5.so in /x"}
    assert "| preload_iomp | skipped: no libtcmalloc / libiomp5.so in /x |" in bench.report.to_markdown(results)


def test_mapped_libraries_reads_the_maps_format(tmp_path):
    import bench.rollout

    lib = tmp_path / "libiomp5.so"
    lib.write_bytes(b"")
    link = tmp_path / "libiomp5.so.link"
    link.symlink_to(lib)
    maps = f"7f00-7f01 r-xp 00000000 08:01 123    {lib}\n7f02-7f03 rw-p 00000000 00:00 0 \n"
    assert bench.rollout.mapped_libraries([str(lib), str(link), "/nope/libtcmalloc.so.4"], maps) == {
        str(lib): True, str(link): True, "/nope/libtcmalloc.so.4": False}
    assert bench.rollout.mapped_libraries(["/nope/x.so"]) == {"/nope/x.so": False}  # this process's own maps


def test_a_case_env_reaches_the_case_interpreter(monkeypatch):
    """case["env"] (the preload case's LD_PRELOAD) is in the subprocess environment from its start."""
    seen = {}

    def fake_run(cmd, cwd, env, **kw):
        seen.update(env=env)
        Path(cmd[cmd.index("--_result") + 1]).write_text(json.dumps({"case": "x", "points": []}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.case.subprocess, "run", fake_run)
    bench.case.run_case({"kind": "engine", "name": "x", "env": {"LD_PRELOAD": "/v/lib/libiomp5.so"}})
    assert seen["env"]["LD_PRELOAD"] == "/v/lib/libiomp5.so" and seen["env"]["WANDB_MODE"] == "disabled"


def test_a_crashed_case_is_an_error_record(monkeypatch):
    """An engine that kills its interpreter (the prefix-caching crash was a segfault) is recorded, not raised."""
    monkeypatch.setattr(bench.case.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, -11, "", "Segmentation fault"))
    out = bench.case.run_case({"kind": "engine", "name": "prefix_caching_on"})
    assert out == {"case": "prefix_caching_on", "error": "exit -11", "stderr_tail": "Segmentation fault"}


def test_the_rollout_section_runs_each_engine_case_as_its_own_case(monkeypatch, tmp_path):
    """Every engine case is one run_case (one engine start) with its setting; preload_iomp carries
    LD_PRELOAD in its env, or is recorded as skipped where no library is found."""
    import cycle_oracle.rollout as ro

    ran = []
    monkeypatch.setattr(bench.main, "machine_section", lambda *a: {"fp32": {"flops_per_s": 1e9}})
    monkeypatch.setattr(bench.main, "matmul_flops", lambda *a, **kw: {})
    monkeypatch.setattr(bench.main, "run_case", lambda case, **kw: ran.append(case) or {"case": case["name"], "error": "not run"})
    monkeypatch.setattr(ro, "cpu_preload_libraries", lambda dirs=None: ["/v/lib/libiomp5.so"])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    argv = ["--sections", "rollout", "--model", "tiny-random-llama", "--out", str(tmp_path / "r.json")]
    assert bench.main.main(argv) == 0
    by = {c["name"]: c for c in ran}
    assert list(by) == list(bench.main.ENGINE_CASES)
    assert by["preload_iomp"]["env"] == {"LD_PRELOAD": "/v/lib/libiomp5.so"} and by["preload_iomp"]["preload"] == ["/v/lib/libiomp5.so"]
    assert by["max_num_seqs_16"]["max_num_seqs"] == 16 and by["separate_requests"]["separate_requests"]
    assert not any(c.get("env") for name, c in by.items() if name != "preload_iomp")
    assert all(c["points"] == [(4, 4), (8, 8)] for name, c in by.items() if name != "bind01_nocache_nolora")

    ran.clear()
    monkeypatch.setattr(ro, "cpu_preload_libraries", lambda dirs=None: [])
    assert bench.main.main(argv + ["--engine-cases", "preload_iomp"]) == 0
    assert ran == []
    rec = json.loads((tmp_path / "r.json").read_text())["rollout"]["cases"]["preload_iomp"]
    assert rec["skipped"].startswith("no libtcmalloc / libiomp5.so in ")


def test_rerender_recounts_learner_flops_with_the_current_convention():
    """A results file written under an older FLOP count (here: the learner's 2x-forward backward)
    gets the current count and MFU from its raw timings; a timed-alone old-policy pass stays its own piece."""
    s = bf.SMOLLM2_135M
    lora = s.lora_params(8)
    case = {"prompt_len": 63, "reference_prompt_len": 6, "completion_len": 40, "lora_params": lora, "kl_reference": "base"}
    stale = {"seconds": 2.0, "flops": 1.0, "flops_per_s": 0.5, "mfu": 9.9}
    results = {"meta": {"model": {"name": "smollm2", "shape": {k: getattr(s, k) for k in s.__dataclass_fields__}}},
               "machine": {"fp32": {"flops_per_s": 1e11}},
               "learner": {**case, "points": [{"n_samples": 16, "seconds": 8.0, "flops": 1.0, "pieces": {
                   "old_forward": dict(stale), "ref_forward": dict(stale), "policy_update": dict(stale, seconds=4.0)}}]}}
    out = bench.main.rerender(results)
    point = out["learner"]["points"][0]
    f = bf.learner_flops(s, 16, 63, 40, lora, "base", 6, old_pass=True)
    assert point["flops"] == f["total"] and point["mfu"] == f["total"] / 8.0 / 1e11
    assert point["pieces"]["old_forward"]["flops"] == f["old"] and point["pieces"]["policy_update"]["flops"] == f["policy"]
    assert point["pieces"]["policy_update"]["mfu"] == f["policy"] / 4.0 / 1e11


def test_the_encoder_mfu_is_against_the_matmul_reference_of_its_dtype():
    """The encoder computes in the recipe's dtype (bf16 where `model.dtype: auto` chose it): its MFU is
    its FLOP/s over the bf16 matmul then, not the fp32 one (which put a bf16 encoder at 108%)."""
    s = bf.SMOLLM2_135M
    machine = {"fp32": {"n": 2048, "flops_per_s": 100e9, "flops_per_s_median": 100e9},
               "bf16": {"n": 2048, "flops_per_s": 400e9, "flops_per_s_median": 400e9}}
    point = {"n_texts": 16, "score": {"seconds": 1.0, "flops": 200e9, "flops_per_s": 200e9, "mfu": 2.0}}
    results = {"meta": {"model": {"name": "smollm2", "shape": {k: getattr(s, k) for k in s.__dataclass_fields__}}}, "machine": machine,
               "encoder": {"case": "encoder", "dtype": "bfloat16", "layer": 15, "lora_rank": 8, "points": [point]}}
    out = bench.main.rerender(results)
    assert out["encoder"]["points"][0]["score"]["mfu"] == pytest.approx(200 / 400)
    fp32 = bench.main.add_step_mfu({"case": "encoder", "points": [{"score": {"flops_per_s": 50e9}}]}, machine)
    assert fp32["points"][0]["score"]["mfu"] == pytest.approx(0.5)  # a file from before the dtype was recorded: fp32


def test_summed_flops_equal_the_per_sequence_counts():
    """The sum forms (what the main job's minutes account counts from) give the per-sequence
    functions' totals: the warmup's SFT steps and the GRPO learner at equal lengths."""
    s, lora = bf.SMOLLM2_135M, bf.SMOLLM2_135M.lora_params(8)
    seqs = [(57, 9), (70, 22), (63, 1)]  # (prompt + answer tokens, answer tokens)
    reads = [12, 96, 40]
    work = {"tokens": sum(t for t, _ in seqs), "key_pairs": sum(t * (t + 1) // 2 for t, _ in seqs), "head_tokens": sum(a for _, a in seqs),
            "read_tokens": sum(reads), "read_key_pairs": sum(r * (r + 1) // 2 for r in reads)}
    f = bf.sft_flops(s, 15, lora, work)
    assert f["read"] == sum(bf.forward_flops(s, r, 0, layers=15) for r in reads)
    assert f["policy"] == sum(bf.forward_flops(s, t, a, lora_params=lora) + bf.backward_flops(s, t, a, lora_params=lora) for t, a in seqs)
    assert f["total"] == f["read"] + f["policy"] and f["trained_tokens"] == work["head_tokens"]
    for reference, ref_len in (("base", 5), ("warmup", 0), (None, 0)):
        exact = bf.learner_flops(s, 16, 60, 40, lora, reference, ref_len, old_pass=False)
        means = bf.grpo_learner_flops_from_means(s, 16, 40.0, 60, lora, reference, ref_len)
        assert means["total"] == pytest.approx(exact["total"], rel=1e-12) and means["ref"] == pytest.approx(exact["ref"], rel=1e-12)


def _minutes(tmp_path, work_scale: float = 1.0) -> dict:
    """A minutes.json as the main job writes it, with the embedded model's shape (no run)."""
    import json as _json

    from cycle_oracle.models import resolve_model_path

    config = _json.loads((Path(resolve_model_path("smollm2-135m-instruct", weights=False)) / "config.json").read_text())
    work = {k: v * work_scale for k, v in {"sequences": 1200, "tokens": 80_000, "key_pairs": 3.3e6, "head_tokens": 14_000,
                                          "read_tokens": 40_000, "read_key_pairs": 9e5}.items()}
    stages = [{"stage": "setup/interpreter_and_recipe", "start_s": -4.0, "seconds": 4.0},
              {"stage": "warmup/data_build", "start_s": 0.0, "seconds": 20.0, "items": 5000, "cached": True, "load1": 1.0},
              {"stage": "warmup/sft_steps", "start_s": 20.0, "seconds": 300.0, "steps": 150, "examples": 1200, "work": work, "load1": 2.0},
              {"stage": "grpo/steps", "start_s": 320.0, "seconds": 100.0, "steps": 2, "samples": 32, "load1": 2.0},
              {"stage": "report", "start_s": 420.0, "seconds": 2.0}]
    steps = [{"step": i, "time_step": 12.0, "time_learn": 7.0, "description_tokens": 38.0} for i in (1, 2)]
    return {"schema": 1, "started": "2026-12-04T16:00:00", "wall_s": 422.0, "stages": stages,
            "model": {"name": "smollm2-135m-instruct", "config": config, "dtype": "float32", "decoder_lora_r": 8, "decoder_lora_targets": "all-linear"},
            "warmup": {"step_seconds": [2.0] * 150}, "grpo": {"steps": steps, "samples_per_step": 16, "kl_reference": "base",
                                                           "prompt_tokens": {"prompt": 63, "reference_prompt": 5, "layer": 15}},
            "matmul_reference": {"float32": 1e11, "bfloat16": 3e11}}


def test_the_minutes_account_shares_and_mfu(tmp_path):
    from bench.minutes import account, main, to_markdown

    m = _minutes(tmp_path)
    acc = account(m)
    rows = {r["stage"]: r for r in acc["rows"]}
    assert acc["wall_s"] == pytest.approx(426.0) and sum(r["share"] for r in acc["rows"]) == pytest.approx(1.0)
    assert rows["setup/interpreter_and_recipe"]["start_s"] == 0 and rows["report"]["start_s"] == pytest.approx(424.0)
    shape = bf.shape_from_hf_config(m["model"]["config"])
    sft = bf.sft_flops(shape, 15, shape.lora_params(8), rows["warmup/sft_steps"]["work"])
    assert rows["warmup/sft_steps"]["mfu"] == pytest.approx(sft["total"] / 300.0 / 1e11)
    learn = bf.grpo_learner_flops_from_means(shape, 16, 38.0, 63, shape.lora_params(8), "base", 5)["total"]
    assert rows["grpo/steps"]["mfu"] == pytest.approx(2 * learn / 14.0 / 1e11)  # over the learner's own seconds
    assert rows["warmup/data_build"]["mfu"] is None
    assert acc["trained_per_minute"] == pytest.approx((1200 + 32) / (426.0 / 60))
    assert account(_minutes(tmp_path, 2.0))["rows"][2]["mfu"] == pytest.approx(2 * rows["warmup/sft_steps"]["mfu"])
    m["model"]["dtype"] = "bfloat16"  # divided by the rate of the dtype the run computed in
    assert account(m)["rows"][2]["mfu"] == pytest.approx(rows["warmup/sft_steps"]["mfu"] / 3)
    md = to_markdown(m)
    assert all(f"| {stage} |" in md for stage in rows) and "1200 examples (150 steps" in md
    (tmp_path / "minutes.json").write_text(json.dumps(m))
    assert main([str(tmp_path), "--md", str(tmp_path / "m.md")]) == 0 and (tmp_path / "m.md").read_text() == md
    assert main([str(tmp_path / "nothing")]) == 2


def test_learner_and_warmup_mfu_against_the_reference_of_their_dtype():
    """A bf16 case is divided by the run's bf16 matmul, an fp32 one by the fp32 matmul; `mfu_median`
    puts the median step over the reference's median; the targets take the best variant and name it."""
    from bench.main import add_step_mfu, variant_case

    machine = {"fp32": {"n": 2048, "flops_per_s": 100e9, "flops_per_s_median": 90e9},
               "bf16": {"n": 2048, "flops_per_s": 300e9, "flops_per_s_median": 250e9}}
    point = {"n_samples": 16, "flops_per_s": 60e9, "flops_per_s_median": 50e9, "seconds": 1.0, "seconds_median": 1.2}
    fp32 = add_step_mfu({"case": "learner", "dtype": "float32", "points": [dict(point)]}, machine)
    bf16 = add_step_mfu({"case": "learner", "dtype": "bfloat16", "points": [dict(point)]}, machine)
    assert fp32["points"][0]["mfu"] == pytest.approx(0.6) and fp32["points"][0]["mfu_median"] == pytest.approx(50 / 90)
    assert bf16["points"][0]["mfu"] == pytest.approx(0.2) and bf16["points"][0]["mfu_median"] == pytest.approx(0.2)
    sft = add_step_mfu({"case": "sft", "dtype": "bfloat16", "flops_per_s": 200e9, "steps": [{"flops_per_s": 200e9}]}, machine)
    assert sft["mfu_median"] == pytest.approx(0.8) and sft["mfu"] == pytest.approx(200 / 300)
    assert add_step_mfu({"case": "sft", "dtype": "bfloat16", "flops_per_s": 1.0}, {"fp32": {"n": 2048}, "bf16": {"n": 1024}}).get("mfu") is None
    t = bench.report.evaluate_targets({"learner": fp32, "learner_variants": {"bf16": bf16}, "warmup": sft})
    assert t["learner_mfu"]["best"] == pytest.approx(50 / 90) and "recipe (float32)" in t["learner_mfu"]["at"] and not t["learner_mfu"]["met"]
    assert t["warmup_mfu"]["met"] and t["warmup_mfu"]["at"] == "recipe (bfloat16)"
    name, case = variant_case({"overrides": ["model.name=m"]}, "c:model.dtype=bfloat16;case.compile=blocks;env.OMP_WAIT_POLICY=ACTIVE")
    assert (name, case["overrides"], case["compile"], case["env"]) == ("c", ["model.name=m", "model.dtype=bfloat16"], "blocks", {"OMP_WAIT_POLICY": "ACTIVE"})
