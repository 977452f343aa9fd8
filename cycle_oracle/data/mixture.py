"""Splitting by source and the deterministic, resumable warmup mixture.

`split_by_source` is the one split every builder uses: whole sources (documents, document groups,
behaviour labels) go to train or held-out, never single tokens or items.

`WarmupMixture` draws items from several task pools with given weights. Draw number i picks its
task from a RNG seeded by (seed, i) alone, and each task walks through seeded per-epoch
permutations of its pool (every item once per epoch). The whole state is therefore a handful of
ints (`state_dict()`: draws so far, and draws per task), JSON-able and exact on restore.

`sft_mix_examples` draws GRPO's supervised-mixing examples from the same task pools, per (seed, step).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

from cycle_oracle.data.items import SftExample, WarmupItem, log
from cycle_oracle.data.read_positions import to_example


def heldout_sources(source_ids: Iterable[str], heldout_fraction: float, seed: int) -> set[str]:
    """The held-out sources: those whose seeded hash falls below `heldout_fraction`.

    A source's side depends only on (seed, its id), never on which other sources were loaded, so
    every stage agrees: the warmup (which samples documents) and GRPO / the evals (which take the
    first N of the same corpus) hold out the same articles, and no held-out paragraph is trained on
    by either. The held-out share is therefore `heldout_fraction` on average, not exactly. With two
    or more sources, at least one lands on each side (the lowest hash is held out, the highest kept
    for training, if the threshold put all on one side).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    ids = sorted(set(source_ids))
    if len(ids) < 2:
        return set()
    draw = {s: source_draw(s, seed) for s in ids}
    held = {s for s in ids if draw[s] < heldout_fraction}
    if not held:
        held = {min(ids, key=draw.get)}
    elif len(held) == len(ids):
        held.discard(max(ids, key=draw.get))
    return held


def source_draw(source_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, source id): the source's place in every split."""
    digest = hashlib.sha256(f"split:{seed}:{source_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_source(
    items: Sequence[WarmupItem],
    heldout_fraction: float,
    seed: int,
    heldout: set[str] | None = None,
) -> tuple[list[WarmupItem], list[WarmupItem]]:
    """(train, held-out) with no source_id on both sides. `heldout` forces the held-out source set
    (e.g. the same documents across token prediction and description)."""
    held = heldout if heldout is not None else heldout_sources((it.source_id for it in items), heldout_fraction, seed)
    train = [it for it in items if it.source_id not in held]
    test = [it for it in items if it.source_id in held]
    return train, test


class WarmupMixture:
    """Weighted, deterministic, resumable sampling over task pools.

    sources: task -> items (tasks with no items, or weight <= 0, are left out with a log line);
    weights: task -> relative weight (renormalised over the tasks kept).
    """

    def __init__(self, sources: dict[str, list[WarmupItem]], weights: dict[str, float], seed: int = 0):
        kept = {t: list(v) for t, v in sources.items() if v and weights.get(t, 0.0) > 0}
        dropped = sorted((set(sources) | set(weights)) - set(kept))
        if dropped:
            log.info("warmup mixture: leaving out task(s) %s (no items or zero weight)", dropped)
        if not kept:
            raise ValueError(
                f"the warmup mixture has no task with both items and a positive weight (sources: "
                f"{ {t: len(v) for t, v in sources.items()} }, weights: {weights})"
            )
        self.tasks = sorted(kept)
        self.pools = kept
        total = sum(float(weights[t]) for t in self.tasks)
        self.weights = {t: float(weights[t]) / total for t in self.tasks}
        self._cum = []
        acc = 0.0
        for t in self.tasks:
            acc += self.weights[t]
            self._cum.append(acc)
        self.seed = int(seed)
        self.position = 0
        self.drawn = {t: 0 for t in self.tasks}
        self._perm_cache: dict[tuple[str, int], list[int]] = {}

    def _task_at(self, position: int) -> str:
        u = random.Random(f"mix:{self.seed}:{position}").random()
        for t, c in zip(self.tasks, self._cum):
            if u < c:
                return t
        return self.tasks[-1]

    def _perm(self, task: str, epoch: int) -> list[int]:
        key = (task, epoch)
        if key not in self._perm_cache:
            perm = list(range(len(self.pools[task])))
            random.Random(f"perm:{self.seed}:{task}:{epoch}").shuffle(perm)
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != task}
            self._perm_cache[key] = perm
        return self._perm_cache[key]

    def next(self) -> WarmupItem:
        task = self._task_at(self.position)
        n = len(self.pools[task])
        k = self.drawn[task]
        item = self.pools[task][self._perm(task, k // n)[k % n]]
        self.drawn[task] = k + 1
        self.position += 1
        return item

    def sample(self, n: int) -> list[WarmupItem]:
        return [self.next() for _ in range(n)]

    def counts(self) -> dict[str, int]:
        """Draws per task so far."""
        return dict(self.drawn)

    def sizes(self) -> dict[str, int]:
        return {t: len(v) for t, v in self.pools.items()}

    def epochs(self) -> dict[str, float]:
        return {t: self.drawn[t] / len(self.pools[t]) for t in self.tasks}

    def state_dict(self) -> dict:
        """JSON-able ints only; restoring it into a mixture over the same pools continues exactly."""
        return {"seed": self.seed, "position": self.position, "drawn": dict(self.drawn), "sizes": self.sizes()}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"mixture state was saved with seed {state['seed']}, this mixture has seed {self.seed}")
        if dict(state["sizes"]) != self.sizes():
            raise ValueError(
                f"mixture state was saved over pools of sizes {state['sizes']}, this mixture has {self.sizes()}: "
                f"the warmup data changed, so the saved position does not resume the same stream"
            )
        drawn = {t: int(v) for t, v in state["drawn"].items()}
        if set(drawn) != set(self.tasks) or sum(drawn.values()) != int(state["position"]):
            raise ValueError(f"inconsistent mixture state {state}")
        self.position = int(state["position"])
        self.drawn = drawn


def sft_mix_examples(pools: dict[str, list[WarmupItem]], settings, seed: int, step: int, num_placeholders: int) -> list[SftExample]:
    """GRPO's supervised mixing (`grpo.sft_mix_*`, `settings` = GrpoSettings): `sft_mix_examples`
    warmup examples for GRPO step `step`, tasks drawn by their `sft_mix_tasks` weight from the
    warmup's training items `pools` (task -> items), none when `sft_mix_weight` is 0. A function of
    (seed, step) only, so a resumed run draws the same ones."""
    tasks = [t for t, w in settings.sft_mix_tasks.items() if w > 0 and pools.get(t)]
    if settings.sft_mix_weight <= 0 or not tasks:
        return []
    rng = random.Random(f"sft-mix:{seed}:{step}")
    picks = rng.choices(tasks, weights=[settings.sft_mix_tasks[t] for t in tasks], k=settings.sft_mix_examples)
    return [to_example(rng.choice(pools[t]), rng, num_placeholders) for t in picks]
