"""Where does the target carry a LatentQA behaviour? A linear probe per reading position.

For every embedded LatentQA record (a behaviour's system prompt, a stimulus, the target's reply),
read the target's residual stream at layer L and train a logistic-regression probe to predict the
behaviour's tone (12 classes) and kind (persona / goal / hidden instruction) from ONE activation at:

  reply_header_last   the last reply-header token ("\\n" after "assistant")
  reply_header_any    a random reply-header token (what `warmup.latentqa_read: reply_header` reads)
  stimulus_any        a random token of the user's message
  completion_any      a random token of the reply
  stimulus_mean       the mean over the user's message (not something the decoder gets; a reference)

Train on the warmup's training behaviours, test on its held-out behaviours (the same split as the
warmup, by label). Held-out accuracy next to the majority class says how much of the behaviour a
single injected activation can carry, before any decoder is trained. JSON to stdout or --out.

    .venv/bin/python -m experiments.latentqa_probe_positions.probe_latentqa_positions --model smollm2-135m-instruct --layer 0.5
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from cycle_oracle.activations import pad_right, read_residual
from cycle_oracle.data.embedded import build_embedded_records, hf_generate_fn
from cycle_oracle.data.latentqa import chat_context
from cycle_oracle.data.mixture import heldout_sources
from cycle_oracle.evals.probes import fit_vector_probe
from cycle_oracle.models import load_causal_lm, load_tokenizer, num_layers, resolve_layer, resolve_model_path

POSITIONS = ("reply_header_last", "reply_header_any", "stimulus_any", "completion_any", "stimulus_mean")


class _CacheOnly:
    """A generate function that refuses to generate: use a cache or fail."""

    batch_size = 16

    def __call__(self, chats, max_new_tokens):
        raise LookupError("not cached")


def features(hidden: torch.Tensor, header: list[int], stimulus: list[int], completion: list[int], rng: random.Random) -> dict:
    return {
        "reply_header_last": hidden[header[-1]],
        "reply_header_any": hidden[rng.choice(header)],
        "stimulus_any": hidden[rng.choice(stimulus)],
        "completion_any": hidden[rng.choice(completion or stimulus)],
        "stimulus_mean": hidden[stimulus].mean(0),
    }


def targets(label: str) -> dict:
    base, tone = label.split("+")
    return {"tone": tone, "kind": base.split("-")[0]}


def variance_shares(rows: list[tuple[str, dict]], stimuli: list[str]) -> dict:
    """Per position: the share of the (centred) activations' variance that the class means of the
    behaviour label, its tone, its kind or the stimulus explain (between-class / total sum of
    squares), next to what unstructured vectors would give. Injection rescales the whole centred
    vector, so a small share is a small signal."""
    out = {}
    for pos in POSITIONS:
        x = torch.stack([f[pos] for _, f in rows]).double()
        x = x - x.mean(0)
        total = float((x**2).sum())
        block = {}
        for name, keys in (("behaviour", [lb for lb, _ in rows]), ("tone", [targets(lb)["tone"] for lb, _ in rows]),
                           ("kind", [targets(lb)["kind"] for lb, _ in rows]), ("stimulus", stimuli)):
            between = 0.0
            for key in set(keys):
                idx = [i for i, k in enumerate(keys) if k == key]
                between += len(idx) * float((x[idx].mean(0) ** 2).sum())
            # With k groups over n items, unstructured vectors give about (k - 1) / (n - 1).
            block[name] = {"share": round(between / total, 3), "chance": round((len(set(keys)) - 1) / (len(keys) - 1), 3)}
        out[pos] = block
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=float, default=0.5)
    ap.add_argument("--num-behaviours", type=int, default=120)
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tok, model = load_tokenizer(path), load_causal_lm(path).eval()
    layer = resolve_layer(args.layer, num_layers(model))
    try:  # the records the warmup built with vLLM (the CPU recipes' engine), when cached
        records, info = build_embedded_records(_CacheOnly(), args.num_behaviours, seed=args.seed, model_id=f"{args.model}@vllm")
    except LookupError:  # otherwise build (and cache) them with HF generate
        records, info = build_embedded_records(hf_generate_fn(model, tok, batch_size=16), args.num_behaviours,
                                               seed=args.seed, model_id=args.model)
    rng = random.Random(args.seed)
    rows: list[tuple[str, dict]] = []
    stimuli: list[str] = []
    for r in records:
        chat = [{"role": "system", "content": r["system"]}, {"role": "user", "content": r["stimulus"]}]
        if r.get("completion", "").strip():
            chat.append({"role": "assistant", "content": r["completion"]})
        built = chat_context(tok, chat, 1, args.max_tokens, read="both")
        if built is None:
            continue
        ids, _ = built
        _, header = chat_context(tok, chat, 1, args.max_tokens, read="reply_header")
        _, text = chat_context(tok, chat, 1, args.max_tokens, read="content")
        stimulus = [p for p in text if p < header[0]]
        completion = [p for p in text if p > header[-1]]
        input_ids, mask = pad_right([ids], tok.pad_token_id)
        hidden = read_residual(model, input_ids, mask, layer)[0]
        rows.append((r["label"], features(hidden, header, stimulus, completion, rng)))
        stimuli.append(r["stimulus"])
    held = heldout_sources((label for label, _ in rows), args.heldout_fraction, args.seed)
    result = {"model": args.model, "layer": layer, "records": len(rows), "heldout_behaviours": len(held),
              "records_cache": info.get("cache"), "probes": {}}
    for what in ("tone", "kind"):
        classes = sorted({targets(label)[what] for label, _ in rows})
        y = np.array([classes.index(targets(label)[what]) for label, _ in rows])
        test = np.array([label in held for label, _ in rows])
        majority = float(np.bincount(y[test], minlength=len(classes)).max() / test.sum())
        block = {"classes": len(classes), "test_items": int(test.sum()), "majority": round(majority, 3)}
        for pos in POSITIONS:
            x = torch.stack([f[pos] for _, f in rows])
            probe = fit_vector_probe(x[torch.from_numpy(~test)], y[~test], seed=args.seed)
            block[pos] = round(float((probe.predict(x[torch.from_numpy(test)].numpy()) == y[test]).mean()), 3)
        result["probes"][what] = block
    result["variance_share"] = variance_shares(rows, stimuli)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
