"""Embedded LatentQA-style data for a fresh machine (all text written for this project).

Behaviours are composed from parts in `embedded/*.txt`: a persona, a goal or a hidden instruction,
each combined with a tone (persona x tone, goal x tone, hidden x tone: several hundred distinct
behaviours). Each behaviour has a label (e.g. `persona-pirate+tone-grumpy`), a system prompt (the
parts' sentences) and QA pairs from `embedded/qa_templates.txt`: descriptive ("How will the
assistant speak?" -> "In a grumpy and irritated way.") and inductive ("What will the reply be
like?" -> its effect on the reply), plus negative answers for parts a behaviour lacks.

Each chosen behaviour is paired with a few stimuli (user questions in `embedded/stimuli.txt`) and
the TARGET model writes a completion with the behaviour as its system turn (through `generate_fn`,
so the caller picks HF or vLLM). The records are built once and cached as JSONL, keyed by
(model id, seed, sizes, the embedded texts). The target then reads system + stimulus + completion
with the system turn masked, exactly like the public LatentQA data (see latentqa.py).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cycle_oracle.data.generation import (
    GenerateFn,
    cache_file,
    hf_generate_fn,  # noqa: F401  (re-exported: recipes import it from here)
    read_jsonl,
    resolve_model_id,
    run_generation,
    text_digest,
    write_jsonl,
)
from cycle_oracle.data.items import WarmupItem, log
from cycle_oracle.data.latentqa import LatentQAResult, chat_context

EMBEDDED_VERSION = 1
PART_FILES = {"persona": "personas.txt", "tone": "tones.txt", "goal": "goals.txt", "hidden": "hidden.txt"}
BASE_KINDS = ("persona", "goal", "hidden")  # each combined with a tone


def embedded_text(name: str) -> str:
    return resources.files("cycle_oracle.data").joinpath(f"embedded/{name}").read_text(encoding="utf-8")


def embedded_lines(name: str) -> list[str]:
    """Non-empty, non-comment lines of an embedded text file."""
    return [ln.strip() for ln in embedded_text(name).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@dataclass(frozen=True)
class Part:
    kind: str
    key: str
    system: str
    desc: str
    effect: str


@dataclass(frozen=True)
class Behaviour:
    label: str
    system: str
    qa: tuple[tuple[str, str], ...]


def load_parts(kind: str) -> list[Part]:
    parts = []
    for n, line in enumerate(embedded_lines(PART_FILES[kind])):
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 4 or not all(fields):
            raise ValueError(f"embedded/{PART_FILES[kind]} line {n}: expected 'key | system | description | effect', got {line!r}")
        parts.append(Part(kind, *fields))
    keys = [p.key for p in parts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"embedded/{PART_FILES[kind]} has duplicate keys")
    return parts


def load_qa_templates() -> list[tuple[str, str, str]]:
    out = []
    for n, line in enumerate(embedded_lines("qa_templates.txt")):
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 3 or not all(fields):
            raise ValueError(f"embedded/qa_templates.txt line {n}: expected 'slot | question | answer', got {line!r}")
        out.append((fields[0], fields[1], fields[2]))
    return out


def stimuli() -> list[str]:
    return embedded_lines("stimuli.txt")


def seed_prompts() -> list[str]:
    return embedded_lines("seed_prompts.txt")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def compose(base: Part, tone: Part, templates: list[tuple[str, str, str]]) -> Behaviour:
    """One behaviour: a persona / goal / hidden part combined with a tone."""
    fields = {"tone": tone.desc, "tone_effect": tone.effect}
    for kind in BASE_KINDS:
        fields[kind] = fields[f"{kind}_effect"] = ""
    fields[base.kind] = base.desc
    fields[f"{base.kind}_effect"] = base.effect
    fields["Persona"] = _cap(fields["persona"])
    system = f"{base.system} {tone.system}"
    fields["system"] = system
    fields["summary"] = {
        "persona": f"It will speak as {base.desc}, in a {tone.desc} way.",
        "goal": f"It will try {base.desc}, speaking in a {tone.desc} way.",
        "hidden": f"{base.desc} It will speak in a {tone.desc} way.",
    }[base.kind]
    slots = {"any", "tone", base.kind} | {f"no_{k}" for k in BASE_KINDS if k != base.kind}
    qa, asked = [], set()
    for slot, question, answer in templates:
        if slot in slots and question not in asked:
            asked.add(question)
            qa.append((question, answer.format(**fields).strip()))
    return Behaviour(f"{base.kind}-{base.key}+tone-{tone.key}", system, tuple(qa))


def all_behaviours() -> dict[str, list[Behaviour]]:
    """Every composition, by base kind (deterministic order)."""
    templates = load_qa_templates()
    tones = load_parts("tone")
    return {kind: [compose(b, t, templates) for b in load_parts(kind) for t in tones] for kind in BASE_KINDS}


def count_behaviours(by_kind: dict[str, list[Behaviour]] | None = None) -> int:
    """How many distinct behaviours the embedded parts compose."""
    return sum(len(v) for v in (by_kind or all_behaviours()).values())


def choose_behaviours(n: int, seed: int) -> list[Behaviour]:
    """n distinct behaviours, seeded, balanced across kinds (round-robin over shuffled kinds)."""
    by_kind = all_behaviours()
    total = count_behaviours(by_kind)
    if n > total:
        raise ValueError(f"asked for {n} embedded behaviours but only {total} distinct ones exist")
    rng = random.Random(f"behaviours:{seed}")
    queues = {}
    for kind in BASE_KINDS:
        q = list(by_kind[kind])
        rng.shuffle(q)
        queues[kind] = q
    chosen: list[Behaviour] = []
    while len(chosen) < n:
        for kind in BASE_KINDS:
            if queues[kind] and len(chosen) < n:
                chosen.append(queues[kind].pop())
    return chosen


def embedded_digest() -> str:
    names = sorted(set(PART_FILES.values()) | {"qa_templates.txt", "stimuli.txt", "seed_prompts.txt"})
    return text_digest(*(embedded_text(n) for n in names))


def build_embedded_records(
    generate_fn: GenerateFn,
    num_behaviours: int = 120,
    stimuli_per_behaviour: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Records {label, system, stimulus, completion, qa} (one per behaviour x stimulus), from the
    cache when present, otherwise generated by the target and cached. Returns (records, info)."""
    mid = resolve_model_id(generate_fn, None, model_id)
    payload = {
        "kind": "latentqa-embedded",
        "version": EMBEDDED_VERSION,
        "model_id": mid,
        "seed": seed,
        "num_behaviours": num_behaviours,
        "stimuli_per_behaviour": stimuli_per_behaviour,
        "max_new_tokens": max_new_tokens,
        "texts": embedded_digest(),
    }
    path = cache_file(cache_dir, "latentqa-embedded", payload)
    if path.is_file():
        records = read_jsonl(path)
        log.info("embedded LatentQA: %d records from cache %s", len(records), path)
        return records, {"cache": str(path), "cached": True, "generated": 0, "seconds": 0.0}
    stims = stimuli()
    if not 1 <= stimuli_per_behaviour <= len(stims):
        raise ValueError(f"stimuli_per_behaviour must be in 1..{len(stims)}, got {stimuli_per_behaviour}")
    behaviours = choose_behaviours(num_behaviours, seed)
    rng = random.Random(f"stimuli:{seed}")
    rows = []
    for b in behaviours:
        for s in rng.sample(stims, stimuli_per_behaviour):
            rows.append({"label": b.label, "system": b.system, "stimulus": s, "qa": [list(p) for p in b.qa]})
    chats = [[{"role": "system", "content": r["system"]}, {"role": "user", "content": r["stimulus"]}] for r in rows]
    t0 = time.time()
    completions = run_generation(generate_fn, chats, max_new_tokens, "embedded LatentQA completions", progress)
    seconds = time.time() - t0
    for r, c in zip(rows, completions):
        r["completion"] = c.strip()
    write_jsonl(path, rows, {**payload, "records": len(rows), "seconds": round(seconds, 1)})
    log.info("embedded LatentQA: generated %d completions in %.1fs -> %s", len(rows), seconds, path)
    return rows, {"cache": str(path), "cached": False, "generated": len(rows), "seconds": round(seconds, 1)}


def records_to_items(records: list[dict], tokenizer, max_tokens: int = 256, read: str = "reply_header") -> tuple[list[WarmupItem], dict]:
    """Tokenize records (system turn masked) into `latentqa` items; one item per record x QA pair.
    `read` picks the readable positions (latentqa.READ_MODES)."""
    items: list[WarmupItem] = []
    stats = {"empty_completions": 0, "too_long": 0}
    for r in records:
        messages = [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["stimulus"]}]
        if r.get("completion", "").strip():
            messages.append({"role": "assistant", "content": r["completion"]})
        else:
            stats["empty_completions"] += 1
        built = chat_context(tokenizer, messages, 1, max_tokens, read)
        if built is None:
            stats["too_long"] += 1
            continue
        ids, readable = built
        for q, a in r["qa"]:
            items.append(WarmupItem("latentqa", r["label"], tuple(ids), tuple(readable), q, a))
    return items, stats


def build_embedded_latentqa(
    tokenizer,
    generate_fn: GenerateFn,
    num_behaviours: int = 120,
    stimuli_per_behaviour: int = 2,
    max_new_tokens: int = 64,
    seed: int = 0,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
    max_tokens: int = 256,
    progress: bool = True,
    read: str = "reply_header",
) -> LatentQAResult:
    """The embedded default for the `latentqa` task: items for `num_behaviours` behaviours."""
    records, info = build_embedded_records(
        generate_fn, num_behaviours, stimuli_per_behaviour, max_new_tokens, seed, model_id, cache_dir, progress
    )
    items, stats = records_to_items(records, tokenizer, max_tokens, read)
    stats.update(info)
    stats["records"] = len(records)
    stats["labels"] = len({it.source_id for it in items})
    stats["items"] = len(items)
    return LatentQAResult(items, 0, [], stats)
