"""`run_evals`: run the chosen evals on one or several oracles and write one report (what
`cycle-oracle eval` calls).

    oracle = make_hf_oracle(...)                    # or untrained_hf_oracle(...), or a vLLM-backed one
    store = ActivationStore("runs/x/activations")   # the pool for retrieval (held-out documents)
    results = run_evals(oracle, store, ["retrieval", "probes", "arithmetic"], "runs/x/eval")
    results = run_evals({"decoder": oracle, "logit_lens": lens}, store, ...)   # side by side

Evals: `retrieval` (with its controls: shuffled, zero, context-only, mean floor, text controls,
and with `paraphrase=ParaphraseOptions(...)` the paraphrase test; `controls` is accepted as a
synonym), `probes` (six binary tasks, evals/data.py, plus user-defined `probe_files`),
`arithmetic`, `secrets` (secret elicitation on Taboo-style organisms, evals/secrets.py: pass
`secrets=prepare_secret_set(...)`). Retrieval also scores each description cut to its first n
tokens (`truncation_tokens`) and with its quotes banned (`quote_ban`), and grades every text
condition again by each encoder of `graders` (other checkpoints', `--grader`). With the text-only
guess among the oracles (`text_guess`), `versus_text_guess` holds every other oracle's paired
difference from it (retrieval per item, secrets per item) with a bootstrap interval.
Every oracle runs the same evals on the same pool, probe items and problems. The first
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

import torch

from cycle_oracle.checkpoint import load_trained
from cycle_oracle.config import ProbeFileSettings
from cycle_oracle.evals.arithmetic import evaluate_arithmetic
from cycle_oracle.evals.baselines import OracleError, build_graders, build_oracles, check_oracle_request, oracle_names
from cycle_oracle.evals.data import ALL_TASKS, ProbeFileError, load_probe_file, load_task, probe_file_name
from cycle_oracle.evals.oracle import Oracle
from cycle_oracle.evals.paraphrase import ParaphraseOptions
from cycle_oracle.evals.probes import ROUTES, evaluate_task
from cycle_oracle.evals.report import comparison_rows, write_eval_report
from cycle_oracle.evals.retrieval import evaluate_retrieval
from cycle_oracle.evals.secrets import SecretSet, evaluate_secrets, prepare_secret_set, secret_controls
from cycle_oracle.models import load_tokenizer, resolve_model_path
from cycle_oracle.organism import load_organism
from cycle_oracle.stats import paired_difference

EVALS = ("retrieval", "probes", "arithmetic", "secrets")
GUESS = "text_guess"


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


def load_probe_tasks(probe_tasks: Sequence[str], probe_files: Sequence, n_items: int, seed: int, data_dir, hub: bool,
                     source: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """{name: BinaryTask}: the built-in tasks (from `source`, evals/data.py), then the user-defined
    files (`config.ProbeFileSettings` or dicts of its fields); a file's name must not repeat another task's."""
    loaded = {name: load_task(name, n_items, seed, data_dir, hub, source=source, log=log) for name in probe_tasks}
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
    task_source: str | None = None,
    truncation_tokens: Sequence[int] = (),
    quote_ban: bool = False,
    graders: Mapping[str, Callable] | None = None,
    secrets: SecretSet | None = None,
    secret_question: str = "What is the secret word?",
    secret_answer_tokens: int = 12,
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
    answer length (1, 2, 3 digits). Secrets read the prepared organisms' side (`secrets`) and ask
    every oracle for each item's word (`secret_question` for oracles that answer questions).
    """
    chosen = _normalise(tasks)
    oracles = _named(oracle)
    say = log or (lambda _msg: None)
    if "retrieval" in chosen and store is None:
        raise ValueError("the retrieval eval needs an ActivationStore (store=...)")
    if "secrets" in chosen and secrets is None:
        raise ValueError("the secrets eval needs the organisms read first (secrets=evals.secrets.prepare_secret_set(...))")
    if "retrieval" in chosen:
        for name, o in oracles.items():
            if o.encode is None:
                raise OracleError(f"oracle {name!r} has no encoder, and retrieval reconstructs v from its descriptions with one: pass "
                                  f"--checkpoint with a run or checkpoint that holds an encoder, or leave retrieval out")
            if paraphrase and "paraphrased" in paraphrase.conditions and o.paraphrase is None:
                raise ValueError(f"oracle {name!r} has no paraphrase callable; run the paraphrase test with conditions=('word_shuffled',) or without it")
    loaded = {}
    if "probes" in chosen:  # check every data file first: fail before spending compute
        loaded = load_probe_tasks(probe_tasks, probe_files, probe_items_per_task, seed, data_dir, hub, task_source, say)
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
            "arithmetic_per_digits": arithmetic_per_digits, "task_source": task_source or ("hub" if hub else "auto"),
            "truncation_tokens": list(truncation_tokens), "quote_ban": quote_ban, "graders": list(graders or {}),
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
                                                  paraphrase=paraphrase, truncation_tokens=truncation_tokens, quote_ban=quote_ban, graders=graders)
            out["timings"]["retrieval"] = time.time() - t0
            r = out["retrieval"]
            c = r["conditions"]["description"]
            say(f"{tag} retrieval N={r['n']}: top-1 {c['top1']:.3f} (chance {r['chance']['top1']:.3f}) FVE {c['fve']:.3f} "
                f"(predict-the-mean: FVE 0, cos {c['mean_baseline_cosine']:.3f}) cos {c['cosine']:.3f} top-5 {c['top5']:.3f}")
            for g, graded in r.get("graders", {}).items():
                gc = graded["conditions"]["description"]
                say(f"{tag}   under the {g} encoder: top-1 {gc['top1']:.3f} FVE {gc['fve']:.3f}")
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
        if "secrets" in chosen:
            t0 = time.time()
            say(f"{tag} secrets: {len(secrets.words)} items ({len(set(secrets.words))} organisms)")
            out["secrets"] = evaluate_secrets(o, secrets, secret_question, secret_answer_tokens, seed)
            out["timings"]["secrets"] = time.time() - t0
            best = out["secrets"]["routes"][out["secrets"]["best_route"]]
            say(f"{tag} secrets: accuracy {best['accuracy']:.3f} [{best['ci_low']:.2f}, {best['ci_high']:.2f}] ({out['secrets']['best_route']} route)")
        sections[name] = out
    if "secrets" in chosen:
        results["secret_controls"] = secret_controls(secrets, seed)
        bb, leak = results["secret_controls"]["black_box"], results["secret_controls"]["leak_rate"]
        say(f"[eval] secrets: black-box (asking the organism) {bb['accuracy']:.3f} [{bb['ci_low']:.2f}, {bb['ci_high']:.2f}], "
            f"organism leak rate {leak['accuracy']:.3f}")
    if GUESS in sections:
        results["versus_text_guess"] = versus_text_guess(sections, seed)
    results.update(sections[names[0]])  # the primary oracle: schema v1's top-level sections
    if len(names) > 1:
        results["other_oracles"] = {name: sections[name] for name in names[1:]}
    results["comparison"] = comparison_rows(sections)
    write_eval_report(out_dir, results)
    say(f"[eval] wrote {Path(out_dir) / 'results.json'} and report.md")
    return results


def _paired_retrieval(a: dict, b: dict, seed: int) -> dict:
    """Per-item paired differences a - b of two retrieval per-item blocks over the same rows."""
    ranks_a, ranks_b = torch.tensor(a["rank"], dtype=torch.float64), torch.tensor(b["rank"], dtype=torch.float64)
    return {"centred_cosine": paired_difference(torch.tensor(a["centred_cosine"]), torch.tensor(b["centred_cosine"]), seed=seed),
            "top1": paired_difference((ranks_a == 1).double(), (ranks_b == 1).double(), seed=seed),
            "reciprocal_rank": paired_difference(1 / ranks_a, 1 / ranks_b, seed=seed)}


def versus_text_guess(sections: Mapping[str, dict], seed: int = 0) -> dict:
    """{oracle: {"retrieval": {grader: paired differences}, "secrets": paired difference}}: each
    oracle minus the text-only guess on the same items (retrieval: per-item centred cosine, top-1
    hit and reciprocal rank under each grader; secrets: the item named, best route vs the guess's
    description), mean and percentile-bootstrap interval (`stats.paired_difference`). A decoder
    that only matches the guess adds nothing the text did not already say."""
    guess = sections[GUESS]
    out: dict = {}
    for name, sec in sections.items():
        if name == GUESS:
            continue
        row: dict = {}
        r, g = sec.get("retrieval"), guess.get("retrieval")
        if r and g and r["rows"] == g["rows"]:
            row["retrieval"] = {"own": _paired_retrieval(r["per_item"]["description"], g["per_item"]["description"], seed)}
            for grader, graded in r.get("graders", {}).items():
                if grader in g.get("graders", {}):
                    row["retrieval"][grader] = _paired_retrieval(graded["per_item"]["description"], g["graders"][grader]["per_item"]["description"], seed)
        s, gs = sec.get("secrets"), guess.get("secrets")
        if s and gs:
            best = s["routes"][s["best_route"]]["correct_items"]
            row["secrets"] = {"route": s["best_route"], **paired_difference(torch.tensor(best, dtype=torch.float64),
                                                                            torch.tensor(gs["routes"]["description"]["correct_items"], dtype=torch.float64), seed=seed)}
        if row:
            out[name] = row
    return out


def run_evals_from_settings(oracle, store, settings, out_dir: str | Path, seed: int = 0, data_dir: str | Path | None = None, **overrides) -> dict:
    """`run_evals` with the recipe's `eval:` section (`config.EvalSettings`); `data_dir` (e.g. the
    CLI's --data-dir) wins over `settings.data_dir`; other keyword overrides go to run_evals."""
    paraphrase = ParaphraseOptions(settings.paraphrase_instruction, settings.paraphrase_max_new_tokens, seed) if settings.paraphrase else None
    kwargs = dict(pool_size=settings.pool_size, rows_per_document=settings.rows_per_document, probe_items_per_task=settings.probe_items_per_task,
                  data_dir=data_dir if data_dir is not None else settings.data_dir, seed=seed,
                  probe_tasks=settings.probe_tasks, probe_files=settings.probe_files, positions=settings.probe_positions,
                  arithmetic_per_digits=settings.arithmetic_per_digits, judge=settings.judge, paraphrase=paraphrase,
                  task_source=settings.task_source, truncation_tokens=settings.truncation_tokens, quote_ban=settings.quote_ban,
                  secret_question=settings.secrets.question, secret_answer_tokens=settings.secrets.answer_max_new_tokens)
    kwargs.update(overrides)
    return run_evals(oracle, store, settings.tasks, out_dir, **kwargs)


def run_evals_from_recipe(cfg, store, out_dir: str | Path, data_dir: str | Path | None = None, log: Callable[[str], None] | None = print,
                          organisms: Mapping[str, str] | None = None, organism_reports: Mapping[str, dict] | None = None) -> dict:
    """What `cycle-oracle eval` runs once the store is extracted (and, for `secrets`, the organisms
    trained): every oracle of `cfg.eval.oracles` (evals/baselines.build_oracles: the checkpoint
    `cfg.init_from` or the untrained floor) on the recipe's pool (held-out side of `cfg.split`, seed
    `cfg.seed`), probe tasks and problems; `eval.grader`'s encoder grades every oracle beside the
    checkpoint's; `organisms` ({word: PEFT adapter folder or hub id}) are read for the secrets eval."""
    names = oracle_names(cfg)
    check_oracle_request(cfg, names)
    cfg, split_seed = checkpoint_split(cfg, log)
    oracles = build_oracles(cfg, store, names, split_seed)
    graders = build_graders(cfg)
    secrets = None
    if "secrets" in cfg.eval.tasks:
        secrets = read_organisms(cfg, next(iter(oracles.values())), organisms or {}, organism_reports, log)
    return run_evals_from_settings(oracles, store, cfg.eval, out_dir, seed=cfg.seed, data_dir=data_dir,
                                   heldout_fraction=cfg.split.heldout_fraction, split_seed=split_seed, log=log,
                                   graders=graders, secrets=secrets)


def checkpoint_split(cfg, log: Callable[[str], None] | None = print):
    """(cfg, split seed) with the checkpoint's own held-out split (`split.heldout_fraction` and the
    seed of the run that trained it) when there is a checkpoint: a split is a hash threshold, so a
    larger held-out fraction in the eval recipe would put documents the checkpoint trained on into
    the pool (and take them out of LatentLens's bank). Without a checkpoint: the recipe's."""
    if cfg.init_from is None:
        return cfg, cfg.seed

    run_cfg = load_trained(cfg.init_from).config()
    theirs = (run_cfg.split.heldout_fraction, run_cfg.seed)
    if theirs != (cfg.split.heldout_fraction, cfg.seed) and log:
        log(f"[eval] held-out split of the checkpoint's run: heldout_fraction {theirs[0]}, seed {theirs[1]} "
            f"(the recipe says {cfg.split.heldout_fraction}, seed {cfg.seed}): the pool holds no document it trained on")
    return cfg.model_copy(update={"split": run_cfg.split}), run_cfg.seed


def read_organisms(cfg, oracle: Oracle, organisms: Mapping[str, str], reports: Mapping[str, dict] | None = None,
                   log: Callable[[str], None] | None = print) -> SecretSet:
    """The organisms' side of the secrets eval (evals/secrets.prepare_secret_set) for every word of
    `eval.secrets.words`, each organism = the oracle's target model + the word's adapter."""
    s = cfg.eval.secrets
    missing = [w for w in s.words if w not in organisms]
    if missing:
        raise ValueError(f"no organism for the secret word(s) {missing}: train them first (recipes/evaluate.py) or name them in eval.secrets.organisms")
    model_name = oracle.info.get("model") or cfg.model.name
    path = resolve_model_path(model_name)
    dtype = cfg.model.dtype
    where = {w: {"adapter": str(organisms[w]), **(dict(reports or {}).get(w) or {})} for w in s.words}
    return prepare_secret_set(lambda w: load_organism(path, organisms[w], dtype), load_tokenizer(path), s.words, oracle.info["layer"],
                              s.prompts_per_word, s.read, s.reply_max_new_tokens, organisms=where, log=log)
