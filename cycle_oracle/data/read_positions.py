"""Where the target is read for one use of a warmup item: a seeded choice among the item's
`read_positions`, and the `SftExample` that carries it (training steps, centring, held-out evals)."""

from __future__ import annotations

import random

from cycle_oracle.data.items import SftExample, WarmupItem


def read_positions(item: WarmupItem, rng: random.Random, num_placeholders: int) -> int | tuple[int, ...]:
    """Where the target is read for one example: LatentQA reads up to `num_placeholders` distinct
    readable positions (`warmup.latentqa_read`: the reply header by default; one per placeholder, in order),
    the other tasks one position (repeated over the placeholders)."""
    if item.task != "latentqa" or num_placeholders == 1:
        return rng.choice(item.read_positions)
    chosen = sorted(rng.sample(list(item.read_positions), min(num_placeholders, len(item.read_positions))))
    return tuple(chosen + [chosen[-1]] * (num_placeholders - len(chosen)))


def to_example(item: WarmupItem, rng: random.Random, num_placeholders: int = 1, context_from: WarmupItem | None = None) -> SftExample:
    """The item's question and answer; the activation from `context_from` (default: the item itself;
    another source's item for the shuffled control)."""
    ctx = context_from or item
    return SftExample(item.task, list(ctx.context_ids), read_positions(ctx, rng, num_placeholders), item.question, item.answer)
