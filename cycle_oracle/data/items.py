"""The one item type every warmup builder yields, the example the learner trains on, and
data-problem reporting (the documents builders read are `corpus.Document`).

A `WarmupItem` is what the supervised warmup consumes: the target reads `context_ids`, one position
from `read_positions` is chosen (seeded) per use, its activation is injected into the decoder,
which is trained to produce `answer` after `question`. Every split is by `source_id` (a document
id, a document group such as a Wikipedia article, or a behaviour label), never by token. An
`SftExample` is one use of an item, its read position chosen (`data/read_positions.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("cycle_oracle.data")

Task = Literal["latentqa", "token_prediction", "description"]
TASKS: tuple[str, ...] = ("latentqa", "token_prediction", "description")


@dataclass(frozen=True)
class WarmupItem:
    task: Task
    source_id: str
    """Document id / document group / behaviour label: every split is by this, never by token."""
    context_ids: tuple[int, ...]
    """Token ids the TARGET reads (already chat-templated where relevant)."""
    read_positions: tuple[int, ...]
    """Allowed activation positions within context_ids (one is chosen per use with a seeded RNG)."""
    question: str
    """The decoder's question (for "description": the config's one description instruction)."""
    answer: str
    """The supervised answer text."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown warmup task {self.task!r}; expected one of {TASKS}")
        if not self.read_positions:
            raise ValueError(f"{self.task} item from {self.source_id!r} has no read positions")
        n = len(self.context_ids)
        bad = [p for p in self.read_positions if not 0 <= p < n]
        if bad:
            raise ValueError(f"{self.task} item from {self.source_id!r}: read positions {bad} outside a {n}-token context")
        if not self.question.strip() or not self.answer.strip():
            raise ValueError(f"{self.task} item from {self.source_id!r} has an empty question or answer")


@dataclass
class SftExample:
    """One supervised warmup example: the target reads context_ids, the activation at `position`
    is injected into the decoder prompt built from `question`, and `answer` is learned."""

    task: str
    context_ids: list[int]
    position: int | Sequence[int]
    """One position (its activation fills every placeholder) or one per placeholder."""
    question: str
    answer: str


class MalformedDataError(ValueError):
    """A data row that does not match its format (raised with file and row when strict=True)."""


@dataclass
class ProblemLog:
    """Collects malformed rows: raise at the first (strict) or count, keep the first messages, log."""

    strict: bool = False
    keep: int = 20
    count: int = 0
    messages: list[str] = field(default_factory=list)

    def report(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.strict:
            raise MalformedDataError(f"malformed data row: {message} (set warmup.strict=false to skip and count such rows)")
        self.count += 1
        if len(self.messages) < self.keep:
            self.messages.append(message)
        log.warning("skipping malformed data row: %s", message)

    def summary(self) -> dict:
        return {"malformed_rows": self.count, "problems": list(self.messages)}
