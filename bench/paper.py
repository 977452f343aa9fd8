"""On paper: FLOPs per role and step time of a Qwen3-8B GPU-cluster GRPO step (no measurement)."""

from __future__ import annotations

from bench import flops as bf


def paper_section() -> dict:
    setups = {
        "qwen3_8b_8xh100_mfu40": bf.GrpoPaperSetup(),
        "qwen3_8b_8xh100_mfu40_shared_prefill": bf.GrpoPaperSetup(shared_prefill=True),
    }
    return {name: bf.grpo_step_on_paper(s) for name, s in setups.items()}
