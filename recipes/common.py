"""Set-up every recipe driver shares: the run's context (`RunContext`: folder, config, model and
layer, metrics, placement group of every role of the kind, `actors/placement.py`), extraction of
corpus activations (a Ray task in the placement group's first bundle, so the driver holds no
model), the injection norm, loading a checkpoint to start from, and the warmup's data (built by a
Ray task; the warmup trains on it, GRPO's supervised mixing draws from it, both centre LatentQA's
activations the same way).

The model travels to the roles as the recipe names it (`RunContext.model_spec`: a hub id, an embedded name
or an absolute folder) and every role and task resolves it on its own node (`resolve_model_path`);
the driver resolves it only for its own config and tokenizer (`RunContext.model_path`, no weights).
Documents the roles need are read once, on the driver, and reach them through Ray's object store."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
import yaml

from actors.learner import LearnerGroup
from actors.logs import output_to, send_output_to
from actors.placement import Placement, init_ray, remote_get
from cycle_oracle.activations import ActivationStore, extract, write_store
from cycle_oracle.checkpoint import (CheckpointRecord, TrainedCheckpoint, latest_checkpoint, load_trained, recorded_dtype,
                                     resolve_checkpoint, served_injection_norm)
from cycle_oracle.config import RecipeConfig, dump_recipe
from cycle_oracle.corpus import load_documents
from cycle_oracle.data.build import build_warmup_data
from cycle_oracle.data.generation import hf_generate_fn, vllm_generate_fn
from cycle_oracle.data.read_positions import read_positions
from cycle_oracle.devices import AUTO, check_dtype, choose_dtype, dtype_probe, role_device
from cycle_oracle.evals.baselines import training_free_descriptions
from cycle_oracle.evals.final import format_control_texts, pool_rows
from cycle_oracle.files import atomic_write_text
from cycle_oracle.injection import mean_embedding_norm, target_norm
from cycle_oracle.metrics import MetricsLogger
from cycle_oracle.models import load_causal_lm, load_tokenizer, lora_config, model_spec, resolve_layer, resolve_model_path
from cycle_oracle.rollout import configure_cpu_environment


@dataclass
class RunContext:
    """One recipe run as its driver holds it (`start_run` makes it, `finish_run` closes it)."""

    cfg: RecipeConfig
    out: Path
    model_path: str
    """The model's folder on the driver's node: config and tokenizer (no weights for a hub id)."""
    model_spec: str
    """What every role is given and resolves on its own node (`models.model_spec`)."""
    layer: int
    n_layers: int
    metrics: MetricsLogger
    placement: Placement

    @property
    def log_dir(self) -> str | None:
        """Where actors and tasks write their output (None with `logging.verbose`: the terminal)."""
        return None if self.cfg.logging.verbose else str(self.out / "logs")

    def log_file(self, name: str) -> str | None:
        return f"{self.log_dir}/{name}.log" if self.log_dir else None

    def write_results(self, name: str, results: dict) -> Path:
        path = self.out / name
        atomic_write_text(path, json.dumps(results, indent=2, default=float))
        return path


def start_run(cfg: RecipeConfig, out: str | Path, stage: str, resume: bool = False) -> RunContext:
    """The run folder, Ray, the placement group, `model.dtype: auto` resolved (`resolve_dtype`; the
    returned `RunContext.cfg` holds the concrete dtype, and so does `<out>/config.yaml`) and the metrics logger."""
    if cfg.init_from:  # a missing or incomplete checkpoint is the user's to fix: say so before anything starts
        resolve_checkpoint(cfg.init_from)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    resumed_dtype = recorded_run_dtype(out) if resume else None  # before config.yaml is rewritten
    atomic_write_text(out / "config.yaml", dump_recipe(cfg))
    model_path = str(resolve_model_path(cfg.model.name, weights=False))
    model_config = json.loads((Path(model_path) / "config.json").read_text())
    n_layers = int(model_config["num_hidden_layers"])
    layer = resolve_layer(cfg.model.layer, n_layers)
    init_ray(cfg)
    placement = Placement(cfg, cfg.ray.setup_timeout_s)
    if cfg.model.dtype == AUTO:
        try:
            cfg, note = resolve_dtype(cfg, placement, model_config, out, resumed_dtype)
        except BaseException:
            placement.remove()
            raise
        atomic_write_text(out / "config.yaml", dump_recipe(cfg))
        print(f"[{stage}] {note}")
    metrics = MetricsLogger(out, cfg.logging, cfg.model_dump(mode="json"), run_name=f"{out.name}-{stage}")
    print(f"[{stage}] model {cfg.model.name} ({n_layers} blocks), read layer {layer}, run folder {out}")
    return RunContext(cfg, out, model_path, model_spec(cfg.model.name), layer, n_layers, metrics, placement)


def recorded_run_dtype(out: Path) -> str | None:
    """The concrete `model.dtype` a run folder's config.yaml records (what `auto` was resolved to when
    the run started), or None."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        return None
    dtype = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("dtype", "float32")
    return None if dtype == AUTO else dtype


@ray.remote
def dtype_probe_task(num_gpus: float, threads: int, engine: str, d_model: int, d_ff: int) -> dict:
    """`devices.dtype_probe` on the device Ray gave this task (a role's bundle), with the role's threads."""
    torch.set_num_threads(threads)
    return dtype_probe(role_device(num_gpus), d_model, d_ff, engine=engine)


ROLE_ENGINES = {"learner": "deepspeed", "rollout": "vllm", "encoder": "torch"}
"""The engine each role computes with (what `devices.dtype_support` checks a dtype against)."""


def resolve_dtype(cfg: RecipeConfig, placement: Placement, model_config: dict, out: Path, resumed: str | None = None) -> tuple[RecipeConfig, str]:
    """`model.dtype: auto` -> (a copy of cfg with the concrete dtype, the line that says why). Once per
    run, in this order: a resumed run keeps what it resolved at its start (`resumed`, from its
    config.yaml); a run started from a checkpoint (`init_from`) computes in the checkpoint's dtype;
    otherwise a probe on every role's device (one Ray task in the first bundle of each role, one after
    another so that they do not share the cores) decides (`devices.choose_dtype`), and its
    measurements go to `<out>/dtype_probe.json`. The learner and eval kinds use DeepSpeed (the
    learner role), the rollout vLLM, the encoder plain torch."""
    if resumed:
        dtype, why = resumed, "as this run resolved it when it started (config.yaml)"
    elif cfg.init_from and (start := recorded_dtype(cfg.init_from)):
        dtype, why = start, f"as the checkpoint it starts from ({cfg.init_from}) was trained"
    else:
        d_model, d_ff = int(model_config["hidden_size"]), int(model_config["intermediate_size"])
        probes: dict[str, dict] = {}
        for item in placement.plan:
            role = item["role"]
            if role in probes:
                continue
            res = getattr(cfg.resources, role)
            engine = ROLE_ENGINES[role] if cfg.kind != "eval" else "torch"  # eval's oracles run HF models
            probes[role] = remote_get(dtype_probe_task.options(**placement.options(role, item["index"])).remote(
                res.num_gpus, res.threads, engine, d_model, d_ff), cfg.ray.setup_timeout_s, f"the dtype probe on the {role}'s device")
        dtype, why = choose_dtype(probes)
        atomic_write_text(out / "dtype_probe.json", json.dumps({"chosen": dtype, "why": why, "probes": probes}, indent=1))
    resolved = cfg.model_copy(deep=True)
    resolved.model.dtype = dtype
    return resolved, f"model.dtype auto -> {dtype}: {why}"


def finish_run(ctx: RunContext) -> None:
    ctx.metrics.close()
    ctx.placement.remove()


@ray.remote(max_calls=1)  # the worker exits afterwards: the target model's (GPU) memory is not kept
def extraction_task(model: str, config: dict, layer: int, documents: list, threads: int, log_file: str | None = None):
    """Read corpus activations with the frozen target (`model`: a spec, resolved on this node) ->
    (batches, embedding norm)."""
    with output_to(log_file):
        return _extract(model, config, layer, documents, threads)


def _extract(model: str, config: dict, layer: int, documents: list, threads: int):
    model_path = resolve_model_path(model)  # on this task's node
    cfg = RecipeConfig.model_validate(config)
    torch.set_num_threads(threads)
    device = role_device(cfg.resources.learner.num_gpus)  # the first (learner) bundle
    check_dtype(cfg.model.dtype, device, role="learner (extraction)")
    tok = load_tokenizer(model_path)
    target = load_causal_lm(model_path, cfg.model.dtype).to(device)
    e = cfg.extraction
    batches = list(extract(target, tok, documents, layer, e.positions, e.skip_first, e.skip_special, e.batch_size, cfg.model.max_context_tokens, progress=True))
    return batches, mean_embedding_norm(target.get_input_embeddings())


@ray.remote(max_calls=1)  # the worker exits afterwards: the target model's (GPU) memory is not kept
def baselines_task(model: str, config: dict, layer: int, norm: float, vectors: torch.Tensor, token_lists: list[list[int]],
                   names: list[str], threads: int, log_file: str | None = None) -> dict[str, list[str]]:
    """The training-free oracles' texts for GRPO's final pool (`evals.baselines.training_free_descriptions`:
    the frozen target, resolved on this node, reading vectors [N, d] or the items' source tokens)
    -> {name: N texts}. Runs on the first (learner) bundle once the learners are gone."""
    with output_to(log_file):
        cfg = RecipeConfig.model_validate(config)
        model_path = resolve_model_path(model)  # on this task's node
        torch.set_num_threads(threads)
        device = role_device(cfg.resources.learner.num_gpus)
        tok = load_tokenizer(model_path)
        target = load_causal_lm(model_path, cfg.model.dtype).to(device).eval()
        w = cfg.warmup
        return training_free_descriptions(names, target, tok, vectors.to(device), token_lists, cfg.eval, norm, cfg.injection.mode,
                                          cfg.description_instruction, cfg.sampling.max_new_tokens, w.description_quote_tokens,
                                          w.description_quote_style)


def written_oracles(ctx: RunContext, store, tokenizer, norm: float) -> dict[str, list[str]]:
    """GRPO's final pool (`evals/final.pool_rows`) described by the training-free baselines
    (`eval.final_baselines`: `baselines_task` on the first bundle, which the caller has freed) and
    written as the format controls (`eval.final_format_controls`), in pool order."""
    cfg = ctx.cfg
    rows, written = pool_rows(store, cfg), {}
    if cfg.eval.final_baselines:
        options, threads = ctx.placement.task_options()
        token_lists = [store.context_window(i, before=cfg.eval.text_guess_window_tokens) for i in rows]
        written.update(remote_get(baselines_task.options(**options).remote(
            ctx.model_spec, cfg.model_dump(mode="json"), ctx.layer, norm, store.activations[rows], token_lists, list(cfg.eval.final_baselines),
            threads, ctx.log_file("baselines")), cfg.ray.setup_timeout_s, "the training-free baselines"))
    if cfg.eval.final_format_controls:
        written.update(format_control_texts(store, rows, tokenizer, cfg.warmup.description_quote_tokens, cfg.warmup.description_quote_style))
    return written


def extract_store(ctx: RunContext, documents, subdir: str = "activations"):
    """Extract activations for `documents` (read on the driver; they reach the task through Ray's
    object store) into `<run>/<subdir>` (reused if already there)."""
    root = ctx.out / subdir
    if (root / "meta.json").is_file():
        store = ActivationStore(root)
        return store, float(json.loads((root / "embedding_norm.json").read_text())["embedding_norm"])
    t0 = time.time()
    options, threads = ctx.placement.task_options()
    batches, emb_norm = remote_get(
        extraction_task.options(**options).remote(ctx.model_spec, ctx.cfg.model_dump(mode="json"), ctx.layer, ray.put(documents), threads,
                                                  ctx.log_file("extraction")),
        ctx.cfg.ray.setup_timeout_s, "activation extraction",
    )
    store = write_store(root, batches, ctx.cfg.model.name, ctx.layer, ctx.cfg.extraction.shard_size)
    atomic_write_text(root / "embedding_norm.json", json.dumps({"embedding_norm": emb_norm}))
    print(f"[extract] {len(store)} activations from {len(documents)} documents in {time.time() - t0:.0f}s -> {root}")
    return store, emb_norm


def injection_norm(ctx: RunContext, embedding_norm: float, layer_mean_norm: float, start: TrainedCheckpoint | None = None) -> float:
    """The norm injected activations are scaled to: the recipe's choice (`injection.scale`) for a
    fresh decoder, the checkpoint's for a trained one (`served_injection_norm`)."""
    norm, note = served_injection_norm(start.record if start else None, target_norm(ctx.cfg.injection, embedding_norm, layer_mean_norm))
    if note:
        print(f"[{ctx.cfg.kind}] {note}")
    return norm


def load_start(ctx: RunContext) -> TrainedCheckpoint | None:
    """The checkpoint `init_from` names (warmup or GRPO), checked against this run's model, layer and
    injection; None without init_from."""
    if not ctx.cfg.init_from:
        return None
    start = load_trained(ctx.cfg.init_from)
    start.require_tensors("decoder_adapter")
    start.record.check_compatible(ctx.cfg.model.name, ctx.layer, ctx.cfg.injection.model_dump(mode="json"), f"init_from {start.path}")
    print(f"[{ctx.cfg.kind}] starting from the {start.record.stage} checkpoint {start.path} (step {start.record.step})")
    return start


def load_resume(ctx: RunContext, stage: str) -> TrainedCheckpoint | None:
    """The run folder's latest checkpoint for `--resume` (None if it has none yet)."""
    if latest_checkpoint(ctx.out) is None:
        return None
    ckpt = load_trained(ctx.out)
    ckpt.require_stage(stage, f"resuming a {stage} run")
    return ckpt


def checkpoint_adapter_configs(ctx: RunContext) -> dict:
    """PEFT configs of the adapters a checkpoint stores as PEFT folders: the decoder's
    (`<checkpoint>/decoder_adapter/`, loadable by `PeftModel.from_pretrained` and vLLM's `LoRARequest`)."""
    config = lora_config(ctx.cfg.decoder_lora)
    config.base_model_name_or_path = ctx.model_spec  # the recipe's name of the base, not a path on the driver
    return {"decoder_adapter": config}


def record(ctx: RunContext, stage: str, step: int, norm: float, weight_version: int, world_size: int, **extra) -> CheckpointRecord:
    """This run's checkpoint record at `step`."""
    return CheckpointRecord(stage=stage, step=step, model=ctx.cfg.model.name, layer=ctx.layer,
                            injection=ctx.cfg.injection.model_dump(mode="json"), injection_norm=float(norm),
                            weight_version=weight_version, world_size=world_size, extra=extra, dtype=ctx.cfg.model.dtype)


def out_of_time(max_minutes: float | None, since: float) -> bool:
    """A stage's wall-clock budget (`warmup.max_minutes`, `grpo.max_minutes`) is spent: more than
    `max_minutes` since `since` (time.time()); never with no budget. The loops stop after the step
    that passes it."""
    return max_minutes is not None and time.time() - since > 60 * max_minutes


def check_finite(metrics: dict, step: int) -> None:
    """Stop the run on NaN/inf (before anything is checkpointed, so the last good one stays)."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite values at step {step}: {bad}; stopping with the last good checkpoint intact")


# ---- the warmup's data (the warmup trains on it, GRPO's supervised mixing draws from it) ----------

@ray.remote(max_calls=1)  # the worker exits afterwards: a vLLM engine's memory is not kept
def build_data_task(model: str, config: dict, threads: int, shared_data_dir: str | None, log_file: str | None = None,
                    corpus_documents: list | None = None):
    """The warmup data (`build_warmup_data`) with the target `model` (a spec, resolved on this node);
    `corpus_documents`: the warmup corpus as the driver read it (`warmup_corpus`), None to read
    nothing here (an embedded corpus is written by the target; no corpus task in the mixture)."""
    send_output_to(log_file)  # the worker exits afterwards (max_calls=1)

    return warmup_data(RecipeConfig.model_validate(config), str(resolve_model_path(model)), threads, shared_data_dir, corpus_documents)


def warmup_data(cfg, model_path: str, threads: int, shared_data_dir: str | None = None, corpus_documents: list | None = None):
    """(train, heldout, report) of the recipe's warmup data (`build_warmup_data`) in this process, the
    model at `model_path` writing what is not cached (`warmup_generate_fn`): the task's work, and
    the bench's warmup case's examples."""
    torch.set_num_threads(threads)
    tok = load_tokenizer(model_path)
    generate, model_id = warmup_generate_fn(cfg, model_path, tok, threads)
    return build_warmup_data(
        cfg.warmup, cfg.split.heldout_fraction, tok, generate, cfg.description_instruction,
        shared_data_dir=shared_data_dir, seed=cfg.seed, model_id=model_id, max_context_tokens=cfg.model.max_context_tokens,
        token_items_per_document=cfg.warmup.token_items_per_document,
        stimuli_per_behaviour=cfg.warmup.stimuli_per_behaviour, corpus_documents=corpus_documents,
    )


def warmup_corpus(cfg):
    """The warmup's token-prediction / description corpus (`warmup.corpus`), read on the driver and
    put in Ray's object store for `build_data_task` (which may run on a node without the files or
    the hub) -> its ObjectRef, or None where the task reads no corpus (kind `embedded`: the target
    writes it; neither corpus task in `warmup.mixture`)."""
    w = cfg.warmup
    if w.corpus.kind == "embedded" or not any(w.mixture.get(t, 0) > 0 for t in ("token_prediction", "description")):
        return None
    return ray.put(load_documents(w.corpus, w.num_corpus_documents, cfg.seed))  # as data/token_prediction.load_corpus selects them


def warmup_generate_fn(cfg, model_path: str, tokenizer, threads: int):
    """(generate_fn, model id for the data cache) of the engine that writes the warmup data
    (`warmup.generation_engine`), on the device of the bundle the task runs in (the learner's,
    `Placement.task_options`): a vLLM engine takes the GPU Ray gave the task by itself; the HF model
    is moved there, and `hf_generate_fn` puts its inputs on the model's device."""
    device = role_device(cfg.resources.learner.num_gpus)
    if cfg.warmup.generation_engine == "vllm":
        check_dtype(cfg.model.dtype, device, engine="vllm", role="learner (warmup data)")
        configure_cpu_environment(threads, None, cfg.rollout.kv_cache_gb)
        return vllm_generate_fn(model_path, cfg.seed, dtype=cfg.model.dtype), f"{cfg.model.name}@vllm"

    check_dtype(cfg.model.dtype, device, role="learner (warmup data)")
    return hf_generate_fn(load_causal_lm(model_path, cfg.model.dtype).to(device), tokenizer, batch_size=16), cfg.model.name


def centre_latentqa(group: LearnerGroup, items: list, cfg, max_contexts: int = 256) -> dict | None:
    """Every learner subtracts the mean LatentQA read-slot activation over (up to `max_contexts`)
    training contexts before injection (`warmup.latentqa_centre`). Deterministic in the seed and
    the data, so a resumed run recomputes the same offset; it draws from its own RNG."""
    contexts = list({it.context_ids: it for it in items}.values())
    if not contexts:
        return None
    rng = random.Random(f"latentqa-centre:{cfg.seed}")
    chosen = rng.sample(contexts, min(max_contexts, len(contexts)))
    positions = [read_positions(it, rng, cfg.injection.num_placeholders) for it in chosen]
    positions = [[p] if isinstance(p, int) else list(p) for p in positions]
    info = group.set_read_offset("latentqa", [list(it.context_ids) for it in chosen], positions)
    print(f"[warmup] LatentQA activations centred on {info['contexts']} training contexts: they keep "
          f"{info['energy_share_kept']:.3f} of their energy")
    return info


def warmup_training_items(ctx: RunContext) -> dict:
    """Supervised mixing's data: the warmup data build of this recipe's `warmup` settings (the
    cache a warmup of the same settings wrote; built here otherwise), training split only."""
    options, threads = ctx.placement.task_options()
    train, _heldout, _report = remote_get(
        build_data_task.options(**options).remote(ctx.model_spec, ctx.cfg.model_dump(mode="json"), threads, None, ctx.log_file("warmup-data"),
                                                  warmup_corpus(ctx.cfg)),
        ctx.cfg.ray.setup_timeout_s, "building the warmup data (supervised mixing)")
    tasks = {t: len(train.get(t) or []) for t in ctx.cfg.grpo.sft_mix_tasks}
    print(f"[grpo] supervised mixing: beta {ctx.cfg.grpo.sft_mix_weight}, warmup items {tasks}")
    return {t: train[t] for t in tasks if train.get(t)}
