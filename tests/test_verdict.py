"""The verdict: trained decoder vs the best training-free baseline on top-1 and FVE (pure functions)."""

from __future__ import annotations

import torch

from cycle_oracle.evals.verdict import best_baseline, format_controls, verdict


def scores(hits: list[int], cosines: list[float]) -> dict[str, torch.Tensor]:
    return {"hit": torch.tensor(hits, dtype=torch.float64), "cosine": torch.tensor(cosines, dtype=torch.float64)}


N = 60
FLOOR = torch.full((N,), 0.7, dtype=torch.float64)


def test_best_baseline_is_the_highest_top1():
    s = {"patchscopes": scores([1] * 20 + [0] * 40, [0.5] * N), "logit_lens": scores([1] * 5 + [0] * 55, [0.9] * N)}
    assert best_baseline(s, FLOOR, ["patchscopes", "logit_lens", "latentlens"]) == "patchscopes"
    assert best_baseline(s, FLOOR, ["latentlens"]) is None


def test_a_clear_win_on_both_metrics():
    s = {"decoder": scores([1] * 40 + [0] * 20, [0.85] * N), "patchscopes": scores([1] * 10 + [0] * 50, [0.6] * N)}
    v = verdict(s, FLOOR, "decoder", ["patchscopes"], "text encoder")
    assert v["wins"] and not v["baseline_wins"] and v["best_baseline"] == "patchscopes"
    assert v["difference"]["top1"]["ci_low"] > 0 and v["difference"]["fve"]["ci_low"] > 0
    assert v["line"].startswith("the trained decoder beats the best training-free baseline (patchscopes)")
    assert v["trained_headline"]["fve"] > 0 > v["best_headline"]["fve"]


def test_a_baseline_that_wins_either_metric_leads_the_line():
    # the decoder reconstructs better (FVE) but retrieves worse (top-1): the baseline's win comes first
    s = {"decoder": scores([1] * 5 + [0] * 55, [0.85] * N), "patchscopes": scores([1] * 30 + [0] * 30, [0.6] * N)}
    v = verdict(s, FLOOR, "decoder", ["patchscopes"], "frozen warmup encoder")
    assert v["baseline_wins"] and not v["wins"]
    assert v["line"].startswith("BASELINE WINS on top-1: patchscopes beats the trained decoder")


def test_an_undecided_comparison_says_which_metric():
    noise = torch.Generator().manual_seed(0)
    cos = (0.7 + 0.05 * torch.randn(N, generator=noise)).tolist()
    s = {"decoder": scores([1, 0] * (N // 2), cos), "patchscopes": scores([0, 1] * (N // 2), cos[::-1])}
    v = verdict(s, FLOOR, "decoder", ["patchscopes"], "text encoder")
    assert not v["wins"] and not v["baseline_wins"]
    assert "not shown better than patchscopes on top-1 and FVE" in v["line"]


def test_format_controls_write_the_same_content_in_each_format():
    c = format_controls([" cat", "sat"], ["the cat", "cat sat"])
    assert c["decoder/token"] == ['It reads: "cat".', 'It reads: "sat".']
    assert c["bare/window"] == ["the cat", "cat sat"]
