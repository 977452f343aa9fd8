"""Retrieval: can the description of v pick v out of a pool of N activations?

For a pool v_1..v_N (held-out documents, at most one row per document by default):

    d_i = describe(v_i)  (greedy),   v_hat_i = encode(d_i),   S_ij = cos(v_hat_i, v_j)     S: [N, N]
    rank_i = 1 + #{j != i : S_ij >= S_ii}        (ties count against the true row: a constant
                                                   reconstruction ranks last, never first)
    top-k = mean_i [rank_i <= k],   MRR = mean_i 1/rank_i
    chance: top-1 = 1/N, top-5 = min(5, N)/N, MRR = H_N / N  (H_N = sum_{r<=N} 1/r)

Next to it, the reconstruction metrics of `encoder.reconstruction_metrics` (cosine, centred
cosine, FVE against predicting the corpus mean mu) and these conditions, scored against the same
originals v_i:

- `mean_floor`:   v_hat_i = mu (predict the corpus mean);
- `shuffled`:     v_hat_i = encode(describe(v_pi(i))) for a derangement pi: a description of
                  another activation of the pool (reuses the greedy descriptions, permuted);
- `zero`:         v_hat_i = encode(describe(0)): the decoder with nothing injected;
- `context_only`: v_hat_i = encode(source window of v_i, `context_tokens` tokens ending at v_i's
                  token): the encoder reading the true text instead of a description (a ceiling
                  for a decoder that only guesses the context);
- `paraphrased`, `word_shuffled` (with `paraphrase=ParaphraseOptions(...)`): v_hat_i = encode(d_i
                  rewritten by the target / with its words shuffled), and the drops from
                  `description` (evals/paraphrase.py: the hidden-channel check);
- `truncated_<n>`, `quote_banned`: v_hat_i = encode(d_i cut to its first n tokens / with its
                  quoted spans removed) (evals/truncation.py: what survives truncation).

Every text condition can also be graded by other encoders (`graders`: another checkpoint's,
`cycle-oracle eval --grader`), beside the oracle's own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from cycle_oracle.encoder import centred_cosine, cosine, reconstruction_metrics
from cycle_oracle.evals.controls import derangement, shuffled_gap, text_controls
from cycle_oracle.evals.oracle import describe_items
from cycle_oracle.evals.paraphrase import ParaphraseOptions, drops, rewritten_descriptions
from cycle_oracle.evals.truncation import ban_quotes, token_lengths, truncate_tokens


# ---- pure maths ---------------------------------------------------------------------------

def similarity_matrix(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """S_ij = cos(queries_i, keys_j): [N, d], [M, d] -> [N, M]."""
    return F.normalize(queries.float(), dim=-1, eps=1e-12) @ F.normalize(keys.float(), dim=-1, eps=1e-12).T


def true_ranks(sim: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of the true key of each query: [N, M] -> [N] long. targets[i] is the true
    column of row i (default i). Ties with the true key count against it (pessimistic)."""
    n = sim.shape[0]
    targets = torch.arange(n) if targets is None else targets
    true = sim[torch.arange(n), targets][:, None]
    others = torch.ones_like(sim, dtype=torch.bool)
    others[torch.arange(n), targets] = False
    return 1 + ((sim >= true) & others).sum(1)


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k share, MRR, median and mean rank of 1-based ranks [N]."""
    r = ranks.float()
    out = {f"top{k}": float((r <= k).float().mean()) for k in ks}
    out["mrr"] = float((1.0 / r).mean())
    out["median_rank"] = float(r.median())
    out["mean_rank"] = float(r.mean())
    return out


def chance_metrics(n: int, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Expected top-k and MRR of a uniformly random ranking of n candidates."""
    out = {f"top{k}": min(k, n) / n for k in ks}
    out["mrr"] = sum(1.0 / r for r in range(1, n + 1)) / n
    return out


def score_condition(v_hat: torch.Tensor, v: torch.Tensor, mean: torch.Tensor) -> tuple[dict, dict]:
    """(summary metrics, per-item lists) of reconstructions v_hat [N, d] of v [N, d]."""
    ranks = true_ranks(similarity_matrix(v_hat, v))
    summary = reconstruction_metrics(v_hat, v, mean) | ranking_metrics(ranks)
    per_item = {
        "cosine": cosine(v_hat, v).tolist(),
        "centred_cosine": centred_cosine(v_hat, v, mean).tolist(),
        "rank": ranks.tolist(),
    }
    return summary, per_item


# ---- pool ---------------------------------------------------------------------------------

def select_pool(store, pool_size: int, seed: int = 0, heldout_fraction: float | None = 0.2, split_seed: int | None = None, rows_per_document: int = 1) -> list[int]:
    """Row indices of a retrieval pool: rows of the store's held-out documents
    (`store.split_by_document(heldout_fraction, split_seed)`; None = every document), at most
    `rows_per_document` per document, drawn with `seed`; at most pool_size rows."""
    if heldout_fraction is None:
        rows = list(range(len(store)))
    else:
        _, rows = store.split_by_document(heldout_fraction, seed if split_seed is None else split_seed)
    by_doc: dict[str, list[int]] = {}
    for i in rows:
        by_doc.setdefault(store.records[i]["doc_id"], []).append(i)
    rng = random.Random(seed)
    chosen = []
    for doc in sorted(by_doc):
        group = by_doc[doc]
        chosen.extend(rng.sample(group, min(rows_per_document, len(group))))
    rng.shuffle(chosen)
    return sorted(chosen[:pool_size])


# ---- the eval -----------------------------------------------------------------------------

def evaluate_retrieval(
    oracle,
    store,
    pool_size: int = 100,
    seed: int = 0,
    heldout_fraction: float | None = 0.2,
    split_seed: int | None = None,
    rows_per_document: int = 1,
    context_tokens: int = 16,
    controls: Sequence[str] = ("shuffled", "zero", "context_only"),
    paraphrase: ParaphraseOptions | None = None,
    truncation_tokens: Sequence[int] = (),
    quote_ban: bool = False,
    graders: Mapping[str, Callable[[Sequence[str]], torch.Tensor]] | None = None,
) -> dict:
    """Retrieval + reconstruction metrics and controls on a pool from `store` (see module docstring).

    Returns {"n", "rows", "chance", "conditions": {name: summary}, "per_item": {name: lists},
    "text_controls", "shuffled_gap", "items": [...]}, plus "paraphrase": {instruction,
    max_new_tokens, seed, drops: {condition: ...}} when `paraphrase` is given, "truncation" (the
    curve over `truncation_tokens` and "all") when asked, and "graders": {name: {"conditions",
    "per_item"}}: every text condition graded again by each encoder of `graders` (callables
    texts -> v_hat [N, d]: other checkpoints' encoders, `cycle-oracle eval --grader`).
    An oracle that writes from source text (the text-only guess) reads each row's left context
    and has no zero-activation control.
    """
    if oracle.encode is None:
        raise ValueError("the retrieval eval needs an oracle with an encoder (oracle.encode is None)")
    rows = select_pool(store, pool_size, seed, heldout_fraction, split_seed, rows_per_document)
    n = len(rows)
    if n < 2:
        raise ValueError(f"retrieval needs at least 2 activations in the pool, got {n} (store has {len(store.doc_ids())} documents)")
    v = store.activations[rows].float()
    mean = store.mean.float()
    sources = [oracle.detokenize(store.context_window(i, before=context_tokens)) for i in rows] if oracle.detokenize else None
    left_contexts = None
    if oracle.describe_text is not None:  # the text-only guess reads each row's whole left context (it keeps its own window)
        left_contexts = [oracle.detokenize(store.context_window(i, before=store_context_limit(store, i))) for i in rows]
    descriptions = describe_items(oracle, v, left_contexts)
    result: dict = {"n": n, "rows": rows, "chance": chance_metrics(n), "pool": {
        "heldout_fraction": heldout_fraction, "seed": seed, "split_seed": seed if split_seed is None else split_seed,
        "rows_per_document": rows_per_document, "documents": len({store.records[i]["doc_id"] for i in rows}),
        "requested": pool_size}}
    texts: dict[str, list[str]] = {"description": descriptions}  # every condition that is a text, in report order
    perm = None
    if "shuffled" in controls:
        perm = derangement(n, seed)
        texts["shuffled"] = [descriptions[j] for j in perm.tolist()]
        result["shuffled_permutation"] = perm.tolist()
    if "zero" in controls and oracle.describe_text is None:
        zero_description = oracle.describe(torch.zeros(1, v.shape[1]))[0]
        texts["zero"] = [zero_description] * n
        result["zero_description"] = zero_description
    if "context_only" in controls:
        if sources is None:
            raise ValueError("the context_only control needs oracle.detokenize (to decode the store's context windows)")
        texts["context_only"] = sources
        result["context_tokens"] = context_tokens
    rewritten = rewritten_descriptions(oracle, descriptions, paraphrase) if paraphrase else {}
    texts.update(rewritten)
    if truncation_tokens:
        if oracle.tokenize is None or oracle.detokenize is None:
            raise ValueError("the truncation conditions need oracle.tokenize and oracle.detokenize")
        for k in truncation_tokens:
            texts[f"truncated_{k}"] = truncate_tokens(descriptions, k, oracle.tokenize, oracle.detokenize)
    if quote_ban:
        texts["quote_banned"] = [ban_quotes(d) for d in descriptions]
    conditions, per_item = with_mean_floor(*score_texts(oracle.encode, texts, v, mean, perm), v, mean)
    if "shuffled" in conditions:
        result["shuffled_gap"] = shuffled_gap(torch.tensor(per_item["description"]["cosine"]), torch.tensor(per_item["shuffled"]["cosine"]))
        result["shuffled_gap_centred"] = shuffled_gap(torch.tensor(per_item["description"]["centred_cosine"]), torch.tensor(per_item["shuffled"]["centred_cosine"]))
    if paraphrase:
        result["paraphrase"] = {"instruction": paraphrase.instruction, "max_new_tokens": paraphrase.max_new_tokens, "seed": paraphrase.seed,
                                "drops": drops(conditions, per_item, result["chance"]["top1"], list(rewritten), seed)}
    if truncation_tokens:
        lengths = token_lengths(descriptions, oracle.tokenize)
        result["truncation"] = truncation_curve(conditions, truncation_tokens, lengths)
    result["conditions"] = conditions
    result["per_item"] = per_item
    if graders:
        result["graders"] = {}
        for name, encode in graders.items():
            g_conditions, g_items = with_mean_floor(*score_texts(encode, texts, v, mean, perm), v, mean)
            graded = {"conditions": g_conditions, "per_item": g_items}
            if truncation_tokens:
                graded["truncation"] = truncation_curve(g_conditions, truncation_tokens, lengths)
            result["graders"][name] = graded
    result["text_controls"] = text_controls(descriptions, sources)
    items = []
    for k, i in enumerate(rows):
        rec = store.records[i]
        item = {"row": i, "doc_id": rec["doc_id"], "token_index": rec["token_index"], "token": rec["token"],
                "description": descriptions[k], "context": sources[k] if sources else None}
        item.update({f"{name}_description": t[k] for name, t in rewritten.items()})
        if quote_ban:
            item["quote_banned_description"] = texts["quote_banned"][k]
        for name in per_item:
            if name != "mean_floor":
                item[f"{name}_cosine"] = per_item[name]["cosine"][k]
                item[f"{name}_rank"] = per_item[name]["rank"][k]
        items.append(item)
    result["items"] = items
    return result


def store_context_limit(store, row: int) -> int:
    """How many tokens of its document precede and include row `row` (its whole left context)."""
    return int(store.records[row]["token_index"]) + 1


def score_texts(encode: Callable[[Sequence[str]], torch.Tensor], texts: Mapping[str, list[str]], v: torch.Tensor, mean: torch.Tensor,
                perm: torch.Tensor | None = None) -> tuple[dict, dict]:
    """(summary, per-item lists) per condition of `texts` ({condition: N texts}), each encoded by
    `encode` and scored against v [N, d]; `shuffled` reuses the descriptions' reconstructions
    permuted by `perm`, and `zero` (one text repeated) is encoded once."""
    conditions, per_item = {}, {}
    v_hat_description = None
    for name, t in texts.items():
        if name == "shuffled":
            if v_hat_description is None or perm is None:
                raise ValueError("the shuffled condition needs the description condition first and its permutation")
            v_hat = v_hat_description[perm]
        elif name == "zero":
            v_hat = encode(t[:1]).expand_as(v)
        else:
            v_hat = encode(t)
        if name == "description":
            v_hat_description = v_hat
        conditions[name], per_item[name] = score_condition(v_hat, v, mean)
    return conditions, per_item


def with_mean_floor(conditions: dict, per_item: dict, v: torch.Tensor, mean: torch.Tensor) -> tuple[dict, dict]:
    """The conditions with `mean_floor` (v_hat = mu: predict the mean; FVE 0, top-1 1/N) right after `description`."""
    floor = score_condition(mean[None, :].expand_as(v), v, mean)
    order = ["description", "mean_floor", *[k for k in conditions if k != "description"]]
    c = {**conditions, "mean_floor": floor[0]}
    p = {**per_item, "mean_floor": floor[1]}
    return {k: c[k] for k in order if k in c}, {k: p[k] for k in order if k in p}


def truncation_curve(conditions: Mapping[str, dict], tokens: Sequence[int], lengths: Sequence[int]) -> dict:
    """The truncation curve: top-1, top-5, MRR, centred cosine and FVE of `truncated_<n>` per n, then
    "all" (the description), with the share of descriptions longer than n (those that were cut)."""
    keys = ("top1", "top5", "mrr", "centred_cosine", "fve")
    curve = [{"tokens": k, "cut_share": sum(x > k for x in lengths) / max(1, len(lengths)), **{m: conditions[f"truncated_{k}"][m] for m in keys}}
             for k in tokens]
    curve.append({"tokens": "all", "cut_share": 0.0, **{m: conditions["description"][m] for m in keys}})
    return {"tokens": [*tokens, "all"], "curve": curve, "mean_description_tokens": sum(lengths) / max(1, len(lengths))}
