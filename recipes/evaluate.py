"""`kind: eval` — evaluate a checkpoint (`init_from`, a run or checkpoint folder) or, without one,
the untrained decoder (the floor, `selfie`), and the training-free baselines asked for in
`eval.oracles` (`cycle-oracle eval --oracle NAME`), side by side: retrieval on held-out corpus
documents (with the paraphrase test), probe comparisons, arithmetic and the faithfulness controls.
Writes results.json, report.md and PNG plots.

The oracles run in-process on HF models (the evals are small next to training); the corpus
activations are extracted by the same Ray task the training recipes use.
"""

from __future__ import annotations

from pathlib import Path

from cycle_oracle.corpus import load_documents
from recipes.common import extract_store, finish_run, start_run

DEFAULT_EVAL_RECIPE = Path(__file__).with_name("eval_cpu.yaml")


def run(cfg, out, resume: bool = False, data_dir: str | None = None) -> dict:
    from cycle_oracle.evals.baselines import check_oracle_request, needs_store, oracle_names
    from cycle_oracle.evals.report import summarise
    from cycle_oracle.evals.run import run_evals_from_recipe

    names = oracle_names(cfg)
    check_oracle_request(cfg, names)  # a request that cannot run fails before Ray starts
    run = start_run(cfg, out, "eval")
    store = None
    if needs_store(cfg, names):
        store, _emb_norm = extract_store(run, load_documents(cfg.corpus, cfg.num_documents))
        print(f"[eval] store of {len(store)} activations (layer mean norm {store.mean_norm:.1f})")
    print(f"[eval] oracles: {', '.join(names)}")
    results = run_evals_from_recipe(cfg, store, run.out, data_dir=data_dir)
    summary = summarise(results)
    run.metrics.log("eval", 0, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    finish_run(run)
    results["summary"] = summary
    return results
