"""Controls: is the decoder describing the activation, or guessing / copying the context?

Pure text and number functions (unit-tested on hand-made examples):

- context-copy rate of a description against its source window (`stats.copy_rate`, shared with
  GRPO's copy penalty), averaged over a set of descriptions. A decoder that pastes the source
  scores 1; one that ignores it scores near the rate of common phrases.
- shuffled-activation gap: mean cos(v_i, v_hat(d(v_i))) - mean cos(v_i, v_hat(d(v_pi(i)))): what the
  description of *this* activation buys over the description of another one from the same pool.
- distinct-n and same-start share of the descriptions (defined in `cycle_oracle/stats.py`, with
  the words and n-grams every control counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cycle_oracle.stats import copy_rate, distinct_n, most_common_start, same_start_share, words


def mean_copy_rate(descriptions: Sequence[str], sources: Sequence[str], n: int = 2) -> float | None:
    """Mean copy rate over the descriptions that have at least n words (None if none does)."""
    if len(descriptions) != len(sources):
        raise ValueError(f"{len(descriptions)} descriptions but {len(sources)} sources")
    rates = [r for r in (copy_rate(d, s, n) for d, s in zip(descriptions, sources)) if r is not None]
    return sum(rates) / len(rates) if rates else None


def shuffled_gap(matched_cosines: torch.Tensor, shuffled_cosines: torch.Tensor) -> float:
    """mean(matched) - mean(shuffled): > 0 when the description carries this activation's information."""
    return float(matched_cosines.float().mean() - shuffled_cosines.float().mean())


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded random permutation with no fixed point (n >= 2): row i is described by pi(i) != i."""
    if n < 2:
        raise ValueError("a shuffled control needs at least 2 activations")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # Rotate by one inside a random order: i -> next in the random cycle; never a fixed point.
    out = torch.empty(n, dtype=torch.long)
    out[perm] = perm.roll(-1)
    return out


def text_controls(descriptions: Sequence[str], sources: Sequence[str] | None = None, ngram_sizes=(1, 2, 3), start_words: int = 4) -> dict:
    """All text-only controls for one set of descriptions (and their source windows, if given)."""
    out = {
        "distinct_1": distinct_n(descriptions, 1),
        "distinct_2": distinct_n(descriptions, 2),
        "same_start_share": same_start_share(descriptions, start_words),
        "same_start_words": start_words,
        "most_common_start": most_common_start(descriptions, start_words),
        "empty_share": sum(not d.strip() for d in descriptions) / len(descriptions) if descriptions else None,
        "mean_words": sum(len(words(d)) for d in descriptions) / len(descriptions) if descriptions else None,
    }
    if sources is not None:
        out["copy_rate"] = {str(n): mean_copy_rate(descriptions, sources, n) for n in ngram_sizes}
    return out
