"""Statistics shared by training and the evals: paired bootstrap intervals and text diversity.

- paired difference of two score lists over the same items: mean of d_i = a_i - b_i with a
  percentile bootstrap interval (items resampled with replacement, seeded).
- FVE from per-item cosines, with a bootstrap interval, and the paired FVE difference of two
  oracles graded on the same items (the ratio is resampled, not a mean of per-item ratios):

      FVE = 1 - sum_i (1 - cos(v_hat_i, v_i)) / sum_i (1 - cos(mu, v_i))

  which is `encoder.fve` (FVE on sqrt(d)-rescaled vectors: ||r(a) - r(b)||^2 = 2d (1 - cos(a, b))).
- distinct-n over a set of texts: |unique n-grams| / |all n-grams| (1 = no repetition).
- context-copy rate of a description d against its source window s, for word n-grams (the evals'
  copy control and GRPO's copy penalty):
      copy_n(d, s) = |{g in ngrams_n(d) : g in set(ngrams_n(s))}| / |ngrams_n(d)|
  counted with repetition over d's n-grams; undefined (None) when d has fewer than n words.
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


def _bootstrap_indices(n: int, n_boot: int, seed: int) -> torch.Tensor:
    return torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))


def fve_from_cosines(cos_hat: torch.Tensor, cos_mean: torch.Tensor) -> float:
    """FVE of reconstructions from per-item cos(v_hat_i, v_i) and cos(mu, v_i) (module docstring)."""
    cos_hat, cos_mean = cos_hat.double().flatten(), cos_mean.double().flatten()
    return float(1.0 - (1.0 - cos_hat).sum() / (1.0 - cos_mean).sum().clamp_min(1e-12))


def _fve_rows(cos_hat: torch.Tensor, cos_mean: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """FVE of each bootstrap resample: idx [n_boot, n] -> [n_boot]."""
    err, base = 1.0 - cos_hat.double()[idx], 1.0 - cos_mean.double()[idx]
    return 1.0 - err.sum(1) / base.sum(1).clamp_min(1e-12)


def fve_interval(cos_hat: torch.Tensor, cos_mean: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """FVE over the items with a percentile bootstrap interval (items resampled with replacement)."""
    cos_hat, cos_mean = cos_hat.flatten(), cos_mean.flatten()
    if cos_hat.shape != cos_mean.shape or cos_hat.numel() < 2:
        raise ValueError(f"fve_interval needs two equal-length cosine lists of >= 2 items, got {cos_hat.numel()} and {cos_mean.numel()}")
    boots = _fve_rows(cos_hat, cos_mean, _bootstrap_indices(cos_hat.numel(), n_boot, seed))
    tail = (1 - level) / 2
    return {"fve": fve_from_cosines(cos_hat, cos_mean), "ci_low": float(boots.quantile(tail)), "ci_high": float(boots.quantile(1 - tail)),
            "n": int(cos_hat.numel()), "level": level}


def paired_fve_difference(cos_a: torch.Tensor, cos_b: torch.Tensor, cos_mean: torch.Tensor, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """FVE_a - FVE_b for two oracles graded on the same items (cos_a, cos_b: per-item cos(v_hat, v);
    cos_mean: cos(mu, v)), with a paired percentile bootstrap interval: each resample draws items
    once and recomputes both FVEs on them."""
    cos_a, cos_b, cos_mean = cos_a.flatten(), cos_b.flatten(), cos_mean.flatten()
    if not cos_a.shape == cos_b.shape == cos_mean.shape or cos_a.numel() < 2:
        raise ValueError(f"paired_fve_difference needs three equal-length cosine lists of >= 2 items, got "
                         f"{cos_a.numel()}, {cos_b.numel()} and {cos_mean.numel()}")
    idx = _bootstrap_indices(cos_a.numel(), n_boot, seed)
    boots = _fve_rows(cos_a, cos_mean, idx) - _fve_rows(cos_b, cos_mean, idx)
    tail = (1 - level) / 2
    return {"mean": fve_from_cosines(cos_a, cos_mean) - fve_from_cosines(cos_b, cos_mean), "ci_low": float(boots.quantile(tail)),
            "ci_high": float(boots.quantile(1 - tail)), "share_a_better": float((cos_a > cos_b).double().mean()),
            "n": int(cos_a.numel()), "level": level}


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
