"""Token prediction items from a text corpus, and the corpus the warmup's text tasks share.

Corpus kinds (`WarmupSettings.corpus.kind`):
- `text_files`, `datasets`: the documents `corpus.load_documents` reads for every corpus (same ids,
  texts and article groups as GRPO's and the evals'), a seeded subset, texts stripped.
- `embedded`: the default for a fresh machine: the TARGET model's replies to the seed prompts in
  `embedded/seed_prompts.txt` (x a few framings), generated through `generate_fn` and cached.

Items: at a seeded position p (at least `min_position` tokens in), "What are the previous k
tokens?" (answer: the k tokens before p) or "What are the next k tokens?" (the k tokens after p),
k seeded in 1..16, and with the `current` direction "What is the current token?" (the token at p
itself: the read token's identity, the first thing a description of v can say). The target reads
the document up to and including p (`context_ids = tokens[:p+1]`, `read_positions = (p,)`) for
every direction; for "next" the answer lies beyond what the target read. Answers are the decoded true tokens, stripped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cycle_oracle.corpus import Document, load_documents
from cycle_oracle.data.behaviours import embedded_text, seed_prompts
from cycle_oracle.data.generation import (
    GenerateFn,
    cache_file,
    read_jsonl,
    resolve_model_id,
    run_generation,
    text_digest,
    write_jsonl,
)
from cycle_oracle.data.items import WarmupItem, log

CORPUS_VERSION = 1
FRAMINGS = (
    "{p}",
    "{p} Keep it to about 80 words.",
    "{p} Write it for a ten-year-old.",
    "{p} Use a formal style.",
    "{p} Make it lively and vivid.",
    "{p} Begin with a surprising fact.",
)


DIRECTIONS = ("previous", "next", "current")


def question_for(direction: str, k: int) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if direction == "current":
        return "What is the current token?"
    return f"What is the {direction} token?" if k == 1 else f"What are the {direction} {k} tokens?"


# ---------------------------------------------------------------- the warmup's corpus


def embedded_corpus(
    generate_fn: GenerateFn,
    num_documents: int = 200,
    seed: int = 0,
    max_new_tokens: int = 96,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[list[Document], dict]:
    """The target's replies to the embedded seed prompts (x framings), cached. Documents from one
    seed prompt share a group (they are about the same topic)."""
    prompts = seed_prompts()
    total = len(prompts) * len(FRAMINGS)
    if not 1 <= num_documents <= total:
        raise ValueError(f"the embedded corpus has {total} distinct prompts; asked for {num_documents} documents")
    mid = resolve_model_id(generate_fn, None, model_id)
    payload = {
        "kind": "corpus-embedded",
        "version": CORPUS_VERSION,
        "model_id": mid,
        "seed": seed,
        "num_documents": num_documents,
        "max_new_tokens": max_new_tokens,
        "texts": text_digest(embedded_text("seed_prompts.txt"), *FRAMINGS),
    }
    path = cache_file(cache_dir, "corpus-embedded", payload)
    if path.is_file():
        rows = read_jsonl(path)
        info = {"cache": str(path), "cached": True, "generated": 0, "seconds": 0.0}
    else:
        rng = random.Random(f"corpus:{seed}")
        order = []
        for j in range(len(FRAMINGS)):  # every prompt once before any prompt twice
            round_ = list(range(len(prompts)))
            rng.shuffle(round_)
            order += [(i, j) for i in round_]
        order = order[:num_documents]
        chats = [[{"role": "user", "content": FRAMINGS[j].format(p=prompts[i])}] for i, j in order]
        t0 = time.time()
        texts = run_generation(generate_fn, chats, max_new_tokens, "embedded corpus", progress)
        seconds = time.time() - t0
        rows = [
            {"doc_id": f"embedded-gen:{i}:{j}", "source_id": f"embedded-gen:{i}", "prompt": c[0]["content"], "text": t.strip()}
            for (i, j), c, t in zip(order, chats, texts)
        ]
        write_jsonl(path, rows, {**payload, "records": len(rows), "seconds": round(seconds, 1)})
        info = {"cache": str(path), "cached": False, "generated": len(rows), "seconds": round(seconds, 1)}
    docs = [Document(r["doc_id"], r["text"], r["source_id"]) for r in rows if r["text"].strip()]
    info["empty_documents"] = len(rows) - len(docs)
    return docs, info


def load_corpus(
    source,
    generate_fn: GenerateFn | None,
    num_documents: int,
    seed: int = 0,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_new_tokens: int = 96,
    documents: Sequence[Document] | None = None,
) -> tuple[list[Document], dict]:
    """Documents for token prediction / description from a `DataSource` (config.py): for `embedded`
    the target's replies (`embedded_corpus`), otherwise a seeded subset of `corpus.load_documents`
    (or `documents`, that subset as the caller already read it) with each text stripped (a
    `datasets` row may carry surrounding whitespace)."""
    info: dict = {"kind": source.kind}
    if source.kind == "embedded":
        if generate_fn is None:
            raise ValueError("the embedded corpus is written by the target model: pass a generate_fn")
        limit = min(x for x in (num_documents, source.max_documents) if x is not None)
        docs, gen_info = embedded_corpus(generate_fn, limit, seed, max_new_tokens, model_id, cache_dir, progress)
        info.update(gen_info)
    else:
        if documents is None:
            documents = load_documents(source, num_documents, seed)
        docs = [replace(d, text=d.text.strip()) for d in documents]
        if source.kind == "text_files":
            info["paths"] = list(source.paths)
        else:
            info["name"] = source.name
    info["documents"] = len(docs)
    info["sources"] = len({d.group for d in docs})
    return docs, info


# ---------------------------------------------------------------- items


def tokenize_text(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The same tokenization as activation extraction (special tokens as the tokenizer adds them)."""
    return list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"])


def content_span(ids: Sequence[int], special: set[int]) -> tuple[int, int] | None:
    """(first, last) index of non-special tokens, or None."""
    content = [i for i, t in enumerate(ids) if t not in special]
    return (content[0], content[-1]) if content else None


def token_prediction_items(
    documents: Sequence[Document],
    tokenizer,
    seed: int = 0,
    items_per_document: int = 4,
    max_tokens: int = 128,
    min_position: int = 8,
    max_k: int = 16,
    directions: Sequence[str] = ("previous", "next"),
) -> tuple[list[WarmupItem], dict]:
    """`items_per_document` seeded (direction, k, p) questions per document (see module docstring)."""
    special = set(tokenizer.all_special_ids)
    items: list[WarmupItem] = []
    stats = {"documents": len(documents), "too_short": 0, "empty_answers": 0}
    for doc in documents:
        ids = tokenize_text(tokenizer, doc.text, max_tokens)
        span = content_span(ids, special)
        rng = random.Random(f"tokpred:{seed}:{doc.doc_id}")
        if span is None or span[1] - span[0] < min_position + 1:
            stats["too_short"] += 1
            continue
        lo, hi = span
        made: set[tuple[str, int, int]] = set()
        for _ in range(items_per_document * 4):
            if len(made) >= items_per_document:
                break
            direction = rng.choice(list(directions))
            k = 1 if direction == "current" else rng.randint(1, max_k)
            if direction == "current":
                first, last = lo + min_position, hi
            elif direction == "next":
                first, last = lo + min_position, hi - k
            else:
                first, last = max(lo + min_position, lo + k), hi
            if first > last:  # document too short for this k: shrink it
                k = max(1, k - (first - last))
                first, last = (lo + min_position, hi - k) if direction == "next" else (max(lo + min_position, lo + k), hi)
                if first > last:
                    continue
            p = rng.randint(first, last)
            if (direction, k, p) in made:
                continue
            answer_ids = {"next": ids[p + 1 : p + 1 + k], "previous": ids[p - k : p], "current": ids[p : p + 1]}[direction]
            answer = tokenizer.decode(answer_ids).strip()
            if not answer:
                stats["empty_answers"] += 1
                continue
            made.add((direction, k, p))
            items.append(
                WarmupItem("token_prediction", doc.group, tuple(ids[: p + 1]), (p,), question_for(direction, k), answer)
            )
    stats["items"] = len(items)
    if stats["too_short"]:
        log.info("token prediction: %d document(s) too short to use", stats["too_short"])
    return items, stats
