"""Controls: is the decoder describing the activation, or guessing / copying the context?

Pure text and number functions (unit-tested on hand-made examples):

- context-copy rate of a description d against its source window s, for word n-grams:
      copy_n(d, s) = |{g in ngrams_n(d) : g in set(ngrams_n(s))}| / |ngrams_n(d)|
  (counted with repetition over d's n-grams; undefined when d has fewer than n words). A decoder
  that pastes the source scores 1; one that ignores it scores near the rate of common phrases.
- distinct-n over a set of descriptions: |unique n-grams| / |all n-grams| (1 = no repetition).
- same-start share: the largest share of descriptions that begin with the same first k words
  (k = 4 by default; "The expression ..." template collapse shows up here).
- shuffled-activation gap: mean cos(v_i, v_hat(d(v_i))) - mean cos(v_i, v_hat(d(v_pi(i)))): what the
  description of *this* activation buys over the description of another one from the same pool.

Words are lower-cased runs of letters/digits (`\\w+`, Unicode), so punctuation never counts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def copy_rate(description: str, source: str, n: int = 2) -> float | None:
    """Share of the description's word n-grams that occur in the source (None: < n words)."""
    grams = ngrams(words(description), n)
    if not grams:
        return None
    src = set(ngrams(words(source), n))
    return sum(g in src for g in grams) / len(grams)


def mean_copy_rate(descriptions: Sequence[str], sources: Sequence[str], n: int = 2) -> float | None:
    """Mean copy rate over the descriptions that have at least n words (None if none does)."""
    if len(descriptions) != len(sources):
        raise ValueError(f"{len(descriptions)} descriptions but {len(sources)} sources")
    rates = [r for r in (copy_rate(d, s, n) for d, s in zip(descriptions, sources)) if r is not None]
    return sum(rates) / len(rates) if rates else None


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """|unique n-grams| / |n-grams| pooled over all texts (None: no n-gram at all)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def same_start_share(texts: Sequence[str], k: int = 4) -> float | None:
    """Largest share of texts that start with the same first k words (a text with fewer than k
    words is its own whole start). None for an empty list."""
    if not texts:
        return None
    starts = Counter(tuple(words(t)[:k]) for t in texts)
    return max(starts.values()) / len(texts)


def most_common_start(texts: Sequence[str], k: int = 4) -> str:
    if not texts:
        return ""
    return " ".join(Counter(tuple(words(t)[:k]) for t in texts).most_common(1)[0][0])


def shuffled_gap(matched_cosines: torch.Tensor, shuffled_cosines: torch.Tensor) -> float:
    """mean(matched) - mean(shuffled): > 0 when the description carries this activation's information."""
    return float(matched_cosines.float().mean() - shuffled_cosines.float().mean())


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
