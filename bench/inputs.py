"""What every case builds exactly as the recipes do: the recipe, the model's shape, the input
embedding, the description prompt and injection norm, random activations and natural-text rows."""

from __future__ import annotations

import json
from pathlib import Path

from bench import flops as bf

REPO = Path(__file__).resolve().parents[1]


def recipe_config(recipe: str, overrides: list[str]):
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from cycle_oracle.config import load_recipe

    return load_recipe(REPO / recipe, overrides)


def model_info(model: str) -> dict:
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from cycle_oracle.models import resolve_model_path

    path = resolve_model_path(model)
    config = json.loads((Path(path) / "config.json").read_text())
    return {"path": str(path), "config": config, "shape": bf.shape_from_hf_config(config, model)}


def input_embedding(path: str):
    """The input embedding only (no full model load), as an nn.Embedding."""
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        weight = f.get_tensor(key).float()
    return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def case_model(case: dict):
    """The case's model (path, config, shape), its recipe with the overrides, and the read layer."""
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from cycle_oracle.models import resolve_layer

    info = model_info(case["model"])
    cfg = recipe_config(case["recipe"], case.get("overrides", []))
    if cfg.model.dtype == "auto":  # as a run resolves it (recipes/common.resolve_dtype), on this case's CPU
        from cycle_oracle.devices import choose_dtype, dtype_probe

        cfg.model.dtype = choose_dtype({"case": dtype_probe("cpu", info["shape"].d_model, info["shape"].d_ff)})[0]
    return info, cfg, resolve_layer(cfg.model.layer, info["shape"].n_layers)


def prompt_setup(case: dict):
    """Tokenizer, description prompt, injection norm and layer exactly as the GRPO recipe builds them."""
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from cycle_oracle.injection import description_prompt, mean_embedding_norm, target_norm
    from cycle_oracle.models import load_tokenizer

    info, cfg, layer = case_model(case)
    tok = load_tokenizer(info["path"])
    prompt = description_prompt(tok, layer, cfg.injection, cfg.description_instruction)
    emb = input_embedding(info["path"])
    norm = target_norm(cfg.injection, mean_embedding_norm(emb), None)
    return info, cfg, layer, tok, prompt, emb, norm


def random_vectors(batch: int, d: int, seed: int):
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch

    return torch.randn(batch, d, generator=torch.Generator().manual_seed(seed)) * 10


def prompt_embeds(emb, prompt, vectors, norm, mode):
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from cycle_oracle.injection import decoder_inputs

    n = vectors.shape[0]
    return decoder_inputs(emb, [prompt.input_ids] * n, [prompt.placeholder_positions] * n, vectors, norm, mode)


def corpus_token_rows(tok, n: int, length: int) -> list[list[int]]:
    """n rows of exactly `length` token ids of natural text (the embedded corpus, cycled)."""
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    from cycle_oracle.corpus import embedded_passages

    ids: list[int] = []
    for doc in embedded_passages():
        ids.extend(tok.encode(" " + doc.text, add_special_tokens=False))
        if len(ids) >= n * length + 1:
            break
    while len(ids) < n * length:
        ids = ids + ids
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def single_rank_learner(case: dict, info: dict, cfg, layer: int, stage: str):
    """One DecoderLearner rank (gloo on a free local port) as a case measures it, the model compiled
    per `case["compile"]` (`compile_blocks`) -> (learner, seconds its start took)."""
    import socket
    import time

    from cycle_oracle.injection import mean_embedding_norm, target_norm
    from cycle_oracle.learner import DecoderLearner, init_distributed

    norm = target_norm(cfg.injection, mean_embedding_norm(input_embedding(info["path"])), None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    init_distributed(0, 1, "127.0.0.1", port, "gloo")
    learner = DecoderLearner(info["path"], cfg, layer, norm, total_steps=1000, stage=stage)
    start_s = time.perf_counter() - t0
    compile_blocks(learner.model, case.get("compile"))
    return learner, start_s


def compile_blocks(model, mode: str | None) -> None:
    """The torch.compile lever (`case["compile"]`, bench only): None leaves the model eager; "blocks"
    compiles each transformer block in place (regional compilation: the blocks share one code object,
    so one compilation serves them all; dynamic sequence lengths), "blocks_static" the same without
    marking shapes dynamic up front. Compile time lands in the case's first (unmeasured) steps,
    reported as `warm_step_s`."""
    if not mode:
        return
    from cycle_oracle.models import decoder_blocks

    for block in decoder_blocks(model):
        block.compile(dynamic=None if mode == "blocks_static" else True)
