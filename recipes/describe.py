"""`kind: describe` — extract activations from the corpus and describe them with the decoder
(untrained, or `init_from` a checkpoint) through the rollout group (vLLM). Greedy decoding."""

from __future__ import annotations

import random
import time

from actors.rollout import RolloutGroup
from cycle_oracle.corpus import load_documents
from cycle_oracle.models import load_tokenizer
from cycle_oracle.rollout import Sampling
from recipes.common import extract_store, finish_run, injection_norm, load_start, start_run


def one_row_per_document(store, seed: int, limit: int) -> list[int]:
    by_doc: dict[str, list[int]] = {}
    for i, r in enumerate(store.records):
        by_doc.setdefault(r["doc_id"], []).append(i)
    rng = random.Random(seed)
    rows = [rng.choice(v) for _, v in sorted(by_doc.items())]
    return rows[:limit]


def run(cfg, out, resume: bool = False) -> dict:
    ctx = start_run(cfg, out, "describe", resume)
    cfg = ctx.cfg  # model.dtype: auto resolved
    docs = load_documents(cfg.corpus, cfg.num_documents)
    store, emb_norm = extract_store(ctx, docs)
    start = load_start(ctx)
    norm = injection_norm(ctx, emb_norm, store.mean_norm, start)
    rows = one_row_per_document(store, cfg.seed, cfg.num_documents)
    rollouts = RolloutGroup(ctx.model_spec, cfg, ctx.layer, norm, ctx.placement, ctx.log_file)
    if start is not None:
        rollouts.sync(start.tensors["decoder_adapter"])
    t0 = time.time()
    batch = rollouts.sample(store.activations[rows], [0] * len(rows), Sampling.greedy(cfg.sampling.max_new_tokens), "describing activations")
    elapsed = time.time() - t0
    tokenizer = load_tokenizer(ctx.model_path)
    items = []
    for i, row in enumerate(rows):
        rec = store.records[row]
        context = tokenizer.decode(store.context_window(row))
        items.append({**rec, "context": context, "description": batch.texts[i], "truncated": bool(batch.truncated[i])})
    results = {
        "kind": "describe",
        "model": cfg.model.name,
        "layer": ctx.layer,
        "injection_norm": norm,
        "weight_version": int(batch.versions.max()),
        "num_descriptions": len(items),
        "seconds": elapsed,
        "descriptions": items,
    }
    ctx.write_results("results.json", results)
    ctx.metrics.log("describe", 0, {"num_descriptions": len(items), "seconds": elapsed})
    rollouts.shutdown()
    finish_run(ctx)
    for it in items[:5]:
        print(f"  [{it['doc_id']} @{it['token_index']} {it['token']!r}] -> {it['description'][:120]!r}")
    return results
