"""Statistics shared by training and the evals: paired bootstrap intervals and text diversity.

- paired difference of two score lists over the same items: mean of d_i = a_i - b_i with a
  percentile bootstrap interval (items resampled with replacement, seeded).
- distinct-n over a set of texts: |unique n-grams| / |all n-grams| (1 = no repetition).
- same-start share: the largest share of texts that begin with the same first k words
  (k = 4 by default; "The expression ..." template collapse shows up here).

Words are lower-cased runs of letters/digits (`\\w+`, Unicode), so punctuation never counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

_WORD = re.compile(r"\w+", re.UNICODE)


def paired_difference(a: torch.Tensor, b: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of d_i = a_i - b_i over items scored both ways, with a percentile bootstrap interval
    (items resampled with replacement) and the share of items where a_i > b_i."""
    a, b = a.double().flatten(), b.double().flatten()
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"paired_difference needs two equal-length score lists of >= 2 items, got {a.numel()} and {b.numel()}")
    d = a - b
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(0, d.numel(), (n_boot, d.numel()), generator=g)].mean(1)
    tail = (1 - level) / 2
    return {"mean": float(d.mean()), "ci_low": float(means.quantile(tail)), "ci_high": float(means.quantile(1 - tail)),
            "share_a_better": float((d > 0).double().mean()), "n": int(d.numel()), "level": level}


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """|unique n-grams| / |n-grams| pooled over all texts (None: no n-gram at all)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def _starts(texts: Sequence[str], k: int) -> Counter:
    return Counter(tuple(words(t)[:k]) for t in texts)


def same_start_share(texts: Sequence[str], k: int = 4) -> float | None:
    """Largest share of texts that start with the same first k words (a text with fewer than k
    words is its own whole start). None for an empty list."""
    if not texts:
        return None
    return max(_starts(texts, k).values()) / len(texts)


def most_common_start(texts: Sequence[str], k: int = 4) -> str:
    if not texts:
        return ""
    return " ".join(_starts(texts, k).most_common(1)[0][0])


def text_diversity(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1/2 over all texts and the share starting with the most common 4 words (a key is
    left out where it is undefined: no n-gram, no text)."""
    values = {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "same_start_share": same_start_share(texts, 4)}
    return {k: float(v) for k, v in values.items() if v is not None}
