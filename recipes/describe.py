"""`kind: describe` — extract activations from the corpus and describe them with the decoder
(untrained, or `init_from` a checkpoint) through a vLLM rollout actor. Greedy decoding."""

from __future__ import annotations

import random
import time

import ray

from actors.placement import remote_get
from actors.rollout import RolloutActor
from cycle_oracle.corpus import load_documents
from cycle_oracle.models import load_tokenizer
from recipes.common import extract_store, finish_run, injection_norm, load_start, start_run


def one_row_per_document(store, seed: int, limit: int) -> list[int]:
    by_doc: dict[str, list[int]] = {}
    for i, r in enumerate(store.records):
        by_doc.setdefault(r["doc_id"], []).append(i)
    rng = random.Random(seed)
    rows = [rng.choice(v) for _, v in sorted(by_doc.items())]
    return rows[:limit]


def run(cfg, out, resume: bool = False) -> dict:
    run = start_run(cfg, out, "describe", resume)
    cfg = run.cfg  # model.dtype: auto resolved
    docs = load_documents(cfg.corpus, cfg.num_documents)
    store, emb_norm = extract_store(run, docs)
    start = load_start(run)
    norm = injection_norm(run, emb_norm, store.mean_norm, start)
    rows = one_row_per_document(store, cfg.seed, cfg.num_documents)
    actor = RolloutActor.options(**run.placement.options("rollout", 0)).remote(run.model_spec, cfg.model_dump(mode="json"), run.layer, norm, 0,
                                                                            run.log_file("rollout-0"))
    if start is not None:
        remote_get(actor.sync.remote(start.tensors["decoder_adapter"], 1), cfg.ray.get_timeout_s, "rollout sync")
    t0 = time.time()
    vectors = store.activations[rows]
    batch = remote_get(
        actor.sample.remote(vectors, [0] * len(rows), 1, 0.0, 1.0, cfg.sampling.max_new_tokens),
        cfg.ray.get_timeout_s, "describing activations",
    )
    elapsed = time.time() - t0
    tokenizer = load_tokenizer(run.model_path)
    items = []
    for i, row in enumerate(rows):
        rec = store.records[row]
        context = tokenizer.decode(store.context_window(row))
        items.append({**rec, "context": context, "description": batch.texts[i], "truncated": bool(batch.truncated[i])})
    results = {
        "kind": "describe",
        "model": cfg.model.name,
        "layer": run.layer,
        "injection_norm": norm,
        "weight_version": int(batch.versions.max()),
        "num_descriptions": len(items),
        "seconds": elapsed,
        "descriptions": items,
    }
    run.write_results("results.json", results)
    run.metrics.log("describe", 0, {"num_descriptions": len(items), "seconds": elapsed})
    ray.kill(actor)
    finish_run(run)
    for it in items[:5]:
        print(f"  [{it['doc_id']} @{it['token_index']} {it['token']!r}] -> {it['description'][:120]!r}")
    return results
