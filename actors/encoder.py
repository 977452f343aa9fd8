"""EncoderActor: `cycle_oracle.encoder_trainer.EncoderTrainer` as a Ray actor (its methods —
`score`, `train_step`, `reconstruct`, `state`, `load_state` — are the actor's methods)."""

from __future__ import annotations

import ray
import torch

from cycle_oracle.encoder_trainer import EncoderTrainer


@ray.remote
class EncoderActor(EncoderTrainer):
    def __init__(self, model_path: str, config: dict, layer: int, mean: torch.Tensor, log_file: str | None = None):
        from actors.logs import send_output_to
        from cycle_oracle.config import RecipeConfig

        send_output_to(log_file)
        cfg = RecipeConfig.model_validate(config)
        torch.set_num_threads(cfg.resources.encoder.threads)
        torch.manual_seed(cfg.seed)
        super().__init__(model_path, cfg, layer, mean)

