"""Reading residual-stream activations from the target, and storing them as shards on disk.

"layer L" = the residual stream after L blocks (HF `hidden_states[L]`), no final norm. We read it
with a forward hook on block L-1 and stop the forward pass there (the later blocks never run).

Padding is on the right, so with a causal mask the values at real tokens do not depend on the
batch (tested: batched == one-by-one within fp32 tolerance).

Shards: `<dir>/shard-00000.safetensors` holds `activations` [N, d] float32; `<dir>/shard-00000.json`
holds one record per row (doc_id, token_index, token). `<dir>/meta.json` names the model, layer,
width and shards; `<dir>/stats.safetensors` the corpus mean [d]; `<dir>/documents.jsonl` the token
ids of every source document (for context windows). Every split in the project is by `doc_id`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cycle_oracle.data.mixture import heldout_sources
from cycle_oracle.devices import model_device
from cycle_oracle.files import atomic_write as _atomic_write
from cycle_oracle.models import decoder_blocks, num_layers

if TYPE_CHECKING:
    from cycle_oracle.corpus import Document


class _StopForward(Exception):
    pass


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":  # shapes only (device checks)
        return
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).nonzero()
        raise FloatingPointError(f"{name} contains NaN/inf (first bad index {bad[0].tolist()}, shape {list(tensor.shape)})")


@torch.no_grad()
def read_residual(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual stream after `layer` blocks. [B, T] ids -> [B, T, d] (float32, on the model's device)."""
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    n = num_layers(model)
    if not 1 <= layer <= n - 1:
        raise ValueError(f"layer {layer} is out of range for a {n}-block model; expected 1..{n - 1}")
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_blocks(model)[layer - 1].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    hidden = captured[0].float()
    check_finite(f"activations at layer {layer}", hidden)
    return hidden


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """List of id lists -> (ids [B, T], attention_mask [B, T]) padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def tokenize_document(tokenizer, text: str, max_tokens: int) -> list[int]:
    if not text or not text.strip():
        raise ValueError("cannot extract activations from an empty text")
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
    return list(ids)


def readable_positions(token_ids: Sequence[int], positions, skip_first: int, special_ids: set[int]) -> list[int]:
    """Which token indices to read: "all", "last", or explicit indices (negative counts from the end).

    Position < skip_first (attention sink) and special tokens (BOS, chat markers) are skipped.
    """
    n = len(token_ids)
    allowed = [i for i in range(n) if i >= skip_first and token_ids[i] not in special_ids]
    if positions == "all":
        return allowed
    if positions == "last":
        return allowed[-1:]
    chosen = []
    for p in positions:
        i = p if p >= 0 else n + p
        if not 0 <= i < n:
            raise ValueError(f"token index {p} is out of range for a {n}-token text")
        if i in allowed:
            chosen.append(i)
    return chosen


@torch.no_grad()
def extract(
    model: nn.Module,
    tokenizer,
    documents: Iterable[Document],
    layer: int,
    positions="all",
    skip_first: int = 1,
    skip_special: bool = True,
    batch_size: int = 8,
    max_tokens: int = 128,
    progress: bool = True,
):
    """Yield (activations [n, d], records) per batch of documents; records are dicts with
    doc_id, token_index, token, and the document's token ids under `_doc_tokens` (first row only)."""
    special = set(tokenizer.all_special_ids) if skip_special else set()
    docs = list(documents)
    batches = [docs[i : i + batch_size] for i in range(0, len(docs), batch_size)]
    iterator = track(batches, description=f"extracting layer {layer}") if progress else batches
    for batch in iterator:
        token_lists = [tokenize_document(tokenizer, d.text, max_tokens) for d in batch]
        ids, mask = pad_right(token_lists, tokenizer.pad_token_id)
        hidden = read_residual(model, ids, mask, layer)
        rows, records = [], []
        for b, (doc, toks) in enumerate(zip(batch, token_lists)):
            for i in readable_positions(toks, positions, skip_first, special):
                rows.append(hidden[b, i].cpu())
                records.append({"doc_id": doc.doc_id, "group": doc.group, "token_index": i, "token": tokenizer.decode([toks[i]])})
        yield (torch.stack(rows) if rows else torch.zeros((0, hidden.shape[-1]))), records, dict(
            zip([d.doc_id for d in batch], token_lists)
        )


class ActivationStore:
    """Activation shards on disk (memory-mapped on read) with per-row provenance."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no activation store at {self.root} (meta.json missing); run `cycle-oracle extract` first")
        self.meta = json.loads(meta_path.read_text())
        self.records: list[dict] = []
        self._tensors: list[torch.Tensor] = []
        for shard in self.meta["shards"]:
            with safe_open(self.root / f"{shard}.safetensors", framework="pt") as f:
                self._tensors.append(f.get_tensor("activations"))
            self.records.extend(json.loads((self.root / f"{shard}.json").read_text()))
        self.activations = torch.cat(self._tensors) if self._tensors else torch.zeros(0, self.meta["d_model"])
        with safe_open(self.root / "stats.safetensors", framework="pt") as f:
            self.mean = f.get_tensor("mean")
        self.documents = {}
        with open(self.root / "documents.jsonl") as f:
            for line in f:
                row = json.loads(line)
                self.documents[row["doc_id"]] = row["token_ids"]

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def mean_norm(self) -> float:
        return float(self.meta["mean_norm"])

    def __len__(self) -> int:
        return len(self.records)

    def doc_ids(self) -> list[str]:
        return sorted({r["doc_id"] for r in self.records})

    def split_by_document(self, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Row indices (train, heldout), split by source document (or its group, e.g. the article
        of a paragraph), never by token: the same split as the warmup data's (`heldout_sources`)."""
        key = lambda r: r.get("group", r["doc_id"])  # noqa: E731
        held = heldout_sources((key(r) for r in self.records), heldout_fraction, seed)
        train = [i for i, r in enumerate(self.records) if key(r) not in held]
        heldout = [i for i, r in enumerate(self.records) if key(r) in held]
        return train, heldout

    def context_window(self, index: int, before: int = 16, after: int = 0) -> list[int]:
        """Token ids of the source text around row `index` (the activation's own token included)."""
        rec = self.records[index]
        toks = self.documents[rec["doc_id"]]
        i = rec["token_index"]
        return toks[max(0, i - before + 1) : i + 1 + after]

    def source_windows(self, rows: Sequence[int], tokenizer, tokens: int) -> list[str]:
        """The source text of each row: the `tokens` tokens ending at (and including) its token, decoded."""
        return [tokenizer.decode(self.context_window(i, before=tokens)) for i in rows]


def write_store(
    root: str | Path,
    batches: Iterable[tuple[torch.Tensor, list[dict], dict]],
    model_id: str,
    layer: int,
    shard_size: int = 4096,
) -> ActivationStore:
    """Write extraction batches as shards (each file written to a temp name, then renamed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    buf_rows: list[torch.Tensor] = []
    buf_recs: list[dict] = []
    total = torch.zeros(0)
    count = 0
    norm_sum = 0.0
    docs: dict[str, list[int]] = {}

    def flush():
        nonlocal buf_rows, buf_recs
        if not buf_recs:
            return
        name = f"shard-{len(shards):05d}"
        tensor = torch.cat(buf_rows).contiguous()
        _atomic_write(root / f"{name}.safetensors", lambda p: save_file({"activations": tensor}, str(p)))
        _atomic_write(root / f"{name}.json", lambda p: Path(p).write_text(json.dumps(buf_recs)))
        shards.append(name)
        buf_rows, buf_recs = [], []

    for acts, recs, doc_tokens in batches:
        docs.update(doc_tokens)
        if len(recs) == 0:
            continue
        total = acts.sum(0) if count == 0 else total + acts.sum(0)
        norm_sum += float(acts.norm(dim=-1).sum())
        count += len(recs)
        buf_rows.append(acts)
        buf_recs.extend(recs)
        if len(buf_recs) >= shard_size:
            flush()
    flush()
    if count == 0:
        raise ValueError("extraction produced no activations (all texts empty or every position skipped)")
    mean = (total / count).contiguous()
    _atomic_write(root / "stats.safetensors", lambda p: save_file({"mean": mean}, str(p)))
    _atomic_write(
        root / "documents.jsonl",
        lambda p: Path(p).write_text("".join(json.dumps({"doc_id": k, "token_ids": v}) + "\n" for k, v in docs.items())),
    )
    meta = {
        "model_id": model_id,
        "layer": layer,
        "layer_convention": "residual stream after L blocks (HF hidden_states[L]), no final norm",
        "d_model": int(mean.shape[0]),
        "count": count,
        "mean_norm": norm_sum / count,
        "mean_vector_norm": float(mean.norm()),
        "shards": shards,
    }
    _atomic_write(root / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return ActivationStore(root)

