"""The encoder role: reconstruct activations from descriptions, score them (the cycle reward) and
co-train by regression. One trainer holds the encoder state and its optimizer.

Reward for sample j of activation v (`grpo.reward_space`):
    raw:      r_j = cos(v_hat_j, v)
    centred:  r_j = cos(v_hat_j - mu, v - mu)        (mu = corpus mean at the read layer)
The encoder learns the same objective the reward measures: with `reward_space: centred` its
regression loss compares v_hat - mu with v - mu, in raw space v_hat with v (`regression_targets`).
`score` leaves unusable (empty or penalised truncated) descriptions at NaN; the driver gives them
the penalty of `grpo.unusable_rewards`, which needs the whole group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cycle_oracle.batch import RolloutBatch
from cycle_oracle.devices import check_dtype, model_device, role_device, to_cpu
from cycle_oracle.encoder import (ActivationEncoder, centred_cosine, cosine, encoder_inputs, reconstruct_texts, reconstruction_loss,
                                  reconstruction_metrics)
from cycle_oracle.models import load_causal_lm, load_tokenizer


def cycle_rewards(v_hat: torch.Tensor, v: torch.Tensor, mean: torch.Tensor, space: str) -> torch.Tensor:
    """[N, d], [N, d] -> [N] cosine rewards in raw or centred space (see module docstring)."""
    if space == "raw":
        return cosine(v_hat, v)
    if space == "centred":
        return centred_cosine(v_hat, v, mean)
    raise ValueError(f"reward space {space!r}; expected 'raw' or 'centred'")


def regression_targets(v_hat: torch.Tensor, v: torch.Tensor, mean: torch.Tensor, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the encoder's loss compares, in the reward's space: (v_hat, v) raw, (v_hat - mu, v - mu) centred."""
    if space == "raw":
        return v_hat, v
    if space == "centred":
        return v_hat - mean, v - mean
    raise ValueError(f"reward space {space!r}; expected 'raw' or 'centred'")


def cpu_copy(obj):
    """A nested state (dicts, lists, tuples; e.g. an optimizer's `state_dict()`) with every tensor
    detached, copied and on the CPU: what may leave a role (the copy also cuts it loose from the
    live optimizer state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class EncoderTrainer:
    """The encoder, its own optimiser (`encoder.optim`) and the corpus mean mu."""

    def __init__(self, model_path: str, cfg, layer: int, mean: torch.Tensor):
        self.cfg = cfg
        device = role_device(cfg.resources.encoder.num_gpus)
        check_dtype(cfg.model.dtype, device, role="encoder")
        self.tokenizer = load_tokenizer(model_path)
        self.encoder = ActivationEncoder(load_causal_lm(model_path, cfg.model.dtype), layer, cfg.encoder.lora)
        self.encoder.to(device)
        self.mean = mean.float().cpu()  # rewards are computed on the CPU, from v_hat brought back
        opt = cfg.encoder.optim
        self.optimizer = torch.optim.AdamW(self.encoder.trainable_parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
        self.updates = 0
        self._initial = self.state()[0]  # the fresh encoder (LoRA B = 0, identity head): `train_text_encoder` starts here

    def _inputs(self, texts: Sequence[str]):
        """(ids, attention, pool mask) on the encoder's device."""
        e = self.cfg.encoder
        device = model_device(self.encoder)
        return tuple(t.to(device) for t in encoder_inputs(self.tokenizer, texts, e.prefix, e.max_description_tokens))

    def reconstruct(self, texts: Sequence[str], batch_size: int = 32) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """texts -> (v_hat [N, d], pooling weights per text over its description tokens), on the CPU;
        an empty text gets v_hat = 0 (`encoder.reconstruct_texts`, the rule every encoding follows)."""
        e = self.cfg.encoder
        v_hat, _ids, weights = reconstruct_texts(self.encoder, self.tokenizer, texts, e.prefix, e.max_description_tokens, batch_size)
        return v_hat, weights

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """Cycle rewards [N] for the batch's descriptions of its activations (NaN where not
        `batch.usable`: the driver assigns their penalty). Also the reconstruction metrics of the usable ones."""
        g = self.cfg.grpo
        vectors = batch.vectors.float()
        usable = batch.usable if batch.usable is not None else torch.ones(len(batch), dtype=torch.bool)
        rewards = torch.full((len(batch),), float("nan"))
        metrics = {}
        if usable.any():
            idx = usable.nonzero().squeeze(1)
            v_hat, _ = self.reconstruct([batch.texts[i] for i in idx.tolist()])
            rewards[idx] = cycle_rewards(v_hat, vectors[idx], self.mean, g.reward_space)
            metrics = reconstruction_metrics(v_hat, vectors[idx], self.mean)
        return rewards, metrics

    def _regression_step(self, texts: Sequence[str], vectors: torch.Tensor, batch_size: int = 16) -> tuple[float, torch.Tensor]:
        """One optimizer step of regression v_hat -> v over all (text, vector) pairs, in the reward's
        space (`regression_targets`) -> (mean loss, the v_hat of the forward before the step, detached, on the CPU)."""
        self.encoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        n = len(texts)
        outs = []
        for i in range(0, n, batch_size):
            ids, attn, pool = self._inputs(texts[i : i + batch_size])
            v_hat, _ = self.encoder(ids, attn, pool)
            outs.append(to_cpu(v_hat.detach().float()))
            target_v = vectors[i : i + batch_size].to(device=v_hat.device, dtype=torch.float32)
            pred, target = regression_targets(v_hat.float(), target_v, self.mean.to(v_hat.device), self.cfg.grpo.reward_space)
            loss = reconstruction_loss(self.cfg.encoder.loss, pred, target)
            (loss * len(ids) / n).backward()
            total += loss.item() * len(ids)
        torch.nn.utils.clip_grad_norm_(self.encoder.trainable_parameters(), self.cfg.encoder.optim.grad_clip)
        self.optimizer.step()
        self.updates += 1
        return total / n, torch.cat(outs)

    def train_step(self, texts: Sequence[str], vectors: torch.Tensor, batch_size: int = 16) -> dict:
        """One optimizer step of regression v_hat -> v over all (text, vector) pairs, in the reward's
        space (`regression_targets`)."""
        return {"encoder_loss": self._regression_step(texts, vectors, batch_size)[0]}

    def score_and_train(self, batch: RolloutBatch, anchor_texts: Sequence[str] = (), anchor_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, dict]:
        """`score(batch)`, then `train_step` on its usable descriptions (and the anchor pairs, e.g.
        source windows), with one encoder forward per description: the rewards come from the
        detached v_hat of the forward whose loss is then back-propagated, so they are the rewards of
        the encoder before this update, as `score` gives them. One function in train and eval mode
        needs a dropout-free encoder: with `encoder.lora.dropout` > 0 this is the two calls.
        -> (rewards [N] with NaN where unusable, reconstruction metrics, {"encoder_loss"})."""
        usable = batch.usable if batch.usable is not None else torch.ones(len(batch), dtype=torch.bool)
        idx = usable.nonzero().squeeze(1)
        texts = [batch.texts[i] for i in idx.tolist()] + list(anchor_texts)
        anchors = anchor_vectors if anchor_vectors is not None else batch.vectors[:0]
        vectors = torch.cat([batch.vectors[idx].float(), anchors.float()])
        if self.cfg.encoder.lora.dropout > 0 or not len(idx):
            rewards, metrics = self.score(batch)
            return rewards, metrics, self.train_step(texts, vectors) if texts else {}
        loss, v_hat = self._regression_step(texts, vectors)
        v_hat, v = v_hat[: len(idx)], batch.vectors[idx].float()
        rewards = torch.full((len(batch),), float("nan"))
        rewards[idx] = cycle_rewards(v_hat, v, self.mean, self.cfg.grpo.reward_space)
        return rewards, reconstruction_metrics(v_hat, v, self.mean), {"encoder_loss": loss}

    def train_text_encoder(self, texts: Sequence[str], vectors: torch.Tensor, steps: int, batch_size: int = 32, seed: int = 0) -> dict:
        """Replace the encoder by a text encoder: from the fresh encoder, with a fresh optimiser,
        `steps` regression steps on (source text, activation) pairs only, so it has never read a
        description of any decoder (an independent judge for the final evals). -> its last losses."""
        self.load_state(self._initial)
        opt = self.cfg.encoder.optim
        self.optimizer = torch.optim.AdamW(self.encoder.trainable_parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
        self.updates = 0
        g = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            idx = torch.randperm(len(texts), generator=g)[:batch_size].tolist()
            losses.append(self.train_step([texts[i] for i in idx], vectors[idx])["encoder_loss"])
        tail = losses[-max(1, steps // 10):]
        return {"steps": steps, "pairs": len(texts), "loss_first": losses[0] if losses else None, "loss_last": sum(tail) / len(tail) if tail else None}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(encoder tensors: LoRA + head, optimizer state) for checkpoints and scoring replicas, every
        tensor on the CPU and a copy: on a GPU role the AdamW moments live on its GPU, and a GPU tensor
        that leaves the actor is unpickled onto the receiver's GPU 0 (or fails where it has no CUDA).
        `load_state` puts them back on the encoder's device."""
        tensors = {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items() if "lora_" in k or k.startswith(("scorer", "projection"))}
        return tensors, {"optimizer": cpu_copy(self.optimizer.state_dict()), "updates": self.updates}

    def load_state(self, tensors: dict[str, torch.Tensor], optim: dict | None = None) -> None:
        missing = set(tensors) - set(self.encoder.state_dict())
        if missing:
            raise ValueError(f"encoder state has unknown keys {sorted(missing)[:3]}")
        self.encoder.load_state_dict(tensors, strict=False)
        if optim is not None:
            self.optimizer.load_state_dict(optim["optimizer"])
            self.updates = int(optim["updates"])
