"""`kind: eval` — evaluate a checkpoint (`init_from`, a run or checkpoint folder) or, without one,
the untrained decoder (the floor, `selfie`), and the training-free baselines asked for in
`eval.oracles` (`cycle-oracle eval --oracle NAME`), side by side: retrieval on held-out corpus
documents (with the paraphrase test, truncation and the quote ban, and `--grader`'s encoder beside
the checkpoint's), probe comparisons, arithmetic, the faithfulness controls and, with `secrets` in
`eval.tasks`, secret elicitation on Taboo-style organisms. Writes results.json, report.md and PNG plots.

The oracles run in-process on HF models (the evals are small next to training); the corpus
activations are extracted, and the organisms trained (one LoRA per secret word, TRL's SFTTrainer,
saved as PEFT folders under `<out>/organisms/<word>/` and reused when already there), by Ray tasks
in the run's placement group, as the training recipes do.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray
import torch

from actors.logs import output_to
from actors.placement import remote_get
from cycle_oracle.checkpoint import load_trained, write_adapter_folder
from cycle_oracle.config import RecipeConfig
from cycle_oracle.corpus import load_documents
from cycle_oracle.data.taboo import load_hints
from cycle_oracle.devices import check_dtype, role_device
from cycle_oracle.evals.baselines import check_oracle_request, needs_store, oracle_names
from cycle_oracle.evals.report import eval_summary
from cycle_oracle.evals.run import run_evals_from_recipe
from cycle_oracle.files import atomic_write_text
from cycle_oracle.models import lora_config, model_spec, resolve_model_path
from cycle_oracle.organism import train_organism
from recipes.common import RunContext, extract_store, finish_run, start_run

DEFAULT_EVAL_RECIPE = Path(__file__).with_name("eval_cpu.yaml")


def run(cfg, out, resume: bool = False, data_dir: str | None = None) -> dict:
    names = oracle_names(cfg)
    check_oracle_request(cfg, names)  # a request that cannot run fails before Ray starts
    ctx = start_run(cfg, out, "eval", resume)
    cfg = ctx.cfg  # model.dtype: auto resolved
    store = None
    if needs_store(cfg, names):
        store, _emb_norm = extract_store(ctx, load_documents(cfg.corpus, cfg.num_documents))
        print(f"[eval] store of {len(store)} activations (layer mean norm {store.mean_norm:.1f})")
    organisms, reports = ({}, {}) if "secrets" not in cfg.eval.tasks else organisms_for(ctx)
    print(f"[eval] oracles: {', '.join(names)}")
    results = run_evals_from_recipe(cfg, store, ctx.out, data_dir=data_dir, organisms=organisms, organism_reports=reports)
    summary = eval_summary(results)
    ctx.metrics.log("eval", 0, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    finish_run(ctx)
    results["summary"] = summary
    return results


@ray.remote
def organism_task(model: str, config: dict, words: list[str], hints: dict, threads: int, log_file: str | None = None) -> dict:
    """Train the organism of each word (one after another) -> {word: (adapter state, report)};
    `model` is the model spec (`models.model_spec`), resolved on this task's node."""
    with output_to(log_file):
        cfg = RecipeConfig.model_validate(config)
        torch.set_num_threads(threads)
        device = role_device(cfg.resources.learner.num_gpus)
        check_dtype(cfg.model.dtype, device, role="learner (organism)")
        path = resolve_model_path(model)
        return {w: train_organism(path, w, cfg.eval.secrets, cfg.seed, cfg.model.dtype, hints, device) for w in words}


def organisms_for(ctx: RunContext) -> tuple[dict[str, str], dict[str, dict]]:
    """({word: adapter folder or hub id}, {word: training report}) for every secret word: the
    recipe's `eval.secrets.organisms`, the folders of an earlier run in `<out>/organisms/`, and the
    rest trained now (a Ray task in the placement group's first bundle) and written there."""
    cfg, s = ctx.cfg, ctx.cfg.eval.secrets
    organisms: dict[str, str] = {w: s.organisms[w] for w in s.words if w in s.organisms}
    reports: dict[str, dict] = {w: {"source": "given (eval.secrets.organisms)"} for w in organisms}
    root = ctx.out / "organisms"
    model = load_trained(cfg.init_from).record.model if cfg.init_from else cfg.model.name
    todo = []
    for w in s.words:
        if w in organisms:
            continue
        meta = root / w / "organism.json"
        earlier = json.loads(meta.read_text()) if meta.is_file() and (root / w / "adapter_model.safetensors").is_file() else None
        if earlier and earlier.get("model") == model:
            organisms[w], reports[w] = str(root / w), {"source": "reused", **earlier}
        else:
            todo.append(w)
    if todo:
        spec = model_spec(model)
        print(f"[eval] training {len(todo)} Taboo organism(s) of {model}: {', '.join(todo)} "
              f"({s.dialogues_per_word} dialogues x {s.train_epochs} epochs each)")
        options, threads = ctx.placement.task_options()
        trained = remote_get(organism_task.options(**options).remote(spec, cfg.model_dump(mode="json"), todo, load_hints(s.hints_path),
                                                                     threads, ctx.log_file("organisms")),
                             cfg.ray.setup_timeout_s, "organism training")
        for w, (state, report) in trained.items():
            config = lora_config(s.lora)
            config.base_model_name_or_path = spec  # the recipe's name of the base, not a path on the driver
            write_adapter_folder(root / w, state, config)
            atomic_write_text(root / w / "organism.json", json.dumps({"model": model, **report}, indent=2))
            organisms[w], reports[w] = str(root / w), {"source": "trained", **report}
            print(f"[eval] organism {w!r}: {report['steps']} steps, loss {report['train_loss']:.3f}, {report['seconds']:.0f} s -> {root / w}")
    return organisms, reports
