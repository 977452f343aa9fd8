"""End-to-end GRPO runs: a recipe through `cycle-oracle run` (Ray actors), its time split per phase
from metrics.jsonl and the peak memory of every process in its tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.inputs import REPO
from bench.load import QUIET, LoadProbe, wait_quiet

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
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
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
        chosen = [dict(r) for r in steps if lo <= r["step"] <= hi]
        for r in chosen:  # "sync" = the push and, on the steps that make one, its check (grpo.sync_check_every)
            r["time_sync"] = r["time_sync"] + r.get("time_sync_check", 0.0)
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
            placed = (cfg.get("resources") or {}).get("rollout") or {}  # actors, CPUs, threads live under resources.rollout
            res["rollout"] = {**{k: placed.get(k) for k in ("num_actors", "num_cpus", "threads")},
                              **{k: cfg["rollout"].get(k) for k in ("thread_binding", "weight_sync", "preload")}}
    return res
