"""The verdict of a comparison between oracles graded on one pool: the trained decoder against the best
training-free baseline, on retrieval top-1 and FVE together, with paired intervals (pure functions).

Every oracle's texts are graded by the same grader on the same items i = 1..N, giving per item a top-1
hit h_i (the true activation ranks first) and c_i = cos(v_hat_i, v_i); the predict-the-mean floor gives
m_i = cos(mu, v_i). For the trained oracle a and a baseline b:

    top-1 difference  = mean_i (h_a,i - h_b,i)                               (paired bootstrap interval)
    FVE difference    = FVE(c_a, m) - FVE(c_b, m),  FVE(c, m) = 1 - sum_i (1 - c_i) / sum_i (1 - m_i)
                                                                             (paired bootstrap of the ratio)

The best baseline is the one with the highest top-1 under that grader (FVE breaks ties). A verdict
says "wins" only when both intervals lie above 0; a baseline above the trained oracle on either metric
(its interval below 0) is named in the verdict's first words.

Format controls (`format_controls`) write the TRUE content of each item (its read token; the source
window ending at it) in each oracle's surface format, so a grader's preference for a format shows up
as a gap between formats holding the same content.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from cycle_oracle.stats import fve_from_cosines, fve_interval, paired_difference, paired_fve_difference

FORMATS: dict[str, Callable[[str], str]] = {
    "decoder": lambda content: f'It reads: "{" ".join(content.split())}".',
    "bare": lambda content: " ".join(content.split()),
}
"""How oracles write what they read (the content a format control puts in it): the trained decoder's
quote, and bare text (Patchscopes' continuation, the logit lens's space-joined tokens)."""


def oracle_scores(per_item: Mapping[str, Sequence[float]]) -> dict[str, torch.Tensor]:
    """An eval condition's per-item lists (`retrieval.score_condition`) -> {"hit", "cosine"} tensors."""
    return {"hit": torch.tensor([float(r == 1) for r in per_item["rank"]]), "cosine": torch.tensor(per_item["cosine"], dtype=torch.float64)}


def headline(scores: Mapping[str, torch.Tensor], floor: torch.Tensor) -> dict:
    """top-1 and FVE of one oracle with their intervals (top-1: bootstrap of the mean hit)."""
    hits = scores["hit"].double()
    top1 = paired_difference(hits, torch.zeros_like(hits))
    fve = fve_interval(scores["cosine"], floor)
    return {"top1": top1["mean"], "top1_ci": [top1["ci_low"], top1["ci_high"]], "fve": fve["fve"], "fve_ci": [fve["ci_low"], fve["ci_high"]],
            "n": int(hits.numel())}


def best_baseline(scores: Mapping[str, Mapping[str, torch.Tensor]], floor: torch.Tensor, baselines: Sequence[str]) -> str | None:
    """The baseline with the highest top-1 (then FVE) among those graded."""
    graded = [b for b in baselines if b in scores]
    if not graded:
        return None
    return max(graded, key=lambda b: (float(scores[b]["hit"].mean()), fve_from_cosines(scores[b]["cosine"], floor)))


def compare(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], floor: torch.Tensor) -> dict:
    """Paired top-1 and FVE differences a - b (module docstring)."""
    return {"top1": paired_difference(a["hit"].double(), b["hit"].double()), "fve": paired_fve_difference(a["cosine"], b["cosine"], floor)}


def verdict(scores: Mapping[str, Mapping[str, torch.Tensor]], floor: torch.Tensor, trained: str, baselines: Sequence[str],
            grader: str) -> dict:
    """The trained oracle against the best baseline under one grader: both headlines, the paired
    differences, and one line that leads with a baseline's win where there is one."""
    best = best_baseline(scores, floor, baselines)
    out: dict = {"grader": grader, "trained": trained, "best_baseline": best, "trained_headline": headline(scores[trained], floor)}
    if best is None:
        out["line"] = f"under the {grader}: no training-free baseline was graded"
        return out
    diff = compare(scores[trained], scores[best], floor)
    out.update(best_headline=headline(scores[best], floor), difference=diff)
    above = {m: d["ci_low"] > 0 for m, d in diff.items()}
    below = {m: d["ci_high"] < 0 for m, d in diff.items()}
    numbers = ", ".join(f"{m if m != 'top1' else 'top-1'} {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" for m, d in diff.items())
    if any(below.values()):
        lost = " and ".join("top-1" if m == "top1" else "FVE" for m, x in below.items() if x)
        lead = f"BASELINE WINS on {lost}: {best} beats the trained {trained}"
    elif all(above.values()):
        lead = f"the trained {trained} beats the best training-free baseline ({best})"
    else:
        undecided = " and ".join("top-1" if m == "top1" else "FVE" for m, x in above.items() if not x)
        lead = f"the trained {trained} is not shown better than {best} on {undecided}"
    out["wins"] = all(above.values())
    out["baseline_wins"] = any(below.values())
    out["line"] = f"{lead} (under the {grader}; {trained} minus {best}: {numbers})"
    return out


def format_controls(token_texts: Sequence[str], window_texts: Sequence[str], formats: Mapping[str, Callable[[str], str]] | None = None) -> dict[str, list[str]]:
    """The true content of each item written in each oracle's format: {"<format>/token": [...],
    "<format>/window": [...]} (the read token alone; the source window ending at it)."""
    formats = FORMATS if formats is None else formats
    out = {}
    for name, fmt in formats.items():
        out[f"{name}/token"] = [fmt(t.strip() or t) for t in token_texts]
        out[f"{name}/window"] = [fmt(w) for w in window_texts]
    return out
