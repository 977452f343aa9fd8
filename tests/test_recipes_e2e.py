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

from cycle_oracle.config import load_recipe
from cycle_oracle.files import atomic_write_text
from cycle_oracle.weight_sync import SYNC_TOLERANCE
from fake_checkpoints import warmup_like_checkpoint

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


def test_smoke_warmup_and_resume(tmp_path, shared_data, capsys):
    """The warmup smoke with `model.dtype: auto`: every role computes in what the probe of their
    devices chose (bfloat16 on a CPU with fast bf16 matmul: vLLM, the DeepSpeed learners and the
    encoder), recorded in config.yaml and the checkpoints; the resume keeps it without a new probe."""
    import yaml

    from recipes import warmup
    from cycle_oracle.checkpoint import load_trained
    from cycle_oracle.devices import choose_dtype

    cfg = load_recipe(REPO / "recipes" / "smoke_warmup.yaml", [
        f"warmup.corpus.paths=[{shared_data / 'corpus' / 'wiki.valid.raw'}]", "logging.checkpoint_every=2", "model.dtype=auto"])
    out = tmp_path / "warm"
    try:
        results = warmup.run(cfg, out)
        resumed_dir = tmp_path / "warm-resumed"
        shutil.copytree(out, resumed_dir)
        _rewind(resumed_dir, 2)
        (resumed_dir / "dtype_probe.json").unlink()
        capsys.readouterr()
        warmup.run(cfg, resumed_dir, resume=True)
        resumed_lines = capsys.readouterr().out
    finally:
        ray.shutdown()
    for name in ("config.yaml", "metrics.jsonl", "results.json"):
        assert (out / name).is_file()
    assert (out / "checkpoints" / "latest").is_file()
    probe = json.loads((out / "dtype_probe.json").read_text())
    dtype = yaml.safe_load((out / "config.yaml").read_text())["model"]["dtype"]
    assert dtype == probe["chosen"] == choose_dtype(probe["probes"])[0] and load_trained(out).record.dtype == dtype
    assert yaml.safe_load((resumed_dir / "config.yaml").read_text())["model"]["dtype"] == dtype
    assert f"model.dtype auto -> {dtype}: as this run resolved it when it started" in resumed_lines
    assert not (resumed_dir / "dtype_probe.json").exists() and load_trained(resumed_dir).record.dtype == dtype
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
    redone = [json.loads(x)["step"] for x in (resumed_dir / "metrics.jsonl").read_text().splitlines() if json.loads(x)["stage"] == "warmup"]
    assert 3 in first and sorted(redone) == [1, 2, 3], f"resume continues at step 3, which replaces its earlier row: {redone}"
    assert abs(first[3]["loss"] - again[3]["loss"]) < 1e-4, (first[3]["loss"], again[3]["loss"])


def test_warmup_max_minutes_stops_after_the_step_that_passes_it(tmp_path, shared_data, capsys):
    """`warmup.max_minutes`: the SFT loop stops after the step that passes the budget, and the rest of
    the warmup (held-out eval, encoder warm start, the final checkpoint) runs on what it trained."""
    from recipes import warmup
    from cycle_oracle.checkpoint import load_trained

    cfg = load_recipe(REPO / "recipes" / "smoke_warmup.yaml", [
        f"warmup.corpus.paths=[{shared_data / 'corpus' / 'wiki.valid.raw'}]", "warmup.max_minutes=0.0001"])
    out = tmp_path / "capped"
    try:
        results = warmup.run(cfg, out)
    finally:
        ray.shutdown()
    assert (results["steps"], results["steps_planned"]) == (1, cfg.warmup.steps) and cfg.warmup.steps > 1
    assert sorted(_metrics(out, "warmup")) == [1]
    assert load_trained(out).record.step == 1 and results["heldout"] and results["encoder_warm_start"]["heldout_after"]
    assert f"warmup.max_minutes=0.0001 reached after step 1 of {cfg.warmup.steps}" in capsys.readouterr().out


def _kill_process_of(class_name: str, which: int = 0) -> int:
    """SIGKILL the process of a live actor of `class_name` (as a crash would): -> its pid."""
    import os
    import signal

    alive = sorted((a for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")]) if a.pid),
                   key=lambda a: a.actor_id)
    pid = alive[which].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_smoke_grpo_two_nodes_role_deaths_resume_and_eval(tmp_path, shared_data):
    """One GRPO run (5 steps, from a warmup-like checkpoint, checkpoints every 2 steps) on a 2-node
    cluster survives: a rollout actor killed mid-run (Ray restarts it, the driver re-syncs it), a
    rollout actor killed while idle between steps (it comes back serving a fresh LoRA without any
    error: the next step must still train on samples of the current version), the encoder's process
    SIGKILLed after step 3 (every role restarts from checkpoint 2 and redoes step 3) and a learner's
    after step 4. Every step is logged once; resumes reproduce its metrics."""
    from ray.cluster_utils import Cluster

    from recipes import grpo

    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # AF_UNIX socket paths must stay short
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(temp / "h")})
    cluster.add_node(num_cpus=1, temp_dir=str(temp / "n"))
    cluster.wait_for_nodes()
    warm = tmp_path / "warm"
    overrides = [f"ray.address={cluster.address}", "grpo.steps=5", "grpo.sync_check_every=1", "logging.checkpoint_every=2", f"init_from={warm}",
                 "resources.learner.num_actors=2"]
    cfg = load_recipe(REPO / "recipes" / "smoke_grpo.yaml", overrides)
    warmup_like_checkpoint(warm, cfg)
    out = tmp_path / "grpo"
    killed: dict = {}

    def kill_rollout_after_first_step():
        deadline = time.time() + 900
        while time.time() < deadline:
            if (out / "metrics.jsonl").is_file() and 1 in _metrics(out, "grpo"):
                handle = ray.get_actor("grpo-rollout-0")
                killed["pid"] = ray.get(handle.info.remote())["pid"]
                ray.kill(handle, no_restart=False)  # Ray restarts it; the driver must re-sync it
                return
            time.sleep(1)

    def between_steps(roles, step):
        if step == 2 and "idle" not in killed:  # idle rollout actor: restarted by Ray with version 0
            killer.join(timeout=600)
            handle = roles.rollouts.actors[0]
            old_pid = None
            for _ in range(60):  # the mid-run kill (asynchronous) may only now restart the actor: wait until it serves
                roles.rollouts.recover()
                try:
                    old_pid = ray.get(handle.info.remote(), timeout=60)["pid"]
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    time.sleep(1)
            assert old_pid is not None, "the rollout actor never came back after the mid-run kill"
            ray.kill(handle, no_restart=False)
            deadline = time.time() + 600
            while time.time() < deadline:  # until the restarted process answers (the kill is asynchronous)
                try:
                    info = ray.get(handle.info.remote(), timeout=60)
                    if info["pid"] != old_pid:
                        killed["idle"] = info
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    pass
                time.sleep(1)
        elif step == 3 and "encoder" not in killed:
            killed["encoder"] = _kill_process_of("EncoderActor")
        elif step == 4 and "learner" not in killed:
            killed["learner"] = _kill_process_of("LearnerActor", 1)

    try:
        ray.init(address=cluster.address)
        killer = threading.Thread(target=kill_rollout_after_first_step, daemon=True)
        killer.start()
        results = grpo.run(cfg, out, on_step_end=between_steps)
        roles = [a for a in list_actors() if a.class_name in ("RolloutActor", "LearnerActor", "EncoderActor")]
        nodes = {a.node_id for a in roles}
        rollout_pids = {a.pid for a in roles if a.class_name == "RolloutActor" and a.pid} | {killed.get("pid")}
        resumed = tmp_path / "grpo-resumed"
        shutil.copytree(out, resumed)
        _rewind(resumed, 2)
        budget_cfg = load_recipe(REPO / "recipes" / "smoke_grpo.yaml", [*overrides, "grpo.max_minutes=0.0001"])
        stopped = grpo.run(budget_cfg, resumed, resume=True)  # out of time after one step: checkpoints at 3
        grpo.run(cfg, resumed, resume=True)
        # evals on the smoke checkpoint (CI's eval check), through the same recipe path as the CLI
        from recipes import evaluate

        eval_cfg = load_recipe(REPO / "recipes" / "eval_smoke.yaml", [f"init_from={out}", f"eval.data_dir={SHARED}"])
        evaluation = evaluate.run(eval_cfg, tmp_path / "eval")
    finally:
        ray.shutdown()
        cluster.shutdown()
        if (out / "logs" / "role_deaths.log").is_file():
            print((out / "logs" / "role_deaths.log").read_text())
    for name in ("results.json", "report.md"):
        assert (tmp_path / "eval" / name).is_file()
    assert list((tmp_path / "eval").glob("*.png")), "the eval report has no plots"
    assert evaluation["summary"]
    assert {"pid", "idle", "encoder", "learner"} <= set(killed), f"not every role was killed: {killed}"
    assert killed["idle"]["version"] == 0, "an actor restarted by Ray serves a fresh LoRA (version 0)"
    assert results["role_restarts"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["stage"] == "grpo"]
    assert sorted(steps) == [1, 2, 3, 4, 5], f"every step logged exactly once, redone ones replaced: {steps}"
    m = _metrics(out, "grpo")
    for step in range(1, 6):
        assert -1.0 <= m[step]["reward_mean"] <= 1.0
        assert m[step]["sync_logprob_error_p99"] < SYNC_TOLERANCE["float32"]["p99"]
    for step in range(2, 6):  # every step trains on samples of the version served after the previous step
        assert m[step]["rollout_versions"] == m[step - 1]["weight_version"], (step, m[step - 1]["weight_version"], m[step]["rollout_versions"])
    assert results["retrieval"]["n"] >= 2
    frozen = results["frozen_start_encoder"]  # the unbiased comparison: the starting checkpoint's encoder
    assert frozen["grpo_decoder"]["n"] == frozen["warmup_decoder"]["n"] == results["retrieval"]["n"]
    assert frozen["grpo_decoder"]["rows"] == results["retrieval"]["rows"]
    assert {"patchscopes", "logit_lens", "text_guess", "true_token_bare"} <= set(frozen), "baselines and format controls beside the decoders"
    assert frozen["patchscopes"]["rows"] == results["retrieval"]["rows"] and len(frozen["text_guess"]["items"]) == results["retrieval"]["n"]
    verdict = results["verdicts"]["frozen_start_encoder"]
    assert verdict["trained"] == "grpo_decoder" and verdict["best_baseline"] in ("patchscopes", "logit_lens", "text_guess")
    assert verdict["line"][1:] in (out / "report.md").read_text(), "the report's verdict leads with the baseline comparison"
    assert "frozen_encoder/grpo_minus_warmup/centred_cosine" in results["summary"]
    assert (stopped["steps"], stopped["steps_planned"]) == (3, 5), "grpo.max_minutes must stop the loop after the step that crosses it"
    again = _metrics(resumed, "grpo")
    assert set(again) == {1, 2, 3, 4, 5}, "resume from step 2 replaces the later rows: every step once"
    for step in (3, 4, 5):
        for key in ("reward_mean", "policy_loss", "encoder_loss"):
            assert abs(m[step][key] - again[step][key]) < 1e-3, (step, key, m[step][key], again[step][key])
    import psutil

    time.sleep(2)
    leftover = [pid for pid in rollout_pids if pid and psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not leftover, f"orphaned rollout (vLLM engine) processes: {leftover}"
    assert len(nodes) == 2, "the roles must have been placed across both nodes"
