"""Token prediction items from a text corpus, and the corpus loaders the warmup shares.

Corpus kinds (`WarmupSettings.corpus.kind`):
- `text_files`: plain text files. Documents are paragraphs (blocks separated by blank lines);
  WikiText-style headings `= Title =` start a new article and are dropped, as are sub-headings
  `= = Section = =`. Paragraphs of one article share a `source_id`, so a split never puts one
  article on both sides.
- `datasets`: a HF `datasets` name (and/or `paths` as data files) with a text column; needs a
  reachable hub or local files, and fails with a clear message otherwise.
- `embedded`: the default for a fresh machine: the TARGET model's replies to the seed prompts in
  `embedded/seed_prompts.txt` (x a few framings), generated through `generate_fn` and cached.

Items: at a seeded position p (at least `min_position` tokens in), "What are the previous k
tokens?" (answer: the k tokens before p) or "What are the next k tokens?" (the k tokens after p),
k seeded in 1..16. The target reads the document up to and including p (`context_ids =
tokens[:p+1]`, `read_positions = (p,)`) for both directions; for "next" the answer lies beyond
what the target read. Answers are the decoded true tokens, stripped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

from cycle_oracle.corpus import split_paragraphs
from cycle_oracle.data.generation import (
    GenerateFn,
    cache_file,
    read_jsonl,
    resolve_model_id,
    run_generation,
    text_digest,
    write_jsonl,
)
from cycle_oracle.data.items import TextDocument, WarmupItem, log

CORPUS_VERSION = 1
FRAMINGS = (
    "{p}",
    "{p} Keep it to about 80 words.",
    "{p} Write it for a ten-year-old.",
    "{p} Use a formal style.",
    "{p} Make it lively and vivid.",
    "{p} Begin with a surprising fact.",
)


def question_for(direction: str, k: int) -> str:
    if direction not in ("previous", "next"):
        raise ValueError(f"direction must be 'previous' or 'next', got {direction!r}")
    return f"What is the {direction} token?" if k == 1 else f"What are the {direction} {k} tokens?"


# ---------------------------------------------------------------- corpus loading


def load_text_files(paths: Sequence[str | Path], min_chars: int = 80) -> list[TextDocument]:
    """Paragraph documents of text files, with the same ids and article groups as the corpus that
    GRPO and the evals read (`corpus.split_paragraphs`), so their splits agree."""
    if not paths:
        raise ValueError("corpus kind text_files needs `paths` (a list of text files)")
    docs: list[TextDocument] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path} (set warmup.corpus.paths to existing text files)")
        paragraphs = split_paragraphs(path.read_text(encoding="utf-8", errors="replace"), path.stem, min_chars)
        docs.extend(TextDocument(d.doc_id, d.text, d.group or d.doc_id) for d in paragraphs)
    if not docs:
        raise ValueError(f"no documents of at least {min_chars} characters in {list(paths)}")
    return docs


def load_datasets_corpus(name: str | None, paths: Sequence[str] = (), split: str = "train") -> list[TextDocument]:
    """A HF `datasets` corpus: by name (hub or local script/folder) and/or local data files."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("corpus kind 'datasets' needs the `datasets` package: pip install datasets") from err
    if not name and not paths:
        raise ValueError("corpus kind 'datasets' needs a `name` (hub dataset) or `paths` (data files)")
    builder = name
    if not builder:
        ext = Path(paths[0]).suffix.lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(ext, "text")
    try:
        ds = datasets.load_dataset(builder, data_files=list(paths) or None, split=split)
    except Exception as err:
        raise FileNotFoundError(
            f"could not load the datasets corpus {name or list(paths)!r} ({type(err).__name__}: {err}). Offline machines "
            f"should use warmup.corpus.kind=text_files with local paths, or kind=embedded"
        ) from err
    columns = ds.column_names
    column = "text" if "text" in columns else next((c for c in columns if ds.features[c].dtype == "string"), None)
    if column is None:
        raise ValueError(f"datasets corpus {builder!r} has no text column (columns: {columns})")
    tag = name or Path(paths[0]).stem
    return [TextDocument(f"{tag}:{i}", str(row[column]).strip()) for i, row in enumerate(ds) if str(row[column] or "").strip()]


def embedded_corpus(
    generate_fn: GenerateFn,
    num_documents: int = 200,
    seed: int = 0,
    max_new_tokens: int = 96,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[list[TextDocument], dict]:
    """The target's replies to the embedded seed prompts (x framings), cached. Documents from one
    seed prompt share a source_id (they are about the same topic)."""
    from cycle_oracle.data.embedded import embedded_text, seed_prompts

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
    docs = [TextDocument(r["doc_id"], r["text"], r["source_id"]) for r in rows if r["text"].strip()]
    info["empty_documents"] = len(rows) - len(docs)
    return docs, info


def sample_documents(docs: list[TextDocument], limit: int | None, seed: int) -> list[TextDocument]:
    """A seeded subset of `limit` documents in their original order (spread over the whole corpus)."""
    if limit is None or limit >= len(docs):
        return docs
    keep = sorted(random.Random(f"docs:{seed}").sample(range(len(docs)), limit))
    return [docs[i] for i in keep]


def load_corpus(
    source,
    generate_fn: GenerateFn | None,
    num_documents: int,
    seed: int = 0,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_new_tokens: int = 96,
) -> tuple[list[TextDocument], dict]:
    """Documents for token prediction / description from a `DataSource` (config.py)."""
    limit = min(x for x in (num_documents, source.max_documents) if x is not None)
    info: dict = {"kind": source.kind}
    if source.kind == "embedded":
        if generate_fn is None:
            raise ValueError("the embedded corpus is written by the target model: pass a generate_fn")
        docs, gen_info = embedded_corpus(generate_fn, limit, seed, max_new_tokens, model_id, cache_dir, progress)
        info.update(gen_info)
    elif source.kind == "text_files":
        docs = sample_documents(load_text_files(source.paths), limit, seed)
        info["paths"] = list(source.paths)
    elif source.kind == "datasets":
        docs = sample_documents(load_datasets_corpus(source.name, source.paths), limit, seed)
        info["name"] = source.name
    else:
        raise ValueError(f"corpus kind {source.kind!r} is not a text corpus (expected embedded, text_files or datasets)")
    info["documents"] = len(docs)
    info["sources"] = len({d.source_id for d in docs})
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
    documents: Sequence[TextDocument],
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
            k = rng.randint(1, max_k)
            if direction == "next":
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
            answer_ids = ids[p + 1 : p + 1 + k] if direction == "next" else ids[p - k : p]
            answer = tokenizer.decode(answer_ids).strip()
            if not answer:
                stats["empty_answers"] += 1
                continue
            made.add((direction, k, p))
            items.append(
                WarmupItem("token_prediction", doc.source_id, tuple(ids[: p + 1]), (p,), question_for(direction, k), answer)
            )
    stats["items"] = len(items)
    if stats["too_short"]:
        log.info("token prediction: %d document(s) too short to use", stats["too_short"])
    return items, stats
