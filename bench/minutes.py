"""The main job's minutes account, rendered: `python -m bench.minutes RUN_DIR [--md FILE]` (or
`cycle-oracle bench --minutes RUN_DIR`) reads `<RUN_DIR>/minutes.json` (written by the
`warmup_then_grpo` driver: recipes/eta.py `write_minutes`) and prints one Markdown table: every
stage's start, seconds and share of the job, what it worked on, and the MFU of the two stages that
train the decoder:

- warmup SFT steps: the necessary FLOPs of the steps (`flops.sft_flops`: the frozen target's read
  up to each read position, the decoder's forward + backward over prompt + answer, the LM head on
  the answer tokens) over the stage's wall seconds (driver and Ray calls included);
- GRPO steps: the learner's FLOPs (`flops.grpo_learner_flops_from_means`: policy forward + backward
  and the KL reference's forward) over the learner's own time (`time_learn`), since the stage also
  samples, scores and syncs.

Both are divided by the dense matmul FLOP/s the job measured after it ended, on the learner's
threads, in the dtype the run computed in (`matmul_reference`: the bench's 2048^3 reference)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import flops as bf

LORA_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
TRAINING_STAGES = ("warmup/sft_steps", "grpo/steps")
"""The stages that train the decoder (their examples and samples are the job's training)."""


def _lora_params(shape: bf.ModelShape, r: int, targets) -> int:
    if targets == "all-linear":
        return shape.lora_params(r)
    return shape.lora_params(r, tuple(LORA_TARGETS[t] for t in targets if t in LORA_TARGETS))


def account(minutes: dict) -> dict:
    """minutes.json -> {rows: one per stage with share and MFU where it trains, totals}."""
    model = minutes["model"]
    shape = bf.shape_from_hf_config(model["config"], model["name"])
    lora = _lora_params(shape, model["decoder_lora_r"], model["decoder_lora_targets"])
    dtype = model["dtype"]
    reference = (minutes.get("matmul_reference") or {}).get(dtype)
    before = max(0.0, -min((s["start_s"] for s in minutes["stages"]), default=0.0))  # set-up before the driver's clock started
    wall = minutes["wall_s"] + before
    grpo = minutes.get("grpo") or {}
    prompts = grpo.get("prompt_tokens") or {}
    rows, trained = [], {"examples": 0, "samples": 0}
    for s in minutes["stages"]:
        row = dict(s, start_s=s["start_s"] + before, share=s["seconds"] / wall if wall else None, mfu=None, flops=None, compute_s=None)
        if s["stage"] == "warmup/sft_steps" and s.get("work"):
            f = bf.sft_flops(shape, prompts.get("layer", shape.n_layers // 2), lora, s["work"])
            row.update(flops=f["total"], compute_s=s["seconds"])
            trained["examples"] += s.get("examples", 0)
            steps = (minutes.get("warmup") or {}).get("step_seconds") or []
            row["step_median_s"] = statistics.median(steps) if steps else None
        elif s["stage"] == "grpo/steps" and grpo.get("steps"):
            total, learn = 0.0, 0.0
            for step in grpo["steps"]:
                if step.get("time_learn") is None or step.get("description_tokens") is None:
                    continue
                f = bf.grpo_learner_flops_from_means(shape, grpo["samples_per_step"], step["description_tokens"], prompts["prompt"], lora,
                                                     grpo.get("kl_reference"), prompts["reference_prompt"])
                total += f["total"]
                learn += step["time_learn"]
            row.update(flops=total, compute_s=learn)
            row["step_median_s"] = statistics.median([x["time_step"] for x in grpo["steps"] if x.get("time_step")] or [0.0])
            row["learn_median_s"] = statistics.median([x["time_learn"] for x in grpo["steps"] if x.get("time_learn")] or [0.0])
            trained["samples"] += s.get("samples", 0)
        if row["flops"] and row["compute_s"] and reference:
            row["mfu"] = row["flops"] / row["compute_s"] / reference
        rows.append(row)
    training_s = sum(r["seconds"] for r in rows if r["stage"] in TRAINING_STAGES)
    return {"rows": rows, "wall_s": wall, "dtype": dtype, "reference_flops_per_s": reference, "training_s": training_s,
            "training_share": training_s / wall if wall else None, **trained,
            "trained_per_minute": (trained["examples"] + trained["samples"]) / (wall / 60) if wall else None}


def _what(row: dict) -> str:
    """What a stage worked on, in words."""
    s = row["stage"]
    if s == "warmup/sft_steps":
        return f"{row.get('examples', 0)} examples ({row.get('steps', 0)} steps; median step {row.get('step_median_s') or 0:.2f} s)"
    if s == "grpo/steps":
        return (f"{row.get('samples', 0)} samples ({row.get('steps', 0)} steps; median step {row.get('step_median_s') or 0:.1f} s, "
                f"learner {row.get('learn_median_s') or 0:.1f} s)")
    if s == "warmup/encoder_warm_start":
        return f"{row.get('examples', 0)} (description, activation) pairs drawn from {row.get('pairs', 0)} ({row.get('encoder_steps', 0)} encoder steps)"
    if s.endswith("text_encoder_training"):
        return f"{row.get('steps', 0)} encoder steps on {row.get('pairs', 0)} (source window, activation) pairs"
    skip = {"stage", "start_s", "seconds", "load1", "share", "mfu", "flops", "compute_s", "work", "step_median_s", "learn_median_s"}
    return ", ".join(f"{k} {v}" for k, v in row.items() if k not in skip and v is not None)


def to_markdown(minutes: dict, title: str = "") -> str:
    acc = account(minutes)
    ref = acc["reference_flops_per_s"]
    L = [f"### {title or 'The main job, stage by stage'} ({minutes['started']}; {minutes['model']['name']}, {acc['dtype']})", "",
         f"{acc['wall_s'] / 60:.1f} min in all; the decoder trains in {acc['training_s'] / 60:.1f} min ({100 * (acc['training_share'] or 0):.0f}%) "
         f"on {acc['examples']} warmup examples + {acc['samples']} GRPO samples = "
         f"{acc['trained_per_minute'] or 0:.1f} per minute of the job. MFU against the {acc['dtype']} matmul reference measured after the job "
         f"({ref / 1e9:.0f} GFLOP/s)." if ref else "no matmul reference in this run (MFU not computed).", "",
         "| stage | starts (min) | seconds | share | worked on | MFU | load1 |", "|---|---|---|---|---|---|---|"]
    for r in acc["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        L.append(f"| {r['stage']} | {r['start_s'] / 60:.1f} | {r['seconds']:.0f} | {100 * (r['share'] or 0):.1f}% | {_what(r)} | {mfu} | "
                 f"{r.get('load1', '') if r.get('load1') is not None else ''} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.minutes", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a warmup_then_grpo run folder (holding minutes.json)")
    ap.add_argument("--md", help="also write the Markdown here")
    ap.add_argument("--title", default="", help="the table's heading")
    args = ap.parse_args(argv)
    path = Path(args.run_dir) / "minutes.json"
    if not path.is_file():
        print(f"no minutes.json in {args.run_dir}: the warmup_then_grpo driver writes it when the job ends", file=sys.stderr)
        return 2
    md = to_markdown(json.loads(path.read_text()), args.title)
    if args.md:
        Path(args.md).write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
