"""`run_evals`: run the chosen evals on one or several oracles and write one report (what
`cycle-oracle eval` calls).

    oracle = make_hf_oracle(...)                    # or untrained_hf_oracle(...), or a vLLM-backed one
    store = ActivationStore("runs/x/activations")   # the pool for retrieval (held-out documents)
    results = run_evals(oracle, store, ["retrieval", "probes", "arithmetic"], "runs/x/eval")
    results = run_evals({"decoder": oracle, "logit_lens": lens}, store, ...)   # side by side

Evals: `retrieval` (with its controls: shuffled, zero, context-only, mean floor, text controls,
and with `paraphrase=ParaphraseOptions(...)` the paraphrase test; `controls` is accepted as a
synonym), `probes` (six binary tasks, evals/data.py, plus user-defined `probe_files`),
`arithmetic`. Every oracle runs the same evals on the same pool, probe items and problems. The first
oracle's results sit at the top level of results.json (schema v1 as before); the others' under
`other_oracles.<name>`, and `comparison` holds one row of headline numbers per oracle.
Every data file a chosen eval needs is checked before anything runs, so a missing file fails in
the first second with a message naming it (and `eval.data_dir` / `--data-dir`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from cycle_oracle.evals.arithmetic import evaluate_arithmetic
from cycle_oracle.evals.data import ALL_TASKS, load_probe_file, load_task, probe_file_name
from cycle_oracle.evals.oracle import Oracle
from cycle_oracle.evals.paraphrase import ParaphraseOptions
from cycle_oracle.evals.probes import ROUTES, evaluate_task
from cycle_oracle.evals.report import comparison_rows, write_report
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


def _named(oracle: Oracle | Mapping[str, Oracle]) -> dict[str, Oracle]:
    if isinstance(oracle, Oracle):
        return {oracle.info.get("name", "decoder"): oracle}
    named = dict(oracle)
    if not named:
        raise ValueError("run_evals needs at least one oracle")
    return named


def load_probe_tasks(probe_tasks: Sequence[str], probe_files: Sequence, n_items: int, seed: int, data_dir, hub: bool) -> dict:
    """{name: BinaryTask}: the built-in tasks, then the user-defined files (`config.ProbeFileSettings`
    or dicts of its fields); a file's name must not repeat another task's."""
    from cycle_oracle.config import ProbeFileSettings
    from cycle_oracle.evals.data import ProbeFileError

    loaded = {name: load_task(name, n_items, seed, data_dir, hub) for name in probe_tasks}
    for spec in probe_files:
        spec = spec if isinstance(spec, ProbeFileSettings) else ProbeFileSettings.model_validate(spec)
        name = probe_file_name(spec)
        if name in loaded or name in ALL_TASKS:
            raise ProbeFileError(f"probe file {spec.path}: task name {name!r} is already taken (a built-in task or another file); set `name` in eval.probe_files")
        loaded[name] = load_probe_file(spec, n_items, seed)
    return loaded


def run_evals(
    oracle: Oracle | Mapping[str, Oracle],
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
    probe_files: Sequence = (),
    probe_items_per_task: int = 100,
    positions: Sequence[str] = ("last", "mean"),
    probe_routes: Sequence[str] = ROUTES,
    judge: bool = False,
    data_dir: str | Path | None = None,
    hub: bool = False,
    arithmetic_per_digits: int = 20,
    paraphrase: ParaphraseOptions | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Run `tasks` on every oracle and write `results.json`, `report.md` and plots into out_dir;
    returns the results.

    oracle: one Oracle, or {name: Oracle} evaluated side by side (the first is the primary).
    Retrieval reads its pool from `store` (required for it): held-out documents of
    `store.split_by_document(heldout_fraction, split_seed or seed)` (None: all rows), at most
    `rows_per_document` per document, pool_size rows; `paraphrase` adds the paraphrase test's
    conditions. Probes draw `probe_items_per_task` balanced items per task (half train, half test)
    from `probe_tasks` and `probe_files`. Arithmetic uses `arithmetic_per_digits` problems per
    answer length (1, 2, 3 digits).
    """
    chosen = _normalise(tasks)
    oracles = _named(oracle)
    say = log or (lambda _msg: None)
    if "retrieval" in chosen and store is None:
        raise ValueError("the retrieval eval needs an ActivationStore (store=...)")
    if "retrieval" in chosen:
        from cycle_oracle.evals.baselines import OracleError

        for name, o in oracles.items():
            if o.encode is None:
                raise OracleError(f"oracle {name!r} has no encoder, and retrieval reconstructs v from its descriptions with one: pass "
                                  f"--checkpoint with a run or checkpoint that holds an encoder, or leave retrieval out")
            if paraphrase and "paraphrased" in paraphrase.conditions and o.paraphrase is None:
                raise ValueError(f"oracle {name!r} has no paraphrase callable; run the paraphrase test with conditions=('word_shuffled',) or without it")
    loaded = {}
    if "probes" in chosen:  # check every data file first: fail before spending compute
        loaded = load_probe_tasks(probe_tasks, probe_files, probe_items_per_task, seed, data_dir, hub)
    names = list(oracles)
    results: dict = {
        "kind": "eval",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "evals": chosen,
        "oracles": names,
        "store": None if store is None else {
            "root": str(store.root), "model_id": store.meta.get("model_id"), "layer": store.layer,
            "d_model": store.meta.get("d_model"), "count": len(store), "documents": len(store.doc_ids())},
        "settings": {
            "seed": seed, "pool_size": pool_size, "heldout_fraction": heldout_fraction, "split_seed": split_seed,
            "rows_per_document": rows_per_document, "context_tokens": context_tokens, "probe_tasks": list(loaded) or list(probe_tasks),
            "probe_files": [f if isinstance(f, dict) else f.model_dump() for f in probe_files],
            "probe_items_per_task": probe_items_per_task, "positions": list(positions), "probe_routes": list(probe_routes),
            "judge": judge, "data_dir": None if data_dir is None else str(data_dir), "hub": hub,
            "arithmetic_per_digits": arithmetic_per_digits,
            "paraphrase": None if paraphrase is None else {"instruction": paraphrase.instruction, "max_new_tokens": paraphrase.max_new_tokens,
                                                           "seed": paraphrase.seed, "conditions": list(paraphrase.conditions)}},
    }
    sections = {}
    for name, o in oracles.items():
        tag = f"[eval:{name}]" if len(oracles) > 1 else "[eval]"
        out: dict = {"oracle": dict(o.info, name=name), "timings": {}}
        if "retrieval" in chosen:
            t0 = time.time()
            say(f"{tag} retrieval: pool of up to {pool_size} activations")
            out["retrieval"] = evaluate_retrieval(o, store, pool_size, seed, heldout_fraction, split_seed, rows_per_document, context_tokens,
                                                  paraphrase=paraphrase)
            out["timings"]["retrieval"] = time.time() - t0
            c = out["retrieval"]["conditions"]["description"]
            say(f"{tag} retrieval N={out['retrieval']['n']}: top-1 {c['top1']:.3f} top-5 {c['top5']:.3f} cos {c['cosine']:.3f} (mean floor {c['mean_baseline_cosine']:.3f})")
        if "probes" in chosen:
            t0 = time.time()
            out["probes"] = {"positions": list(positions), "routes": list(probe_routes) + (["judge"] if judge else []), "tasks": {}}
            for task_name, task in loaded.items():
                say(f"{tag} probes: {task_name} ({len(task.items)} items)")
                out["probes"]["tasks"][task_name] = evaluate_task(o, task, positions, probe_routes, judge, 0.5, seed)
            out["timings"]["probes"] = time.time() - t0
        if "arithmetic" in chosen:
            t0 = time.time()
            say(f"{tag} arithmetic: {3 * arithmetic_per_digits} problems")
            out["arithmetic"] = evaluate_arithmetic(o, arithmetic_per_digits, seed)
            out["timings"]["arithmetic"] = time.time() - t0
        sections[name] = out
    results.update(sections[names[0]])  # the primary oracle: schema v1's top-level sections
    if len(names) > 1:
        results["other_oracles"] = {name: sections[name] for name in names[1:]}
    results["comparison"] = comparison_rows(sections)
    write_report(results, out_dir)
    say(f"[eval] wrote {Path(out_dir) / 'results.json'} and report.md")
    return results


def run_evals_from_settings(oracle, store, settings, out_dir: str | Path, seed: int = 0, data_dir: str | Path | None = None, **overrides) -> dict:
    """`run_evals` with the recipe's `eval:` section (`config.EvalSettings`); `data_dir` (e.g. the
    CLI's --data-dir) wins over `settings.data_dir`; other keyword overrides go to run_evals."""
    paraphrase = ParaphraseOptions(settings.paraphrase_instruction, settings.paraphrase_max_new_tokens, seed) if settings.paraphrase else None
    kwargs = dict(pool_size=settings.pool_size, rows_per_document=settings.rows_per_document, probe_items_per_task=settings.probe_items_per_task,
                  data_dir=data_dir if data_dir is not None else settings.data_dir, seed=seed,
                  probe_tasks=settings.probe_tasks, probe_files=settings.probe_files, positions=settings.probe_positions,
                  arithmetic_per_digits=settings.arithmetic_per_digits, judge=settings.judge, paraphrase=paraphrase)
    kwargs.update(overrides)
    return run_evals(oracle, store, settings.tasks, out_dir, **kwargs)


def run_evals_from_recipe(cfg, store, out_dir: str | Path, data_dir: str | Path | None = None, log: Callable[[str], None] | None = print) -> dict:
    """What `cycle-oracle eval` runs once the store is extracted: every oracle of `cfg.eval.oracles`
    (evals/baselines.build_oracles: the checkpoint `cfg.init_from` or the untrained floor) on the
    recipe's pool (held-out side of `cfg.split`, seed `cfg.seed`), probe tasks and problems."""
    from cycle_oracle.evals.baselines import build_oracles, check_oracle_request, oracle_names

    names = oracle_names(cfg)
    check_oracle_request(cfg, names)
    oracles = build_oracles(cfg, store, names)
    return run_evals_from_settings(oracles, store, cfg.eval, out_dir, seed=cfg.seed, data_dir=data_dir,
                                   heldout_fraction=cfg.split.heldout_fraction, split_seed=cfg.seed, log=log)
