"""LearnerGroup: N DeepSpeed ranks (one Ray actor each) training the decoder LoRA data-parallel."""

from __future__ import annotations

import ray
import torch

from actors.cluster import free_port, remote_get


@ray.remote
class LearnerActor:
    def __init__(self, model_path: str, config: dict, layer: int, injection_norm: float, total_steps: int,
                 rank: int, world_size: int, master_addr: str, master_port: int, grad_accum: int | None = None,
                 reference_adapter: dict | None = None):
        from cycle_oracle.config import RecipeConfig
        from cycle_oracle.learner import DecoderLearner, init_distributed

        cfg = RecipeConfig.model_validate(config)
        torch.set_num_threads(cfg.learner.threads)
        torch.manual_seed(cfg.seed)
        init_distributed(rank, world_size, master_addr, master_port)
        self.rank = rank
        self.learner = DecoderLearner(model_path, cfg, layer, injection_norm, total_steps, grad_accum, reference_adapter)

    def ready(self) -> int:
        return self.rank

    def call(self, method: str, *args, **kwargs):
        return getattr(self.learner, method)(*args, **kwargs)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerGroup:
    """Driver-side handle: splits work across ranks and waits with a timeout."""

    def __init__(self, model_path: str, cfg, layer: int, injection_norm: float, total_steps: int,
                 actor_options: list[dict], grad_accum: int | None = None, reference_adapter=None):
        self.timeout = cfg.ray.get_timeout_s
        self.norm = injection_norm
        n = cfg.learner.num_actors
        addr = ray.util.get_node_ip_address()
        port = free_port()
        config = cfg.model_dump(mode="json")
        self.actors = [
            LearnerActor.options(**actor_options[r]).remote(model_path, config, layer, injection_norm, total_steps, r, n, addr, port, grad_accum, reference_adapter)
            for r in range(n)
        ]
        remote_get([a.ready.remote() for a in self.actors], self.timeout, f"{n} DeepSpeed learner(s) to start")

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def on_all(self, method: str, per_rank_args: list[tuple] | None = None, what: str | None = None):
        args = per_rank_args or [()] * self.world_size
        refs = [a.call.remote(method, *args[r]) for r, a in enumerate(self.actors)]
        return remote_get(refs, self.timeout, what or f"learner.{method}")

    def on_rank0(self, method: str, *args):
        return remote_get(self.actors[0].call.remote(method, *args), self.timeout, f"learner.{method}")

    def shard(self, items: list) -> list[tuple]:
        """Split a batch across ranks (rank r takes items r, r+N, ...)."""
        return [(items[r :: self.world_size],) for r in range(self.world_size)]

    def checkpoint_files(self) -> dict[str, bytes]:
        """Every rank's DeepSpeed checkpoint files in one folder `learner/` (rank 0 writes the module
        states, each rank its own optimizer partition), for the driver to store."""
        files: dict[str, bytes] = {}
        for r, rank_files in enumerate(self.on_all("save_state", what="learner checkpoint")):
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
                f"DeepSpeed's partitioned optimizer state is not re-split here; resume with learner.num_actors={world_size_in_checkpoint}"
            )
        self.on_all("load_state", [(files,)] * self.world_size, "learner resume")

    def shutdown(self) -> None:
        try:
            remote_get([a.shutdown.remote() for a in self.actors], 60, "learner shutdown")
        finally:
            for a in self.actors:
                ray.kill(a)
