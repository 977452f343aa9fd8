"""The embedded LatentQA parts and the behaviours they compose (plain package data, no model).

Behaviours are composed from parts in `embedded/*.txt`: a persona, a goal or a hidden instruction,
each combined with a tone (persona x tone, goal x tone, hidden x tone: several hundred distinct
behaviours). Each behaviour has a label (e.g. `persona-pirate+tone-grumpy`), a system prompt (the
parts' sentences) and QA pairs from `embedded/qa_templates.txt`: descriptive ("How will the
assistant speak?" -> "In a grumpy and irritated way.") and inductive ("What will the reply be
like?" -> its effect on the reply), plus negative answers for parts a behaviour lacks. The stimuli
(user questions) and seed prompts are read here too. `data/embedded.py` builds the records from
them with the target; the recipe schema (`config.py`) checks its sizes against `count_behaviours`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

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
