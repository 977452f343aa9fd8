"""One measurement in a fresh interpreter: `run_case` starts `python -m bench --_case JSON` (optionally
under py-spy) and reads its result; `run_here` is what that interpreter does with the case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.encoder import case_encoder
from bench.inputs import REPO
from bench.learner import case_learner
from bench.load import QUIET, wait_quiet
from bench.pyspy import PROFILE_FOCUS, summarise_profile
from bench.rollout import case_engine, case_hf
from bench.warmup import case_sft

CASES = {"engine": case_engine, "hf": case_hf, "encoder": case_encoder, "learner": case_learner, "sft": case_sft}


def run_here(case: dict, result_path: Path) -> int:
    """The `--_case` side: run the case in this process and write its JSON to result_path."""
    result = CASES[case["kind"]](case)
    result_path.write_text(json.dumps(result, indent=1, default=float))
    return 0


def run_case(case: dict, timeout_s: float = 1800, profile_dir: str | None = None) -> dict:
    """Run one case in a fresh interpreter; returns its JSON, or an error record when the interpreter
    fails (an engine crash, a segfault, a timeout: the bench goes on with the next case). With profile_dir
    the interpreter runs under `py-spy record --native` (its timings are then perturbed: profile
    in a separate invocation from the one whose numbers you report)."""
    waited = wait_quiet(QUIET["max_wait_s"]) if QUIET["max_wait_s"] else None
    with tempfile.TemporaryDirectory(prefix="bench-case-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench", "--_case", json.dumps(case), "--_result", str(result)]
        raw = None
        if profile_dir:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            raw = Path(profile_dir) / f"{case.get('name', case['kind'])}.pyspy.txt"
            pyspy = Path(sys.executable).parent / "py-spy"
            cmd = [str(pyspy), "record", "--native", "-r", "25", "-f", "raw", "-o", str(raw), "--", *cmd]
        # case["env"]: variables the interpreter must have from its start (LD_PRELOAD acts only then)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **case.get("env", {})}
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
