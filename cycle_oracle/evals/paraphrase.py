"""Paraphrase test: does a description score through what it says, or through its surface form?

A hidden channel (the decoder encoding v in word choice, order or odd tokens that only the
co-trained encoder reads) survives neither of these rewrites, while meaning survives the first:

- `paraphrased`:   d' = the target model's greedy rewrite of d, prompted through its chat template
                   with "Rewrite this in different words, keeping its meaning." (`rewrite_texts`);
- `word_shuffled`: d' = the words of d (whitespace-separated) in a seeded random order.

Each rewritten description is encoded and scored against the same v as the original
(retrieval.score_condition), and the drop is reported with the retrieval eval:

    drop_m = m(description) - m(condition)     for m in top-1, top-5, MRR, cosine, centred cosine, FVE
    kept_top1 = (top1(condition) - 1/N) / (top1(description) - 1/N)   (share of the above-chance top-1 kept;
                                                                      None unless the description beats chance)

with a paired bootstrap interval of the per-item centred-cosine drop (`stats.paired_difference`).
An empty description stays empty (it reconstructs to 0 either way).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cycle_oracle.devices import model_device
from cycle_oracle.models import render_chat
from cycle_oracle.stats import paired_difference

CONDITIONS = ("paraphrased", "word_shuffled")
DROP_METRICS = ("top1", "top5", "mrr", "cosine", "centred_cosine", "fve")


@dataclass(frozen=True)
class ParaphraseOptions:
    """What the retrieval eval's paraphrase conditions need (from `eval.paraphrase_*`)."""

    instruction: str = "Rewrite this in different words, keeping its meaning."
    max_new_tokens: int = 64
    seed: int = 0
    conditions: tuple[str, ...] = CONDITIONS

    def __post_init__(self) -> None:
        unknown = set(self.conditions) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"unknown paraphrase condition(s) {sorted(unknown)}; expected some of {CONDITIONS}")


def shuffle_words(texts: Sequence[str], seed: int = 0) -> list[str]:
    """Each text's whitespace-separated words in a random order (one seeded generator for the list)."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        parts = text.split()
        rng.shuffle(parts)
        out.append(" ".join(parts))
    return out


@torch.no_grad()
def rewrite_texts(model: nn.Module, tokenizer, texts: Sequence[str], instruction: str, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy rewrite of each text by `model` (HF generate): one user turn "<instruction>\\n\\n<text>"
    through the chat template (`models.render_chat`: no thinking block), batched with left padding
    (what a decoder-only model needs to continue every row from its last real token). Empty texts
    stay empty."""
    device = model_device(model)
    out = ["" for _ in texts]
    todo = [i for i, t in enumerate(texts) if t and t.strip()]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        chats = [render_chat(tokenizer, [{"role": "user", "content": f"{instruction}\n\n{texts[i].strip()}"}]) for i in idx]
        enc = tokenizer(chats, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt").to(device)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = generated[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new.tolist()):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def rewritten_descriptions(oracle, descriptions: Sequence[str], options: ParaphraseOptions) -> dict[str, list[str]]:
    """{condition: rewritten descriptions}; `paraphrased` needs `oracle.paraphrase`."""
    out = {}
    for cond in options.conditions:
        if cond == "paraphrased":
            if oracle.paraphrase is None:
                raise ValueError("the paraphrased condition needs oracle.paraphrase (the target model rewriting descriptions)")
            out[cond] = list(oracle.paraphrase(list(descriptions), options.instruction, options.max_new_tokens))
        else:
            out[cond] = shuffle_words(descriptions, options.seed)
    return out


def drops(conditions: dict, per_item: dict, chance_top1: float, names: Sequence[str], seed: int = 0) -> dict:
    """{condition: {drop_<m>, kept_top1, centred_cosine_drop: paired interval}} against `description`."""
    base = conditions["description"]
    out = {}
    for name in names:
        c = conditions[name]
        row = {f"drop_{m}": base[m] - c[m] for m in DROP_METRICS}
        gain = base["top1"] - chance_top1
        row["kept_top1"] = (c["top1"] - chance_top1) / gain if gain > chance_top1 / 2 else None  # defined when above chance by an item
        row["centred_cosine_drop"] = paired_difference(torch.tensor(per_item["description"]["centred_cosine"]),
                                                       torch.tensor(per_item[name]["centred_cosine"]), seed=seed)
        out[name] = row
    return out
