"""What the decoder reads against examples seen: every checkpoint of a run, on one held-out pool.

For each checkpoint of `RUN/warmup` and `RUN/grpo` (a run made with `logging.checkpoint_every` and
enough `logging.keep_checkpoints`), on the GRPO final eval's pool of held-out activations:

  nll_real / nll_shuffled   teacher-forced NLL per token of the true quote of the last 8 tokens, in the run's
                            `warmup.description_quote_style` (`It reads: "..."` or bare), with the item's own
                            activation and with another document's (the held-out gap)
  has_token                 the greedy description's quote holds the read token (diagnose.item_features)
  recall_8, wrong_share     how much of the true window the quote recovers, how much of it is wrong
  top1 / fve                retrieval under one fixed grader: the text encoder (source windows only),
                            trained once as GRPO's final evals train it

    .venv/bin/python -m experiments.quality_diagnosis.learning_curve /work/runs/NAME --out curve.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from cycle_oracle.activations import ActivationStore
from cycle_oracle.checkpoint import load_trained
from cycle_oracle.data.description import quote_text
from cycle_oracle.decoder import build_batch, completion_mask, completion_token_stats, unflatten
from cycle_oracle.encoder_trainer import EncoderTrainer
from cycle_oracle.evals.oracle import checkpoint_oracle, load_checkpoint_models
from cycle_oracle.injection import answer_ids, description_prompt
from cycle_oracle.models import load_tokenizer, resolve_model_path
from experiments.quality_diagnosis.diagnose import grade, item_features, text_encoder, words


def checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    return sorted((p for p in folder.glob("step-*") if (p / "MANIFEST.json").is_file()), key=lambda p: int(p.name.split("-")[1]))


@torch.no_grad()
def quote_nll(models, store, rows: list[int], shuffled: list[int], tokenizer) -> tuple[float, float]:
    """Mean per-token NLL of the true 8-token quote with the real and with a shuffled activation."""
    cfg = models.config
    prompt = description_prompt(tokenizer, models.layer, cfg.injection, cfg.description_instruction)
    style = cfg.warmup.description_quote_style
    answers = [answer_ids(tokenizer, quote_text(tokenizer.decode(store.context_window(r, before=8)), style)) for r in rows]
    batch = build_batch([prompt] * len(rows), answers, tokenizer.pad_token_id)
    out = []
    for source in (rows, shuffled):
        stats = completion_token_stats(models.decoder, batch, store.activations[source].float(), models.record.injection_norm, 1.0,
                                       cfg.injection.mode)
        nll = -unflatten(stats.logp, batch)
        mask = completion_mask(batch)
        out.append(float((nll * mask).sum() / mask.sum()))
    return out[0], out[1]


def examples_seen(run_dir: Path, stage: str, step: int, cfg) -> int:
    """Warmup: the examples its metrics row counts by that step; GRPO: the samples scored (B x K per step)."""
    if stage == "grpo":
        return step * cfg.grpo.batch_activations * cfg.grpo.samples_per_activation
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == "warmup" and row.get("step") == step and "examples_seen" in row:
            return int(row["examples_seen"])
    return step * cfg.decoder_optim.micro_batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a warmup_then_grpo run folder with several checkpoints per stage")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--warmup-steps", default=None, help="comma list of warmup steps to read (default: every checkpoint)")
    args = ap.parse_args()
    wanted = {int(x) for x in args.warmup_steps.split(",")} if args.warmup_steps else None
    torch.set_num_threads(2)
    grpo_dir = args.run / "grpo"
    results = json.loads((grpo_dir / "results.json").read_text())
    cfg = load_trained(grpo_dir).config()
    store = ActivationStore(grpo_dir / "activations")
    rows = results["retrieval"]["rows"]
    doc = [store.records[r]["doc_id"] for r in rows]
    rng = random.Random(0)
    shuffled = [rng.choice([s for s, d in zip(rows, doc) if d != doc[i]]) for i in range(len(rows))]
    model_path = str(resolve_model_path(cfg.model.name))
    tokenizer = load_tokenizer(model_path)
    v, mean = store.activations[rows].float(), store.mean.float()
    truth = [{"token_words": words(store.records[r]["token"]), "previous_words": words(tokenizer.decode(store.context_window(r, before=2)[:-1])),
              "window8_words": words(tokenizer.decode(store.context_window(r, before=8))),
              "window16_words": words(tokenizer.decode(store.context_window(r, before=16)))} for r in rows]
    grader = EncoderTrainer(model_path, cfg, load_trained(grpo_dir).record.layer, store.mean)
    grader_report = text_encoder(grader, cfg, store, tokenizer)

    curve = []
    for stage in ("warmup", "grpo"):
        for ckpt in checkpoints(args.run / stage):
            if stage == "warmup" and wanted is not None and int(ckpt.name.split("-")[1]) not in wanted:
                continue
            models = load_checkpoint_models(ckpt)
            oracle = checkpoint_oracle(models)
            texts = oracle.describe(v)
            feats = [item_features(t, tr, cfg.warmup.description_quote_style == "it_reads") for t, tr in zip(texts, truth)]
            real, shuf = quote_nll(models, store, rows, shuffled, tokenizer)
            summary, _, _ = grade(grader, texts, v, mean)
            rec = models.record
            seen = examples_seen(args.run / stage, stage, rec.step, cfg)
            point = {"stage": stage, "step": rec.step, "examples_seen": seen, "nll_real": round(real, 4), "nll_shuffled": round(shuf, 4),
                     "nll_gap": round(shuf - real, 4), **{k: round(sum(float(f[k]) for f in feats) / len(feats), 4) for k in ("has_token", "recall_8", "wrong_share")},
                     "text_grader": summary, "example": texts[0]}
            print(f"[curve] {stage} step {rec.step}: gap {point['nll_gap']:+.3f} has_token {point['has_token']:.2f} "
                  f"recall_8 {point['recall_8']:.2f} top1 {summary['top1']:.3f} fve {summary['fve']:+.3f}", flush=True)
            curve.append(point)
    report = {"run": str(args.run), "n": len(rows), "grader": grader_report, "curve": curve}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
