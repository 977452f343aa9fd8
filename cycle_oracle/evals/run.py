"""`run_evals`: run the chosen evals on one oracle and write the report (what `cycle-oracle eval` calls).

    oracle = make_hf_oracle(...)                    # or untrained_hf_oracle(...), or a vLLM-backed one
    store = ActivationStore("runs/x/activations")   # the pool for retrieval (held-out documents)
    results = run_evals(oracle, store, ["retrieval", "probes", "arithmetic"], "runs/x/eval")

Evals: `retrieval` (with its controls: shuffled, zero, context-only, mean floor, text controls;
`controls` is accepted as a synonym), `probes` (six binary tasks, evals/data.py), `arithmetic`.
Every data file a chosen eval needs is checked before anything runs, so a missing file fails in
the first second with a message naming it (and `eval.data_dir` / `--data-dir`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from cycle_oracle.evals.arithmetic import evaluate_arithmetic
from cycle_oracle.evals.data import ALL_TASKS, load_task
from cycle_oracle.evals.probes import ROUTES, evaluate_task
from cycle_oracle.evals.report import write_report
from cycle_oracle.evals.retrieval import evaluate_retrieval

EVALS = ("retrieval", "probes", "arithmetic")


def _normalise(tasks: Sequence[str]) -> list[str]:
    chosen = []
    for t in tasks:
        t = "retrieval" if t == "controls" else t
        if t not in EVALS:
            raise ValueError(f"unknown eval {t!r}; expected some of {list(EVALS) + ['controls']}")
        if t not in chosen:
            chosen.append(t)
    return chosen


def run_evals(
    oracle,
    store=None,
    tasks: Sequence[str] = EVALS,
    out_dir: str | Path = "eval",
    *,
    seed: int = 0,
    pool_size: int = 100,
    heldout_fraction: float | None = 0.2,
    split_seed: int | None = None,
    rows_per_document: int = 1,
    context_tokens: int = 16,
    probe_tasks: Sequence[str] = ALL_TASKS,
    probe_items_per_task: int = 100,
    positions: Sequence[str] = ("last", "mean"),
    probe_routes: Sequence[str] = ROUTES,
    judge: bool = False,
    data_dir: str | Path | None = None,
    hub: bool = False,
    arithmetic_per_digits: int = 20,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Run `tasks` and write `results.json`, `report.md` and plots into out_dir; returns the results.

    Retrieval reads its pool from `store` (required for it): held-out documents of
    `store.split_by_document(heldout_fraction, split_seed or seed)` (None: all rows), at most
    `rows_per_document` per document, pool_size rows. Probes draw `probe_items_per_task` balanced
    items per task (half train, half test). Arithmetic uses `arithmetic_per_digits` problems per
    answer length (1, 2, 3 digits).
    """
    chosen = _normalise(tasks)
    say = log or (lambda _msg: None)
    if "retrieval" in chosen and store is None:
        raise ValueError("the retrieval eval needs an ActivationStore (store=...)")
    loaded = {}
    if "probes" in chosen:  # check every data file first: fail before spending compute
        for name in probe_tasks:
            loaded[name] = load_task(name, probe_items_per_task, seed, data_dir, hub)
    results: dict = {
        "kind": "eval",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "evals": chosen,
        "oracle": dict(oracle.info),
        "store": None if store is None else {
            "root": str(store.root), "model_id": store.meta.get("model_id"), "layer": store.layer,
            "d_model": store.meta.get("d_model"), "count": len(store), "documents": len(store.doc_ids())},
        "settings": {
            "seed": seed, "pool_size": pool_size, "heldout_fraction": heldout_fraction, "split_seed": split_seed,
            "rows_per_document": rows_per_document, "context_tokens": context_tokens, "probe_tasks": list(probe_tasks),
            "probe_items_per_task": probe_items_per_task, "positions": list(positions), "probe_routes": list(probe_routes),
            "judge": judge, "data_dir": None if data_dir is None else str(data_dir), "hub": hub,
            "arithmetic_per_digits": arithmetic_per_digits},
        "timings": {},
    }
    if "retrieval" in chosen:
        t0 = time.time()
        say(f"[eval] retrieval: pool of up to {pool_size} activations")
        results["retrieval"] = evaluate_retrieval(oracle, store, pool_size, seed, heldout_fraction, split_seed, rows_per_document, context_tokens)
        results["timings"]["retrieval"] = time.time() - t0
        c = results["retrieval"]["conditions"]["description"]
        say(f"[eval] retrieval N={results['retrieval']['n']}: top-1 {c['top1']:.3f} top-5 {c['top5']:.3f} cos {c['cosine']:.3f} (mean floor {c['mean_baseline_cosine']:.3f})")
    if "probes" in chosen:
        t0 = time.time()
        results["probes"] = {"positions": list(positions), "routes": list(probe_routes) + (["judge"] if judge else []), "tasks": {}}
        for name, task in loaded.items():
            say(f"[eval] probes: {name} ({len(task.items)} items)")
            results["probes"]["tasks"][name] = evaluate_task(oracle, task, positions, probe_routes, judge, 0.5, seed)
        results["timings"]["probes"] = time.time() - t0
    if "arithmetic" in chosen:
        t0 = time.time()
        say(f"[eval] arithmetic: {3 * arithmetic_per_digits} problems")
        results["arithmetic"] = evaluate_arithmetic(oracle, arithmetic_per_digits, seed)
        results["timings"]["arithmetic"] = time.time() - t0
    write_report(results, out_dir)
    say(f"[eval] wrote {Path(out_dir) / 'results.json'} and report.md")
    return results


def run_evals_from_settings(oracle, store, settings, out_dir: str | Path, seed: int = 0, data_dir: str | Path | None = None, **overrides) -> dict:
    """`run_evals` with the recipe's `eval:` section (`config.EvalSettings`); `data_dir` (e.g. the
    CLI's --data-dir) wins over `settings.data_dir`; other keyword overrides go to run_evals."""
    kwargs = dict(pool_size=settings.pool_size, probe_items_per_task=settings.probe_items_per_task,
                  data_dir=data_dir if data_dir is not None else settings.data_dir, seed=seed)
    kwargs.update(overrides)
    return run_evals(oracle, store, settings.tasks, out_dir, **kwargs)
