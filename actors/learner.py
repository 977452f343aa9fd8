"""LearnerGroup: N DeepSpeed ranks (one Ray actor each) training the decoder LoRA data-parallel.

`LearnerActor` is `cycle_oracle.learner.DecoderLearner` as a Ray actor (the library class's
methods are the actor's methods: `sft_micro_step`, `update_shard`, `sequence_kl`, ...); `LearnerGroup`
is the driver's handle: it shards a batch across ranks, gathers results back into sample order,
combines the ranks' `UpdateStats` and waits with a timeout.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch
import torch.distributed as dist

from actors.logs import send_output_to
from actors.placement import Placement, free_port, remote_get
from cycle_oracle.batch import RolloutBatch, gather_in_order, shard_indices
from cycle_oracle.config import RecipeConfig
from cycle_oracle.learner import DecoderLearner, UpdateStats, init_distributed
from cycle_oracle.models import resolve_model_path


@ray.remote
class LearnerActor(DecoderLearner):
    """One data-parallel rank: joins the process group, then builds the DeepSpeed learner."""

    def __init__(self, model_path: str, config: dict, layer: int, injection_norm: float, total_steps: int, stage: str,
                 rank: int, world_size: int, master_addr: str, master_port: int, reference_adapter: dict | None = None,
                 log_file: str | None = None):
        send_output_to(log_file)
        cfg = RecipeConfig.model_validate(config)
        torch.set_num_threads(cfg.resources.learner.threads)
        torch.manual_seed(cfg.seed)
        model_path = str(resolve_model_path(model_path))  # on this node; before the process group (transformers saves on rank 0 only)
        init_distributed(rank, world_size, master_addr, master_port)
        self.rank = rank
        super().__init__(model_path, cfg, layer, injection_norm, total_steps, stage, reference_adapter)

    def ready(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@ray.remote(num_cpus=0)
def _node_address_and_port() -> tuple[str, int]:
    """(IP of this node, a port free on it): where learner rank 0 will listen."""
    return ray.util.get_node_ip_address(), free_port()


class LearnerGroup:
    """Driver-side handle of the N learner ranks."""

    def __init__(self, model_path: str, cfg, layer: int, injection_norm: float, total_steps: int, stage: str,
                 placement: Placement, reference_adapter: dict | None = None, log_dir: str | None = None):
        self.timeout = cfg.ray.get_timeout_s
        self.norm = injection_norm
        n = cfg.resources.learner.num_actors
        # the rendezvous lives on rank 0's node (not the driver's): ask that bundle for its address and a free port
        addr, port = remote_get(_node_address_and_port.options(**placement.options("learner", 0)).remote(), self.timeout,
                                "learner rank 0's node address")
        config = cfg.model_dump(mode="json")
        self.actors = [
            LearnerActor.options(**placement.options("learner", r)).remote(
                model_path, config, layer, injection_norm, total_steps, stage, r, n, addr, port, reference_adapter,
                f"{log_dir}/learner-{r}.log" if log_dir else None)
            for r in range(n)
        ]
        remote_get([a.ready.remote() for a in self.actors], self.timeout,
                   f"{n} DeepSpeed learner(s) to start (process group rendezvous at rank 0's {addr}:{port})")

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def _all(self, refs, what: str):
        return remote_get(refs, self.timeout, what)

    # ---- warmup ---------------------------------------------------------------------------
    def sft_micro_step(self, examples: Sequence) -> list[dict]:
        """One micro-batch split across ranks (rank r takes examples r, r+N, ...) -> per-rank metrics."""
        parts = shard_indices(len(examples), self.world_size)
        return self._all([a.sft_micro_step.remote([examples[i] for i in idx]) for a, idx in zip(self.actors, parts)],
                         "warmup micro-step")

    def answer_scores(self, examples: Sequence, vector_override: str | None = None) -> dict[str, list[float]]:
        """Held-out scoring on rank 0 (no gradient, no collective)."""
        return self._all(self.actors[0].answer_scores.remote(list(examples), vector_override), "held-out answer scores")

    def set_read_offset(self, task: str, contexts: list, positions: list) -> dict:
        """Every rank centres `task`'s activations by the same offset; rank 0's report."""
        return self._all([a.set_read_offset.remote(task, contexts, positions) for a in self.actors],
                         "centring the LatentQA activations")[0]

    # ---- GRPO -------------------------------------------------------------------------------
    def update(self, batch: RolloutBatch, sft_examples: Sequence = ()) -> UpdateStats:
        """One GRPO update on the whole batch, sharded by sample (and the supervised-mixing
        examples, if any, by example) -> the step's `UpdateStats` (`UpdateStats.combined` over the ranks)."""
        parts = shard_indices(len(batch), self.world_size)
        sft = shard_indices(len(sft_examples), self.world_size)
        return UpdateStats.combined(self._all([a.update_shard.remote(batch.select(idx), [sft_examples[i] for i in sft_idx])
                                               for a, idx, sft_idx in zip(self.actors, parts, sft)], "GRPO update"))

    def sequence_kl(self, batch: RolloutBatch) -> torch.Tensor:
        """[N] sum_t (log pi - log pi_ref) per sample, in the batch's sample order."""
        parts = shard_indices(len(batch), self.world_size)
        kl = self._all([a.sequence_kl.remote(batch.select(idx)) for a, idx in zip(self.actors, parts)], "sequence KL")
        return gather_in_order(kl, parts, len(batch))

    def sync_error(self, probe: RolloutBatch) -> dict[str, float]:
        """Rank 0's |log pi_learner - log pi_sampler| over the probe's tokens: mean, p99, max, tokens."""
        return self._all(self.actors[0].sync_error.remote(probe), "sync verification")

    # ---- weights and state ------------------------------------------------------------------
    def adapter(self) -> dict[str, torch.Tensor]:
        """The decoder's LoRA adapter (identical on every rank; read from rank 0)."""
        return self._all(self.actors[0].adapter.remote(), "learner adapter")

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        ref = ray.put(state)
        self._all([a.load_adapter.remote(ref) for a in self.actors], "load adapter")

    def checkpoint_files(self) -> dict[str, bytes]:
        """Every rank's DeepSpeed checkpoint files in one folder `learner/` (rank 0 writes the module
        states, each rank its own optimizer partition), for the driver to store."""
        files: dict[str, bytes] = {}
        for r, rank_files in enumerate(self._all([a.save_state.remote() for a in self.actors], "learner checkpoint")):
            for name, data in rank_files.items():
                key = f"learner/{name}"
                if key in files and files[key] != data:
                    raise RuntimeError(f"learner ranks disagree on checkpoint file {name} (rank {r})")
                files[key] = data
        return files

    def restore(self, files: dict[str, bytes], world_size_in_checkpoint: int) -> None:
        """Load a checkpoint written by `checkpoint_files` into every rank (same rank count only)."""
        if world_size_in_checkpoint != self.world_size:
            raise RuntimeError(
                f"the checkpoint was written by {world_size_in_checkpoint} learner rank(s) but this run has {self.world_size}: "
                f"DeepSpeed's partitioned optimizer state is not re-split here; resume with resources.learner.num_actors={world_size_in_checkpoint}"
            )
        self._all([a.load_state.remote(files) for a in self.actors], "learner resume")

    def shutdown(self) -> None:
        """Stop every rank (again: nothing; GRPO's final evals stop them early to free their bundle)."""
        actors, self.actors = self.actors, []
        try:
            remote_get([a.shutdown.remote() for a in actors], 60, "learner shutdown")
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
