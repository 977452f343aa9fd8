"""Anti-transcription reward terms for GRPO (recipe options, off by default): what a description
pays for copying its context or for running long. Pure functions of texts and lengths.

For sample j of activation b, with cycle reward r_bj, description d_bj of |d_bj| tokens and the
activation's source window s_b (the `window_tokens` tokens ending at the read position: the
window the evals' context-copy control reads):
    r'_bj = r_bj - lambda_copy * copy_n(d_bj, s_b) - lambda_len * max(0, |d_bj| - free_tokens)
    copy_n(d, s) = share of d's word n-grams that occur in s   (stats.copy_rate; 0 below n words)
Applied before the unusable-sample penalty, so an unusable sample still never wins its group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cycle_oracle.stats import copy_rate


def copy_rates(texts: Sequence[str], sources: Sequence[str], n: int) -> torch.Tensor:
    """[N] copy_n(d_i, s_i), 0 where a description has fewer than n words."""
    if len(texts) != len(sources):
        raise ValueError(f"{len(texts)} descriptions but {len(sources)} source windows")
    return torch.tensor([copy_rate(d, s, n) or 0.0 for d, s in zip(texts, sources)], dtype=torch.float32)


def length_excess(lengths: Sequence[int], free_tokens: int) -> torch.Tensor:
    """[N] max(0, |d_i| - free_tokens): the tokens a description runs beyond its free budget."""
    return (torch.tensor(list(lengths), dtype=torch.float32) - free_tokens).clamp(min=0.0)


def shaped_rewards(rewards: torch.Tensor, copy: torch.Tensor | None, copy_coef: float,
                   excess: torch.Tensor | None, length_coef: float) -> torch.Tensor:
    """r - copy_coef * copy - length_coef * excess (each term only where given); NaN stays NaN."""
    out = rewards.float().clone()
    if copy is not None and copy_coef:
        out = out - copy_coef * copy
    if excess is not None and length_coef:
        out = out - length_coef * excess
    return out
