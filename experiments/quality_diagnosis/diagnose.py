"""Where is the information lost? Per held-out item, what each oracle's text recovers of the truth,
and what each grader makes of it (issue 26's diagnosis).

Takes a finished `warmup_then_grpo` run (the main job: `runs/main`) and its retrieval pool (the GRPO
final eval's held-out rows). For every pool item it has the truth (the read token, the token before
it, the 8- and 16-token source windows ending at it) and four texts:

  grpo, warmup    the GRPO and the warmup decoder's greedy descriptions (results.json: vLLM, greedy)
  patchscopes     the untrained target continuing the identity prompt with v injected (HF, greedy)
  logit_lens      the top-10 tokens of unembed(final_norm(v))

Per item and oracle (word level, lower-cased `\\w+` words):
  has_token       the read token's word is in the text (the quote, for a quoted description)
  has_previous    the word of the token before it is in the text
  recall_8        share of the true 8-token window's words found in the quote / answer
  wrong_share     share of the quote's / answer's words found nowhere in the true 16-token window
  right_suffix    how many of the quote's last words equal the true window's last words

Graders (each scores every text on the same pool; top-1 / top-5 / FVE / centred cosine):
  frozen_warmup   the warmup checkpoint's encoder (never saw GRPO output)
  text            a text encoder trained here exactly as GRPO's final evals train it (source windows only)

Conditions per oracle: as written; for the decoders also the quote alone, the sentence alone, and the
quote cut to its right part (only words that are in the true window, in their order: what a decoder
that stopped where it stops being right would have written). Format controls: the true read token,
and the true last 1/2/4/8/16 tokens, written bare, in the decoder's `It reads: "...".` format and in
Patchscopes' format (a bare continuation), under each grader.

    .venv/bin/python -m experiments.quality_diagnosis.diagnose runs/main --out experiments/quality_diagnosis/main_job_before.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

from cycle_oracle.activations import ActivationStore
from cycle_oracle.checkpoint import load_trained
from cycle_oracle.data.description import split_quoted_description
from cycle_oracle.encoder import cosine
from cycle_oracle.encoder_trainer import EncoderTrainer
from cycle_oracle.evals.retrieval import score_condition
from cycle_oracle.models import load_tokenizer, resolve_model_path
from cycle_oracle.stats import fve_interval, paired_difference, paired_fve_difference

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str | None) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def quote_format(text: str) -> str:
    return f'It reads: "{" ".join(text.split())}".'


def right_part(quote_words: list[str], window_words: list[str]) -> list[str]:
    """The quote's words that are in the true window, in the quote's order."""
    allowed = set(window_words)
    return [w for w in quote_words if w in allowed]


def right_suffix(quote_words: list[str], window_words: list[str]) -> int:
    n = 0
    while n < min(len(quote_words), len(window_words)) and quote_words[-1 - n] == window_words[-1 - n]:
        n += 1
    return n


def item_features(text: str, truth: dict, quoted: bool) -> dict:
    quote, sentence = split_quoted_description(text) if quoted else (text, "")
    span = quote if quote is not None else text
    qw = words(span)
    w8, w16 = truth["window8_words"], truth["window16_words"]
    tok, prev = truth["token_words"], truth["previous_words"]
    return {
        "has_quote": quote is not None,
        "has_token": bool(tok) and all(t in qw for t in tok),
        "has_token_anywhere": bool(tok) and all(t in words(text) for t in tok),
        "has_previous": bool(prev) and all(t in qw for t in prev),
        "recall_8": (sum(1 for w in set(w8) if w in qw) / len(set(w8))) if w8 else 0.0,
        "wrong_share": (sum(1 for w in qw if w not in set(w16)) / len(qw)) if qw else 0.0,
        "right_suffix": right_suffix(qw, w8),
        "quote_words": len(qw),
        "sentence_words": len(words(sentence)),
    }


def grade(encoder: EncoderTrainer, texts: list[str], v: torch.Tensor, mean: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """(summary with the FVE interval, per-item lists incl. `hit` = rank 1, v_hat) of texts under one grader."""
    safe = [t if t.strip() else "(empty)" for t in texts]
    v_hat = encoder.reconstruct(safe)[0]
    summary, per_item = score_condition(v_hat, v, mean)
    summary = {k: round(summary[k], 4) for k in ("top1", "top5", "fve", "centred_cosine", "cosine", "mrr")}
    floor = cosine(mean[None].expand_as(v), v)
    summary["fve_interval"] = {k: round(x, 4) for k, x in fve_interval(torch.tensor(per_item["cosine"]), floor).items() if k in ("ci_low", "ci_high")}
    per_item["hit"] = [float(r == 1) for r in per_item["rank"]]
    return summary, per_item, v_hat


def text_encoder(trainer: EncoderTrainer, cfg, store, tokenizer) -> dict:
    """GRPO's final-eval text encoder, trained exactly as `recipes.grpo.train_text_encoder` trains it."""
    train_rows, _ = store.split_by_document(cfg.split.heldout_fraction, cfg.seed)
    rows = random.Random(f"text-encoder:{cfg.seed}").sample(train_rows, min(len(train_rows), 50 * 32))
    texts = [tokenizer.decode(store.context_window(i, before=cfg.eval.text_encoder_window_tokens)) for i in rows]
    return trainer.train_text_encoder(texts, store.activations[rows], cfg.eval.text_encoder_steps, seed=cfg.seed)


def baseline_texts(warmup_dir: Path, cfg, store, v: torch.Tensor) -> dict[str, list[str]]:
    """Patchscopes and logit lens descriptions of the pool (the eval suite's own baselines)."""
    from cycle_oracle.evals.baselines import build_oracles

    eval_cfg = cfg.model_copy(update={"kind": "eval", "init_from": str(warmup_dir)})
    oracles = build_oracles(eval_cfg, store, names=["patchscopes", "logit_lens"])
    return {name: o.describe(v) for name, o in oracles.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished warmup_then_grpo run folder (warmup/ and grpo/)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--examples", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(2)

    grpo_dir, warmup_dir = args.run / "grpo", args.run / "warmup"
    results = json.loads((grpo_dir / "results.json").read_text())
    trained = load_trained(grpo_dir)
    cfg = trained.config()
    store = ActivationStore(grpo_dir / "activations")
    model_path = str(resolve_model_path(cfg.model.name))
    tokenizer = load_tokenizer(model_path)
    mean = store.mean.float()

    frozen = results["frozen_start_encoder"]
    rows = frozen["grpo_decoder"]["rows"]
    v = store.activations[rows].float()
    texts = {"grpo": [it["description"] for it in frozen["grpo_decoder"]["items"]],
             "warmup": [it["description"] for it in frozen["warmup_decoder"]["items"]]}
    texts.update(baseline_texts(warmup_dir, cfg, store, v))

    truth = []
    for r in rows:
        w8 = tokenizer.decode(store.context_window(r, before=8))
        w16 = tokenizer.decode(store.context_window(r, before=16))
        prev_ids = store.context_window(r, before=2)[:-1]
        token = store.records[r]["token"]
        truth.append({"row": r, "token": token, "previous": tokenizer.decode(prev_ids), "window8": " ".join(w8.split()),
                      "window16": " ".join(w16.split()), "token_words": words(token), "previous_words": words(tokenizer.decode(prev_ids)),
                      "window8_words": words(w8), "window16_words": words(w16)})

    quoted = {"grpo": True, "warmup": True, "patchscopes": False, "logit_lens": False}
    features = {name: [item_features(t, tr, quoted[name]) for t, tr in zip(texts[name], truth)] for name in texts}
    feature_summary = {}
    for name, feats in features.items():
        n = len(feats)
        feature_summary[name] = {k: round(sum(float(f[k]) for f in feats) / n, 4) for k in feats[0]}
        feature_summary[name]["token_is_word_share"] = round(sum(1 for t in truth if t["token_words"]) / n, 4)

    # conditions: the oracles' texts and their cuts, then the format controls (true content in each format)
    conditions: dict[str, list[str]] = {}
    for name in ("grpo", "warmup"):
        parts = [split_quoted_description(t) for t in texts[name]]
        conditions[f"{name}/as_written"] = texts[name]
        conditions[f"{name}/quote_only"] = [quote_format(q or "") for q, _ in parts]
        conditions[f"{name}/sentence_only"] = [s or "." for _, s in parts]
        conditions[f"{name}/quote_right_part"] = [quote_format(" ".join(right_part(words(q), tr["window16_words"]))) for (q, _), tr in zip(parts, truth)]
        conditions[f"{name}/quote_bare"] = [q or "" for q, _ in parts]
    for name in ("patchscopes", "logit_lens"):
        conditions[f"{name}/as_written"] = texts[name]
        conditions[f"{name}/in_decoder_format"] = [quote_format(t) for t in texts[name]]
        conditions[f"{name}/right_part"] = [" ".join(right_part(words(t), tr["window16_words"])) for t, tr in zip(texts[name], truth)]
    conditions["true/token_bare"] = [tr["token"].strip() or tr["token"] for tr in truth]
    conditions["true/token_in_decoder_format"] = [quote_format(tr["token"]) for tr in truth]
    for k in (1, 2, 4, 8, 16):
        windows = [" ".join(tokenizer.decode(store.context_window(r, before=k)).split()) for r in rows]
        conditions[f"true/window{k}_bare"] = windows
        conditions[f"true/window{k}_in_decoder_format"] = [quote_format(w) for w in windows]

    encoder = EncoderTrainer(model_path, cfg, trained.record.layer, store.mean)
    graders: dict[str, dict] = {}
    per_item_all: dict[str, dict[str, dict]] = {}
    warm = load_trained(warmup_dir)
    for grader in ("frozen_warmup", "text"):
        if grader == "frozen_warmup":
            encoder.load_state(warm.tensors["encoder"])
            note = f"the warmup checkpoint's encoder ({warm.path})"
        else:
            report = text_encoder(encoder, cfg, store, tokenizer)
            note = f"text encoder: {report}"
        block, items = {"grader": note}, {}
        for cond, batch in conditions.items():
            block[cond], items[cond], _ = grade(encoder, batch, v, mean)
        graders[grader] = block
        per_item_all[grader] = items
        print(f"[diagnose] {grader}: " + ", ".join(f"{c} {block[c]['top1']:.3f}/{block[c]['fve']:+.3f}" for c in conditions if not c.startswith("true/window")))

    # paired: each decoder vs each baseline, as written, under each grader: top-1 hits and FVE
    paired = {}
    floor = cosine(mean[None].expand_as(v), v)
    for grader in graders:
        items = per_item_all[grader]
        for name in ("grpo", "warmup"):
            for base in ("patchscopes", "logit_lens"):
                a, b = items[f"{name}/as_written"], items[f"{base}/as_written"]
                paired[f"{grader}/{name}_minus_{base}/top1"] = paired_difference(torch.tensor(a["hit"]), torch.tensor(b["hit"]))
                paired[f"{grader}/{name}_minus_{base}/fve"] = paired_fve_difference(torch.tensor(a["cosine"]), torch.tensor(b["cosine"]), floor)
                paired[f"{grader}/{name}_minus_{base}/centred_cosine"] = paired_difference(torch.tensor(a["centred_cosine"]),
                                                                                         torch.tensor(b["centred_cosine"]))

    examples = []
    for i in random.Random(0).sample(range(len(rows)), min(args.examples, len(rows))):
        examples.append({"window16": truth[i]["window16"], "token": truth[i]["token"], **{n: texts[n][i] for n in texts}})
    report = {"run": str(args.run), "n": len(rows), "chance_top1": 1 / len(rows), "features": feature_summary,
              "graders": graders, "paired": paired, "examples": examples,
              "per_item": [{"row": tr["row"], "token": tr["token"], **{f"{n}/{k}": features[n][i][k] for n in features for k in ("has_token", "recall_8", "wrong_share")}}
                           for i, tr in enumerate(truth)]}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps({"features": feature_summary}, indent=1))


if __name__ == "__main__":
    main()
