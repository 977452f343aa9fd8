"""The warmup's held-out evaluation: does the decoder read the injected activation?

Per task, answer NLL and token accuracy with the item's own activation (`real`), another source's
(`shuffled`: a different document or behaviour, never the same one) and a zero activation
(`zero`); the NLL gap shuffled - real with a paired 95% bootstrap interval over items, per
question for LatentQA, and LatentQA's ranking of the true answer among other behaviours' answers.

The model is reached through one callable, so this runs against any learner (the Ray driver passes
its rank-0 learner's `answer_scores`, a test a pure function):

    score_answers(examples: list[SftExample], vector_override: str | None = None) -> dict[str, list[float]]

one value per example under "nll" (mean answer-token NLL) and "token_accuracy"; `vector_override`
"zero" injects a zero activation instead of the one read at each example's position.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from rich.progress import Progress

from cycle_oracle.data.items import SftExample
from cycle_oracle.data.read_positions import read_positions, to_example
from cycle_oracle.stats import paired_difference

AnswerScorer = Callable[..., dict[str, list[float]]]
"""`score_answers(examples, vector_override=None) -> {"nll": [...], "token_accuracy": [...]}` (module docstring)."""


def other_source(items: list, rng: random.Random) -> list:
    """For each item, an item of a different source document / behaviour (the shuffled control)."""
    out = []
    for item in items:
        others = [x for x in items if x.source_id != item.source_id]
        out.append(rng.choice(others) if others else item)
    return out


def spread_by_source(items: list, n: int, rng: random.Random) -> list:
    """Up to n items, as many distinct sources as possible (round-robin over shuffled sources)."""
    by_source: dict = {}
    for it in items:
        by_source.setdefault(it.source_id, []).append(it)
    pools = [rng.sample(v, len(v)) for _k, v in sorted(by_source.items())]
    rng.shuffle(pools)
    out = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out


def latentqa_ranking(score_answers: AnswerScorer, heldout_items: list, rng: random.Random, num_placeholders: int, n_items: int,
                     n_candidates: int = 5, advance=lambda n: None) -> dict:
    """Rank the true answer among other behaviours' answers by NLL, with the real activation and
    with another behaviour's (shuffled control); the real-minus-shuffled top-1 gap gets a paired
    95% bootstrap interval over items."""
    if len(heldout_items) < n_candidates:
        return {}
    hits: dict[str, list[float]] = {"real": [], "shuffled": []}
    items = spread_by_source(heldout_items, n_items, rng)
    by_question: dict[str, dict[str, list[float]]] = {}
    for item, other in zip(items, other_source(items, rng)):
        wrong = sorted({x.answer for x in heldout_items if x.source_id != item.source_id and x.question == item.question and x.answer != item.answer})
        if len(wrong) < n_candidates - 1:
            wrong = sorted({x.answer for x in heldout_items if x.source_id != item.source_id and x.answer != item.answer})
        cands = [item.answer] + rng.sample(wrong, min(n_candidates - 1, len(wrong)))
        for mode, ctx in (("real", item), ("shuffled", other)):
            positions = read_positions(ctx, rng, num_placeholders)
            exs = [SftExample("latentqa", list(ctx.context_ids), positions, item.question, c) for c in cands]
            nll = score_answers(exs)["nll"]
            advance(1)
            hit = float(min(range(len(cands)), key=lambda i: nll[i]) == 0)
            hits[mode].append(hit)
            by_question.setdefault(item.question, {"real": [], "shuffled": []})[mode].append(hit)
    n = len(items)
    gap = paired_difference(torch.tensor(hits["real"]), torch.tensor(hits["shuffled"]), seed=0)
    return {"ranking_top1_real": sum(hits["real"]) / n, "ranking_top1_shuffled": sum(hits["shuffled"]) / n,
            "ranking_gap_ci_low": gap["ci_low"], "ranking_gap_ci_high": gap["ci_high"],
            "ranking_candidates": n_candidates, "ranking_items": n,
            "ranking_by_question": {q: {"items": len(h["real"]), "top1_real": sum(h["real"]) / len(h["real"]),
                                        "top1_shuffled": sum(h["shuffled"]) / len(h["shuffled"])} for q, h in sorted(by_question.items())}}


def heldout_eval(score_answers: AnswerScorer, heldout: dict, cfg, seed: int, label: str = "held-out") -> dict:
    """Answer NLL and token accuracy per task with the real activation, another source's (shuffled:
    a different document or behaviour, never the same one) and a zero activation; the NLL gap
    shuffled - real with a paired 95% bootstrap interval over items.

    `heldout`: task -> WarmupItems (up to `cfg.warmup.eval_items` per task, spread over sources,
    read at `cfg.injection.num_placeholders` positions). `score_answers(examples: list[SftExample],
    vector_override: str | None = None) -> {"nll": [...], "token_accuracy": [...]}` scores a batch
    of at most 8 examples, one value per example (mean over answer tokens); `vector_override="zero"`
    injects zeros instead of the examples' activations."""
    with Progress() as progress:
        return _heldout_eval(score_answers, heldout, cfg, seed, progress, label)


def _heldout_eval(score_answers: AnswerScorer, heldout: dict, cfg, seed: int, progress: Progress, label: str) -> dict:
    rng = random.Random(seed)
    p = cfg.injection.num_placeholders
    n_eval = cfg.warmup.eval_items
    out: dict[str, dict] = {}
    for task, items in sorted(heldout.items()):
        if not items:
            continue
        chosen = spread_by_source(items, n_eval, rng)
        ranked = min(n_eval, len(items)) if task == "latentqa" else 0
        bar = progress.add_task(f"{label} eval: {task}", total=3 * len(chosen) + 2 * ranked)  # 3 variants, 2 ranking modes
        variants = {
            "real": ([to_example(it, rng, p) for it in chosen], None),
            "shuffled": ([to_example(it, rng, p, other) for it, other in zip(chosen, other_source(chosen, rng))], None),
            "zero": ([to_example(it, rng, p) for it in chosen], "zero"),
        }
        res, nll_by_variant = {}, {}
        for name, (examples, mode) in variants.items():
            scores = {"nll": [], "token_accuracy": []}
            for i in range(0, len(examples), 8):
                s = score_answers(examples[i : i + 8], mode)
                for k in scores:
                    scores[k].extend(s[k])
                progress.update(bar, advance=len(examples[i : i + 8]))
            nll_by_variant[name] = scores["nll"]
            res[f"nll_{name}"] = sum(scores["nll"]) / len(scores["nll"])
            res[f"token_accuracy_{name}"] = sum(scores["token_accuracy"]) / len(scores["token_accuracy"])
        if len(chosen) >= 2:  # paired over items: > 0 when the real activation helps
            gap = paired_difference(torch.tensor(nll_by_variant["shuffled"]), torch.tensor(nll_by_variant["real"]))
            res["nll_gap_shuffled_minus_real"], res["nll_gap_ci_low"], res["nll_gap_ci_high"] = gap["mean"], gap["ci_low"], gap["ci_high"]
        res["items"] = len(chosen)
        res["sources"] = len({it.source_id for it in chosen})
        if task == "latentqa":
            res["nll_gap_by_question"] = gap_by_question(chosen, nll_by_variant)
            res.update(latentqa_ranking(score_answers, items, rng, p, n_eval, advance=lambda n: progress.update(bar, advance=n)))
        out[task] = res
    return out


def gap_by_question(items: list, nll_by_variant: dict) -> dict:
    """Mean NLL (real, shuffled) and gap per question: which questions the activation informs."""
    out: dict[str, dict] = {}
    for i, item in enumerate(items):
        row = out.setdefault(item.question, {"items": 0, "nll_real": 0.0, "nll_shuffled": 0.0})
        row["items"] += 1
        row["nll_real"] += nll_by_variant["real"][i]
        row["nll_shuffled"] += nll_by_variant["shuffled"][i]
    for row in out.values():
        row["nll_real"] /= row["items"]
        row["nll_shuffled"] /= row["items"]
        row["nll_gap_shuffled_minus_real"] = row["nll_shuffled"] - row["nll_real"]
    return dict(sorted(out.items()))
