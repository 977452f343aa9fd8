"""`kind: eval` — evaluate a checkpoint (`init_from`, a run or checkpoint folder) or, without one,
the untrained decoder (the floor): retrieval on held-out corpus documents, probe comparisons,
arithmetic and the faithfulness controls. Writes results.json, report.md and PNG plots.

The oracle runs in-process on HF models (the evals are small next to training); the corpus
activations are extracted by the same Ray task the training recipes use.
"""

from __future__ import annotations

from pathlib import Path

from cycle_oracle.corpus import load_documents
from recipes.common import extract_store, finish_run, start_run

DEFAULT_EVAL_RECIPE = Path(__file__).with_name("eval_cpu.yaml")


def run(cfg, out, resume: bool = False, data_dir: str | None = None) -> dict:
    from cycle_oracle.evals.oracle import load_oracle
    from cycle_oracle.evals.run import run_evals_from_settings

    run = start_run(cfg, out, "eval")
    store = None
    if "retrieval" in cfg.eval.tasks:
        store, _emb_norm = extract_store(run, load_documents(cfg.corpus, cfg.num_documents))
        print(f"[eval] store of {len(store)} activations (layer mean norm {store.mean_norm:.1f})")
    if cfg.init_from is None:  # the untrained floor, with this recipe's model, layer and instruction
        oracle = load_oracle(None, model=cfg.model.name, layer=cfg.model.layer, max_new_tokens=cfg.sampling.max_new_tokens,
                             description_instruction=cfg.description_instruction)
    else:  # the checkpoint's own recipe defines model, layer and instruction
        oracle = load_oracle(cfg.init_from, max_new_tokens=cfg.sampling.max_new_tokens)
    results = run_evals_from_settings(oracle, store, cfg.eval, run.out, seed=cfg.seed, data_dir=data_dir,
                                      heldout_fraction=cfg.split.heldout_fraction, split_seed=cfg.seed,
                                      probe_tasks=cfg.eval.probe_tasks, positions=cfg.eval.probe_positions,
                                      arithmetic_per_digits=cfg.eval.arithmetic_per_digits, judge=cfg.eval.judge)
    from cycle_oracle.evals.report import summarise

    summary = summarise(results)
    run.metrics.log("eval", 0, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    finish_run(run)
    results["summary"] = summary
    return results
