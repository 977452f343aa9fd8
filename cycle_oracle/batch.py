"""The one batch type that flows between roles: rollout -> encoder -> learner.

A `RolloutBatch` holds N = B x K sampled descriptions, flattened activation-major: sample j of
activation b sits at index b * K + j (`groups()` gives the [B, K] view). Every per-sample field
has N entries. The rollout engine returns texts, token ids and log-probs only; the driver, which
holds the activations, attaches them (`with_vectors`: each sample's activation, [N, d]), so any
subset of samples (`select`, a learner rank's shard) is again a complete batch. The driver fills
`usable`, `rewards` and `advantages` as the step goes; `to(device)` moves every tensor at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    token_ids: list[list[int]]
    """[N] generated token ids (no prompt)."""
    sampler_logprobs: list[list[float]]
    """[N] per-token log-probs from the sampler (vLLM's processed logprobs, after temperature)."""
    texts: list[str]
    """[N] the decoded descriptions."""
    truncated: torch.Tensor
    """[N] bool: hit max_new_tokens without an end token."""
    versions: torch.Tensor
    """[N] long: the weight version each sample was drawn from."""
    group_size: int
    """K: samples per activation."""
    temperature: float
    """The sampling temperature (the learner's log-probs use the same one)."""
    vectors: torch.Tensor | None = None
    """[N, d] the activation each sample describes (attached by the driver: `with_vectors`)."""
    usable: torch.Tensor | None = None
    """[N] bool: scored by the encoder (not empty, not a penalised truncation)."""
    rewards: torch.Tensor | None = None
    """[N] float32: cycle rewards (after any KL shaping)."""
    advantages: torch.Tensor | None = None
    """[N] float32: group-relative advantages."""

    def __post_init__(self) -> None:
        n = len(self.texts)
        lengths = {"token_ids": len(self.token_ids), "sampler_logprobs": len(self.sampler_logprobs),
                   "truncated": len(self.truncated), "versions": len(self.versions)}
        lengths.update({k: len(v) for k in ("vectors", "usable", "rewards", "advantages") if (v := getattr(self, k)) is not None})
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"RolloutBatch fields must all have N={n} entries (texts [N]); got {bad}")

    def with_vectors(self, vectors: torch.Tensor) -> "RolloutBatch":
        """This batch with the activations behind it attached: [B, d] (one per group, repeated over
        its K samples) or [N, d] (one per sample)."""
        vectors = vectors.float().cpu()
        if len(vectors) != len(self):
            if len(vectors) * self.group_size != len(self):
                raise ValueError(f"{len(vectors)} activations for {len(self)} samples in groups of K={self.group_size}; expected B or N rows")
            vectors = vectors.repeat_interleave(self.group_size, dim=0)
        return dataclasses.replace(self, vectors=vectors)

    @classmethod
    def of_texts(cls, vectors: torch.Tensor, texts: Sequence[str]) -> "RolloutBatch":
        """Descriptions that did not come from a rollout (no token ids or logprobs), e.g. to score
        given texts against activations [N, d]."""
        n = len(texts)
        return cls(vectors=vectors, token_ids=[[] for _ in range(n)], sampler_logprobs=[[] for _ in range(n)], texts=list(texts),
                   truncated=torch.zeros(n, dtype=torch.bool), versions=torch.zeros(n, dtype=torch.long), group_size=1,
                   temperature=1.0, usable=torch.ones(n, dtype=torch.bool))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_activations(self) -> int:
        """B (only meaningful for a whole batch: N = B x K)."""
        return len(self) // self.group_size

    def groups(self, values: torch.Tensor) -> torch.Tensor:
        """[N] -> [B, K] view of a per-sample tensor."""
        if len(self) % self.group_size:
            raise ValueError(f"{len(self)} samples are not whole groups of K={self.group_size} (a shard has no group view)")
        return values.view(-1, self.group_size)

    def completion_lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    def select(self, indices: Sequence[int]) -> "RolloutBatch":
        """The samples at `indices`, in that order (a shard, a minibatch, a reordering)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)

        def pick(value):
            if value is None:
                return None
            if isinstance(value, torch.Tensor):
                return value[idx]
            return [value[i] for i in idx.tolist()]

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return RolloutBatch(**{k: (v if k in ("group_size", "temperature") else pick(v)) for k, v in fields.items()})

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """Every tensor moved to `device` (lists of ids and texts stay Python)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    @staticmethod
    def concat(parts: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """Samples of `parts` one after another (same K and temperature)."""
        if not parts:
            raise ValueError("RolloutBatch.concat needs at least one part")
        first = parts[0]
        if any(p.group_size != first.group_size or p.temperature != first.temperature for p in parts):
            raise ValueError("RolloutBatch.concat: parts differ in group size or temperature")

        def join(name):
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                return None
            if isinstance(values[0], torch.Tensor):
                return torch.cat(values)
            return [x for v in values for x in v]

        names = [f.name for f in dataclasses.fields(RolloutBatch) if f.name not in ("group_size", "temperature")]
        return RolloutBatch(**{n: join(n) for n in names}, group_size=first.group_size, temperature=first.temperature)


def shard_indices(n: int, world_size: int) -> list[list[int]]:
    """Sample indices of each of `world_size` ranks: rank r takes r, r + W, r + 2W, ..."""
    return [list(range(r, n, world_size)) for r in range(world_size)]


def gather_in_order(parts: Sequence[Sequence[float] | torch.Tensor], indices: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """Inverse of sharding: per-rank values (rank r's for `indices[r]`) -> [n] in sample order."""
    out = torch.empty(n, dtype=torch.float32)
    for part, idx in zip(parts, indices):
        if len(part) != len(idx):
            raise ValueError(f"a rank returned {len(part)} values for {len(idx)} samples")
        out[torch.as_tensor(list(idx), dtype=torch.long)] = torch.as_tensor(part, dtype=torch.float32)
    return out


def regroup(parts: Sequence[RolloutBatch], activation_indices: Sequence[Sequence[int]]) -> RolloutBatch:
    """Rollout parts (part p holds whole groups for activations `activation_indices[p]`, in that
    order) -> one batch in activation order 0..B-1."""
    whole = RolloutBatch.concat(parts)
    k = whole.group_size
    start_of: dict[int, int] = {}
    offset = 0
    for part, acts in zip(parts, activation_indices):
        if len(part) != len(acts) * k:
            raise ValueError(f"a rollout part has {len(part)} samples for {len(acts)} activations x K={k}")
        for q, b in enumerate(acts):
            start_of[b] = offset + q * k
        offset += len(part)
    if sorted(start_of) != list(range(len(start_of))):
        raise ValueError(f"rollout parts cover activations {sorted(start_of)}, expected 0..{len(start_of) - 1}")
    return whole.select([start_of[b] + j for b in range(len(start_of)) for j in range(k)])


def micro_batches(lengths: Sequence[int], token_budget: int | None, count: int | None = None) -> list[list[int]]:
    """Sequences (by their padded lengths) cut into micro-batches for one rank's forward/backward
    passes: longest first, greedily packed so rows x longest <= `token_budget` (a sequence longer than
    the budget goes alone; None: one micro-batch). With `count` (the largest number any
    data-parallel rank needs, so every rank makes the same number of backward passes, which ZeRO-2's
    per-backward reductions require) the largest micro-batches are halved until there are `count`;
    a rank still short gets empty ones (the learner runs them as zero-weight passes)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (token_budget is None or (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget):
            groups[-1].append(i)
        else:
            groups.append([i])
    if count is not None:
        if count < len(groups):
            raise ValueError(f"micro_batches: {len(groups)} micro-batches are needed under the budget, fewer ({count}) were asked")
        while len(groups) < count:
            big = max(range(len(groups)), key=lambda g: len(groups[g])) if groups else None
            if big is None or len(groups[big]) < 2:
                groups.append([])
                continue
            half = len(groups[big]) // 2
            groups[big:big + 1] = [groups[big][:half], groups[big][half:]]
    return groups
