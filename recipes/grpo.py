"""`kind: grpo` — the cycle-consistency GRPO loop (single controller).

    setup:  extract corpus activations (split by document), place the roles (one Ray placement
            group), start the rollout group (vLLM), the encoder actor and N DeepSpeed learners; load
            `init_from` (a warmup checkpoint) or `--resume` state; serve the policy
    loop:   sample B activations -> rollout (K descriptions each) -> score (cycle reward) ->
            co-train encoder -> advantages -> learn (GRPO) -> sync weights (+ verify) -> log ->
            checkpoint (`grpo.max_minutes` may end it early)
    end:    every decoder under every grader on held-out documents (cycle_oracle/evals/final.py:
            the GRPO decoder and, with init_from, the starting one, beside the training-free
            baselines and the format controls, under the final, text and frozen starting encoders,
            with a verdict per encoder), results.json, report.md

With `grpo.overlap_rollout`, step s+1's rollout runs while the learner trains on step s (one
step off-policy; the learner's truncated importance weights correct for it).
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass

import ray
import torch
from rich.progress import Progress

from actors.encoder import EncoderGraders, start_encoder
from actors.learner import LearnerGroup
from actors.placement import remote_get
from actors.rollout import ACTOR_GONE, RolloutGroup
from cycle_oracle.batch import RolloutBatch
from cycle_oracle.checkpoint import TrainedCheckpoint, save_checkpoint
from cycle_oracle.corpus import load_documents
from cycle_oracle.data.mixture import sft_mix_examples
from cycle_oracle.encoder import is_empty
from cycle_oracle.evals.final import final_evals, final_summary, text_encoder_pairs
from cycle_oracle.grpo import apply_kl_penalty_to_rewards, group_advantages, unusable_rewards
from cycle_oracle.metrics import PhaseTimer
from cycle_oracle.models import load_tokenizer
from cycle_oracle.reward_shaping import copy_rates, length_excess, shaped_rewards
from cycle_oracle.rollout import Sampling, request_seed
from cycle_oracle.stats import text_diversity
from cycle_oracle.weight_sync import SYNC_PROBE
from recipes.common import (RunContext, centre_latentqa, check_finite, checkpoint_adapter_configs, extract_store, finish_run, injection_norm,
                            load_resume, load_start, out_of_time, record, start_run, warmup_training_items,
                            written_oracles)
from recipes.report import write_closing_report

ROLE_GONE = ACTOR_GONE
"""What an encoder or learner death raises through the driver: every role restarts from the last checkpoint."""
STEP_PHASES = ("rollout", "score", "learn", "sync", "sync_check")
"""The timed phases of a step (`time_*` metrics; `time_idle` is the rest)."""


def step_rows(train_rows: list[int], seed: int, step: int, batch: int) -> list[int]:
    """The B activations of a step: a function of (seed, step) only, so a resumed run picks the same."""
    return random.Random(f"{seed}:{step}").sample(train_rows, min(batch, len(train_rows)))


@dataclass
class Roles:
    """The roles of one GRPO run (restarted together after an encoder or learner death)."""

    ctx: RunContext
    store: object
    learners: LearnerGroup
    rollouts: RolloutGroup
    encoder: object
    tokenizer: object
    sft_pools: dict

    @classmethod
    def start(cls, ctx: RunContext, norm: float, store, start: TrainedCheckpoint | None, incarnation: int, sft_pools: dict) -> Roles:
        cfg, g = ctx.cfg, ctx.cfg.grpo
        if g.kl_reference == "warmup" and start is None:
            raise ValueError("grpo.kl_reference=warmup needs init_from (a warmup checkpoint) to take the reference adapter from")
        learners = LearnerGroup(ctx.model_spec, cfg, ctx.layer, norm, g.steps * g.epochs_per_rollout * g.minibatches_per_epoch, "grpo",
                                ctx.placement, reference_adapter=start.tensors["decoder_adapter"] if g.kl_reference == "warmup" else None,
                                log_dir=ctx.log_dir)
        suffix = f"-r{incarnation}" if incarnation else ""
        rollouts = RolloutGroup(ctx.model_spec, cfg, ctx.layer, norm, ctx.placement, ctx.log_file, lambda i: f"{ctx.out.name}-rollout-{i}{suffix}",
                                max_restarts=3, probe=store.activations[: SYNC_PROBE["activations"]])
        encoder = start_encoder(ctx.model_spec, cfg, ctx.layer, store.mean, ctx.placement, ctx.log_file("encoder"))
        if sft_pools.get("latentqa") and cfg.warmup.latentqa_centre:  # supervised mixing reads LatentQA as the warmup did
            centre_latentqa(learners, sft_pools["latentqa"], cfg)
        return cls(ctx, store, learners, rollouts, encoder, load_tokenizer(ctx.model_path), sft_pools)

    def shutdown(self) -> None:
        """Stop every role (also after one of them died)."""
        try:
            self.learners.shutdown()
        except Exception as err:  # a dead or hung rank: its peers are killed below all the same
            print(f"[grpo] learner shutdown: {type(err).__name__}")
            for a in self.learners.actors:
                ray.kill(a, no_restart=True)
        self.rollouts.shutdown()
        ray.kill(self.encoder, no_restart=True)


def run(cfg, out, resume: bool = False, on_step_end=None, on_stage=None) -> dict:
    """The GRPO recipe. `on_step_end(roles, step)` (optional) runs after each step's checkpoint,
    between steps, while no call is in flight (tests use it to kill a role there); `on_stage(name,
    **counts)` (optional) at the end of each stage (the main job's minutes account)."""
    stage = on_stage or (lambda name, **counts: None)
    ctx = start_run(cfg, out, "grpo", resume)
    cfg, g = ctx.cfg, ctx.cfg.grpo  # model.dtype: auto resolved
    store, emb_norm = extract_store(ctx, load_documents(cfg.corpus, cfg.num_documents))
    start_ckpt = load_start(ctx)
    norm = injection_norm(ctx, emb_norm, store.mean_norm, start_ckpt)
    train_rows, _held = store.split_by_document(cfg.split.heldout_fraction, cfg.seed)
    sft_pools = warmup_training_items(ctx) if g.sft_mix_weight > 0 else {}
    stage("grpo/placement_and_extraction", activations=len(store))

    restarts = 0
    while True:  # an encoder or learner death: every role restarts from the last checkpoint, in this process
        roles = Roles.start(ctx, norm, store, start_ckpt, restarts, sft_pools)
        try:
            first = restore(roles, start_ckpt, resume or restarts > 0)
            stage("grpo/roles_start_and_sync")
            last = train(roles, train_rows, first, on_step_end)
            stage("grpo/steps", steps=last - first, samples=(last - first) * g.batch_activations * g.samples_per_activation)
            break
        except ROLE_GONE as err:
            restarts += 1
            (ctx.out / "logs").mkdir(exist_ok=True)
            with open(ctx.out / "logs" / "role_deaths.log", "a") as f:  # where the driver met the death
                f.write(f"restart {restarts}: {type(err).__name__}: {err}\n{''.join(traceback.format_list(traceback.extract_tb(err.__traceback__)))}\n")
            roles.shutdown()
            if restarts > g.max_role_restarts:
                raise RuntimeError(f"a role died {restarts} times (grpo.max_role_restarts={g.max_role_restarts}); last: {err}") from err
            print(f"[grpo] a role died ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  f"restarting every role from the last checkpoint (restart {restarts} of at most {g.max_role_restarts})")

    results = {"kind": "grpo", "layer": ctx.layer, "injection_norm": norm, "steps": last, "steps_planned": g.steps,
               "weight_version": roles.rollouts.version, "role_restarts": restarts}
    results.update(end_evals(roles, start_ckpt, norm, stage))
    results["summary"] = final_summary(results)
    ctx.write_results("results.json", results)
    write_closing_report(ctx.out, results)
    roles.shutdown()
    finish_run(ctx)
    stage("grpo/results_and_shutdown")
    return results


def restore(roles: Roles, start_ckpt: TrainedCheckpoint | None, resume: bool) -> int:
    """Load the starting checkpoint (init_from), then, when resuming, this run's last checkpoint
    into every role; serve the policy. -> the step to continue from (redone steps' metrics rows go)."""
    ctx, t = roles.ctx, roles.ctx.cfg.ray.get_timeout_s
    first, adapter = 0, None
    if start_ckpt is not None:
        adapter = start_ckpt.tensors["decoder_adapter"]
        roles.learners.load_adapter(adapter)
        if "encoder" in start_ckpt.tensors:
            remote_get(roles.encoder.load_state.remote(start_ckpt.tensors["encoder"]), t, "load the starting encoder")
    if resume and (ckpt := load_resume(ctx, "grpo")) is not None:
        roles.learners.restore(ckpt.learner_files(), ckpt.record.world_size)
        remote_get(roles.encoder.load_state.remote(ckpt.tensors["encoder"], ckpt.objects["encoder_optim"]), t, "encoder resume")
        first = ckpt.record.step
        roles.rollouts.version = ckpt.record.weight_version - 1
        adapter = ckpt.tensors["decoder_adapter"]
        print(f"[grpo] resumed from {ckpt.path} at step {first}")
    if resume and (redone := ctx.metrics.rewind("grpo", first)):
        print(f"[grpo] steps {redone} are redone: their earlier metrics rows are replaced")
    timer = PhaseTimer(("sync", "sync_check"))
    with timer.phase("sync"):
        adapter = adapter if adapter is not None else roles.learners.adapter()
    ctx.metrics.log("grpo_setup", first, roles.rollouts.sync(adapter, roles.learners.sync_error, timer) | timer.phase_metrics())
    return first


def train(roles: Roles, train_rows: list[int], first: int, on_step_end=None) -> int:
    """The GRPO loop from step `first` -> the last step done (`grpo.max_minutes` may stop it early)."""
    ctx, cfg, g = roles.ctx, roles.ctx.cfg, roles.ctx.cfg.grpo
    sampling = Sampling.of(cfg.sampling, g.samples_per_activation)

    def submit(step: int):
        rows = step_rows(train_rows, cfg.seed, step, g.batch_activations)
        return rows, roles.rollouts.submit(roles.store.activations[rows], [request_seed(cfg.seed, step, r) for r in rows], sampling)

    pending, t_loop, last = None, time.time(), g.steps
    with Progress() as progress:
        bar = progress.add_task("grpo", total=g.steps, completed=first)
        for step in range(first, g.steps):
            timer = PhaseTimer(STEP_PHASES)
            with timer.phase("rollout"):
                rows, request = pending or submit(step)
                batch = roles.rollouts.collect(request, f"rollout step {step}").with_vectors(roles.store.activations[rows])
            pending = submit(step + 1) if g.overlap_rollout and step + 1 < g.steps else None  # sampled with the pre-update policy
            metrics = grpo_step(roles, batch, rows, step, timer)
            with timer.phase("sync"):
                adapter = roles.learners.adapter()
            metrics.update(roles.rollouts.sync(adapter, roles.learners.sync_error, timer))
            metrics.update(timer.metrics())
            ctx.metrics.log("grpo", step + 1, metrics)
            progress.update(bar, advance=1, description=f"grpo reward {metrics['reward_mean']:.3f}")
            stop = out_of_time(g.max_minutes, t_loop)
            every = cfg.logging.checkpoint_every
            if (every and (step + 1) % every == 0) or step + 1 == g.steps or stop:
                save_grpo_checkpoint(roles, step + 1)
            if on_step_end is not None:
                on_step_end(roles, step + 1)
            if stop and step + 1 < g.steps:
                last = step + 1
                print(f"[grpo] grpo.max_minutes={g.max_minutes} reached after step {last} of {g.steps}: stopping for the final eval")
                break  # a rollout already submitted for the next step just finishes first (actor calls run in order)
    return last


def grpo_step(roles: Roles, batch: RolloutBatch, rows: list[int], step: int, timer: PhaseTimer) -> dict:
    """Score -> co-train the encoder -> advantages -> learn, on one rollout batch (activations attached)."""
    cfg, g, t = roles.ctx.cfg, roles.ctx.cfg.grpo, roles.ctx.cfg.ray.get_timeout_s
    batch.usable = torch.tensor([not is_empty(text) and not (trunc and g.penalize_truncated)
                                 for text, trunc in zip(batch.texts, batch.truncated.tolist())], dtype=torch.bool)
    with timer.phase("score"):
        encoder_metrics, shaping = {}, {}
        if g.train_encoder and bool(batch.usable.any()):  # score, then co-train on the same forward (rewards: the encoder before its update)
            window = cfg.encoder.source_window_tokens  # the source-text anchor (EncoderSettings.source_window_tokens)
            anchors = (roles.store.source_windows(rows, roles.tokenizer, window), roles.store.activations[rows]) if window else ([], None)
            rewards, recon, encoder_metrics = remote_get(roles.encoder.score_and_train.remote(batch, *anchors), t, "encoder scoring and update")
        else:
            rewards, recon = remote_get(roles.encoder.score.remote(batch), t, "encoder scoring")
        if g.copy_penalty or g.length_penalty:  # anti-transcription terms (cycle_oracle/reward_shaping.py), before the unusable penalty
            windows = roles.store.source_windows(rows, roles.tokenizer, g.copy_window_tokens)
            copy = copy_rates(batch.texts, [windows[i // batch.group_size] for i in range(len(batch))], g.copy_penalty_ngram)
            excess = length_excess(batch.completion_lengths(), g.length_free_tokens)
            rewards = shaped_rewards(rewards, copy, g.copy_penalty, excess, g.length_penalty)
            shaping = {"copy_rate": float(copy.mean()), "length_excess": float(excess.mean())}
        rewards = unusable_rewards(batch.groups(rewards), batch.groups(batch.usable), g.truncation_penalty, g.truncation_penalty_margin).reshape(-1)
        check_finite({"reward": float(rewards.sum())}, step)

    batch.rewards, kl = rewards.clone(), None
    if g.kl_coef > 0 and g.kl_placement == "reward":
        sequence_kl = roles.learners.sequence_kl(batch)
        batch.rewards = apply_kl_penalty_to_rewards(batch.rewards, sequence_kl, g.kl_coef)
        kl = float(sequence_kl.sum()) / max(sum(batch.completion_lengths()), 1)  # per token (k1)
    advantages, zero_spread = group_advantages(batch.groups(batch.rewards), g.scale_advantages_by_std)
    batch.advantages = advantages.reshape(-1).float()
    with timer.phase("learn"):
        stats = roles.learners.update(batch, sft_mix_examples(roles.sft_pools, g, cfg.seed, step, cfg.injection.num_placeholders))

    lengths = batch.completion_lengths()
    metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(batch.groups(rewards).std(1).mean()), **recon, **encoder_metrics,
               **shaping, **stats.metrics(), "description_tokens": sum(lengths) / len(lengths),
               "truncation_rate": float(batch.truncated.float().mean()), "zero_spread_fraction": zero_spread,
               "rollout_versions": float(batch.versions.min()), **text_diversity(batch.texts)}
    if kl is not None:  # the reward placement's KL (the learner computes none)
        metrics["kl"] = kl
    check_finite(metrics, step)
    return metrics


def save_grpo_checkpoint(roles: Roles, step: int) -> None:
    files = roles.learners.checkpoint_files()
    enc_tensors, enc_optim = remote_get(roles.encoder.state.remote(), roles.ctx.cfg.ray.get_timeout_s, "encoder state")
    rec = record(roles.ctx, "grpo", step, roles.learners.norm, roles.rollouts.version, roles.learners.world_size)
    save_checkpoint(roles.ctx.out, rec, {"decoder_adapter": roles.learners.adapter(), "encoder": enc_tensors},
                    objects={"encoder_optim": enc_optim}, files=files, keep=roles.ctx.cfg.logging.keep_checkpoints,
                    adapter_configs=checkpoint_adapter_configs(roles.ctx))


def end_evals(roles: Roles, start_ckpt: TrainedCheckpoint | None, norm: float, stage) -> dict:
    """The final evals (cycle_oracle/evals/final.py): the GRPO decoder and, from a checkpoint, the
    starting one, served by the rollout group, under the final encoder, with `eval.text_encoder_steps`
    a text encoder trained here on source windows only, and the starting checkpoint's encoder, frozen;
    beside them the training-free baselines and the format controls (`written_oracles`)."""
    cfg, ctx = roles.ctx.cfg, roles.ctx
    graders = EncoderGraders(roles.encoder, cfg.ray.get_timeout_s)
    graders.add("final_encoder")  # the co-trained encoder the actor holds now
    notes = {}
    if cfg.eval.text_encoder_steps > 0:
        texts, vectors = text_encoder_pairs(roles.store, roles.tokenizer, cfg)
        report = graders.train_text_encoder("text_encoder", texts, vectors, cfg.eval.text_encoder_steps, cfg.seed, cfg.ray.setup_timeout_s)
        print(f"[grpo] text encoder: {report['steps']} steps on {report['pairs']} source windows, loss "
              f"{report['loss_first']:.3f} -> {report['loss_last']:.3f}")
        notes["text_encoder"] = {"training": report}
        stage("grpo/final_eval/text_encoder_training", steps=report["steps"], pairs=report["pairs"])
    if start_ckpt is not None and "encoder" in start_ckpt.tensors:
        graders.add("frozen_start_encoder", start_ckpt.tensors["encoder"])
    oracles = {"grpo_decoder": roles.rollouts.describer()}
    if start_ckpt is not None:
        oracles["warmup_decoder"] = roles.rollouts.describer(start_ckpt.tensors["decoder_adapter"])
    if cfg.eval.final_baselines:
        roles.learners.shutdown()  # their work is done: the baselines' task takes the first bundle
    written = written_oracles(ctx, roles.store, roles.tokenizer, norm)
    stage("grpo/final_eval/baselines_written", oracles=len(written))
    return final_evals(oracles, graders.graders(), roles.store, cfg, roles.tokenizer.decode, notes,
                       on_pair=lambda oracle, grader, result: stage(f"grpo/final_eval/{grader}_{oracle}", items=result["n"]),
                       written=written, baselines=cfg.eval.final_baselines)

