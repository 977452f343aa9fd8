"""Which part of a quoted description carries the activation? Re-score a finished GRPO run's retrieval.

Descriptions trained on quoted targets (`warmup.description_quote_tokens`) read
`It reads: "<quote>". <sentence>`. This takes the held-out descriptions a GRPO run's final retrieval
wrote (GRPO decoder and warmup decoder, results.json) and scores, with the run's final encoder (or
`--encoder-from RUN`'s, e.g. the frozen warmup encoder) and on the same pool:

  full             the description as written (reproduces results.json)
  quote_only       `It reads: "<quote>".`, the sentence removed
  sentence_only    the sentence, the quote removed
  true_quote       `It reads: "<the true last N tokens>".` (the quote a perfect copier would write)

plus how often the written quote contains the activation's own token or equals the true text.
If the sentence adds nothing, full and quote_only score alike; if the GRPO decoder only restates
its input text, true_quote bounds it. JSON to stdout or --out.

    .venv/bin/python -m experiments.description_parts.measure_description_parts runs/long4 --out /tmp/parts.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cycle_oracle.activations import ActivationStore
from cycle_oracle.checkpoint import load_trained
from cycle_oracle.data.description import split_quoted_description
from cycle_oracle.encoder_trainer import EncoderTrainer
from cycle_oracle.evals.retrieval import score_condition
from cycle_oracle.models import resolve_model_path
from cycle_oracle.stats import paired_difference

DECODERS = {"grpo_decoder": "retrieval", "warmup_decoder": "retrieval_warmup_decoder"}


def quote_text(quote: str) -> str:
    return f'It reads: "{quote}".'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished GRPO run folder (results.json, checkpoints, activations)")
    ap.add_argument("--quote-tokens", type=int, default=8, help="length of the true quote (the warmup's description_quote_tokens)")
    ap.add_argument("--encoder-from", type=Path, default=None,
                    help="score with this run's (or checkpoint's) encoder instead, e.g. the warmup run: the frozen encoder that never saw GRPO output")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    trained = load_trained(args.run)
    cfg = trained.config()
    results = json.loads((args.run / "results.json").read_text())
    store = ActivationStore(args.run / "activations")
    torch.set_num_threads(2)
    encoder = EncoderTrainer(str(resolve_model_path(cfg.model.name)), cfg, trained.record.layer, store.mean)
    graded_by = load_trained(args.encoder_from) if args.encoder_from else trained
    graded_by.require_tensors("encoder")
    encoder.load_state(graded_by.tensors["encoder"])
    ckpt = trained.path
    mean = store.mean.float()

    report: dict = {"run": str(args.run), "checkpoint": ckpt.name, "quote_tokens": args.quote_tokens,
                    "encoder": str(graded_by.path) if args.encoder_from else "the run's final encoder"}
    rows = results["retrieval"]["rows"]  # one pool for both decoders
    v = store.activations[rows].float()
    true_quotes = [quote_text(" ".join(encoder.tokenizer.decode(store.context_window(r, before=args.quote_tokens)).split())) for r in rows]
    report["true_quote"], per_item = score_condition(encoder.reconstruct(true_quotes)[0], v, mean)
    true_centred = torch.tensor(per_item["centred_cosine"])
    for name, key in DECODERS.items():
        items = results[key]["items"]
        if [it["row"] for it in items] != rows:
            raise SystemExit(f"{key} was scored on a different pool than the GRPO decoder")
        parts = [split_quoted_description(it["description"]) for it in items]
        texts = {
            "full": [it["description"] for it in items],
            "quote_only": [quote_text(q or "") for q, _ in parts],
            "sentence_only": [s or "." for _, s in parts],
        }
        block: dict = {}
        centred = {}
        for cond, batch in texts.items():
            summary, per_item = score_condition(encoder.reconstruct(batch)[0], v, mean)
            block[cond] = summary
            centred[cond] = torch.tensor(per_item["centred_cosine"])
        block["full_minus_quote_only/centred_cosine"] = paired_difference(centred["full"], centred["quote_only"])
        block["full_minus_sentence_only/centred_cosine"] = paired_difference(centred["full"], centred["sentence_only"])
        block["full_minus_true_quote/centred_cosine"] = paired_difference(centred["full"], true_centred)
        quoted = [q for q, _ in parts if q is not None]
        block["quoted_share"] = len(quoted) / len(items)
        block["quote_has_own_token_share"] = sum(
            q is not None and it["token"].strip() != "" and it["token"].strip() in q for (q, _), it in zip(parts, items)
        ) / len(items)
        block["quote_equals_true_share"] = sum(
            q is not None and quote_text(q) == t for (q, _), t in zip(parts, true_quotes)
        ) / len(items)
        block["distinct_sentences"] = len({s for _, s in parts})
        report[name] = block
    report["n"] = len(rows)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
