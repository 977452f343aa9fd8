"""`kind: warmup_then_grpo` — the whole pipeline: warmup into `<out>/warmup`, then GRPO from that
checkpoint into `<out>/grpo` (its retrieval eval runs at the end), then a printed summary."""

from __future__ import annotations

from pathlib import Path

from recipes import grpo, warmup


def run(cfg, out, resume: bool = False) -> dict:
    out = Path(out)
    warm_cfg = cfg.model_copy(update={"kind": "warmup"})
    warm_dir = out / "warmup"
    done = (warm_dir / "results.json").is_file()
    warm = None if done else warmup.run(warm_cfg, warm_dir, resume=resume)
    grpo_cfg = cfg.model_copy(update={"kind": "grpo", "init_from": str(warm_dir)})
    result = grpo.run(grpo_cfg, out / "grpo", resume=resume)
    summary = {"warmup": (warm or {}).get("summary", "reused from a previous run"), "grpo": result.get("summary")}
    return {"kind": "warmup_then_grpo", "summary": summary}
