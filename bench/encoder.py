"""Encoder case: ActivationEncoder scoring (forward) and co-training update (forward + backward + AdamW)."""

from __future__ import annotations

import time

from bench import flops as bf
from bench.inputs import case_model, corpus_token_rows, random_vectors
from bench.load import measure, peak_rss_mb


def case_encoder(case: dict) -> dict:
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    from cycle_oracle.batch import RolloutBatch
    from cycle_oracle.encoder_trainer import EncoderTrainer

    info, cfg, layer = case_model(case)
    shape = info["shape"]
    trainer = EncoderTrainer(info["path"], cfg, layer, torch.zeros(shape.d_model))
    lora = shape.lora_params(cfg.encoder.lora.r, layers=layer)
    out = {"case": "encoder", "dtype": cfg.model.dtype, "layer": layer, "threads": case["threads"], "lora_rank": cfg.encoder.lora.r, "lora_params": lora,
           "points": []}
    for n in case["n_texts"]:
        rows = corpus_token_rows(trainer.tokenizer, n, case["text_len"])
        texts = [trainer.tokenizer.decode(r) for r in rows]
        vectors = random_vectors(n, shape.d_model, n)
        ids, attn, _ = trainer._inputs(texts)
        lengths = attn.sum(1).tolist()
        f = _encoder_flops(shape, layer, lengths, lora)
        batch = RolloutBatch.of_texts(vectors, texts)
        trainer.score(batch)  # warm-up
        trainer.train_step(texts, vectors)
        res = {"n_texts": n, "mean_tokens": sum(lengths) / n, "padded_tokens": int(attn.numel()), "tokens": int(sum(lengths))}
        for what, fn, flops in (("score", lambda: trainer.score(batch), f["score"]),
                                ("update", lambda: trainer.train_step(texts, vectors), f["update"])):
            def once(fn=fn):
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0, None

            rec, _ = measure(once, case["reps"], case.get("quiet_wait_s", 0))
            best = rec["seconds"]
            res[what] = {**rec, "texts_per_s": n / best, "tokens_per_s": sum(lengths) / best, "flops": flops, "flops_per_s": flops / best}
        out["points"].append(res)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _encoder_flops(shape, layer: int, lengths: list[int], lora: int) -> dict:
    score = update = 0
    for n_tok in lengths:
        f = bf.encoder_flops(shape, layer, 1, int(n_tok), lora)
        score += f["score"]
        update += f["update"]
    return {"score": score, "update": update}
