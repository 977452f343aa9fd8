"""EncoderActor: `cycle_oracle.encoder_trainer.EncoderTrainer` as a Ray actor (its methods —
`score`, `train_step`, `reconstruct`, `state`, `load_state` — are the actor's methods)."""

from __future__ import annotations

import ray
import torch

from cycle_oracle.encoder_trainer import EncoderTrainer


@ray.remote
class EncoderActor(EncoderTrainer):
    def __init__(self, model: str, config: dict, layer: int, mean: torch.Tensor, log_file: str | None = None):
        """`model`: the recipe's model spec (`models.model_spec`), resolved here, on this actor's node."""
        from actors.logs import send_output_to
        from cycle_oracle.config import RecipeConfig
        from cycle_oracle.models import resolve_model_path

        send_output_to(log_file)
        cfg = RecipeConfig.model_validate(config)
        torch.set_num_threads(cfg.resources.encoder.threads)
        torch.manual_seed(cfg.seed)
        super().__init__(str(resolve_model_path(model)), cfg, layer, mean)

