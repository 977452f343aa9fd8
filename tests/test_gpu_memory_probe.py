"""The GPU memory probe's code path on the CPU: `python -m bench.gpu_memory --tiny --device cpu` runs
one rank's GRPO steps on a tiny random Qwen3 under DeepSpeed (gloo) and prints the JSON record the
GPU run prints (~10 s; the first DeepSpeed process on a fresh machine also builds its CPU
shared-memory op once, ~20 s, as tests/test_learner.py does)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_tiny_probe_runs_on_the_cpu_and_reports_every_field(tmp_path):
    out = tmp_path / "probe.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_memory", "--tiny", "--device", "cpu", "--out", str(out),
                           "--set", "memory.logits_chunk_tokens=16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index('{\n  "status"'):]) == record  # the same JSON ends stdout (after DeepSpeed's lines)
    assert record["status"] == "ok" and record["device_type"] == "cpu" and record["shape"] == "tiny"
    for key in ("device", "torch", "model", "tokens", "settings", "timings", "memory", "step_metrics", "flops"):
        assert key in record, key
    assert record["model"]["dtype"] == "bfloat16" and record["model"]["lora_parameters"] > 0
    t = record["tokens"]
    assert t["sequences"] == 4 and t["completion_tokens"] == 12
    assert t["tokens_per_step"] == t["sequences"] * (t["prompt_tokens"] + t["completion_tokens"])
    assert record["settings"]["memory"] == {"gradient_checkpointing": True, "micro_batch_tokens": 128,
                                            "logits_chunk_tokens": 16}  # the GPU recipe's, --tiny's and --set's
    assert record["settings"]["gradient_checkpointing_active"] is True
    assert record["settings"]["decoder_lora"]["r"] == 8 and record["settings"]["decoder_optim"]["zero_stage"] == 2
    assert set(record["timings"]) >= {"build_s", "learner_setup_s", "step1_s", "step2_s"}
    assert all(v > 0 for v in record["timings"].values())
    assert list(record["memory"]) == ["after_build", "after_learner_setup", "after_step1", "after_step2"]
    assert all(v["peak_rss_bytes"] > 0 for v in record["memory"].values())
    assert record["flops"]["per_step"] > 0 and record["step_metrics"]["tokens"] == 4 * 12
