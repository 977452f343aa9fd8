"""Model-FLOPs arithmetic for the benchmark (pure Python, no torch; unit-tested).

Conventions (docs/BENCHMARKS.md repeats them):

- N_blocks = parameters of the transformer blocks (attention + MLP + norms) and the final norm.
  The input embedding is a lookup (0 FLOPs). The LM head (d x V, 28M for SmolLM2-135M, 622M for
  Qwen3-8B) is counted separately and only at the positions whose logits are computed: every
  generated token in a rollout, every completion token in the learner (decoder.completion_logits
  only sends completion positions through the head), never in the encoder or in a prefill.
- A forward pass costs 2 FLOPs per weight per token (one multiply-add): 2 * N_blocks per token
  through the blocks, 2 * d * V per token through the LM head.
- Attention scores and weighted sum: a token that attends to c keys (itself included) costs
  4 * n_layers * d_attn * c FLOPs (QK^T and AV, 2 FLOPs per MAC each), with d_attn = heads * head_dim.
  Over a causal sequence of length T that sums to 2 * n_layers * d_attn * T * (T + 1), i.e. about
  2 * n_layers * d_attn * T per token: the "2 * n_layers * context * d" convention.
- Backward of a LoRA model with a frozen base: input gradients only for the base weights
  (2 * N per token, as many as their forward; the LM head's likewise, no weight gradients), plus
  LoRA weight gradients (2 * N_lora). So a policy
  forward + backward is 4 * N + 6 * N_lora per token (plus attention x 3); the old-policy and the
  reference log-probs are one more forward (2 * N) each.
- Padding is not counted (model FLOPs are the useful work; padding shows up as lower MFU).
- MFU = model FLOPs / wall time / reference FLOP/s. On CPU the reference is the dense fp32 matmul
  measured in the same run (the machine's practical limit), on paper the GPU's dense peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """The numbers FLOPs depend on (Llama / Qwen-style decoder-only transformer)."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    tied_embeddings: bool = True
    qk_norm: bool = False
    attention_bias: bool = False

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim

    def block_params(self) -> int:
        """Parameters of one transformer block."""
        d, hd = self.d_model, self.head_dim
        q = d * self.n_heads * hd
        kv = 2 * d * self.n_kv_heads * hd
        o = self.n_heads * hd * d
        bias = (self.n_heads + 2 * self.n_kv_heads) * hd if self.attention_bias else 0
        mlp = 3 * d * self.d_ff
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        return q + kv + o + bias + mlp + norms

    def blocks_params(self, layers: int | None = None) -> int:
        """N_blocks of the first `layers` blocks (all by default) + the final norm when all are kept."""
        n = self.n_layers if layers is None else layers
        return n * self.block_params() + (self.d_model if n == self.n_layers else 0)

    @property
    def head_params(self) -> int:
        return self.d_model * self.vocab

    def total_params(self) -> int:
        emb = self.vocab * self.d_model
        return self.blocks_params() + emb + (0 if self.tied_embeddings else self.head_params)

    def lora_params(self, rank: int, targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down"), layers: int | None = None) -> int:
        """LoRA parameters (A and B) on the given linear layers of every block."""
        d, hd = self.d_model, self.head_dim
        shapes = {
            "q": (d, self.n_heads * hd), "k": (d, self.n_kv_heads * hd), "v": (d, self.n_kv_heads * hd),
            "o": (self.n_heads * hd, d), "gate": (d, self.d_ff), "up": (d, self.d_ff), "down": (self.d_ff, d),
        }
        per_layer = sum(rank * (i + o) for i, o in (shapes[t] for t in targets))
        return per_layer * (self.n_layers if layers is None else layers)


def shape_from_hf_config(config: dict, name: str = "") -> ModelShape:
    """ModelShape from a HF config.json dict (Llama, Qwen2/3, Mistral-style keys)."""
    d = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    return ModelShape(
        name=name or str(config.get("_name_or_path") or config.get("model_type", "model")),
        d_model=d,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or d // heads),
        d_ff=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_norm=str(config.get("model_type", "")).startswith("qwen3"),
        attention_bias=bool(config.get("attention_bias", False)),
    )


SMOLLM2_135M = ModelShape("SmolLM2-135M", 576, 30, 9, 3, 64, 1536, 49152, tied_embeddings=True)
QWEN3_8B = ModelShape("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, tied_embeddings=False, qk_norm=True)


# ---- per-token and per-sequence pieces ----------------------------------------------------

def attention_flops(shape: ModelShape, start: int, end: int, layers: int | None = None) -> int:
    """Forward attention FLOPs of the tokens at positions start..end-1 (0-based) of one causal
    sequence: token at position p attends to p + 1 keys -> 4 * L * d_attn * (p + 1)."""
    n = shape.n_layers if layers is None else layers
    keys = (end * (end + 1) - start * (start + 1)) // 2  # sum_{p=start}^{end-1} (p + 1)
    return 4 * n * shape.d_attn * keys


def forward_flops(shape: ModelShape, seq_len: int, head_tokens: int, layers: int | None = None, lora_params: int = 0, start: int = 0) -> int:
    """One forward pass over positions start..seq_len-1 of a sequence (blocks + attention), with the
    LM head on `head_tokens` positions. `layers` < n_layers: a truncated model (the encoder)."""
    tokens = seq_len - start
    n_blocks = shape.blocks_params(layers)
    return 2 * (n_blocks + lora_params) * tokens + attention_flops(shape, start, seq_len, layers) + 2 * shape.head_params * head_tokens


def backward_flops(shape: ModelShape, seq_len: int, head_tokens: int, layers: int | None = None, lora_params: int = 0) -> int:
    """The backward pass of `forward_flops` with a frozen base and a trainable LoRA: every matmul's
    input gradient (as many FLOPs as its forward: blocks, LoRA and the LM head alike), the LoRA
    weights' gradients (2 * N_lora per token) and, in attention, the second operand's gradient
    (QK^T and AV multiply two activations: one more attention forward). No base weight gradients.
        backward = forward + 2 * N_lora * T + attention"""
    return forward_flops(shape, seq_len, head_tokens, layers, lora_params) + 2 * lora_params * seq_len + attention_flops(shape, 0, seq_len, layers)


def generation_flops(shape: ModelShape, prompt_len: int, new_tokens: int) -> dict:
    """One sampled sequence of new_tokens after a prompt of prompt_len tokens.

    generated: the forward passes whose outputs are the generated tokens - positions
      prompt_len-1 .. prompt_len+new_tokens-2, each with the LM head (2 N_blocks + 2 d V per
      generated token + attention over its context): the "2N per generated token" convention;
    prefill: the rest of the prompt (positions 0 .. prompt_len-2, no LM head).
    The last generated token is never fed back."""
    gen = forward_flops(shape, prompt_len + new_tokens - 1, new_tokens, start=prompt_len - 1)
    pre = forward_flops(shape, prompt_len - 1, 0)
    return {"prefill": pre, "generated": gen, "total": pre + gen}


def rollout_flops(shape: ModelShape, batch: int, k: int, prompt_len: int, new_tokens: int, shared_prefill: bool = False) -> dict:
    """B activations x K samples of `new_tokens` each. Prefill is counted once per sample (what an
    engine with prefix caching off computes) or once per activation (`shared_prefill`)."""
    one = generation_flops(shape, prompt_len, new_tokens)
    prefills = batch if shared_prefill else batch * k
    out = {
        "prefill": one["prefill"] * prefills,
        "generated": one["generated"] * batch * k,
        "generated_tokens": batch * k * new_tokens,
        "prompt_tokens": prompt_len * prefills,
    }
    out["total"] = out["prefill"] + out["generated"]
    return out


def encoder_flops(shape: ModelShape, layers: int, n_texts: int, text_len: int, lora_params: int = 0, update: bool = True) -> dict:
    """Encoder (first `layers` blocks + LoRA, pooling/projection ignored: d^2 per text) on n_texts
    of text_len tokens: scoring = one forward; update = forward + backward (input grads of the
    frozen base, LoRA weight grads: `backward_flops`) - the co-training step re-runs its own forward."""
    fwd = forward_flops(shape, text_len, 0, layers=layers, lora_params=lora_params) * n_texts
    out = {"score": fwd, "tokens": n_texts * text_len}
    if update:
        bwd = backward_flops(shape, text_len, 0, layers=layers, lora_params=lora_params) * n_texts
        out["update"] = fwd + bwd
    out["total"] = out["score"] + out.get("update", 0)
    return out


def learner_flops(shape: ModelShape, n_samples: int, prompt_len: int, completion_len: int, lora_params: int = 0,
                  reference: str | None = "base", reference_prompt_len: int = 0, epochs: int = 1, old_pass: bool = True) -> dict:
    """GRPO learner step on n_samples (prompt + completion) sequences: only the passes the step needs.

    old: policy forward without grad (old log-probs), only with `old_pass` (more than one update per
    rollout; with one, the old log-probs are the gradient pass's own, detached); ref: reference forward (`base` = bare model on
    a short reference prompt + the completion; `warmup` = same prompt as the policy; None = no KL);
    policy: forward + backward per epoch (`backward_flops`: input gradients, LoRA weight gradients,
    attention's second operand). The head runs on completion tokens only."""
    T = prompt_len + completion_len
    fwd = forward_flops(shape, T, completion_len, lora_params=lora_params)
    out = {"old": fwd * n_samples if old_pass else 0}
    if reference == "base":
        out["ref"] = forward_flops(shape, reference_prompt_len + completion_len, completion_len) * n_samples
    elif reference == "warmup":
        out["ref"] = forward_flops(shape, T, completion_len) * n_samples
    else:
        out["ref"] = 0
    bwd = backward_flops(shape, T, completion_len, lora_params=lora_params)
    out["policy"] = (fwd + bwd) * n_samples * epochs
    out["trained_tokens"] = n_samples * completion_len * epochs
    out["processed_tokens"] = n_samples * T
    out["total"] = out["old"] + out["ref"] + out["policy"]
    return out


def forward_flops_summed(shape: ModelShape, tokens: float, key_pairs: float, head_tokens: float, layers: int | None = None,
                         lora_params: int = 0) -> float:
    """`forward_flops` over many causal sequences from sums over them: `tokens` = sum T_i,
    `key_pairs` = sum T_i (T_i + 1) / 2 (the keys every position attends to, summed), `head_tokens`
    = positions whose logits are computed."""
    n = shape.n_layers if layers is None else layers
    return 2 * (shape.blocks_params(layers) + lora_params) * tokens + 4 * n * shape.d_attn * key_pairs + 2 * shape.head_params * head_tokens


def backward_flops_summed(shape: ModelShape, tokens: float, key_pairs: float, head_tokens: float, lora_params: int = 0) -> float:
    """`backward_flops` from the same sums: forward + 2 N_lora per token + attention's second operand."""
    n = shape.n_layers
    return forward_flops_summed(shape, tokens, key_pairs, head_tokens, lora_params=lora_params) + 2 * lora_params * tokens \
        + 4 * n * shape.d_attn * key_pairs


def sft_flops(shape: ModelShape, read_layer: int, lora_params: int, work: dict) -> dict:
    """The warmup's SFT steps from `DecoderLearner.sft_micro_step`'s work counts (summed over calls):
    read = the frozen target's forward through the first `read_layer` blocks up to each example's
    last read position (no LoRA, no head: `read_tokens`, `read_key_pairs`); policy = the decoder's
    forward + backward (LoRA model with a frozen base) over prompt + answer (`tokens`, `key_pairs`),
    with the LM head on the answer tokens (`head_tokens`)."""
    read = forward_flops_summed(shape, work.get("read_tokens", 0), work.get("read_key_pairs", 0), 0, layers=read_layer)
    args = (work.get("tokens", 0), work.get("key_pairs", 0), work.get("head_tokens", 0))
    policy = forward_flops_summed(shape, *args, lora_params=lora_params) + backward_flops_summed(shape, *args, lora_params=lora_params)
    return {"read": read, "policy": policy, "total": read + policy, "trained_tokens": work.get("head_tokens", 0)}


def grpo_learner_flops_from_means(shape: ModelShape, samples: int, mean_completion: float, prompt_len: int, lora_params: int,
                                  reference: str | None, reference_prompt_len: int) -> dict:
    """`learner_flops` (one update per rollout: no old-policy pass) for `samples` completions of mean
    length `mean_completion` (what a GRPO run's metrics.jsonl keeps: `description_tokens`): every
    completion is taken at the mean length, exact for the linear terms; attention (about 2% of a
    SmolLM2 step's FLOPs at these lengths) is off by the spread of the lengths."""
    def summed(prefix: int, with_lora: bool, backward: bool) -> float:
        t = prefix + mean_completion
        args = (samples * t, samples * t * (t + 1) / 2, samples * mean_completion)
        lora = lora_params if with_lora else 0
        return forward_flops_summed(shape, *args, lora_params=lora) + (backward_flops_summed(shape, *args, lora_params=lora) if backward else 0)

    ref = 0.0
    if reference == "base":
        ref = summed(reference_prompt_len, False, False)
    elif reference == "warmup":
        ref = summed(prompt_len, False, False)
    policy = summed(prompt_len, True, True)
    return {"ref": ref, "policy": policy, "total": ref + policy, "trained_tokens": samples * mean_completion}


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError("seconds and peak FLOP/s must be positive")
    return flops / seconds / peak_flops_per_s


# ---- a whole GRPO step on paper ----------------------------------------------------------

@dataclass
class GrpoPaperSetup:
    shape: ModelShape = QWEN3_8B
    batch: int = 32
    k: int = 4
    prompt_len: int = 40
    description_len: int = 128
    read_layer: int = 18
    encoder_prefix_len: int = 4
    lora_rank: int = 64
    reference: str = "base"
    reference_prompt_len: int = 5
    gpus: int = 8
    gpu_peak_flops: float = 989e12
    """H100 SXM dense bf16."""
    gpu_hbm_bytes_per_s: float = 3.35e12
    mfu: float = 0.40
    bytes_per_param: int = 2
    shared_prefill: bool = False
    notes: list = field(default_factory=list)


def grpo_step_on_paper(s: GrpoPaperSetup) -> dict:
    """FLOPs per GRPO step per role and the step time at a stated MFU on a GPU count."""
    shape = s.shape
    lora_dec = shape.lora_params(s.lora_rank)
    lora_enc = shape.lora_params(s.lora_rank, layers=s.read_layer)
    n = s.batch * s.k
    roll = rollout_flops(shape, s.batch, s.k, s.prompt_len, s.description_len, s.shared_prefill)
    enc = encoder_flops(shape, s.read_layer, n, s.encoder_prefix_len + s.description_len, lora_enc)
    learn = learner_flops(shape, n, s.prompt_len, s.description_len, lora_dec, s.reference, s.reference_prompt_len)
    roles = {
        "rollout": roll["total"],
        "encoder_score": enc["score"],
        "encoder_update": enc["update"],
        "learner_old": learn["old"],
        "learner_ref": learn["ref"],
        "learner_policy": learn["policy"],
    }
    total = sum(roles.values())
    rate = s.gpus * s.gpu_peak_flops * s.mfu
    # Decode is also bounded by reading the weights once per step (all sequences batched on one
    # engine per GPU): time >= decode steps * bytes(weights) / HBM bandwidth per engine.
    weight_bytes = shape.total_params() * s.bytes_per_param
    decode_steps = s.description_len
    engines = s.gpus  # one engine per GPU, each with n / gpus sequences
    decode_bw_bound = decode_steps * weight_bytes / s.gpu_hbm_bytes_per_s
    out = {
        "setup": {k: v for k, v in asdict(s).items() if k not in ("shape", "notes")} | {"model": shape.name},
        "params": {"total": shape.total_params(), "blocks": shape.blocks_params(), "lm_head": shape.head_params,
                   "lora_decoder": lora_dec, "lora_encoder": lora_enc},
        "flops": roles | {"total": total},
        "share": {k: v / total for k, v in roles.items()},
        "seconds_at_mfu": {k: v / rate for k, v in roles.items()} | {"total": total / rate},
        "rollout_decode_bandwidth_bound_s": decode_bw_bound,
        "rollout_seconds_at_mfu_all_gpus": roll["total"] / rate,
        "sequences_per_engine": n / engines,
        "tokens": {"generated": roll["generated_tokens"], "learner_processed": learn["processed_tokens"], "encoder": enc["tokens"]},
    }
    return out
