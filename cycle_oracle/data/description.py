"""The description task: the one description prompt GRPO uses, with targets written offline.

For a seeded position p in a corpus document, the TARGET model is shown the window around p (the
`window` tokens before p and p itself) and asked "Here is a passage: ... In one sentence, describe
what this passage is about." Its first sentence becomes the answer. The decoder is then trained to
produce that answer from the activation at p under the config's description instruction (the
same prompt GRPO samples from), so GRPO starts from fluent, on-format descriptions.

Risk (see docs/DATA.md): the target wrote the answer while *reading the text*, so the decoder is
taught to restate context, not to read what the activation carries; the held-out eval compares
real vs shuffled vs zero activations to measure how much it actually uses v.

With `quote_tokens` N > 0 the answer starts with a quote of the last N tokens up to p, content the
encoder can reconstruct from, first so that a length cap cannot cut it off (the quote is added on
load; the cache holds the raw sentences). Without the sentence (`sentence=False`) the answer is the
quote alone: the description says what can be read at p and stops, and no target generation is
needed, so the task can use many positions per document at no cost.

Generated descriptions are cached as JSONL keyed by the model, seed, sizes, the tokenizer and the
documents themselves.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

from cycle_oracle.corpus import Document
from cycle_oracle.data.generation import (
    GenerateFn,
    cache_file,
    read_jsonl,
    resolve_model_id,
    run_generation,
    text_digest,
    tokenizer_fingerprint,
    write_jsonl,
)
from cycle_oracle.data.items import WarmupItem, log
from cycle_oracle.data.token_prediction import content_span, tokenize_text

DESCRIPTION_VERSION = 1
PROMPT_TEMPLATE = "Here is a passage:\n\n{passage}\n\nIn one sentence, describe what this passage is about."
_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.S)
_LEAD_IN = re.compile(
    r"^(?:this|the)\s+(?:passage|text|excerpt|paragraph)\s+"
    r"(?:is\s+(?:all\s+)?about|is\s+describing|describes|explores|discusses|talks\s+about|focuses\s+on)\s+",
    re.I,
)


def clean_description(text: str, max_chars: int = 300, strip_lead_in: bool = True) -> str:
    """First complete sentence of the model's reply, whitespace collapsed; "" when unusable.

    A reply cut off before its first sentence ends (max_new_tokens) or longer than `max_chars` is
    unusable. With `strip_lead_in`, the prompt-induced opener ("This passage is about ...", which
    the 135M target writes almost every time) is removed, leaving the content ("A market town on a
    Saturday ..."), so the warmup does not teach one fixed opening to every description.
    """
    text = " ".join(text.replace("*", " ").split())
    m = _SENTENCE.match(text)
    if not m or len(m.group(1)) > max_chars:
        return ""
    first = m.group(1).strip()
    if strip_lead_in:
        rest = _LEAD_IN.sub("", first, count=1)
        if rest != first and sum(c.isalpha() for c in rest) >= 8:
            first = rest[:1].upper() + rest[1:]
    return first if any(c.isalpha() for c in first) else ""


QUOTE_STYLES = ("it_reads", "bare")


def quote_text(tail: str, style: str = "it_reads") -> str:
    """A quote of `tail` in a description's quote style: `It reads: "<tail>".` or the bare tail."""
    tail = " ".join(tail.split())
    if style == "it_reads":
        return f'It reads: "{tail}".'
    if style == "bare":
        return tail
    raise ValueError(f"quote style {style!r}; expected one of {QUOTE_STYLES}")


def quoted_tail(tokenizer, ids: Sequence[int], p: int, n: int, special: set[int], style: str = "it_reads") -> str:
    """The last n content tokens up to and including p, quoted in `style` (`quote_text`), whitespace collapsed."""
    lo = content_span(ids, special)[0]
    return quote_text(tokenizer.decode(ids[max(lo, p - n + 1) : p + 1]), style)


_QUOTED = re.compile(r'^\s*It reads: "(.*?)"\.\s*(.*)$', re.S)


def split_quoted_description(description: str) -> tuple[str | None, str]:
    """The inverse of `quoted_tail` on a written description: (quoted text or None, the rest).
    `It reads: "a b". It is about c.` -> ("a b", "It is about c."); no quote -> (None, description)."""
    m = _QUOTED.match(description)
    if m is None:
        return None, description.strip()
    return m.group(1), m.group(2).strip()


def description_prompt_text(passage: str) -> str:
    return PROMPT_TEMPLATE.format(passage=passage.strip())


def choose_positions(
    documents: Sequence[Document],
    tokenizer,
    seed: int,
    items_per_document: int,
    max_tokens: int,
    min_position: int,
) -> list[tuple[Document, list[int], int]]:
    """(document, its tokens, p) for seeded positions p >= min_position tokens into the content."""
    special = set(tokenizer.all_special_ids)
    out = []
    for doc in documents:
        ids = tokenize_text(tokenizer, doc.text, max_tokens)
        span = content_span(ids, special)
        if span is None or span[1] - span[0] < min_position:
            continue
        lo, hi = span
        rng = random.Random(f"describe:{seed}:{doc.doc_id}")
        candidates = list(range(lo + min_position, hi + 1))
        for p in sorted(rng.sample(candidates, min(items_per_document, len(candidates)))):
            out.append((doc, ids, p))
    return out


def build_description_items(
    documents: Sequence[Document],
    tokenizer,
    generate_fn: GenerateFn,
    instruction: str,
    seed: int = 0,
    items_per_document: int = 1,
    window: int = 24,
    max_tokens: int = 128,
    min_position: int = 8,
    max_new_tokens: int = 48,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    strip_lead_in: bool = True,
    quote_tokens: int = 0,
    sentence: bool = True,
    quote_style: str = "it_reads",
) -> tuple[list[WarmupItem], dict]:
    """`description` items: question = `instruction`, answer = the target's one-sentence description
    of the window [p - window, p] (with `quote_tokens` > 0, after `quoted_tail`);
    context_ids = the document up to p, read_positions = (p,). With `sentence=False` the answer is
    the quote alone (`quote_tokens` > 0): nothing is generated, so positions cost nothing."""
    if not instruction or not instruction.strip():
        raise ValueError("the description instruction is empty")
    chosen = choose_positions(documents, tokenizer, seed, items_per_document, max_tokens, min_position)
    special = set(tokenizer.all_special_ids)
    if not sentence:
        if quote_tokens < 1:
            raise ValueError(f"a description without its sentence is the quote alone: it needs quote_tokens >= 1, got {quote_tokens}")
        items = [WarmupItem("description", doc.group, tuple(ids[: p + 1]), (p,), instruction,
                             quoted_tail(tokenizer, ids, p, quote_tokens, special, quote_style))
                 for doc, ids, p in chosen]
        return items, {"positions": len(chosen), "items": len(items), "generated": 0, "sentence": False, "seconds": 0.0}
    windows = []
    for doc, ids, p in chosen:
        lo = content_span(ids, special)[0]
        windows.append(tokenizer.decode(ids[max(lo, p - window) : p + 1]).strip())
    mid = resolve_model_id(generate_fn, tokenizer, model_id)
    payload = {
        "kind": "description",
        "version": DESCRIPTION_VERSION,
        "model_id": mid,
        "seed": seed,
        "items_per_document": items_per_document,
        "window": window,
        "max_tokens": max_tokens,
        "min_position": min_position,
        "max_new_tokens": max_new_tokens,
        "prompt": PROMPT_TEMPLATE,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "documents": text_digest(*(f"{d.doc_id}\0{d.text}" for d in documents)),
    }
    path = cache_file(cache_dir, "description", payload)
    info: dict
    if path.is_file():
        rows = read_jsonl(path)
        info = {"cache": str(path), "cached": True, "generated": 0, "seconds": 0.0}
    else:
        chats = [[{"role": "user", "content": description_prompt_text(w)}] for w in windows]
        t0 = time.time()
        raw = run_generation(generate_fn, chats, max_new_tokens, "description targets", progress)
        seconds = time.time() - t0
        rows = [{"doc_id": doc.doc_id, "position": p, "window": w, "raw": r} for (doc, _ids, p), w, r in zip(chosen, windows, raw)]
        write_jsonl(path, rows, {**payload, "records": len(rows), "seconds": round(seconds, 1)})
        info = {"cache": str(path), "cached": False, "generated": len(rows), "seconds": round(seconds, 1)}
    if len(rows) != len(chosen):
        raise RuntimeError(f"description cache {path} has {len(rows)} rows for {len(chosen)} positions; delete it to rebuild")
    items, empty, lead_ins = [], 0, 0
    for (doc, ids, p), row in zip(chosen, rows):
        if row["doc_id"] != doc.doc_id or row["position"] != p:
            raise RuntimeError(f"description cache {path} does not match the documents; delete it to rebuild")
        answer = clean_description(row["raw"], strip_lead_in=strip_lead_in)  # cleaning is redone on load: raw is cached
        if not answer:
            empty += 1
            continue
        lead_ins += bool(_LEAD_IN.match(" ".join(row["raw"].split())))
        if quote_tokens:
            answer = f"{quoted_tail(tokenizer, ids, p, quote_tokens, special, quote_style)} {answer}"
        items.append(WarmupItem("description", doc.group, tuple(ids[: p + 1]), (p,), instruction, answer))
    if empty:
        log.info("description: %d unusable description(s) skipped (empty or cut off)", empty)
    info.update(positions=len(chosen), unusable_descriptions=empty, lead_ins=lead_ins, items=len(items))
    return items, info
