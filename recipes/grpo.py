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

import hashlib
import random
import time
import traceback

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
from cycle_oracle.grpo import apply_kl_penalty_to_rewards, group_advantages, unusable_rewards
from cycle_oracle.models import load_tokenizer
from cycle_oracle.reward_shaping import copy_rates, length_excess, shaped_rewards
from cycle_oracle.rollout import request_seed
from cycle_oracle.stats import text_diversity
from recipes.common import Run, check_finite, checkpoint_adapter_configs, extract_store, finish_run, injection_norm, load_resume, load_start, record, source_windows, start_run

SYNC_TOLERANCE = {"float32": {"mean": 1e-3, "p99": 5e-3}, "bfloat16": {"mean": 0.1, "p99": 0.5}, "float16": {"mean": 0.1, "p99": 0.5}}
"""The ceilings of the weight-sync check: the largest mean and 99th percentile of
|log pi_learner - log pi_served| over the sync probe's tokens that any sync may show, per model
dtype (the learner and the engine run different kernels): about twice the largest values measured
on the CPU with SmolLM2 (docs/BENCHMARKS.md, "Weight-sync mismatch"; float16 is unmeasured and
borrows bfloat16's). `grpo.sync_tolerance` replaces them. The first check is judged by them alone;
later ones by `SyncCheck`'s multiple of the noise floor that first check measured, under them."""
SYNC_NOISE_MULTIPLE = 10.0
"""After the first check, a sync passes while its mean and p99 stay within this multiple of the
kernel-noise floor the first check measured (and within `SYNC_TOLERANCE`). Measured across the
syncs of one CPU run the noise moved by up to 1.7x (p99, bf16); a sync that serves another adapter
moves the log-probs by far more than 10x the noise."""
SYNC_NOISE_MIN = 1e-6
"""The smallest noise floor counted (kernels that agree to rounding would otherwise allow nothing)."""
SYNC_PROBE = {"activations": 4, "tokens": 16}


class SyncCheck:
    """The weight-sync check's bounds, calibrated on the run's own kernels.

    At the first check the learner and the engine hold the same weights, so their mismatch is the
    kernel noise floor of this model, dtype, hardware and probe (on a GPU it can be far below the
    CPU-measured ceilings, which in bf16 pass any sync that moves the served log-probs by less than
    0.1 per token on average). That check is judged by the ceilings alone (`SYNC_TOLERANCE`, or
    `grpo.sync_tolerance`) and its mean and p99 become the floor; every later check passes while
        error_s <= min(ceiling_s, SYNC_NOISE_MULTIPLE * max(floor_s, SYNC_NOISE_MIN))   for s in (mean, p99).
    Each check logs the floor (`sync_noise_floor_*`) and the bounds it was judged by (`sync_bound_*`)."""

    STATS = ("mean", "p99")

    def __init__(self, ceiling: dict[str, float], multiple: float = SYNC_NOISE_MULTIPLE):
        self.ceiling = dict(ceiling)
        self.multiple = multiple
        self.floor: dict[str, float] | None = None

    def bounds(self) -> dict[str, float]:
        """The bounds the next check is judged by."""
        if self.floor is None:
            return dict(self.ceiling)
        return {s: min(self.ceiling[s], self.multiple * max(self.floor[s], SYNC_NOISE_MIN)) for s in self.STATS}

    def judge(self, error: dict[str, float], what: str) -> dict[str, float]:
        """Check one sync's worst error ({mean, p99, max, tokens}); the first passing check sets the
        floor. Raises naming each statistic over its bound -> the floor and bound metrics."""
        bounds = self.bounds()
        bad = {s: error[s] for s in self.STATS if error[s] > bounds[s]}
        if bad:
            if self.floor is None:
                why = "the ceilings (first check: grpo.sync_tolerance sets other ones)"
            else:
                why = (f"{self.multiple:g} x the kernel-noise floor measured at the first check (mean {self.floor['mean']:.2e}, "
                       f"p99 {self.floor['p99']:.2e}), at most the ceilings {self.ceiling}")
            raise RuntimeError(f"{what} failed verification: served logprobs differ from the learner's by "
                               + ", ".join(f"{s} {v:.2e} > {bounds[s]:.2e}" for s, v in bad.items())
                               + f" over {error.get('tokens', 0):.0f} probe tokens; the bounds are {why}")
        if self.floor is None:
            self.floor = {s: float(error[s]) for s in self.STATS}
        return {"sync_noise_floor_mean": self.floor["mean"], "sync_noise_floor_p99": self.floor["p99"],
                "sync_bound_mean": bounds["mean"], "sync_bound_p99": bounds["p99"]}
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class StaleRollout(RuntimeError):
    """Samples came from a weight version the driver did not serve (an actor restarted with a fresh LoRA)."""


ROLE_GONE = ACTOR_GONE
"""What an encoder or learner death raises through the driver: every role restarts from the last checkpoint."""


def step_rows(train_rows: list[int], seed: int, step: int, batch: int) -> list[int]:
    """The B activations of a step: a function of (seed, step) only, so a resumed run picks the same."""
    return random.Random(f"{seed}:{step}").sample(train_rows, min(batch, len(train_rows)))


class Roles:
    """The actors of a GRPO run and the driver-side logic that talks to them."""

    def __init__(self, run: Run, norm: float, store, start: TrainedCheckpoint | None, incarnation: int = 0, sft_pools: dict | None = None):
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
        self.learners = LearnerGroup(run.model_spec, cfg, run.layer, norm, total, "grpo", run.placement, reference_adapter=ref,
                                     log_dir=run.log_dir)
        self.rollouts = [
            RolloutActor.options(**run.placement.options("rollout", i, max_restarts=3, max_task_retries=0, name=f"{run.out.name}-rollout-{i}" + (f"-r{incarnation}" if incarnation else "")))
            .remote(run.model_spec, config, run.layer, norm, i, run.log_file(f"rollout-{i}"))
            for i in range(cfg.resources.rollout.num_actors)
        ]
        self.encoder = EncoderActor.options(**run.placement.options("encoder", 0)).remote(run.model_spec, config, run.layer, store.mean,
                                                                                   run.log_file("encoder"))
        self.tokenizer = load_tokenizer(run.model_path)
        self.version = 0
        self.probe = None  # (vector, sample tokens, logprobs) of the last verified sync
        self.sync_check = SyncCheck(SYNC_TOLERANCE[cfg.model.dtype] | (cfg.grpo.sync_tolerance or {}))
        self.syncs = 0  # syncs by these roles (the first is always verified, then every grpo.sync_check_every-th)
        self.description_cache: dict = {}
        self.sft_pools = sft_pools or {}  # supervised mixing: the warmup's training items per task
        if self.sft_pools.get("latentqa") and cfg.warmup.latentqa_centre:  # as the warmup read them
            from recipes.warmup import centre_latentqa

            centre_latentqa(self.learners, self.sft_pools["latentqa"], cfg)

    def sft_examples(self, step: int) -> list:
        """Supervised mixing: `grpo.sft_mix_examples` warmup examples for this step, a function of
        (seed, step) only, so a resumed run draws the same ones."""
        g = self.cfg.grpo
        tasks = [t for t, w in g.sft_mix_tasks.items() if w > 0 and self.sft_pools.get(t)]
        if g.sft_mix_weight <= 0 or not tasks:
            return []
        from cycle_oracle.data.read_positions import to_example

        rng = random.Random(f"sft-mix:{self.cfg.seed}:{step}")
        picks = rng.choices(tasks, weights=[g.sft_mix_tasks[t] for t in tasks], k=g.sft_mix_examples)
        return [to_example(rng.choice(self.sft_pools[t]), rng, self.cfg.injection.num_placeholders) for t in picks]

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
        self.syncs += 1
        g = self.cfg.grpo
        if g.sync_check and verify and (self.syncs - 1) % g.sync_check_every == 0:
            t1 = time.time()
            out.update(self.with_recovery(self.verify_sync))
            out["time_sync_check"] = time.time() - t1
        else:
            out["time_sync_check"] = 0.0
        return out

    def with_recovery(self, fn, retries: int = 2):
        """Run fn(); if a rollout actor died (or served a version the driver did not serve), wait for
        its restart + re-sync, then run fn() again."""
        for attempt in range(retries + 1):
            try:
                return fn()
            except StaleRollout as err:
                if attempt == retries:
                    raise
                print(f"[grpo] {err}: re-synced, sampling again")
            except ACTOR_GONE as err:
                if attempt == retries:
                    raise
                print(f"[grpo] a rollout actor died ({type(err).__name__}); waiting for Ray to restart it")
                self.recover_rollouts()

    def verify_sync(self) -> dict:
        """The served policy's logprobs for a fixed probe equal the learner's within the bounds of
        `SyncCheck` (mean and 99th percentile of |delta log pi| over the probe's tokens, worst over the
        rollout actors; rank 0 compares): the ceilings at the first check, which measures the kernel
        noise floor, then a multiple of that floor. Also logs whether the served log-probs moved
        since the previous version (`sync_policy_changed`)."""
        vectors = self.store.activations[: SYNC_PROBE["activations"]]
        seeds = [12345 + i for i in range(len(vectors))]
        worst: dict[str, float] = {}
        for r in self.rollouts:
            probe: RolloutBatch = remote_get(r.sample.remote(vectors, seeds, 1, self.cfg.sampling.temperature, 1.0, SYNC_PROBE["tokens"]),
                                             self.timeout, "sync probe")
            if set(probe.versions.tolist()) != {self.version}:
                raise RuntimeError(f"rollout actor serves weight version(s) {sorted(set(probe.versions.tolist()))}, expected {self.version}")
            error = self.learners.sync_error(probe)
            worst = {k: max(worst.get(k, 0.0), error[k]) for k in error}
        calibration = self.sync_check.judge(worst, f"weight sync v{self.version} ({self.cfg.model.dtype})")
        changed = 1.0
        if self.probe is not None:
            old_tokens, old_lp = self.probe
            same = [i for i in range(len(probe)) if old_tokens[i] == probe.token_ids[i]]
            if same:  # any probe sample whose tokens repeat must have moved log-probs
                changed = float(any(not torch.allclose(torch.tensor(old_lp[i]), torch.tensor(probe.sampler_logprobs[i]), atol=1e-6) for i in same))
        self.probe = (probe.token_ids, probe.sampler_logprobs)
        return {"sync_logprob_error": worst["max"], "sync_logprob_error_mean": worst["mean"], "sync_logprob_error_p99": worst["p99"],
                "sync_policy_changed": changed, **calibration}

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
        return refs, parts, self.version

    def collect_rollout(self, pending, rows: list[int], step: int) -> RolloutBatch:
        """Wait for a submitted rollout -> one batch in the order of `rows`. Only samples of the version
        served when the request was made (or the current one) are accepted: an actor restarted by Ray
        while idle serves a fresh LoRA (version 0) without raising, so a batch of any other version is
        re-synced and sampled again, as is one whose actor died (same seeds and weights, so the
        retried step is the step that would have run)."""
        state = {"pending": pending}

        def collect():
            refs, parts, served = state["pending"]
            try:
                got = [(remote_get(ref, self.timeout, f"rollout step {step}"), idx) for ref, idx in zip(refs, parts) if ref is not None]
            except ACTOR_GONE:
                state["pending"] = None
                raise
            batch = regroup([b for b, _ in got], [idx for _, idx in got])
            stale = set(batch.versions.tolist()) - {served, self.version}
            if stale:
                state["pending"] = None
                self.recover_rollouts()
                raise StaleRollout(f"rollout step {step} got samples of weight version(s) {sorted(stale)}, expected {served}")
            return batch

        def resubmit_then_collect():
            if state["pending"] is None:
                state["pending"] = self.submit_rollout(rows, step)
            return collect()

        return self.with_recovery(resubmit_then_collect)

    def recover_rollouts(self) -> None:
        """Wait for restarted rollout actors and re-sync them to the current version before they
        serve (a call that meets an actor mid-restart is retried until `ray.get_timeout_s`)."""
        deadline = time.time() + self.timeout
        for r in self.rollouts:
            while True:
                try:
                    info = remote_get(r.info.remote(), max(1.0, deadline - time.time()), "restarted rollout actor")
                    if info["version"] != self.version:
                        remote_get(r.sync.remote(self._adapter_ref, self.version), self.timeout, "re-sync after restart")
                    break
                except ACTOR_GONE:
                    if time.time() > deadline:
                        raise
                    time.sleep(2)

    def shutdown(self) -> None:
        """Stop every role (also after one of them died)."""
        try:
            self.learners.shutdown()
        except Exception as err:  # a dead or hung rank: its peers are killed below all the same
            print(f"[grpo] learner shutdown: {type(err).__name__}")
            for a in self.learners.actors:
                ray.kill(a, no_restart=True)
        for a in (*self.rollouts, self.encoder):
            ray.kill(a, no_restart=True)


def grpo_step(roles: Roles, batch: RolloutBatch, rows: list[int], step: int) -> dict:
    """Score -> co-train the encoder -> advantages -> learn, on one rollout batch."""
    cfg, g = roles.cfg, roles.cfg.grpo
    t = roles.timeout
    batch.usable = torch.tensor([bool(text.strip()) and not (trunc and g.penalize_truncated)
                                 for text, trunc in zip(batch.texts, batch.truncated.tolist())], dtype=torch.bool)

    t0 = time.time()
    enc_metrics = {}
    if g.train_encoder and bool(batch.usable.any()):  # score, then co-train on the same forward (rewards: the encoder before its update)
        anchor_texts, anchor_vectors = [], None
        if cfg.encoder.source_window_tokens:  # the source-text anchor (EncoderSettings.source_window_tokens)
            anchor_texts = source_windows(roles.store, rows, roles.tokenizer, cfg.encoder.source_window_tokens)
            anchor_vectors = roles.store.activations[rows]
        rewards, recon, enc_metrics = remote_get(roles.encoder.score_and_train.remote(batch, anchor_texts, anchor_vectors), t,
                                                 "encoder scoring and update")
    else:
        rewards, recon = remote_get(roles.encoder.score.remote(batch), t, "encoder scoring")
    shaping = {}
    if g.copy_penalty or g.length_penalty:  # anti-transcription terms (cycle_oracle/reward_shaping.py), before the unusable penalty
        windows = source_windows(roles.store, rows, roles.tokenizer, g.copy_window_tokens)
        copy = copy_rates(batch.texts, [windows[i // batch.group_size] for i in range(len(batch))], g.copy_penalty_ngram)
        excess = length_excess(batch.completion_lengths(), g.length_free_tokens)
        rewards = shaped_rewards(rewards, copy, g.copy_penalty, excess, g.length_penalty)
        shaping = {"copy_rate": float(copy.mean()), "length_excess": float(excess.mean())}
    rewards = unusable_rewards(batch.groups(rewards), batch.groups(batch.usable), g.truncation_penalty,
                               g.truncation_penalty_margin).reshape(-1)
    check_finite({"reward": float(rewards.sum())}, step)
    time_score_train = time.time() - t0

    shaped = rewards.clone()
    reward_kl = None
    if g.kl_coef > 0 and g.kl_placement == "reward":
        sequence_kl = roles.learners.sequence_kl(batch)
        shaped = apply_kl_penalty_to_rewards(shaped, sequence_kl, g.kl_coef)
        reward_kl = float(sequence_kl.sum()) / max(sum(batch.completion_lengths()), 1)  # per token (k1)
    batch.rewards = shaped
    advantages, zero_spread = group_advantages(batch.groups(shaped), g.scale_advantages_by_std)
    batch.advantages = advantages.reshape(-1).float()

    t1 = time.time()
    learn = roles.learners.grpo_step(batch, roles.sft_examples(step))
    time_learn = time.time() - t1

    lengths = batch.completion_lengths()
    metrics = {
        "reward_mean": float(rewards.mean()), "reward_std": float(batch.groups(rewards).std(1).mean()),
        **recon, **enc_metrics, **shaping,
        "kl": learn.get("kl", 0.0) if reward_kl is None else reward_kl, "entropy": learn.get("entropy", 0.0), "clip_fraction": learn.get("clip_fraction", 0.0),
        "policy_loss": learn.get("policy_loss", 0.0), "ratio_mean": learn.get("ratio_mean", 1.0),
        "importance_weight_mean": learn.get("importance_weight_mean", 1.0), "importance_weight_max": learn.get("importance_weight_max", 1.0),
        "importance_capped_fraction": learn.get("importance_capped_fraction", 0.0), "logp_mismatch": learn.get("importance_logp_mismatch", 0.0),
        "lr": learn["lr"], "description_tokens": sum(lengths) / len(lengths),
        **({"sft_loss": learn["sft_loss"]} if "sft_loss" in learn else {}),
        "truncation_rate": float(batch.truncated.float().mean()), "zero_spread_fraction": zero_spread,
        "rollout_versions": float(batch.versions.min()),
        "time_score": time_score_train, "time_learn": time_learn,
    }
    metrics.update(text_diversity(batch.texts))
    check_finite(metrics, step)
    return metrics


def run(cfg, out, resume: bool = False, on_step_end=None, on_stage=None) -> dict:
    """The GRPO recipe. `on_step_end(roles, step)` (optional) runs after each step's checkpoint,
    between steps, while no call is in flight (tests use it to kill a role there); `on_stage(name,
    **counts)` (optional) at the end of each stage (the main job's minutes account)."""
    stage = on_stage or (lambda name, **counts: None)
    run = start_run(cfg, out, "grpo", resume)
    cfg = run.cfg  # model.dtype: auto resolved
    g = cfg.grpo
    store, emb_norm = extract_store(run, load_documents(cfg.corpus, cfg.num_documents))
    start_ckpt = load_start(run)
    norm = injection_norm(run, emb_norm, store.mean_norm, start_ckpt)
    train_rows, _held = store.split_by_document(cfg.split.heldout_fraction, cfg.seed)
    sft_pools = warmup_training_items(run) if g.sft_mix_weight > 0 else None
    stage("grpo/placement_and_extraction", activations=len(store))

    restarts = 0
    while True:  # an encoder or learner death: every role restarts from the last checkpoint, in this process
        roles = Roles(run, norm, store, start_ckpt, incarnation=restarts, sft_pools=sft_pools)
        try:
            start = restore_roles(roles, start_ckpt, resume or restarts > 0)
            stage("grpo/roles_start_and_sync")
            last = train(roles, train_rows, start, on_step_end)
            stage("grpo/steps", steps=last - start, samples=(last - start) * g.batch_activations * g.samples_per_activation)
            break
        except ROLE_GONE as err:
            restarts += 1
            where = traceback.extract_tb(err.__traceback__)
            (run.out / "logs").mkdir(exist_ok=True)
            with open(run.out / "logs" / "role_deaths.log", "a") as f:  # where the driver met the death
                f.write(f"restart {restarts}: {type(err).__name__}: {err}\n{''.join(traceback.format_list(where))}\n")
            roles.shutdown()
            if restarts > g.max_role_restarts:
                raise RuntimeError(f"a role died {restarts} times (grpo.max_role_restarts={g.max_role_restarts}); last: {err}") from err
            print(f"[grpo] a role died ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                  f"restarting every role from the last checkpoint (restart {restarts} of at most {g.max_role_restarts})")

    results = {"kind": "grpo", "layer": run.layer, "injection_norm": norm, "steps": last, "steps_planned": g.steps,
               "weight_version": roles.version, "role_restarts": restarts}
    results.update(final_evals(roles, start_ckpt, stage))
    results["summary"] = retrieval_summary(results)
    run.write_results("results.json", results)
    from recipes.report import write_report
    write_report(run.out, results)  # report.md: the closing report (recipes/report.py)
    roles.shutdown()
    finish_run(run)
    stage("grpo/results_and_shutdown")
    return results


def warmup_training_items(run: Run) -> dict:
    """Supervised mixing's data: the warmup data build of this recipe's `warmup` settings (the
    cache a warmup of the same settings wrote; built here otherwise), training split only."""
    from recipes.warmup import build_data_task, warmup_corpus

    options, threads = run.placement.task_options()
    train, _heldout, report = remote_get(
        build_data_task.options(**options).remote(run.model_spec, run.cfg.model_dump(mode="json"), threads, None, run.log_file("warmup-data"), warmup_corpus(run.cfg)),
        run.cfg.ray.setup_timeout_s, "building the warmup data (supervised mixing)")
    tasks = {t: len(train.get(t) or []) for t in run.cfg.grpo.sft_mix_tasks}
    print(f"[grpo] supervised mixing: beta {run.cfg.grpo.sft_mix_weight}, warmup items {tasks}")
    return {t: train[t] for t in tasks if train.get(t)}


def restore_roles(roles: Roles, start_ckpt: TrainedCheckpoint | None, resume: bool) -> int:
    """Load the starting checkpoint (init_from), then, when resuming, this run's last checkpoint
    into every role; serve the policy. -> the step to continue from (redone steps' metrics rows go)."""
    run, t = roles.run, roles.timeout
    start, adapter = 0, None
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
    if resume and (redone := run.metrics.rewind("grpo", start)):
        print(f"[grpo] steps {redone} are redone: their earlier metrics rows are replaced")
    run.metrics.log("grpo_setup", start, roles.sync(adapter))
    return start


def train(roles: Roles, train_rows: list[int], start: int, on_step_end=None) -> int:
    """The GRPO loop from `start` -> the last step done (`grpo.max_minutes` may stop it early)."""
    run, cfg, g = roles.run, roles.cfg, roles.cfg.grpo
    pending = None
    t_loop = time.time()
    last = g.steps
    with Progress() as progress:
        bar = progress.add_task("grpo", total=g.steps, completed=start)
        for step in range(start, g.steps):
            t_step = time.time()
            rows = step_rows(train_rows, cfg.seed, step, g.batch_activations)
            if pending is None:
                pending = roles.submit_rollout(rows, step)
            batch = roles.collect_rollout(pending, rows, step)
            time_rollout = time.time() - t_step
            pending = None
            if g.overlap_rollout and step + 1 < g.steps:  # sample step+1 with the pre-update policy
                pending = roles.submit_rollout(step_rows(train_rows, cfg.seed, step + 1, g.batch_activations), step + 1)
            metrics = grpo_step(roles, batch, rows, step)
            metrics.update(roles.sync())
            metrics["time_rollout"] = time_rollout
            metrics["time_step"] = time.time() - t_step
            busy = sum(metrics[k] for k in ("time_rollout", "time_score", "time_learn", "time_sync", "time_sync_check"))
            metrics["time_idle"] = max(0.0, metrics["time_step"] - busy)
            run.metrics.log("grpo", step + 1, metrics)
            progress.update(bar, advance=1, description=f"grpo reward {metrics['reward_mean']:.3f}")
            out_of_time = g.max_minutes is not None and time.time() - t_loop > 60 * g.max_minutes
            every = cfg.logging.checkpoint_every
            if (every and (step + 1) % every == 0) or step + 1 == g.steps or out_of_time:
                save_grpo_checkpoint(roles, step + 1)
            if on_step_end is not None:
                on_step_end(roles, step + 1)
            if out_of_time and step + 1 < g.steps:
                last = step + 1
                print(f"[grpo] grpo.max_minutes={g.max_minutes} reached after step {last} of {g.steps}: stopping for the final eval")
                break  # a rollout already submitted for the next step just finishes first (actor calls run in order)
    return last


def final_evals(roles: Roles, start_ckpt: TrainedCheckpoint | None, on_stage=None) -> dict:
    """Retrieval on held-out documents for the GRPO decoder (with controls) and, when GRPO started
    from a checkpoint, for the starting (warmup) decoder on the same pool, each under up to three
    encoders: the final one (co-trained on the GRPO decoder's own outputs, so it favours them), the
    starting checkpoint's encoder, frozen (it never saw GRPO output: the unbiased comparison,
    reported first), and with `eval.text_encoder_steps` a text encoder trained here on source text
    only (it never saw any description). Descriptions are written once per decoder (they do not
    depend on the encoder). `on_stage(name, **counts)`: called at the end of each part."""
    cfg, t = roles.cfg, roles.timeout
    stage = on_stage or (lambda name, **counts: None)
    out = {"retrieval": final_retrieval(roles)}
    stage("grpo/final_eval/final_encoder_grpo_decoder", items=out["retrieval"]["n"])
    frozen = start_ckpt is not None and "encoder" in start_ckpt.tensors
    text = cfg.eval.text_encoder_steps > 0
    if start_ckpt is None and not text:
        return out
    final_encoder, final_optim = remote_get(roles.encoder.state.remote(), t, "final encoder state")
    text_state = None
    if text:
        out["text_encoder"] = {"training": train_text_encoder(roles)}
        stage("grpo/final_eval/text_encoder_training", steps=out["text_encoder"]["training"]["steps"],
              pairs=out["text_encoder"]["training"]["pairs"])
        text_state, _ = remote_get(roles.encoder.state.remote(), t, "text encoder state")
        out["text_encoder"]["grpo_decoder"] = final_retrieval(roles, controls=())
        stage("grpo/final_eval/text_encoder_grpo_decoder")
    if frozen:
        remote_get(roles.encoder.load_state.remote(start_ckpt.tensors["encoder"]), t, "load the starting encoder (frozen)")
        grpo_frozen = final_retrieval(roles, controls=())
        stage("grpo/final_eval/frozen_encoder_grpo_decoder")
    if start_ckpt is not None:
        roles.sync(start_ckpt.tensors["decoder_adapter"], verify=False)  # the learner holds the GRPO adapter
        if frozen:
            warm_frozen = final_retrieval(roles, controls=())
            out["frozen_start_encoder"] = {"grpo_decoder": grpo_frozen, "warmup_decoder": warm_frozen,
                                           "grpo_minus_warmup": decoder_comparison(grpo_frozen, warm_frozen)}
            stage("grpo/final_eval/frozen_encoder_warmup_decoder")
        if text:
            remote_get(roles.encoder.load_state.remote(text_state), t, "load the text encoder")
            te = out["text_encoder"]
            te["warmup_decoder"] = final_retrieval(roles, controls=())
            te["grpo_minus_warmup"] = decoder_comparison(te["grpo_decoder"], te["warmup_decoder"])
            stage("grpo/final_eval/text_encoder_warmup_decoder")
    remote_get(roles.encoder.load_state.remote(final_encoder, final_optim), t, "restore the final encoder")
    if start_ckpt is not None:
        out["retrieval_warmup_decoder"] = final_retrieval(roles, controls=())
        out["grpo_minus_warmup"] = decoder_comparison(out["retrieval"], out["retrieval_warmup_decoder"])
        stage("grpo/final_eval/final_encoder_warmup_decoder")
    return out


def train_text_encoder(roles: Roles) -> dict:
    """The text encoder of the final evals: the encoder actor, reset, trained on (source window,
    activation) pairs of training documents (`eval.text_encoder_steps`)."""
    cfg = roles.cfg
    train_rows, _held = roles.store.split_by_document(cfg.split.heldout_fraction, cfg.seed)
    rows = random.Random(f"text-encoder:{cfg.seed}").sample(train_rows, min(len(train_rows), 50 * 32))
    texts = source_windows(roles.store, rows, roles.tokenizer, cfg.eval.text_encoder_window_tokens)
    report = remote_get(roles.encoder.train_text_encoder.remote(texts, roles.store.activations[rows], cfg.eval.text_encoder_steps,
                                                               seed=cfg.seed), cfg.ray.setup_timeout_s, "training the text encoder")
    print(f"[grpo] text encoder: {report['steps']} steps on {report['pairs']} source windows, loss "
          f"{report['loss_first']:.3f} -> {report['loss_last']:.3f}")
    return report


def decoder_comparison(grpo: dict, warm: dict) -> dict:
    """Per held-out item, GRPO decoder's score minus the warmup decoder's (same pool, same encoder):
    mean, 95% bootstrap interval and share of items where GRPO is better."""
    from cycle_oracle.stats import paired_difference

    a, b = grpo["per_item"]["description"], warm["per_item"]["description"]
    return {k: paired_difference(torch.tensor(a[k]), torch.tensor(b[k])) for k in ("cosine", "centred_cosine")}


def retrieval_summary(results: dict) -> dict:
    """The numbers to read first: GRPO vs warmup decoder under the frozen starting encoder (no
    co-training bias), then under the final encoder, then the pool and chance."""
    out = {}

    def conditions(label: str, r: dict | None) -> None:
        for cond, m in (r or {}).get("conditions", {}).items():
            out[f"{label}/{cond}"] = {k: round(float(m[k]), 4) for k in ("top1", "top5", "cosine", "centred_cosine", "fve") if k in m}

    def difference(label: str, diff: dict | None) -> None:
        for key, d in (diff or {}).items():
            out[f"{label}/{key}"] = {k: round(float(d[k]), 4) for k in ("mean", "ci_low", "ci_high", "share_a_better")}

    frozen = results.get("frozen_start_encoder")
    if frozen:
        conditions("frozen_encoder/grpo_decoder", frozen["grpo_decoder"])
        conditions("frozen_encoder/warmup_decoder", frozen["warmup_decoder"])
        difference("frozen_encoder/grpo_minus_warmup", frozen["grpo_minus_warmup"])
    text = results.get("text_encoder")
    if text:
        conditions("text_encoder/grpo_decoder", text.get("grpo_decoder"))
        conditions("text_encoder/warmup_decoder", text.get("warmup_decoder"))
        difference("text_encoder/grpo_minus_warmup", text.get("grpo_minus_warmup"))
    conditions("final_encoder/grpo_decoder", results.get("retrieval"))
    conditions("final_encoder/warmup_decoder", results.get("retrieval_warmup_decoder"))
    difference("final_encoder/grpo_minus_warmup", results.get("grpo_minus_warmup"))
    r = results.get("retrieval")
    if r:
        out["pool_size"] = r["n"]
        out["chance_top1"] = r["chance"]["top1"]
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
                              heldout_fraction=cfg.split.heldout_fraction, split_seed=cfg.seed,
                              rows_per_document=cfg.eval.rows_per_document, controls=controls)


def actor_oracle(roles: Roles):
    """An evals Oracle whose describe/encode calls go to the running actors."""
    from cycle_oracle.evals.oracle import Oracle

    max_new = roles.cfg.sampling.max_new_tokens

    def describe_chunk(chunk: torch.Tensor) -> list[str]:
        described = remote_get(roles.rollouts[0].sample.remote(chunk, [0] * len(chunk), 1, 0.0, 1.0, max_new), roles.timeout, "describe")
        if int(described.versions.min()) != roles.version:  # restarted idle with a fresh LoRA: re-sync, describe again
            roles.recover_rollouts()
            raise StaleRollout(f"describe got weight version {int(described.versions.min())}, expected {roles.version}")
        return described.texts

    def describe(vectors: torch.Tensor) -> list[str]:
        """Greedy descriptions by the served decoder, memoised per served version (the final evals
        describe the same pool under several encoders)."""
        key = (roles.version, hashlib.sha256(vectors.float().contiguous().numpy().tobytes()).hexdigest())
        if key not in roles.description_cache:
            out = []
            for i in range(0, len(vectors), 32):
                # a rollout actor restarted by Ray is re-synced to the served adapter before it describes
                out.extend(roles.with_recovery(lambda chunk=vectors[i : i + 32]: describe_chunk(chunk)))
            roles.description_cache[key] = out
        return list(roles.description_cache[key])

    def encode(texts: list[str]) -> torch.Tensor:
        safe = [x if x.strip() else "(empty)" for x in texts]
        v_hat, _ = remote_get(roles.encoder.reconstruct.remote(safe), roles.timeout, "encode")
        return v_hat

    tokenizer = load_tokenizer(roles.run.model_path)
    return Oracle(describe=describe, encode=encode, encode_with_weights=None, ask_yes_no=None, read=None,
                  detokenize=lambda ids: tokenizer.decode(ids))

