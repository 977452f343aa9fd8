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

from actors.cluster import bundle_options, create_placement_group, placement_plan, remote_get
from actors.encoder import EncoderActor
from actors.learner import LearnerGroup
from actors.rollout import RolloutActor
from cycle_oracle.checkpoint import latest_checkpoint, load_checkpoint, read_files, save_checkpoint
from cycle_oracle.corpus import load_documents
from cycle_oracle.grpo import group_advantages
from cycle_oracle.learner import PolicySample
from cycle_oracle.models import load_tokenizer
from cycle_oracle.rollout import request_seed
from cycle_oracle.stats import text_diversity
from recipes.common import check_finite, Run, extract_store, injection_norm, source_windows, start_run

SYNC_TOLERANCE = 2e-3
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def step_rows(train_rows: list[int], seed: int, step: int, batch: int) -> list[int]:
    """The B activations of a step: a function of (seed, step) only, so a resumed run picks the same."""
    return random.Random(f"{seed}:{step}").sample(train_rows, min(batch, len(train_rows)))


class Roles:
    """The actors of a GRPO run and the driver-side logic that talks to them."""

    def __init__(self, run: Run, norm: float, store, init_tensors: dict | None):
        cfg = run.cfg
        self.run, self.cfg, self.norm, self.store = run, cfg, norm, store
        self.timeout = cfg.ray.get_timeout_s
        self.plan = placement_plan(cfg)
        self.pg = create_placement_group(self.plan, self.timeout)
        g = cfg.grpo
        total = g.steps * g.epochs_per_rollout * g.minibatches_per_epoch
        ref = None
        if g.kl_reference == "warmup":
            if not init_tensors:
                raise ValueError("grpo.kl_reference=warmup needs init_from (a warmup checkpoint) to take the reference adapter from")
            ref = init_tensors["decoder_adapter"]
        config = cfg.model_dump(mode="json")
        self.learners = LearnerGroup(run.model_path, cfg, run.layer, norm, total,
                                     [bundle_options(self.pg, self.plan, "learner", r) for r in range(cfg.learner.num_actors)],
                                     grad_accum=1, reference_adapter=ref)
        self.rollouts = [
            RolloutActor.options(**bundle_options(self.pg, self.plan, "rollout", i), max_restarts=3, max_task_retries=0,
                                 name=f"{run.out.name}-rollout-{i}")
            .remote(run.model_path, config, run.layer, norm, i)
            for i in range(cfg.rollout.num_actors)
        ]
        self.encoder = EncoderActor.options(**bundle_options(self.pg, self.plan, "encoder", 0)).remote(run.model_path, config, run.layer, store.mean)
        self.tokenizer = load_tokenizer(run.model_path)
        self.version = 0
        self.probe = None  # (vector, sample tokens, logprobs) of the last verified sync

    # ---- weight sync ----------------------------------------------------------------------
    def sync(self, adapter: dict | None = None, verify: bool = True) -> dict:
        """Push an adapter (default: the learner's) to every rollout actor as a new version, then
        verify it against the learner (skip `verify` only to serve an adapter the learner does not hold)."""
        t0 = time.time()
        adapter = adapter if adapter is not None else self.learners.on_rank0("adapter")
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
        """The served policy's logprobs for a fixed probe equal the learner's, and moved since the
        previous version (a silently stale engine fails here)."""
        vector = self.store.activations[:1]
        errors = []
        for r in self.rollouts:
            (samples,), version = remote_get(r.sample.remote(vector, [12345], 1, self.cfg.sampling.temperature, 1.0, 8), self.timeout, "sync probe")
            if version != self.version:
                raise RuntimeError(f"rollout actor serves weight version {version}, expected {self.version}")
            s = samples[0]
            learner_lp = self.learners.on_rank0("policy_logprobs", [PolicySample(vector[0], s.token_ids, s.logprobs, 0.0)], self.cfg.sampling.temperature)[0][0]
            errors.append(float((learner_lp[: len(s.logprobs)] - torch.tensor(s.logprobs)).abs().max()))
        worst = max(errors)
        if worst > SYNC_TOLERANCE:
            raise RuntimeError(f"weight sync v{self.version} failed verification: served logprobs differ from the learner's by {worst:.2e}")
        changed = 1.0
        if self.probe is not None:
            old_tokens, old_lp = self.probe
            if old_tokens == s.token_ids:
                changed = float(not torch.allclose(torch.tensor(old_lp), torch.tensor(s.logprobs), atol=1e-6))
        self.probe = (s.token_ids, s.logprobs)
        return {"sync_logprob_error": worst, "sync_policy_changed": changed}

    # ---- rollout with fault tolerance ---------------------------------------------------------
    def submit_rollout(self, rows: list[int], step: int):
        vectors = self.store.activations[rows]
        seeds = [request_seed(self.cfg.seed, step, r) for r in rows]
        s = self.cfg.sampling
        k = self.cfg.grpo.samples_per_activation
        n_act = len(self.rollouts)
        parts = [(list(range(i, len(rows), n_act))) for i in range(n_act)]
        refs = [r.sample.remote(vectors[idx], [seeds[j] for j in idx], k, s.temperature, s.top_p, s.max_new_tokens) if idx else None
                for r, idx in zip(self.rollouts, parts)]
        return refs, parts

    def collect_rollout(self, pending, rows: list[int], step: int):
        """Wait for a submitted rollout; if an actor died, recover and sample the same requests again
        (same seeds and weights, so the retried step is the step that would have run)."""
        state = {"pending": pending}

        def collect():
            refs, parts = state["pending"]
            groups: list = [None] * len(rows)
            versions = set()
            try:
                for ref, idx in zip(refs, parts):
                    if ref is None:
                        continue
                    samples, version = remote_get(ref, self.timeout, f"rollout step {step}")
                    versions.add(version)
                    for j, grp in zip(idx, samples):
                        groups[j] = grp
            except ACTOR_GONE:
                state["pending"] = None
                raise
            return groups, versions

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
        ray.util.remove_placement_group(self.pg)


def grpo_step(roles: Roles, rows: list[int], step: int, samples_by_row, versions) -> dict:
    cfg, g = roles.cfg, roles.cfg.grpo
    t = roles.timeout
    B, K = len(rows), g.samples_per_activation
    vectors = roles.store.activations[rows]
    flat = [(b, s) for b, grp in enumerate(samples_by_row) for s in grp]
    texts = [s.text for _, s in flat]
    usable = [bool(s.text.strip()) and not (s.truncated and g.penalize_truncated) for _, s in flat]
    flat_vectors = vectors[[b for b, _ in flat]]

    t0 = time.time()
    rewards, recon = remote_get(roles.encoder.call.remote("score", texts, flat_vectors, usable), t, "encoder scoring")
    check_finite({"reward": float(rewards.sum())}, step)
    time_score = time.time() - t0
    enc_metrics = {}
    if g.train_encoder and any(usable):
        idx = [i for i, u in enumerate(usable) if u]
        enc_texts, enc_vectors = [texts[i] for i in idx], flat_vectors[idx]
        if cfg.encoder.source_window_tokens:  # the source-text anchor (EncoderSettings.source_window_tokens)
            enc_texts += source_windows(roles.store, rows, roles.tokenizer, cfg.encoder.source_window_tokens)
            enc_vectors = torch.cat([enc_vectors, vectors])
        enc_metrics = remote_get(roles.encoder.call.remote("train_step", enc_texts, enc_vectors), t, "encoder update")
    time_score_train = time.time() - t0

    samples = [PolicySample(flat_vectors[i], s.token_ids, s.logprobs, 0.0) for i, (_, s) in enumerate(flat)]
    shaped = rewards.clone()
    if g.kl_coef > 0 and g.kl_placement == "reward":
        kl = torch.tensor([v for part in roles.learners.on_all("sequence_kl", [(x, cfg.sampling.temperature) for (x,) in roles.learners.shard(samples)]) for v in part])
        order = [i for r in range(roles.learners.world_size) for i in range(r, len(samples), roles.learners.world_size)]
        kl_by_sample = torch.empty_like(kl)
        kl_by_sample[order] = kl
        shaped = shaped - g.kl_coef * kl_by_sample
    advantages, zero_spread = group_advantages(shaped.view(B, K), g.scale_advantages_by_std)
    for i, s in enumerate(samples):
        s.advantage = float(advantages.view(-1)[i])

    t1 = time.time()
    parts = roles.learners.on_all("grpo_step", [(x, cfg.sampling.temperature) for (x,) in roles.learners.shard(samples)], f"GRPO learn step {step}")
    time_learn = time.time() - t1
    learn = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    learn["tokens"] = sum(p["tokens"] for p in parts)

    lengths = [len(s.token_ids) for _, s in flat]
    metrics = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.view(B, K).std(1).mean()),
        **recon, **enc_metrics,
        "kl": learn.get("kl", 0.0), "entropy": learn.get("entropy", 0.0), "clip_fraction": learn.get("clip_fraction", 0.0),
        "policy_loss": learn.get("policy_loss", 0.0), "ratio_mean": learn.get("ratio_mean", 1.0),
        "importance_weight_mean": learn.get("importance_weight_mean", 1.0), "importance_weight_max": learn.get("importance_weight_max", 1.0),
        "importance_capped_fraction": learn.get("importance_capped_fraction", 0.0), "logp_mismatch": learn.get("importance_logp_mismatch", 0.0),
        "lr": learn["lr"], "description_tokens": sum(lengths) / len(lengths),
        "truncation_rate": sum(s.truncated for _, s in flat) / len(flat), "zero_spread_fraction": zero_spread,
        "rollout_versions": float(min(versions)) if versions else 0.0,
        "time_score": time_score_train, "time_learn": time_learn,
    }
    metrics.update(text_diversity(texts))
    check_finite(metrics, step)
    return metrics


def run(cfg, out, resume: bool = False) -> dict:
    if cfg.grpo.optim is not None:
        cfg = cfg.model_copy(update={"optim": cfg.grpo.optim})
    run = start_run(cfg, out, "grpo")
    g = cfg.grpo
    store, emb_norm = extract_store(run, load_documents(cfg.corpus, cfg.num_documents))
    norm = injection_norm(cfg, emb_norm, store.mean_norm)
    train_rows, _held = store.split_by_document(cfg.warmup.heldout_fraction, cfg.seed)

    init_tensors = None
    if cfg.init_from:
        ckpt = latest_checkpoint(cfg.init_from) or cfg.init_from
        init_tensors, init_state, _ = load_checkpoint(ckpt)
        if init_state.get("layer") not in (None, run.layer):
            raise ValueError(f"init_from {ckpt} was trained at layer {init_state['layer']}, this recipe reads layer {run.layer}")
        trained = {k: v for k, v in (init_state.get("injection") or {}).items() if k in ("num_placeholders", "placeholder", "mode")}
        ours = {k: v for k, v in cfg.injection.model_dump(mode="json").items() if k in trained}
        if trained != ours:
            raise ValueError(f"init_from {ckpt} was trained with injection {trained}, this recipe sets {ours}: "
                             f"set the same injection.num_placeholders / placeholder / mode")
        warm_norm = init_state.get("injection_norm")
        if warm_norm is not None and abs(warm_norm - norm) > 1e-3 * max(abs(norm), 1.0):
            print(f"[grpo] injection norm {norm:.3f} from this run's corpus differs from the warmup's {warm_norm:.3f}: using the warmup's")
            norm = float(warm_norm)
    roles = Roles(run, norm, store, init_tensors)
    t = roles.timeout
    start = 0
    adapter = None
    if init_tensors:
        adapter = init_tensors["decoder_adapter"]
        roles.learners.on_all("load_adapter", [(adapter,)] * roles.learners.world_size, "load warmup adapter")
        if "encoder" in init_tensors:
            remote_get(roles.encoder.call.remote("load_state", init_tensors["encoder"]), t, "load warmup encoder")
    if resume and (ckpt := latest_checkpoint(run.out)) is not None:
        tensors, state, objects = load_checkpoint(ckpt)
        roles.learners.restore(read_files(ckpt, "learner"), state["world_size"])
        remote_get(roles.encoder.call.remote("load_state", tensors["encoder"], objects["encoder_optim"]), t, "encoder resume")
        start = state["step"]
        roles.version = state["weight_version"] - 1
        adapter = tensors["decoder_adapter"]
        print(f"[grpo] resumed from {ckpt} at step {start}")
    run.metrics.log("grpo_setup", start, roles.sync(adapter))

    pending = roles.submit_rollout(step_rows(train_rows, cfg.seed, start, g.batch_activations), start) if start < g.steps else None
    t_loop = time.time()
    last = g.steps
    with Progress() as progress:
        bar = progress.add_task("grpo", total=g.steps, completed=start)
        for step in range(start, g.steps):
            t_step = time.time()
            rows = step_rows(train_rows, cfg.seed, step, g.batch_activations)
            samples_by_row, versions = roles.collect_rollout(pending, rows, step)
            time_rollout = time.time() - t_step
            next_rows = step_rows(train_rows, cfg.seed, step + 1, g.batch_activations)
            pending = None
            if g.overlap_rollout and step + 1 < g.steps:  # sample step+1 with the pre-update policy
                pending = roles.submit_rollout(next_rows, step + 1)
            metrics = grpo_step(roles, rows, step, samples_by_row, versions)
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
    if init_tensors:  # same final encoder, same pool: the warmup decoder's descriptions for comparison
        roles.sync(init_tensors["decoder_adapter"], verify=False)  # the learner holds the GRPO adapter
        results["retrieval_warmup_decoder"] = final_retrieval(roles, controls=())
        results["grpo_minus_warmup"] = decoder_comparison(results["retrieval"], results["retrieval_warmup_decoder"])
    results["summary"] = retrieval_summary(results)
    run.write_results("results.json", results)
    run.metrics.close()
    roles.shutdown()
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
    t = roles.timeout
    files = roles.learners.checkpoint_files()
    enc_tensors, enc_optim = remote_get(roles.encoder.call.remote("state"), t, "encoder state")
    state = {"world_size": roles.learners.world_size, "weight_version": roles.version, "layer": roles.run.layer,
             "model": roles.cfg.model.name, "stage": "grpo", "injection_norm": roles.norm}
    save_checkpoint(roles.run.out, step, {"decoder_adapter": roles.learners.on_rank0("adapter"), "encoder": enc_tensors},
                    state, objects={"encoder_optim": enc_optim}, files=files, keep=roles.cfg.logging.keep_checkpoints)


def final_retrieval(roles: Roles, controls=("shuffled", "zero", "context_only")) -> dict:
    """Retrieval on held-out documents with the served decoder (vLLM, greedy) and the encoder."""
    from cycle_oracle.evals.retrieval import evaluate_retrieval

    cfg = roles.cfg
    return evaluate_retrieval(actor_oracle(roles), roles.store, cfg.eval.pool_size, cfg.seed,
                              heldout_fraction=cfg.warmup.heldout_fraction, split_seed=cfg.seed, controls=controls)


def actor_oracle(roles: Roles):
    """An evals Oracle whose describe/encode calls go to the running actors."""
    from cycle_oracle.evals.oracle import Oracle

    max_new = roles.cfg.sampling.max_new_tokens

    def describe(vectors: torch.Tensor) -> list[str]:
        out = []
        for i in range(0, len(vectors), 32):
            chunk = vectors[i : i + 32]
            # a rollout actor restarted by Ray is re-synced to the served adapter before it describes
            samples, _ = roles.with_recovery(lambda chunk=chunk: remote_get(
                roles.rollouts[0].sample.remote(chunk, [0] * len(chunk), 1, 0.0, 1.0, max_new), roles.timeout, "describe"))
            out.extend(g[0].text for g in samples)
        return out

    def encode(texts: list[str]) -> torch.Tensor:
        safe = [x if x.strip() else "(empty)" for x in texts]
        v_hat, _ = remote_get(roles.encoder.call.remote("reconstruct", safe), roles.timeout, "encode")
        return v_hat

    tokenizer = load_tokenizer(roles.run.model_path)
    return Oracle(describe=describe, encode=encode, encode_with_weights=None, ask_yes_no=None, read=None,
                  detokenize=lambda ids: tokenizer.decode(ids))

