"""EncoderActor: `cycle_oracle.encoder_trainer.EncoderTrainer` as a Ray actor (its methods —
`score`, `score_and_train`, `train_step`, `reconstruct`, `train_text_encoder`, `state`,
`load_state` — are the actor's methods); `start_encoder`, the one place recipes start it; and
`EncoderGraders`, the graders of the final evals (evals/final.py) backed by that one actor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ray
import torch

from actors.logs import send_output_to
from actors.placement import Placement, remote_get
from cycle_oracle.config import RecipeConfig
from cycle_oracle.encoder_trainer import EncoderTrainer
from cycle_oracle.models import resolve_model_path


@ray.remote
class EncoderActor(EncoderTrainer):
    def __init__(self, model: str, config: dict, layer: int, mean: torch.Tensor, log_file: str | None = None):
        """`model`: the recipe's model spec (`models.model_spec`), resolved here, on this actor's node."""
        send_output_to(log_file)
        cfg = RecipeConfig.model_validate(config)
        torch.set_num_threads(cfg.resources.encoder.threads)
        torch.manual_seed(cfg.seed)
        super().__init__(str(resolve_model_path(model)), cfg, layer, mean)


def start_encoder(model_spec: str, cfg: RecipeConfig, layer: int, mean: torch.Tensor, placement: Placement, log_file: str | None = None):
    """The encoder actor of a run, in the placement group's encoder bundle; `mean` [d]: the corpus mean."""
    return EncoderActor.options(**placement.options("encoder", 0)).remote(model_spec, cfg.model_dump(mode="json"), layer, mean, log_file)


class EncoderGraders:
    """Graders (N descriptions -> v_hat [N, d], evals/final.py) that share one encoder actor: each is
    an encoder state, loaded into the actor when its grader encodes and another one is loaded."""

    def __init__(self, actor, timeout_s: float):
        self.actor, self.timeout = actor, timeout_s
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.loaded: str | None = None

    def add(self, name: str, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Grader `name` encodes with the encoder tensors `tensors` (None: the state the actor holds now)."""
        if tensors is None:
            tensors, _optim = remote_get(self.actor.state.remote(), self.timeout, f"the {name} state")
            self.loaded = name
        self.states[name] = tensors

    def train_text_encoder(self, name: str, texts: Sequence[str], vectors: torch.Tensor, steps: int, seed: int, timeout_s: float) -> dict:
        """Grader `name`: the actor's encoder reset to its fresh state and trained on (source text,
        activation) pairs only (`EncoderTrainer.train_text_encoder`) -> the training report."""
        report = remote_get(self.actor.train_text_encoder.remote(list(texts), vectors, steps, seed=seed), timeout_s, f"training the {name}")
        self.add(name)
        return report

    def grader(self, name: str) -> Callable[[Sequence[str]], torch.Tensor]:
        def encode(texts: Sequence[str]) -> torch.Tensor:
            if self.loaded != name:
                remote_get(self.actor.load_state.remote(self.states[name]), self.timeout, f"load the {name}")
                self.loaded = name
            v_hat, _weights = remote_get(self.actor.reconstruct.remote(list(texts)), self.timeout, f"encode ({name})")
            return v_hat

        return encode

    def graders(self) -> dict[str, Callable[[Sequence[str]], torch.Tensor]]:
        """Every grader, in the order they were added."""
        return {name: self.grader(name) for name in self.states}
