"""The rollout fleet: `RolloutActor` (a vLLM engine, cycle_oracle.rollout.RolloutEngine, behind Ray,
and the CPU side of the policy it serves, cycle_oracle.rollout.RolloutPolicy) and `RolloutGroup`,
the driver's handle of the N rollout actors (the twin of `actors/learner.LearnerGroup`).

The group shards a request's activations over the actors (actor i takes i, i+N, ...), puts the
parts back in order, tags the served weight version, and recovers on its own: an actor that died
is restarted by Ray (`max_restarts`) and re-synced before the same request is sent again; one that
Ray restarted while idle serves a fresh LoRA (version 0) without any error, so a batch of any
version but the one served (when the request was made, or now) is re-synced and sampled again.
The engine returns texts, token ids and log-probs only: the caller holds the activations and
attaches them (`RolloutBatch.with_vectors`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray
import torch

from actors.logs import send_output_to
from actors.placement import Placement, remote_get
from cycle_oracle.batch import RolloutBatch, regroup
from cycle_oracle.config import RecipeConfig
from cycle_oracle.devices import check_dtype, role_device
from cycle_oracle.metrics import PhaseTimer
from cycle_oracle.models import resolve_model_path
from cycle_oracle.rollout import RolloutEngine, RolloutPolicy, Sampling, SamplingRequest, configure_cpu_environment
from cycle_oracle.weight_sync import PROBE_SEED, SYNC_PROBE, SYNC_TOLERANCE, SyncCheck, policy_changed

ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
"""What a call to a dead (or restarting) actor raises."""
DESCRIBE_CHUNK = 32
"""Activations per describe call (a greedy describe of a whole pool goes in chunks of this many)."""


class StaleRollout(RuntimeError):
    """Samples came from a weight version the driver did not serve (an actor restarted with a fresh LoRA)."""


@ray.remote
class RolloutActor:
    def __init__(self, model: str, config: dict, layer: int, injection_norm: float, actor_index: int = 0,
                 log_file: str | None = None):
        """`model`: the recipe's model spec (`models.model_spec`), resolved here, on this actor's node."""
        send_output_to(log_file)
        model_path = str(resolve_model_path(model))
        self.cfg = RecipeConfig.model_validate(config)
        ro = self.cfg.rollout
        threads = self.cfg.resources.rollout.threads
        torch.set_num_threads(threads)
        configure_cpu_environment(threads, ro.thread_binding, ro.kv_cache_gb)
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        check_dtype(self.cfg.model.dtype, role_device(self.cfg.resources.rollout.num_gpus), engine="vllm", role="rollout")
        self.version = 0
        self.policy = RolloutPolicy(model_path, self.cfg, layer, injection_norm, tempfile.mkdtemp(prefix="cycle-oracle-adapter-"))
        self.tokenizer = self.policy.tokenizer
        self.engine = RolloutEngine(model_path, seed=self.cfg.seed + actor_index, max_model_len=ro.max_model_len,
                                    max_num_seqs=ro.max_num_seqs, prefix_caching=ro.prefix_caching,
                                    enable_lora=ro.weight_sync == "adapter", max_lora_rank=self.cfg.decoder_lora.r, dtype=self.cfg.model.dtype)

    def info(self) -> dict:
        return {"pid": os.getpid(), "version": self.version, "node": ray.get_runtime_context().get_node_id()}

    def rollout(self, vectors: torch.Tensor, seeds: Sequence[int], sampling: Sampling) -> RolloutBatch:
        """[B, d] activations (seed b for activation b) -> B x n descriptions, tagged with the served
        weight version; the batch carries no activations (the caller holds them)."""
        embeds = self.policy.prompt_embeds(vectors)
        requests = [SamplingRequest(embeds[i], seed) for i, seed in enumerate(seeds)]
        return self.engine.generate(requests, sampling, stop_token_ids=[self.tokenizer.eos_token_id], version=self.version)

    def serve(self, adapter: dict[str, torch.Tensor], version: int) -> int:
        """Serve the policy with this LoRA adapter state as weight version `version`."""
        self.policy.update_engine(adapter, self.engine)
        self.version = version
        return version


@dataclass
class PendingRollout:
    """A rollout in flight: what was asked (to ask again after a recovery) and its per-actor calls."""

    vectors: torch.Tensor
    seeds: list[int]
    sampling: Sampling
    served: int
    """The weight version served when it was asked."""
    refs: list | None
    """One call per actor that got activations (None: to be sent again)."""
    parts: list[list[int]]
    """The activation indices each actor took."""


class RolloutGroup:
    """The driver's handle of the rollout actors: `sample` (or `submit` + `collect`), `describe`,
    `sync`, with recovery inside (module docstring)."""

    def __init__(self, model_spec: str, cfg: RecipeConfig, layer: int, injection_norm: float, placement: Placement,
                 log_file: Callable[[str], str | None] = lambda name: None, actor_name: Callable[[int], str] | None = None,
                 max_restarts: int = 0, probe: torch.Tensor | None = None):
        """`log_file(name)`: where actor `name` writes its output; `actor_name(i)`: actor i's Ray name
        (None: unnamed); `max_restarts`: how often Ray restarts a dead actor (the group then re-syncs
        it); `probe`: activations [P, d] of the weight-sync check (`weight_sync.SYNC_PROBE`; None: no check)."""
        self.cfg = cfg
        self.timeout = cfg.ray.get_timeout_s
        config = cfg.model_dump(mode="json")
        self.actors = [
            RolloutActor.options(**placement.options("rollout", i, max_restarts=max_restarts, max_task_retries=0,
                                                     **({"name": actor_name(i)} if actor_name else {})))
            .remote(model_spec, config, layer, injection_norm, i, log_file(f"rollout-{i}"))
            for i in range(cfg.resources.rollout.num_actors)
        ]
        self.version = 0
        self.adapter: dict | None = None
        """The adapter served now (None: the engines' own weights)."""
        self._adapter_ref = None
        self.probe = probe
        self.sync_check = SyncCheck(SYNC_TOLERANCE[cfg.model.dtype] | (cfg.grpo.sync_tolerance or {}))
        self.syncs = 0  # syncs by this group (the first is always verified, then every grpo.sync_check_every-th)
        self._last_probe = None  # (token ids, log-probs) of the last verified sync

    # ---- sampling ------------------------------------------------------------------------------
    def submit(self, vectors: torch.Tensor, seeds: Sequence[int], sampling: Sampling) -> PendingRollout:
        """Send activations [B, d] (seed b for activation b) to the actors without waiting."""
        pending = PendingRollout(vectors, list(seeds), sampling, self.version, None, [])
        self._send(pending)
        return pending

    def _send(self, pending: PendingRollout) -> None:
        n = len(self.actors)
        pending.parts = [list(range(i, len(pending.seeds), n)) for i in range(n)]
        pending.refs = [a.rollout.remote(pending.vectors[idx], [pending.seeds[j] for j in idx], pending.sampling) if idx else None
                        for a, idx in zip(self.actors, pending.parts)]

    def collect(self, pending: PendingRollout, what: str = "rollout") -> RolloutBatch:
        """Wait for a submitted rollout -> one batch in the order of its activations (no vectors).
        Only samples of the version served when it was submitted (or now) are accepted; after a death
        or a stale version the actors are recovered and the same request (same seeds and weights) is
        sent again, so a retried step is the step that would have run."""

        def collect_once() -> RolloutBatch:
            if pending.refs is None:  # sent again after a recovery: the served version is the one it will get
                pending.served = self.version
                self._send(pending)
            try:
                got = [(remote_get(ref, self.timeout, what), idx) for ref, idx in zip(pending.refs, pending.parts) if ref is not None]
            except ACTOR_GONE:
                pending.refs = None
                raise
            batch = regroup([b for b, _ in got], [idx for _, idx in got])
            stale = set(batch.versions.tolist()) - {pending.served, self.version}
            if stale:
                pending.refs = None
                self.recover()
                raise StaleRollout(f"{what} got samples of weight version(s) {sorted(stale)}, expected {pending.served}")
            return batch

        return self._with_recovery(collect_once)

    def sample(self, vectors: torch.Tensor, seeds: Sequence[int], sampling: Sampling, what: str = "rollout") -> RolloutBatch:
        """`collect(submit(...))`: activations [B, d] -> a batch of B x sampling.n descriptions (no vectors)."""
        return self.collect(self.submit(vectors, seeds, sampling), what)

    def describe(self, vectors: torch.Tensor) -> list[str]:
        """Greedy descriptions (`sampling.max_new_tokens`) of activations [N, d] by the decoder served
        now, in chunks of `DESCRIBE_CHUNK`."""
        greedy = Sampling.greedy(self.cfg.sampling.max_new_tokens)
        texts: list[str] = []
        for i in range(0, len(vectors), DESCRIBE_CHUNK):
            chunk = vectors[i : i + DESCRIBE_CHUNK]
            texts.extend(self.sample(chunk, [0] * len(chunk), greedy, "describe").texts)
        return texts

    def describer(self, adapter: dict[str, torch.Tensor] | None = None) -> Callable[[torch.Tensor], list[str]]:
        """An oracle's describe (evals/final.py) by the decoder with `adapter` (None: the one served
        now), served when it is called (a sync without verification: the learner may hold another),
        memoised per activation batch (the final evals describe one pool under several graders)."""
        adapter = self.adapter if adapter is None else adapter
        cache: dict[str, list[str]] = {}

        def describe(vectors: torch.Tensor) -> list[str]:
            key = hashlib.sha256(vectors.float().contiguous().numpy().tobytes()).hexdigest()
            if key not in cache:
                if self.adapter is not adapter:
                    self.sync(adapter)
                cache[key] = self.describe(vectors)
            return list(cache[key])

        return describe

    # ---- weights -------------------------------------------------------------------------------
    def sync(self, adapter: dict[str, torch.Tensor], verify: Callable[[RolloutBatch], dict] | None = None,
             timer: PhaseTimer | None = None) -> dict:
        """Serve `adapter` on every actor as a new weight version. With `verify` (the learner's
        `sync_error`: probe batch -> {mean, p99, max, tokens}) and `grpo.sync_check`, the first sync and
        then every `grpo.sync_check_every`-th is checked (`check`). Times the phases `sync` and
        `sync_check` into `timer` -> {weight_version, and the check's metrics when it ran}."""
        timer = timer or PhaseTimer()
        with timer.phase("sync"):
            self.version += 1
            self.adapter = adapter
            self._adapter_ref = ray.put(adapter)
            try:
                remote_get([a.serve.remote(self._adapter_ref, self.version) for a in self.actors], self.timeout, f"weight sync v{self.version}")
            except ACTOR_GONE as err:
                print(f"[rollout] a rollout actor died during sync v{self.version} ({type(err).__name__}); recovering")
                self.recover()
        out = {"weight_version": self.version}
        self.syncs += 1
        g = self.cfg.grpo
        if verify is not None and g.sync_check and (self.syncs - 1) % g.sync_check_every == 0:
            with timer.phase("sync_check"):
                out.update(self._with_recovery(lambda: self.check(verify)))
        return out

    def check(self, verify: Callable[[RolloutBatch], dict]) -> dict:
        """The weight-sync check (`weight_sync.SyncCheck`): every actor samples the probe; the served
        log-probs must equal the learner's (`verify`) within the check's bounds (the worst actor
        counts). Also logs whether the served log-probs moved since the previous check (`sync_policy_changed`)."""
        if self.probe is None:
            raise ValueError("this rollout group has no probe activations: it cannot check a sync")
        vectors = self.probe[: SYNC_PROBE["activations"]]
        seeds = [PROBE_SEED + i for i in range(len(vectors))]
        sampling = Sampling(n=1, temperature=self.cfg.sampling.temperature, top_p=1.0, max_new_tokens=SYNC_PROBE["tokens"])
        worst: dict[str, float] = {}
        for actor in self.actors:
            probe = remote_get(actor.rollout.remote(vectors, seeds, sampling), self.timeout, "sync probe").with_vectors(vectors)
            if set(probe.versions.tolist()) != {self.version}:  # restarted while idle: re-sync, probe again
                self.recover()
                raise StaleRollout(f"rollout actor serves weight version(s) {sorted(set(probe.versions.tolist()))}, expected {self.version}")
            error = verify(probe)
            worst = {k: max(worst.get(k, 0.0), error[k]) for k in error}
        calibration = self.sync_check.judge(worst, f"weight sync v{self.version} ({self.cfg.model.dtype})")
        changed = policy_changed(self._last_probe, probe.token_ids, probe.sampler_logprobs)
        self._last_probe = (probe.token_ids, probe.sampler_logprobs)
        return {"sync_logprob_error": worst["max"], "sync_logprob_error_mean": worst["mean"], "sync_logprob_error_p99": worst["p99"],
                "sync_policy_changed": changed, **calibration}

    # ---- recovery ------------------------------------------------------------------------------
    def _with_recovery(self, fn, retries: int = 2):
        """fn(); if an actor died (or served a version the driver did not serve), recover and run fn() again."""
        for attempt in range(retries + 1):
            try:
                return fn()
            except StaleRollout as err:
                if attempt == retries:
                    raise
                print(f"[rollout] {err}: re-synced, sampling again")
            except ACTOR_GONE as err:
                if attempt == retries:
                    raise
                print(f"[rollout] a rollout actor died ({type(err).__name__}); waiting for Ray to restart it")
                self.recover()

    def recover(self) -> None:
        """Wait for restarted actors and re-sync them to the served version before they serve (a call
        that meets an actor mid-restart is retried until `ray.get_timeout_s`)."""
        deadline = time.time() + self.timeout
        for actor in self.actors:
            while True:
                try:
                    info = remote_get(actor.info.remote(), max(1.0, deadline - time.time()), "restarted rollout actor")
                    if info["version"] != self.version:
                        remote_get(actor.serve.remote(self._adapter_ref, self.version), self.timeout, "re-sync after restart")
                    break
                except ACTOR_GONE:
                    if time.time() > deadline:
                        raise
                    time.sleep(2)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
