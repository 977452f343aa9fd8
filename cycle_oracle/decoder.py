"""The decoder side on HF: sequences of (prompt with injected activation, completion) and the
log-probabilities of their completion tokens. Used by the warmup (SFT loss on answer tokens), the
GRPO learner (policy / old / reference log-probs), weight-sync checks and the evals.

Only completion positions go through the LM head (vocabularies are large; prompts are long).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cycle_oracle.activations import pad_right
from cycle_oracle.grpo import token_logprobs
from cycle_oracle.injection import DecoderPrompt, inject


@dataclass
class DecoderBatch:
    """Prompt + completion sequences, right-padded.

    input_ids [N, T]; attention_mask [N, T]; placeholder_positions [N, P];
    target_mask [N, T]: 1 where token t is a completion token (its logit comes from position t-1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    placeholder_positions: torch.Tensor
    target_mask: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())

    def to(self, device: torch.device | str) -> "DecoderBatch":
        return DecoderBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.placeholder_positions, self.target_mask)))

    def targets(self) -> torch.Tensor:
        """The completion tokens [num_targets], row-major (what `completion_logits` predicts)."""
        return self.input_ids[:, 1:][self.target_mask[:, 1:].bool()]


def build_batch(prompts: Sequence[DecoderPrompt], completions: Sequence[Sequence[int]], pad_id: int) -> DecoderBatch:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    seqs = [list(p.input_ids) + list(c) for p, c in zip(prompts, completions)]
    ids, attn = pad_right(seqs, pad_id)
    target = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        target[i, len(p.input_ids) : len(p.input_ids) + len(c)] = 1
    pos = torch.tensor([list(p.placeholder_positions) for p in prompts], dtype=torch.long)
    return DecoderBatch(ids, attn, pos, target)


def _causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Embedding]:
    """(inner transformer, lm_head, input embedding) of a HF causal LM, through PEFT/DeepSpeed wrappers."""
    lm = model
    while hasattr(lm, "module") and not hasattr(lm, "lm_head"):  # DeepSpeedEngine
        lm = lm.module
    if hasattr(lm, "get_base_model"):  # PeftModel: LoRA layers are injected in place
        lm = lm.get_base_model()
    return lm.model, lm.lm_head, lm.get_input_embeddings()


def completion_logits(
    model: nn.Module,
    batch: DecoderBatch,
    vectors: torch.Tensor,
    norm: float,
    mode: str = "replace",
) -> torch.Tensor:
    """Logits that predict each completion token: [num_targets, V] in row-major order of target_mask,
    float32, on the model's device (the batch and vectors are moved there)."""
    inner, lm_head, embedding = _causal_lm_parts(model)
    device = embedding.weight.device
    batch = batch.to(device)
    vectors = vectors.to(device=device, dtype=embedding.weight.dtype)
    with torch.no_grad():
        embeds = embedding(batch.input_ids)
    embeds = inject(embeds, batch.placeholder_positions, vectors, norm, mode)
    hidden = inner(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    # token t is predicted from position t-1
    predict_from = batch.target_mask[:, 1:].bool()
    h = hidden[:, :-1][predict_from]
    return lm_head(h).float()


def completion_logprobs(
    model: nn.Module,
    batch: DecoderBatch,
    vectors: torch.Tensor,
    norm: float,
    temperature: float = 1.0,
    mode: str = "replace",
) -> torch.Tensor:
    """log pi(token) for every completion token, after temperature: padded [N, Tc] (0 beyond each
    completion's length; `completion_mask(batch)` marks the valid entries)."""
    logits = completion_logits(model, batch, vectors, norm, mode)
    flat = token_logprobs(logits[None], batch.targets().to(logits.device)[None], temperature)[0]
    return unflatten(flat, batch)


def completion_mask(batch: DecoderBatch) -> torch.Tensor:
    """[N, Tc] 1 for valid completion tokens (on the batch's device)."""
    lengths = batch.target_mask.sum(1)
    width = int(lengths.max()) if len(lengths) else 0
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).float()


def unflatten(flat: torch.Tensor, batch: DecoderBatch) -> torch.Tensor:
    """[num_targets] in row-major order -> [N, Tc] padded with zeros (on `flat`'s device)."""
    mask = completion_mask(batch).bool().to(flat.device)
    out = flat.new_zeros(mask.shape)
    out[mask] = flat
    return out

