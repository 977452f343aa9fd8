"""`kind: describe` — extract activations from the corpus and describe them with the decoder
(untrained, or `init_from` a checkpoint) through a vLLM rollout actor. Greedy decoding."""

from __future__ import annotations

import random
import time

import ray

from actors.cluster import remote_get
from actors.rollout import RolloutActor
from cycle_oracle.corpus import load_documents
from cycle_oracle.models import load_tokenizer
from recipes.common import extract_store, injection_norm, start_run


def one_row_per_document(store, seed: int, limit: int) -> list[int]:
    by_doc: dict[str, list[int]] = {}
    for i, r in enumerate(store.records):
        by_doc.setdefault(r["doc_id"], []).append(i)
    rng = random.Random(seed)
    rows = [rng.choice(v) for _, v in sorted(by_doc.items())]
    return rows[:limit]


def run(cfg, out, resume: bool = False) -> dict:
    run = start_run(cfg, out, "describe")
    docs = load_documents(cfg.corpus, cfg.num_documents)
    store, emb_norm = extract_store(run, docs)
    norm = injection_norm(cfg, emb_norm, store.mean_norm)
    rows = one_row_per_document(store, cfg.seed, cfg.num_documents)
    actor = RolloutActor.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus).remote(
        run.model_path, cfg.model_dump(mode="json"), run.layer, norm, 0
    )
    if cfg.init_from:
        from cycle_oracle.checkpoint import latest_checkpoint, load_checkpoint

        ckpt = latest_checkpoint(cfg.init_from) or cfg.init_from
        tensors, _, _ = load_checkpoint(ckpt)
        remote_get(actor.sync.remote(tensors["decoder_adapter"], 1), cfg.ray.get_timeout_s, "rollout sync")
    t0 = time.time()
    vectors = store.activations[rows]
    samples, version = remote_get(
        actor.sample.remote(vectors, [0] * len(rows), 1, 0.0, 1.0, cfg.sampling.max_new_tokens),
        cfg.ray.get_timeout_s, "describing activations",
    )
    elapsed = time.time() - t0
    tokenizer = load_tokenizer(run.model_path)
    items = []
    for row, group in zip(rows, samples):
        rec = store.records[row]
        context = tokenizer.decode(store.context_window(row))
        items.append({**rec, "context": context, "description": group[0].text, "truncated": group[0].truncated})
    results = {
        "kind": "describe",
        "model": cfg.model.name,
        "layer": run.layer,
        "injection_norm": norm,
        "weight_version": version,
        "num_descriptions": len(items),
        "seconds": elapsed,
        "descriptions": items,
    }
    run.write_results("results.json", results)
    run.metrics.log("describe", 0, {"num_descriptions": len(items), "seconds": elapsed})
    run.metrics.close()
    ray.kill(actor)
    for it in items[:5]:
        print(f"  [{it['doc_id']} @{it['token_index']} {it['token']!r}] -> {it['description'][:120]!r}")
    return results
