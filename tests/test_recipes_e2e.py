"""End-to-end smoke recipes on real Ray + vLLM + DeepSpeed + encoder actors (tiny random Llama).

Engine starts are the cost here (about a minute each on 2 cores), so the GRPO checks share runs:
one run on a 2-node local cluster with a rollout actor killed mid-run, then a resume of that run
from its step-1 checkpoint under a tiny `grpo.max_minutes` (stops after step 2) and a second
resume; together they must reproduce its step-2 and step-3 metrics.
"""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors

from cycle_oracle.checkpoint import atomic_write_text
from cycle_oracle.config import load_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _metrics(run_dir: Path, stage: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["stage"] == stage}


def _rewind(run_dir: Path, step: int) -> None:
    """Pretend the run died right after checkpoint `step`."""
    ckpts = run_dir / "checkpoints"
    for p in ckpts.glob("step-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    atomic_write_text(ckpts / "latest", f"step-{step:06d}")


def test_cli_help_and_bad_recipes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "run" in out.stdout and "describe" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: grpo\ngrpo: {steps: two, bogus: 1}\n")
    res = subprocess.run([sys.executable, "-m", "cli.main", "run", str(bad), "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert "grpo.steps" in res.stderr and "unknown key 'grpo.bogus'" in res.stderr
    plan = subprocess.run([sys.executable, "-m", "cli.main", "run", "recipes/gpu_qwen3_8b_grpo.yaml", "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert plan.returncode == 0 and "fits" in plan.stdout and "'GPU': 1" in plan.stdout


def test_smoke_warmup_and_resume(tmp_path, shared_data):
    from recipes import warmup

    cfg = load_recipe(REPO / "recipes" / "smoke_warmup.yaml", [
        f"warmup.corpus.paths=[{shared_data / 'corpus' / 'wiki.valid.raw'}]", "logging.checkpoint_every=2"])
    out = tmp_path / "warm"
    try:
        results = warmup.run(cfg, out)
        resumed_dir = tmp_path / "warm-resumed"
        shutil.copytree(out, resumed_dir)
        _rewind(resumed_dir, 2)
        (resumed_dir / "metrics.jsonl").write_text("")
        warmup.run(cfg, resumed_dir, resume=True)
    finally:
        ray.shutdown()
    for name in ("config.yaml", "metrics.jsonl", "results.json"):
        assert (out / name).is_file()
    assert (out / "checkpoints" / "latest").is_file()
    built = {task for task, n in results["data"]["heldout"].items() if n}
    assert built >= {"latentqa", "token_prediction"}  # a random model's description targets may all be unusable
    assert set(results["heldout"]) == built
    lqa = results["heldout"]["latentqa"]
    assert lqa["nll_gap_ci_low"] <= lqa["nll_gap_shuffled_minus_real"] <= lqa["nll_gap_ci_high"]
    assert lqa["ranking_gap_ci_low"] <= lqa["ranking_top1_real"] - lqa["ranking_top1_shuffled"] <= lqa["ranking_gap_ci_high"]
    by_q = lqa["nll_gap_by_question"]  # per question, over the same items
    assert sum(q["items"] for q in by_q.values()) == lqa["items"]
    assert abs(sum(q["items"] * q["nll_real"] for q in by_q.values()) / lqa["items"] - lqa["nll_real"]) < 1e-6
    assert sum(q["items"] for q in lqa["ranking_by_question"].values()) == lqa["ranking_items"]
    assert set(results["train_fit"]) == built  # warmup.train_fit_eval defaults on
    centring = results["latentqa_centring"]  # warmup.latentqa_centre defaults on
    assert centring["contexts"] > 0 and 0 < centring["energy_share_kept"] < 1
    enc = results["encoder_warm_start"]
    assert enc["heldout_before"] and enc["heldout_after"] and enc["heldout_source_window"]
    first, again = _metrics(out, "warmup"), _metrics(resumed_dir, "warmup")
    assert 3 in first and set(again) == {3}, "resume must continue at step 3 only"
    assert abs(first[3]["loss"] - again[3]["loss"]) < 1e-4, (first[3]["loss"], again[3]["loss"])


def test_smoke_grpo_two_nodes_actor_kill_resume_and_eval(tmp_path, shared_data):
    from ray.cluster_utils import Cluster

    from recipes import grpo

    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # AF_UNIX socket paths must stay short
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(temp / "h")})
    cluster.add_node(num_cpus=1, temp_dir=str(temp / "n"))
    cluster.wait_for_nodes()
    cfg = load_recipe(REPO / "recipes" / "smoke_grpo.yaml", [f"ray.address={cluster.address}"])
    out = tmp_path / "grpo"
    killed = {}

    def kill_rollout_after_first_step():
        deadline = time.time() + 900
        while time.time() < deadline:
            if (out / "metrics.jsonl").is_file() and 1 in _metrics(out, "grpo"):
                handle = ray.get_actor("grpo-rollout-0")
                killed["pid"] = ray.get(handle.info.remote())["pid"]
                ray.kill(handle, no_restart=False)  # Ray restarts it; the driver must re-sync it
                return
            time.sleep(1)

    try:
        ray.init(address=cluster.address)
        killer = threading.Thread(target=kill_rollout_after_first_step, daemon=True)
        killer.start()
        results = grpo.run(cfg, out)
        killer.join(timeout=5)
        roles = [a for a in list_actors() if a.class_name in ("RolloutActor", "LearnerActor", "EncoderActor")]
        nodes = {a.node_id for a in roles}
        rollout_pids = {a.pid for a in roles if a.class_name == "RolloutActor" and a.pid} | {killed.get("pid")}
        resumed = tmp_path / "grpo-resumed"
        shutil.copytree(out, resumed)
        _rewind(resumed, 1)
        (resumed / "metrics.jsonl").write_text("")
        budget_cfg = load_recipe(REPO / "recipes" / "smoke_grpo.yaml", [f"ray.address={cluster.address}", "grpo.max_minutes=0.0001"])
        stopped = grpo.run(budget_cfg, resumed, resume=True)  # out of time after one step: checkpoints at 2
        grpo.run(cfg, resumed, resume=True)
        # evals on the smoke checkpoint (CI's eval check), through the same recipe path as the CLI
        from recipes import evaluate

        eval_cfg = load_recipe(REPO / "recipes" / "eval_smoke.yaml", [f"init_from={out}", f"eval.data_dir={SHARED}"])
        evaluation = evaluate.run(eval_cfg, tmp_path / "eval")
    finally:
        ray.shutdown()
        cluster.shutdown()
    for name in ("results.json", "report.md"):
        assert (tmp_path / "eval" / name).is_file()
    assert list((tmp_path / "eval").glob("*.png")), "the eval report has no plots"
    assert evaluation["summary"]
    assert "pid" in killed, "the rollout actor was never killed"
    m = _metrics(out, "grpo")
    assert set(range(1, 4)) <= set(m), "the run must finish all steps after the kill"
    for step in (1, 2, 3):
        assert -1.0 <= m[step]["reward_mean"] <= 1.0
        assert m[step]["sync_logprob_error"] < 2e-3
    assert results["retrieval"]["n"] >= 2
    assert (stopped["steps"], stopped["steps_planned"]) == (2, 3), "grpo.max_minutes must stop the loop after the step that crosses it"
    again = _metrics(resumed, "grpo")
    assert set(again) == {2, 3}, "resume from step 1, stop at the budget after 2, resume again for 3"
    for step in (2, 3):
        for key in ("reward_mean", "policy_loss", "encoder_loss"):
            assert abs(m[step][key] - again[step][key]) < 1e-3, (step, key, m[step][key], again[step][key])
    import psutil

    time.sleep(2)
    leftover = [pid for pid in rollout_pids if pid and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not leftover, f"orphaned rollout (vLLM engine) processes: {leftover}"
    assert len(nodes) == 2, "the roles must have been placed across both nodes"
