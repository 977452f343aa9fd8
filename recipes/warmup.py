"""`kind: warmup` — supervised warmup of the decoder, then the encoder warm start.

    setup:   build the warmup data (Ray task; cached), extract corpus activations, start N
             DeepSpeed learners, a rollout actor and the encoder actor
    loop:    each optimizer step = grad_accum micro-batches per rank; each example's activation is
             read by the learner from the frozen target (adapter disabled) at a seeded position
    then:    held-out evaluation against shuffled / zero activations; encoder warm start on
             (description sampled from the warm decoder via vLLM, activation) pairs
    cleanup: final checkpoint, results.json
"""

from __future__ import annotations

import random
import time

import ray
import torch
from rich.progress import Progress

from actors.encoder import start_encoder
from actors.learner import LearnerGroup
from actors.placement import remote_get
from actors.rollout import RolloutGroup
from cycle_oracle.checkpoint import save_checkpoint
from cycle_oracle.corpus import load_documents
from cycle_oracle.data.mixture import WarmupMixture
from cycle_oracle.data.read_positions import to_example
from cycle_oracle.encoder import is_empty, reconstruction_metrics
from cycle_oracle.evals.warmup import heldout_eval
from cycle_oracle.models import load_tokenizer
from cycle_oracle.rollout import Sampling, request_seed
from recipes.common import (RunContext, build_data_task, centre_latentqa, check_finite, checkpoint_adapter_configs, extract_store, finish_run,
                            injection_norm, load_resume, out_of_time, record, start_run, warmup_corpus)


ENCODER_WARM_START_BATCH = 16
"""(description, activation) pairs per encoder warm-start step."""


def encoder_warm_start(ctx: RunContext, store, rollouts: RolloutGroup, encoder, cfg, seed: int) -> dict:
    """Train the encoder on descriptions sampled from the warm decoder (plus, with
    `encoder.source_window_tokens`, the source text of the same activations); report before/after."""
    tokenizer = load_tokenizer(ctx.model_path)
    train_rows, held_rows = store.split_by_document(cfg.split.heldout_fraction, seed)
    rng = random.Random(seed)
    train_rows = rng.sample(train_rows, min(cfg.warmup.encoder_samples, len(train_rows)))
    held_rows = rng.sample(held_rows, min(cfg.warmup.eval_items, len(held_rows)))
    t = cfg.ray.get_timeout_s

    def describe(rows, sampling: Sampling, step: int):
        vectors = store.activations[rows]
        batch = rollouts.sample(vectors, [request_seed(seed, step, r) for r in rows], sampling, "encoder warm-start descriptions")
        keep = [i for i, text in enumerate(batch.texts) if not is_empty(text)]
        return [batch.texts[i] for i in keep], batch.with_vectors(vectors).vectors[keep]

    held_texts, held_vecs = describe(held_rows, Sampling.of(cfg.sampling, 1), -1)  # sampled, as GRPO scores them

    def measure() -> dict:
        if not held_texts:
            return {}
        v_hat, _ = remote_get(encoder.reconstruct.remote(held_texts), t, "encoder reconstruct")
        return reconstruction_metrics(v_hat, held_vecs, store.mean)

    before = measure()
    greedy_texts, greedy_vecs = describe(train_rows, Sampling.greedy(cfg.sampling.max_new_tokens), -2)
    sampled_texts, sampled_vecs = describe(train_rows, Sampling.of(cfg.sampling, 2), -3)
    texts = greedy_texts + sampled_texts
    vecs = torch.cat([greedy_vecs, sampled_vecs])
    window = cfg.encoder.source_window_tokens
    if window:  # the source-text anchor (EncoderSettings.source_window_tokens)
        texts += store.source_windows(train_rows, tokenizer, window)
        vecs = torch.cat([vecs, store.activations[train_rows]])
    losses = []
    batch = ENCODER_WARM_START_BATCH
    for step in range(cfg.warmup.encoder_steps):
        idx = rng.sample(range(len(texts)), min(batch, len(texts)))
        m = remote_get(encoder.train_step.remote([texts[i] for i in idx], vecs[idx]), t, "encoder train step")
        losses.append(m["encoder_loss"])
        ctx.metrics.log("encoder_warmstart", step, m)
    after = measure()
    out = {}
    if window:  # the encoder reading the true source text of the held-out rows (a ceiling)
        v_hat, _ = remote_get(encoder.reconstruct.remote(store.source_windows(held_rows, tokenizer, window)), t, "encoder reconstruct")
        out["heldout_source_window"] = reconstruction_metrics(v_hat, store.activations[held_rows], store.mean)
    return {**out, "heldout_before": before, "heldout_after": after, "train_pairs": len(texts), "heldout_pairs": len(held_texts),
            "encoder_loss_first": losses[0] if losses else None, "encoder_loss_last": losses[-1] if losses else None}


def run(cfg, out, resume: bool = False, on_step_time=None, on_stage=None) -> dict:
    """The warmup recipe. `on_step_time(step, seconds)` (optional) is called after each warmup step
    with its number (1-based) and wall seconds (the main job's ETA: recipes/eta.py); `on_stage(name,
    **counts)` (optional) at the end of each stage, with what it worked on (the main job's minutes
    account: `JobClock.stage_end`)."""
    if cfg.init_from:
        raise ValueError(f"init_from={cfg.init_from!r}: the warmup always starts from the base model (init_from is for grpo, "
                         f"describe and eval; --resume continues a warmup run)")
    stage = on_stage or (lambda name, **counts: None)
    ctx = start_run(cfg, out, "warmup", resume)
    cfg = ctx.cfg  # model.dtype: auto resolved
    stage("warmup/ray_and_placement", dtype=cfg.model.dtype)
    t = cfg.ray.get_timeout_s
    options, threads = ctx.placement.task_options()
    train, heldout, data_report = remote_get(
        build_data_task.options(**options).remote(ctx.model_spec, cfg.model_dump(mode="json"), threads, None, ctx.log_file("warmup-data"),
                                                  warmup_corpus(cfg)),
        cfg.ray.setup_timeout_s, "building the warmup data",
    )
    counts = ", ".join(f"{t} {len(train.get(t) or [])}/{len(heldout.get(t) or [])}" for t in data_report.get("tasks", []))
    cached = all(data_report.get(t, {}).get("cached", True) for t in ("latentqa", "corpus", "description") if isinstance(data_report.get(t), dict))
    print(f"[warmup] data (train/held-out items): {counts}; {'from the cache' if cached else 'built'} in "
          f"{data_report.get('seconds', 0):.0f} s (the full report goes to results.json)")
    stage("warmup/data_build", items=sum(len(v or []) for v in (*train.values(), *heldout.values())), cached=cached)
    store, emb_norm = extract_store(ctx, load_documents(cfg.corpus, cfg.num_documents))
    stage("warmup/extraction", activations=len(store))
    norm = injection_norm(ctx, emb_norm, store.mean_norm)
    mixture = WarmupMixture({k: v for k, v in train.items() if v}, cfg.warmup.mixture, cfg.seed)
    group = LearnerGroup(ctx.model_spec, cfg, ctx.layer, norm, cfg.warmup.steps, "warmup", ctx.placement, log_dir=ctx.log_dir)
    centring = centre_latentqa(group, train.get("latentqa", []), cfg) if cfg.warmup.latentqa_centre else None
    rng = random.Random(cfg.seed)
    start = 0
    if resume and (ckpt := load_resume(ctx, "warmup")) is not None:
        group.restore(ckpt.learner_files(), ckpt.record.world_size)
        mixture.load_state_dict(ckpt.record.extra["mixture"])
        rng.setstate(_tuple_state(ckpt.record.extra["rng"]))
        start = ckpt.record.step
        print(f"[warmup] resumed from {ckpt.path} at step {start}")
    if resume:  # redone steps (and the evals after them) replace their earlier rows
        for name, after in (("warmup", start), ("encoder_warmstart", -1), ("warmup_eval", -1)):
            ctx.metrics.rewind(name, after)

    stage("warmup/learner_start", ranks=group.world_size)
    ga, mbs = cfg.decoder_optim.grad_accum, cfg.decoder_optim.micro_batch_size
    seen = start * ga * mbs * group.world_size
    work: dict[str, float] = {}  # what the steps computed on (`DecoderLearner.sft_micro_step`'s work/* counts)
    done, t_loop = start, time.time()
    with Progress() as progress:
        bar = progress.add_task("warmup", total=cfg.warmup.steps, completed=start)
        for step in range(start, cfg.warmup.steps):
            t0 = time.time()
            agg: dict[str, float] = {}
            tokens = 0.0
            for _micro in range(ga):
                examples = [to_example(it, rng, cfg.injection.num_placeholders) for it in mixture.sample(mbs * group.world_size)]
                results = group.sft_micro_step(examples)
                for r in results:
                    tokens += r["tokens"]
                    for k, v in r.items():
                        if k.startswith("work/"):
                            work[k[5:]] = work.get(k[5:], 0.0) + v
                    for k, v in r.items():
                        if k.startswith("loss"):
                            agg.setdefault(k, []).append(v)
                seen += len(examples)
            metrics = {k: sum(v) / len(v) for k, v in agg.items()}
            metrics.update(lr=results[0]["lr"], tokens_per_s=tokens / (time.time() - t0), examples_seen=seen)
            check_finite(metrics, step)
            ctx.metrics.log("warmup", step + 1, metrics)
            progress.update(bar, advance=1, description=f"warmup loss {metrics['loss']:.3f}")
            every = cfg.logging.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < cfg.warmup.steps:
                _save(ctx, group, step + 1, mixture, rng, None)
            if on_step_time is not None:
                on_step_time(step + 1, time.time() - t0)
            done = step + 1
            if out_of_time(cfg.warmup.max_minutes, t_loop) and done < cfg.warmup.steps:
                print(f"[warmup] warmup.max_minutes={cfg.warmup.max_minutes:g} reached after step {done} of {cfg.warmup.steps}: "
                      "stopping for the held-out eval")
                break

    stage("warmup/sft_steps", steps=done - start, examples=seen - start * ga * mbs * group.world_size, work=work)
    results: dict = {"kind": "warmup", "steps": done, "steps_planned": cfg.warmup.steps, "data": data_report, "injection_norm": norm,
                     "layer": ctx.layer, "latentqa_centring": centring}
    results["heldout"] = heldout_eval(group.answer_scores, heldout, cfg, cfg.seed + 1)
    if cfg.warmup.train_fit_eval:  # the same measures on training sources: not reading vs not generalising
        results["train_fit"] = heldout_eval(group.answer_scores, train, cfg, cfg.seed + 2, "training-source")
    stage("warmup/heldout_eval", items=sum(r.get("items", 0) for r in results["heldout"].values() if isinstance(r, dict)))
    adapter = group.adapter()
    rollouts = RolloutGroup(ctx.model_spec, cfg, ctx.layer, norm, ctx.placement, ctx.log_file)
    encoder = start_encoder(ctx.model_spec, cfg, ctx.layer, store.mean, ctx.placement, ctx.log_file("encoder"))
    rollouts.sync(adapter)
    stage("warmup/rollout_and_encoder_start")
    results["encoder_warm_start"] = encoder_warm_start(ctx, store, rollouts, encoder, cfg, cfg.seed)
    stage("warmup/encoder_warm_start", pairs=results["encoder_warm_start"]["train_pairs"], encoder_steps=cfg.warmup.encoder_steps,
          examples=cfg.warmup.encoder_steps * min(ENCODER_WARM_START_BATCH, results["encoder_warm_start"]["train_pairs"]))
    enc_tensors, _enc_opt = remote_get(encoder.state.remote(), t, "encoder state")
    _save(ctx, group, done, mixture, rng, enc_tensors, adapter)
    results["summary"] = warmup_summary(results)
    ctx.write_results("results.json", results)
    ctx.metrics.log("warmup_eval", done, _flatten(results["heldout"]))
    group.shutdown()
    rollouts.shutdown()
    ray.kill(encoder)
    finish_run(ctx)
    stage("warmup/checkpoint_and_shutdown")
    return results


def _save(ctx: RunContext, group: LearnerGroup, step: int, mixture, rng: random.Random, encoder_tensors, adapter=None) -> None:
    files = group.checkpoint_files()
    tensors = {"decoder_adapter": adapter if adapter is not None else group.adapter()}
    if encoder_tensors is not None:
        tensors["encoder"] = encoder_tensors
    rec = record(ctx, "warmup", step, group.norm, 0, group.world_size, mixture=mixture.state_dict(), rng=list(_jsonable(rng.getstate())))
    save_checkpoint(ctx.out, rec, tensors, files=files, keep=ctx.cfg.logging.keep_checkpoints, adapter_configs=checkpoint_adapter_configs(ctx))


def _jsonable(state):
    return [state[0], list(state[1]), state[2]]


def _tuple_state(state):
    return (state[0], tuple(state[1]), state[2])


def _flatten(d: dict, prefix: str = "") -> dict:
    """Numeric leaves as `a/b/c` metric names; per-question breakdowns stay in results.json only."""
    out = {}
    for k, v in d.items():
        if k.endswith("_by_question"):
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


def warmup_summary(results: dict) -> dict:
    """The numbers to read first: per task the held-out answer NLL with the real vs a shuffled
    activation, and the encoder warm start's held-out reconstruction before and after."""
    s = {}
    for task, r in results.get("heldout", {}).items():
        s[f"{task}_nll_real_vs_shuffled"] = [round(r["nll_real"], 3), round(r["nll_shuffled"], 3)]
    enc = results.get("encoder_warm_start", {})
    for when in ("before", "after"):
        m = enc.get(f"heldout_{when}") or {}
        if m:
            s[f"encoder_{when}"] = {k: round(v, 3) for k, v in m.items()}
    return s
