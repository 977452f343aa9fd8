"""GPU memory probe: one rank's GRPO step on a random-initialised Qwen3-8B-shaped decoder.

    python -m bench.gpu_memory                      # on a CUDA machine: the 8B shape, bf16, the GPU recipe's settings
    python -m bench.gpu_memory --tiny --device cpu  # the same code on a tiny shape on the CPU (a crash test, seconds)
    python -m bench.gpu_memory --set memory.gradient_checkpointing=true --out probe.json

What it does: builds the decoder directly on the device from a `Qwen3Config` (no weights on
disk, no hub), hands it to `cycle_oracle.learner.DecoderLearner` (LoRA, DeepSpeed ZeRO, the
recipe's `decoder_optim`, `grpo` and `memory` sections: gradient checkpointing, micro-batches under
a token budget, chunked logits; `gradient_checkpointing_active` in the output says whether the
checkpointing took), and runs two
`update_shard`s on one learner rank's shard of the recipe's batch: B x K / learners sequences of the
description prompt + `sampling.max_new_tokens` random completion tokens, random activations of
width d, random advantages. The first step is cold (allocator, kernels); the second is timed on
its own. It prints one JSON object (also written to --out): the device, torch version, peak GPU
memory (`torch.cuda.max_memory_allocated`, cumulative) after the model build, after the learner's
set-up and after each step, the step times, the token counts, the model FLOPs of a step
(bench/flops.py) and the settings used. A CUDA out-of-memory error is reported in the JSON
(`status: "oom"`, exit code 3) with the peaks reached, not as a traceback.

The tokenizer is a small byte-level BPE built in memory (`small_tokenizer`: ChatML template, no
files, no network): the learner only needs its pad / end ids and the decoder prompt, and every id
it makes is far below Qwen3's vocabulary. tests/test_gpu.py builds its tiny Qwen3 with the same
helpers (`save_tiny_qwen3`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "gpu_qwen3_8b_grpo.yaml"

QWEN3_8B = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6)
"""Qwen/Qwen3-8B's config.json sizes (8.19B parameters)."""
TINY = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            intermediate_size=256, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=1024)
"""A Qwen3 of the same architecture (GQA, q/k norms, untied head) small enough for a CPU (tests,
--tiny); head_dim 64 as vLLM's attention backends accept it."""
TINY_OVERRIDES = ["decoder_lora.r=8", "decoder_lora.alpha=16", "grpo.batch_activations=2", "grpo.samples_per_activation=4",
                  "resources.learner.num_actors=2", "sampling.max_new_tokens=12", "memory.micro_batch_tokens=128"]
"""--tiny: a small LoRA rank, a 4-sequence shard of 12-token completions, and a token budget that
cuts it into 2 micro-batches (the 8B shard makes 3 under the recipe's 4096)."""

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TRAINING_TEXT = [
    "Layer: 18 ? Describe in one or two sentences what the text at this point is about and what is likely to come next.",
    "Description: The text is about a river that flows through a city; next it will name the bridge.",
    "The quick brown fox jumps over the lazy dog. A cat sat on the mat. What comes next? How will the assistant speak?",
    "user assistant system 0 1 2 3 4 5 6 7 8 9 , . : ; ! ? ' \" ( ) - the a an of in on to and is was it this that",
]


def small_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) with a ChatML chat template, built in memory in
    well under a second: eos `<|im_end|>`, pad `<|endoftext|>`, " ?" one token (the placeholder)."""
    # imported here: main() sets CUDA_VISIBLE_DEVICES before torch loads
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=_CHATML)
    if len(fast.encode(" ?", add_special_tokens=False)) != 1:
        raise RuntimeError("the small tokenizer must encode the placeholder ' ?' as one token")
    return fast


def qwen3_config(shape: dict, tokenizer):
    # imported here: main() sets CUDA_VISIBLE_DEVICES before torch loads
    from transformers import Qwen3Config

    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but the model's vocabulary is {shape['vocab_size']}")
    return Qwen3Config(**shape, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def random_qwen3(config, device, dtype):
    """A random-initialised Qwen3 causal LM built directly on `device` in `dtype` (eval mode)."""
    # imported here: main() sets CUDA_VISIBLE_DEVICES before torch loads
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_tiny_qwen3(folder: str | Path, seed: int = 0, shape: dict | None = None) -> Path:
    """A tiny random Qwen3 (fp32) + the small tokenizer as a HF folder that `load_causal_lm`,
    `load_tokenizer`, the encoder and the learner load by path."""
    # imported here: main() sets CUDA_VISIBLE_DEVICES before torch loads
    import torch

    folder = Path(folder)
    tok = small_tokenizer()
    torch.manual_seed(seed)
    model = random_qwen3(qwen3_config(shape or TINY, tok), "cpu", torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_batch(n: int, completion_tokens: int, d_model: int, vocab: int, seed: int = 0, temperature: float = 1.0):
    """n samples of `completion_tokens` random ids, random activations [n, d] and advantages;
    sampler log-probs -log V (a random model's typical value)."""
    # imported here: main() sets CUDA_VISIBLE_DEVICES before torch loads
    import torch

    from cycle_oracle.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, completion_tokens), generator=g).tolist()
    return RolloutBatch(vectors=torch.randn(n, d_model, generator=g), token_ids=ids,
                        sampler_logprobs=[[-math.log(vocab)] * completion_tokens for _ in range(n)], texts=[""] * n,
                        truncated=torch.ones(n, dtype=torch.bool), versions=torch.zeros(n, dtype=torch.long),
                        group_size=1, temperature=temperature, advantages=torch.randn(n, generator=g))


def _memory(torch, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(), "allocated_bytes": torch.cuda.memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _gib(x) -> float | None:
    return None if x is None else round(x / 2**30, 3)


def run_probe(args) -> dict:
    """Build, set up, two GRPO steps; the JSON record (see the module docstring)."""
    # imported here: main() sets CUDA_VISIBLE_DEVICES before torch loads
    import torch
    import torch.distributed as dist

    from bench import flops as bf
    from cycle_oracle.config import load_recipe
    from cycle_oracle.injection import mean_embedding_norm
    from cycle_oracle.learner import DecoderLearner, init_distributed
    from cycle_oracle.models import resolve_layer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --tiny --device cpu for the CPU check)")
    if device.type == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a machine with CUDA: DeepSpeed would move the model to the GPU; "
                         "run `CUDA_VISIBLE_DEVICES= python -m bench.gpu_memory --device cpu ...`")
    cfg = load_recipe(args.recipe, (TINY_OVERRIDES if args.tiny else []) + list(args.set or []))
    shape = TINY if args.tiny else QWEN3_8B
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype or cfg.model.dtype]
    g = cfg.grpo
    learners = cfg.resources.learner.num_actors
    n = args.sequences or (g.batch_activations * g.samples_per_activation) // learners
    completion = args.completion_tokens or cfg.sampling.max_new_tokens
    layer = resolve_layer(cfg.model.layer, shape["num_hidden_layers"])

    out: dict = {"status": "ok", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                 "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
                 "shape": "tiny" if args.tiny else "qwen3-8b", "recipe": str(args.recipe), "overrides": list(args.set or [])}
    try:
        import deepspeed
        import transformers

        out["versions"] = {"transformers": transformers.__version__, "deepspeed": deepspeed.__version__}
        import peft

        out["versions"]["peft"] = peft.__version__
    except ImportError:
        pass
    created_group = False
    if not (dist.is_available() and dist.is_initialized()):
        init_distributed(0, 1, "127.0.0.1", _free_port(), "nccl" if device.type == "cuda" else "gloo")
        created_group = True
    memory: dict = {}
    timings: dict = {}
    try:
        torch.manual_seed(args.seed)
        tok = small_tokenizer()
        config = qwen3_config(shape, tok)
        t0 = time.perf_counter()
        model = random_qwen3(config, device, dtype)
        memory["after_build"] = _memory(torch, device)
        timings["build_s"] = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        norm = mean_embedding_norm(model.get_input_embeddings())
        t0 = time.perf_counter()
        learner = DecoderLearner(cfg.model.name, cfg, layer, norm, total_steps=g.steps, stage="grpo", model=model, tokenizer=tok)
        memory["after_learner_setup"] = _memory(torch, device)
        timings["learner_setup_s"] = time.perf_counter() - t0
        base = learner.model.get_base_model() if hasattr(learner.model, "get_base_model") else learner.model
        trainable = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
        prompt_len = len(learner.description_prompt.input_ids)
        batch = probe_batch(n, completion, shape["hidden_size"], shape["vocab_size"], args.seed, cfg.sampling.temperature)
        out.update({
            "model": {"parameters": params, "lora_parameters": trainable, "layer": layer, "dtype": str(dtype).replace("torch.", ""),
                      **{k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                               "head_dim", "intermediate_size", "vocab_size")}},
            "tokens": {"sequences": n, "prompt_tokens": prompt_len, "completion_tokens": completion,
                       "tokens_per_step": n * (prompt_len + completion), "trained_tokens": n * completion},
            "settings": {"memory": cfg.memory.model_dump(mode="json"), "decoder_lora": cfg.decoder_lora.model_dump(mode="json"),
                         "decoder_optim": cfg.grpo_decoder_optim().model_dump(mode="json"),
                         "grpo": {k: getattr(g, k) for k in ("batch_activations", "samples_per_activation", "epochs_per_rollout",
                                                             "minibatches_per_epoch", "kl_coef", "kl_reference", "kl_placement")},
                         "learners": learners, "gradient_checkpointing_active": bool(getattr(base, "is_gradient_checkpointing", False))},
        })
        for step in (1, 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            metrics = {k: v for k, v in dataclasses.asdict(learner.update_shard(batch)).items() if v is not None}
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[f"step{step}_s"] = time.perf_counter() - t0
            memory[f"after_step{step}"] = _memory(torch, device)
            if not all(math.isfinite(v) for v in metrics.values()):
                raise FloatingPointError(f"GRPO step {step} gave non-finite metrics {metrics}")
        out["step_metrics"] = {k: float(v) for k, v in metrics.items()}
        flops = bf.learner_flops(bf.shape_from_hf_config(config.to_dict(), out["shape"]), n, prompt_len, completion, trainable,
                                 reference="base" if g.kl_coef > 0 else None, reference_prompt_len=len(learner.reference_prompt.input_ids))
        # one update per rollout: no separate old-policy forward (learner.update_shard)
        single = g.epochs_per_rollout == 1 and g.minibatches_per_epoch == 1
        model_flops = flops["total"] - (flops["old"] if single else 0)
        out["flops"] = {"per_step": model_flops, "achieved_tflop_s": model_flops / timings["step2_s"] / 1e12}
    except torch.cuda.OutOfMemoryError as err:
        out["status"] = "oom"
        out["error"] = str(err).splitlines()[0]
        memory["at_oom"] = _memory(torch, device)
    finally:
        if created_group:
            dist.destroy_process_group()
    out["timings"] = timings
    out["memory"] = memory
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = {k: _gib(v.get("peak_allocated_bytes")) for k, v in memory.items()}
        out["gpu_total_memory_gib"] = _gib(torch.cuda.get_device_properties(device).total_memory)
    else:
        out["peak_rss_gib"] = {k: _gib(v.get("peak_rss_bytes")) for k, v in memory.items()}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_memory", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe the LoRA, optimiser, GRPO, sampling and memory settings come from")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (as `cycle-oracle run --set`), repeatable")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen3 shape and a 4-sequence shard (CPU-sized)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the recipe's model.dtype")
    ap.add_argument("--sequences", type=int, help="sequences of the step (default: B x K / learners of the recipe)")
    ap.add_argument("--completion-tokens", type=int, help="completion tokens per sequence (default: sampling.max_new_tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and "torch" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed picks its accelerator by what torch sees
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # imported here: main() sets CUDA_VISIBLE_DEVICES before torch loads
    from cycle_oracle.errors import UserError

    try:
        result = run_probe(args)
    except UserError as err:  # a bad recipe or override: one line, as the CLI prints it
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if result["status"] == "ok" else 3


if __name__ == "__main__":
    sys.exit(main())
