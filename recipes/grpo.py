"""`kind: grpo` — the cycle-consistency GRPO loop (single controller).

    setup:  extract corpus activations (split by document), place the roles (Ray placement
            group from the recipe), start rollout actors (vLLM), the encoder actor and N DeepSpeed
            learners; load `init_from` (a warmup checkpoint) or `--resume` state; sync rollouts
    loop:   sample B activations -> rollout (K descriptions each) -> score (cycle reward) ->
            co-train encoder -> advantages -> learn (GRPO) -> sync weights (+ verify) -> log ->
            checkpoint
    end:    final checkpoint, retrieval eval on held-out documents; with init_from, the same eval for
            the warmup decoder under the same final encoder and the paired GRPO-minus-warmup
            difference per item (`grpo_minus_warmup`); results.json + summary
            (`grpo.max_minutes` ends the loop early on a wall-clock budget, then the same end)

With `grpo.overlap_rollout`, step s+1's rollout runs while the learner trains on step s (one
step off-policy; the learner's truncated importance weights correct for it).
"""

from __future__ import annotations

import random
import time

import ray
import torch
from rich.progress import Progress

from actors.encoder import EncoderActor
from actors.learner import LearnerGroup
from actors.placement import remote_get
from actors.rollout import RolloutActor
from cycle_oracle.batch import RolloutBatch, regroup
from cycle_oracle.checkpoint import TrainedCheckpoint, save_checkpoint
from cycle_oracle.corpus import load_documents
from cycle_oracle.grpo import apply_kl_penalty_to_rewards, group_advantages
from cycle_oracle.models import load_tokenizer
from cycle_oracle.rollout import request_seed
from cycle_oracle.stats import text_diversity
from recipes.common import Run, check_finite, checkpoint_adapter_configs, extract_store, finish_run, injection_norm, load_resume, load_start, record, source_windows, start_run

SYNC_TOLERANCE = 2e-3
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def step_rows(train_rows: list[int], seed: int, step: int, batch: int) -> list[int]:
    """The B activations of a step: a function of (seed, step) only, so a resumed run picks the same."""
    return random.Random(f"{seed}:{step}").sample(train_rows, min(batch, len(train_rows)))


class Roles:
    """The actors of a GRPO run and the driver-side logic that talks to them."""

    def __init__(self, run: Run, norm: float, store, start: TrainedCheckpoint | None):
        cfg = run.cfg
        self.run, self.cfg, self.norm, self.store = run, cfg, norm, store
        self.timeout = cfg.ray.get_timeout_s
        g = cfg.grpo
        total = g.steps * g.epochs_per_rollout * g.minibatches_per_epoch
        ref = None
        if g.kl_reference == "warmup":
            if start is None:
                raise ValueError("grpo.kl_reference=warmup needs init_from (a warmup checkpoint) to take the reference adapter from")
            ref = start.tensors["decoder_adapter"]
        config = cfg.model_dump(mode="json")
        self.learners = LearnerGroup(run.model_path, cfg, run.layer, norm, total, "grpo", run.placement, reference_adapter=ref)
        self.rollouts = [
            RolloutActor.options(**run.placement.options("rollout", i, max_restarts=3, max_task_retries=0, name=f"{run.out.name}-rollout-{i}"))
            .remote(run.model_path, config, run.layer, norm, i)
            for i in range(cfg.resources.rollout.num_actors)
        ]
        self.encoder = EncoderActor.options(**run.placement.options("encoder", 0)).remote(run.model_path, config, run.layer, store.mean)
        self.tokenizer = load_tokenizer(run.model_path)
        self.version = 0
        self.probe = None  # (vector, sample tokens, logprobs) of the last verified sync

    # ---- weight sync ----------------------------------------------------------------------
    def sync(self, adapter: dict | None = None, verify: bool = True) -> dict:
        """Push an adapter (default: the learner's) to every rollout actor as a new version, then
        verify it against the learner (skip `verify` only to serve an adapter the learner does not hold)."""
        t0 = time.time()
        adapter = adapter if adapter is not None else self.learners.adapter()
        self.version += 1
        self._adapter_ref = ray.put(adapter)
        try:
            remote_get([r.sync.remote(self._adapter_ref, self.version) for r in self.rollouts], self.timeout, f"weight sync v{self.version}")
        except ACTOR_GONE as err:
            print(f"[grpo] a rollout actor died during sync v{self.version} ({type(err).__name__}); recovering")
            self.recover_rollouts()
        out = {"time_sync": time.time() - t0, "weight_version": self.version}
        if self.cfg.grpo.sync_check and verify:
            out.update(self.with_recovery(self.verify_sync))
        return out

    def with_recovery(self, fn, retries: int = 2):
        """Run fn(); if a rollout actor died, wait for its restart + re-sync, then run fn() again."""
        for attempt in range(retries + 1):
            try:
                return fn()
            except ACTOR_GONE as err:
                if attempt == retries:
                    raise
                print(f"[grpo] a rollout actor died ({type(err).__name__}); waiting for Ray to restart it")
                self.recover_rollouts()

    def verify_sync(self) -> dict:
        """The served policy's logprobs for a fixed probe equal the learner's (rank 0 compares), and
        moved since the previous version (a silently stale engine fails here)."""
        vector = self.store.activations[:1]
        errors = []
        for r in self.rollouts:
            probe: RolloutBatch = remote_get(r.sample.remote(vector, [12345], 1, self.cfg.sampling.temperature, 1.0, 8), self.timeout, "sync probe")
            if int(probe.versions[0]) != self.version:
                raise RuntimeError(f"rollout actor serves weight version {int(probe.versions[0])}, expected {self.version}")
            errors.append(self.learners.sync_error(probe))
        worst = max(errors)
        if worst > SYNC_TOLERANCE:
            raise RuntimeError(f"weight sync v{self.version} failed verification: served logprobs differ from the learner's by {worst:.2e}")
        changed = 1.0
        tokens, logprobs = probe.token_ids[0], probe.sampler_logprobs[0]
        if self.probe is not None:
            old_tokens, old_lp = self.probe
            if old_tokens == tokens:
                changed = float(not torch.allclose(torch.tensor(old_lp), torch.tensor(logprobs), atol=1e-6))
        self.probe = (tokens, logprobs)
        return {"sync_logprob_error": worst, "sync_policy_changed": changed}

    # ---- rollout with fault tolerance ---------------------------------------------------------
    def submit_rollout(self, rows: list[int], step: int):
        vectors = self.store.activations[rows]
        seeds = [request_seed(self.cfg.seed, step, r) for r in rows]
        s = self.cfg.sampling
        k = self.cfg.grpo.samples_per_activation
        n_act = len(self.rollouts)
        parts = [list(range(i, len(rows), n_act)) for i in range(n_act)]
        refs = [r.sample.remote(vectors[idx], [seeds[j] for j in idx], k, s.temperature, s.top_p, s.max_new_tokens) if idx else None
                for r, idx in zip(self.rollouts, parts)]
        return refs, parts

    def collect_rollout(self, pending, rows: list[int], step: int) -> RolloutBatch:
        """Wait for a submitted rollout -> one batch in the order of `rows`; if an actor died, recover
        and sample the same requests again (same seeds and weights, so the retried step is the step
        that would have run)."""
        state = {"pending": pending}

        def collect():
            refs, parts = state["pending"]
            try:
                got = [(remote_get(ref, self.timeout, f"rollout step {step}"), idx) for ref, idx in zip(refs, parts) if ref is not None]
            except ACTOR_GONE:
                state["pending"] = None
                raise
            return regroup([b for b, _ in got], [idx for _, idx in got])

        def resubmit_then_collect():
            if state["pending"] is None:
                state["pending"] = self.submit_rollout(rows, step)
            return collect()

        return self.with_recovery(resubmit_then_collect)

    def recover_rollouts(self) -> None:
        """Wait for restarted rollout actors and re-sync them to the current version before they serve."""
        deadline = time.time() + self.timeout
        for r in self.rollouts:
            while True:
                try:
                    info = remote_get(r.info.remote(), max(1.0, deadline - time.time()), "restarted rollout actor")
                    break
                except ACTOR_GONE:
                    if time.time() > deadline:
                        raise
                    time.sleep(2)
            if info["version"] != self.version:
                remote_get(r.sync.remote(self._adapter_ref, self.version), self.timeout, "re-sync after restart")

    def shutdown(self) -> None:
        self.learners.shutdown()
        for a in (*self.rollouts, self.encoder):
            ray.kill(a, no_restart=True)


def grpo_step(roles: Roles, batch: RolloutBatch, rows: list[int], step: int) -> dict:
    """Score -> co-train the encoder -> advantages -> learn, on one rollout batch."""
    cfg, g = roles.cfg, roles.cfg.grpo
    t = roles.timeout
    batch.usable = torch.tensor([bool(text.strip()) and not (trunc and g.penalize_truncated)
                                 for text, trunc in zip(batch.texts, batch.truncated.tolist())], dtype=torch.bool)

    t0 = time.time()
    rewards, recon = remote_get(roles.encoder.score.remote(batch), t, "encoder scoring")
    check_finite({"reward": float(rewards.sum())}, step)
    time_score = time.time() - t0
    enc_metrics = {}
    if g.train_encoder and bool(batch.usable.any()):
        idx = batch.usable.nonzero().squeeze(1).tolist()
        enc_texts, enc_vectors = [batch.texts[i] for i in idx], batch.vectors[idx]
        if cfg.encoder.source_window_tokens:  # the source-text anchor (EncoderSettings.source_window_tokens)
            enc_texts += source_windows(roles.store, rows, roles.tokenizer, cfg.encoder.source_window_tokens)
            enc_vectors = torch.cat([enc_vectors, roles.store.activations[rows]])
        enc_metrics = remote_get(roles.encoder.train_step.remote(enc_texts, enc_vectors), t, "encoder update")
    time_score_train = time.time() - t0

    shaped = rewards.clone()
    if g.kl_coef > 0 and g.kl_placement == "reward":
        shaped = apply_kl_penalty_to_rewards(shaped, roles.learners.sequence_kl(batch), g.kl_coef)
    batch.rewards = shaped
    advantages, zero_spread = group_advantages(batch.groups(shaped), g.scale_advantages_by_std)
    batch.advantages = advantages.reshape(-1).float()

    t1 = time.time()
    learn = roles.learners.grpo_step(batch)
    time_learn = time.time() - t1

    lengths = batch.completion_lengths()
    metrics = {
        "reward_mean": float(rewards.mean()), "reward_std": float(batch.groups(rewards).std(1).mean()),
        **recon, **enc_metrics,
        "kl": learn.get("kl", 0.0), "entropy": learn.get("entropy", 0.0), "clip_fraction": learn.get("clip_fraction", 0.0),
        "policy_loss": learn.get("policy_loss", 0.0), "ratio_mean": learn.get("ratio_mean", 1.0),
        "importance_weight_mean": learn.get("importance_weight_mean", 1.0), "importance_weight_max": learn.get("importance_weight_max", 1.0),
        "importance_capped_fraction": learn.get("importance_capped_fraction", 0.0), "logp_mismatch": learn.get("importance_logp_mismatch", 0.0),
        "lr": learn["lr"], "description_tokens": sum(lengths) / len(lengths),
        "truncation_rate": float(batch.truncated.float().mean()), "zero_spread_fraction": zero_spread,
        "rollout_versions": float(batch.versions.min()),
        "time_score": time_score_train, "time_learn": time_learn,
    }
    metrics.update(text_diversity(batch.texts))
    check_finite(metrics, step)
    return metrics


def run(cfg, out, resume: bool = False) -> dict:
    run = start_run(cfg, out, "grpo")
    g = cfg.grpo
    store, emb_norm = extract_store(run, load_documents(cfg.corpus, cfg.num_documents))
    start_ckpt = load_start(run)
    norm = injection_norm(run, emb_norm, store.mean_norm, start_ckpt)
    train_rows, _held = store.split_by_document(cfg.split.heldout_fraction, cfg.seed)

    roles = Roles(run, norm, store, start_ckpt)
    t = roles.timeout
    start = 0
    adapter = None
    if start_ckpt is not None:
        adapter = start_ckpt.tensors["decoder_adapter"]
        roles.learners.load_adapter(adapter)
        if "encoder" in start_ckpt.tensors:
            remote_get(roles.encoder.load_state.remote(start_ckpt.tensors["encoder"]), t, "load the starting encoder")
    if resume and (ckpt := load_resume(run, "grpo")) is not None:
        roles.learners.restore(ckpt.learner_files(), ckpt.record.world_size)
        remote_get(roles.encoder.load_state.remote(ckpt.tensors["encoder"], ckpt.objects["encoder_optim"]), t, "encoder resume")
        start = ckpt.record.step
        roles.version = ckpt.record.weight_version - 1
        adapter = ckpt.tensors["decoder_adapter"]
        print(f"[grpo] resumed from {ckpt.path} at step {start}")
    run.metrics.log("grpo_setup", start, roles.sync(adapter))

    pending = roles.submit_rollout(step_rows(train_rows, cfg.seed, start, g.batch_activations), start) if start < g.steps else None
    t_loop = time.time()
    last = g.steps
    with Progress() as progress:
        bar = progress.add_task("grpo", total=g.steps, completed=start)
        for step in range(start, g.steps):
            t_step = time.time()
            rows = step_rows(train_rows, cfg.seed, step, g.batch_activations)
            batch = roles.collect_rollout(pending, rows, step)
            time_rollout = time.time() - t_step
            next_rows = step_rows(train_rows, cfg.seed, step + 1, g.batch_activations)
            pending = None
            if g.overlap_rollout and step + 1 < g.steps:  # sample step+1 with the pre-update policy
                pending = roles.submit_rollout(next_rows, step + 1)
            metrics = grpo_step(roles, batch, rows, step)
            metrics.update(roles.sync())
            if not g.overlap_rollout and step + 1 < g.steps:
                pending = roles.submit_rollout(next_rows, step + 1)
            metrics["time_rollout"] = time_rollout
            metrics["time_step"] = time.time() - t_step
            busy = sum(metrics[k] for k in ("time_rollout", "time_score", "time_learn", "time_sync"))
            metrics["time_idle"] = max(0.0, metrics["time_step"] - busy)
            run.metrics.log("grpo", step + 1, metrics)
            progress.update(bar, advance=1, description=f"grpo reward {metrics['reward_mean']:.3f}")
            out_of_time = g.max_minutes is not None and time.time() - t_loop > 60 * g.max_minutes
            every = cfg.logging.checkpoint_every
            if (every and (step + 1) % every == 0) or step + 1 == g.steps or out_of_time:
                save_grpo_checkpoint(roles, step + 1)
            if out_of_time and step + 1 < g.steps:
                last = step + 1
                print(f"[grpo] grpo.max_minutes={g.max_minutes} reached after step {last} of {g.steps}: stopping for the final eval")
                break  # a rollout already submitted for the next step just finishes first (actor calls run in order)

    results = {"kind": "grpo", "layer": run.layer, "injection_norm": norm, "steps": last, "steps_planned": g.steps, "weight_version": roles.version}
    results["retrieval"] = final_retrieval(roles)
    if start_ckpt is not None:  # same final encoder, same pool: the starting decoder's descriptions for comparison
        roles.sync(start_ckpt.tensors["decoder_adapter"], verify=False)  # the learner holds the GRPO adapter
        results["retrieval_warmup_decoder"] = final_retrieval(roles, controls=())
        results["grpo_minus_warmup"] = decoder_comparison(results["retrieval"], results["retrieval_warmup_decoder"])
    results["summary"] = retrieval_summary(results)
    run.write_results("results.json", results)
    roles.shutdown()
    finish_run(run)
    return results


def decoder_comparison(grpo: dict, warm: dict) -> dict:
    """Per held-out item, GRPO decoder's score minus the warmup decoder's (same pool, same encoder):
    mean, 95% bootstrap interval and share of items where GRPO is better."""
    from cycle_oracle.stats import paired_difference

    a, b = grpo["per_item"]["description"], warm["per_item"]["description"]
    return {k: paired_difference(torch.tensor(a[k]), torch.tensor(b[k])) for k in ("cosine", "centred_cosine")}


def retrieval_summary(results: dict) -> dict:
    out = {}
    for key, label in (("retrieval", "grpo_decoder"), ("retrieval_warmup_decoder", "warmup_decoder")):
        r = results.get(key)
        if not r:
            continue
        for cond, m in r["conditions"].items():
            out[f"{label}/{cond}"] = {k: round(float(m[k]), 4) for k in ("top1", "top5", "cosine", "centred_cosine", "fve") if k in m}
        out["pool_size"] = r["n"]
        out["chance_top1"] = r["chance"]["top1"]
    for key, d in (results.get("grpo_minus_warmup") or {}).items():
        out[f"grpo_minus_warmup/{key}"] = {k: round(float(d[k]), 4) for k in ("mean", "ci_low", "ci_high", "share_a_better")}
    return out


def save_grpo_checkpoint(roles: Roles, step: int) -> None:
    files = roles.learners.checkpoint_files()
    enc_tensors, enc_optim = remote_get(roles.encoder.state.remote(), roles.timeout, "encoder state")
    rec = record(roles.run, "grpo", step, roles.norm, roles.version, roles.learners.world_size)
    save_checkpoint(roles.run.out, rec, {"decoder_adapter": roles.learners.adapter(), "encoder": enc_tensors},
                    objects={"encoder_optim": enc_optim}, files=files, keep=roles.cfg.logging.keep_checkpoints,
                    adapter_configs=checkpoint_adapter_configs(roles.run))


def final_retrieval(roles: Roles, controls=("shuffled", "zero", "context_only")) -> dict:
    """Retrieval on held-out documents with the served decoder (vLLM, greedy) and the encoder."""
    from cycle_oracle.evals.retrieval import evaluate_retrieval

    cfg = roles.cfg
    return evaluate_retrieval(actor_oracle(roles), roles.store, cfg.eval.pool_size, cfg.seed,
                              heldout_fraction=cfg.split.heldout_fraction, split_seed=cfg.seed, controls=controls)


def actor_oracle(roles: Roles):
    """An evals Oracle whose describe/encode calls go to the running actors."""
    from cycle_oracle.evals.oracle import Oracle

    max_new = roles.cfg.sampling.max_new_tokens

    def describe(vectors: torch.Tensor) -> list[str]:
        out = []
        for i in range(0, len(vectors), 32):
            chunk = vectors[i : i + 32]
            # a rollout actor restarted by Ray is re-synced to the served adapter before it describes
            described = roles.with_recovery(lambda chunk=chunk: remote_get(
                roles.rollouts[0].sample.remote(chunk, [0] * len(chunk), 1, 0.0, 1.0, max_new), roles.timeout, "describe"))
            out.extend(described.texts)
        return out

    def encode(texts: list[str]) -> torch.Tensor:
        safe = [x if x.strip() else "(empty)" for x in texts]
        v_hat, _ = remote_get(roles.encoder.reconstruct.remote(safe), roles.timeout, "encode")
        return v_hat

    tokenizer = load_tokenizer(roles.run.model_path)
    return Oracle(describe=describe, encode=encode, encode_with_weights=None, ask_yes_no=None, read=None,
                  detokenize=lambda ids: tokenizer.decode(ids))

