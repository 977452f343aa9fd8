"""EncoderActor: holds the encoder, its optimizer and the corpus mean; scores and co-trains."""

from __future__ import annotations

import ray
import torch


@ray.remote
class EncoderActor:
    def __init__(self, model_path: str, config: dict, layer: int, mean: torch.Tensor):
        from cycle_oracle.config import RecipeConfig
        from cycle_oracle.encoder_trainer import EncoderTrainer

        cfg = RecipeConfig.model_validate(config)
        torch.set_num_threads(cfg.encoder_role.threads)
        torch.manual_seed(cfg.seed)
        self.trainer = EncoderTrainer(model_path, cfg, layer, mean)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.trainer, method)(*args, **kwargs)
