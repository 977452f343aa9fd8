"""Build all warmup data from `WarmupSettings`: the three tasks, split by source, plus a report.

    train, heldout, report = build_warmup_data(cfg.warmup, cfg.split.heldout_fraction, tokenizer, generate_fn,
                                               cfg.description_instruction, seed=cfg.seed,
                                               model_id=cfg.model.name)

Sources:
- `settings.latentqa.kind`: `embedded` (behaviours written for this project, completions by the
  target; `num_behaviours`) or `latentqa` (folders in the public LatentQA format: `paths`, or
  `<shared_data_dir>/latentqa/eval` when no paths are given; `max_documents` caps the labels).
- `settings.corpus.kind`: `embedded` (the target's replies to the embedded seed prompts),
  `text_files` or `datasets`; `num_corpus_documents` (and `max_documents`) cap the documents. The
  same documents feed token prediction and description, and one held-out document set is used
  for both, so a held-out document is never seen in training by either task.
Tasks whose mixture weight is 0 (or missing) are not built (no generation is spent on them).
Every split is by `source_id` with `heldout_fraction` and the seed.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from cycle_oracle.data.description import build_description_items
from cycle_oracle.data.embedded import build_embedded_latentqa
from cycle_oracle.data.generation import GenerateFn
from cycle_oracle.data.items import TASKS, WarmupItem, log
from cycle_oracle.data.latentqa import LatentQAResult, load_latentqa
from cycle_oracle.data.mixture import heldout_sources, split_by_source
from cycle_oracle.data.token_prediction import load_corpus, token_prediction_items


def _latentqa_paths(source, shared_data_dir) -> list[Path]:
    if source.paths:
        return [Path(p).expanduser() for p in source.paths]
    if shared_data_dir is not None:
        return [Path(shared_data_dir) / "latentqa" / "eval"]
    raise ValueError(
        "warmup.latentqa.kind=latentqa needs warmup.latentqa.paths (folders in the public LatentQA format: "
        "system.json / stimulus*.json + qa.json), or a shared data folder holding latentqa/eval"
    )


def _cap_labels(result: LatentQAResult, limit: int | None, seed: int) -> LatentQAResult:
    if limit is None:
        return result
    labels = result.labels
    if len(labels) <= limit:
        return result
    keep = set(random.Random(f"labels:{seed}").sample(labels, limit))
    result.items = [it for it in result.items if it.source_id in keep]
    result.stats["labels_capped_to"] = limit
    return result


def build_warmup_data(
    settings,
    heldout_fraction: float,
    tokenizer,
    generate_fn: GenerateFn | None,
    description_instruction: str,
    shared_data_dir: str | Path | None = None,
    seed: int = 0,
    *,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    max_context_tokens: int = 128,
    max_chat_tokens: int = 256,
    stimuli_per_behaviour: int = 2,
    completion_tokens: int = 64,
    corpus_tokens: int = 96,
    description_tokens: int = 48,
    token_items_per_document: int = 4,
    progress: bool = True,
    corpus_documents: list | None = None,
) -> tuple[dict[str, list[WarmupItem]], dict[str, list[WarmupItem]], dict]:
    """(train, heldout, report): task -> items for each side, and a JSON-able report (counts,
    sources, malformed rows, cache files, timings). `generate_fn` may be None only when nothing
    needs generating (public LatentQA + text corpus + description weight 0). `corpus_documents`:
    the text corpus's documents already read (by the driver, `load_corpus`); None reads them here."""
    t_start = time.time()
    weights = settings.mixture
    wanted = [t for t in TASKS if weights.get(t, 0) > 0]
    train: dict[str, list[WarmupItem]] = {t: [] for t in TASKS}
    heldout: dict[str, list[WarmupItem]] = {t: [] for t in TASKS}
    report: dict = {"seed": seed, "tasks": wanted, "malformed_rows": 0, "problems": []}

    if "latentqa" in wanted:
        t0 = time.time()
        source = settings.latentqa
        if source.kind == "embedded":
            if generate_fn is None:
                raise ValueError("the embedded LatentQA data is completed by the target model: pass a generate_fn")
            result = build_embedded_latentqa(
                tokenizer, generate_fn, settings.num_behaviours, stimuli_per_behaviour, completion_tokens, seed,
                model_id, cache_dir, max_chat_tokens, progress, read=settings.latentqa_read,
            )
        elif source.kind == "latentqa":
            result = load_latentqa(
                _latentqa_paths(source, shared_data_dir), tokenizer, settings.strict, max_chat_tokens, read=settings.latentqa_read
            )
            result = _cap_labels(result, source.max_documents, seed)
        else:
            raise ValueError(f"warmup.latentqa.kind={source.kind!r}: expected 'embedded' or 'latentqa' (a folder in the public format)")
        train["latentqa"], heldout["latentqa"] = split_by_source(result.items, heldout_fraction, seed)
        report["latentqa"] = {"kind": source.kind, **result.stats, "seconds": round(time.time() - t0, 1)}
        report["malformed_rows"] += result.malformed
        report["problems"] += result.problems

    if "token_prediction" in wanted or "description" in wanted:
        t0 = time.time()
        docs, corpus_info = load_corpus(
            settings.corpus, generate_fn, settings.num_corpus_documents, seed, model_id, cache_dir, progress, corpus_tokens,
            documents=corpus_documents,
        )
        corpus_info["seconds"] = round(time.time() - t0, 1)
        report["corpus"] = corpus_info
        held = heldout_sources((d.group for d in docs), heldout_fraction, seed)
        if "token_prediction" in wanted:
            items, stats = token_prediction_items(docs, tokenizer, seed, token_items_per_document, max_context_tokens,
                                                  directions=settings.token_prediction_directions)
            train["token_prediction"], heldout["token_prediction"] = split_by_source(items, heldout_fraction, seed, held)
            report["token_prediction"] = stats
        if "description" in wanted:
            if generate_fn is None and settings.description_sentence:
                raise ValueError("description targets are written by the target model: pass a generate_fn")
            t0 = time.time()
            items, info = build_description_items(
                docs, tokenizer, generate_fn, description_instruction, seed, settings.description_items_per_document,
                max_tokens=max_context_tokens, max_new_tokens=description_tokens, model_id=model_id,
                cache_dir=cache_dir, progress=progress, quote_tokens=settings.description_quote_tokens,
                sentence=settings.description_sentence, quote_style=settings.description_quote_style,
            )
            train["description"], heldout["description"] = split_by_source(items, heldout_fraction, seed, held)
            report["description"] = {**info, "seconds": round(time.time() - t0, 1)}

    report["train"] = {t: len(v) for t, v in train.items()}
    report["heldout"] = {t: len(v) for t, v in heldout.items()}
    report["train_sources"] = {t: len({it.source_id for it in v}) for t, v in train.items()}
    report["heldout_sources"] = {t: len({it.source_id for it in v}) for t, v in heldout.items()}
    report["seconds"] = round(time.time() - t_start, 1)
    for t in wanted:
        if not train[t]:
            log.warning("warmup task %s has no training items (see the report: %s)", t, report.get(t))
    log.info("warmup data: train %s, held-out %s, %d malformed row(s) skipped", report["train"], report["heldout"], report["malformed_rows"])
    return train, heldout, report
