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
from torch.utils.checkpoint import checkpoint

from cycle_oracle.activations import pad_right
from cycle_oracle.grpo import token_logprobs, token_logprobs_and_entropy
from cycle_oracle.injection import DecoderPrompt, inject
from cycle_oracle.models import causal_lm_parts


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


def completion_hidden(model: nn.Module, batch: DecoderBatch, vectors: torch.Tensor, norm: float, mode: str = "replace") -> tuple[torch.Tensor, nn.Module]:
    """(final hidden states at the positions that predict each completion token [num_targets, d],
    in row-major order of target_mask; the LM head), on the model's device (the batch and vectors
    are moved there). Prompt positions never reach the LM head."""
    inner, lm_head, embedding = causal_lm_parts(model)
    device = embedding.weight.device
    batch = batch.to(device)
    vectors = vectors.to(device=device, dtype=embedding.weight.dtype)
    with torch.no_grad():
        embeds = embedding(batch.input_ids)
    embeds = inject(embeds, batch.placeholder_positions, vectors, norm, mode)
    hidden = inner(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    # token t is predicted from position t-1
    predict_from = batch.target_mask[:, 1:].bool()
    return hidden[:, :-1][predict_from], lm_head


def completion_logits(
    model: nn.Module,
    batch: DecoderBatch,
    vectors: torch.Tensor,
    norm: float,
    mode: str = "replace",
) -> torch.Tensor:
    """Logits that predict each completion token: [num_targets, V] in row-major order of target_mask,
    float32, on the model's device (all at once: evals and small batches; the learner uses
    `completion_token_stats`, which never holds more than a chunk of them)."""
    hidden, lm_head = completion_hidden(model, batch, vectors, norm, mode)
    return lm_head(hidden).float()


@dataclass
class TokenStats:
    """Per completion token, row-major [num_targets]: log pi(token) after temperature, and where
    asked the entropy of the temperature-scaled distribution and whether the token is the argmax."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    correct: torch.Tensor | None = None


def _chunk_stats(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                 entropy: bool, correct: bool) -> tuple[torch.Tensor, ...]:
    logits = lm_head(hidden).float()  # [chunk, V], fp32 whatever the model's dtype
    if entropy:  # one read of the logits for both where TRL has the fused kernel (entropy detached)
        logp, ent = (x[0] for x in token_logprobs_and_entropy(logits[None], targets[None], temperature))
        out = [logp, ent]
    else:
        out = [token_logprobs(logits[None], targets[None], temperature)[0]]
    with torch.no_grad():  # logged / scored, never differentiated
        if correct:
            out.append((logits.argmax(-1) == targets).float())
    return tuple(out)


def completion_token_stats(
    model: nn.Module,
    batch: DecoderBatch,
    vectors: torch.Tensor,
    norm: float,
    temperature: float = 1.0,
    mode: str = "replace",
    chunk_tokens: int = 1024,
    entropy: bool = False,
    correct: bool = False,
) -> TokenStats:
    """Log-probs (and entropy, argmax hits) of every completion token, computed from the LM head in
    chunks of `chunk_tokens` positions: fp32 logits exist for one chunk at a time, and with a graph
    (when there is more than one chunk) each chunk's are recomputed in the backward pass (activation
    checkpointing of the head) instead of being kept, so memory is O(chunk x V), not O(num_targets x V).
        logp_t = log softmax(W h_t / temperature)[x_t]     (the same maths as `completion_logprobs`)"""
    hidden, lm_head = completion_hidden(model, batch, vectors, norm, mode)
    targets = batch.targets().to(hidden.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    # one chunk in all: its logits are what one chunk costs anyway, so keep them (no recompute)
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(targets) > chunk_tokens
    for start in range(0, max(len(targets), 1), chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if recompute:
            parts.append(checkpoint(_chunk_stats, lm_head, h, t, temperature, entropy, correct, use_reentrant=False))
        else:
            parts.append(_chunk_stats(lm_head, h, t, temperature, entropy, correct))
    columns = [torch.cat(c) for c in zip(*parts)]
    logp = columns.pop(0)
    return TokenStats(logp, columns.pop(0) if entropy else None, columns.pop(0) if correct else None)


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
    return unflatten(completion_token_stats(model, batch, vectors, norm, temperature, mode).logp, batch)


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

