"""The decoder learner: a PEFT LoRA decoder trained with DeepSpeed (no Ray here; `actors/learner.py`
runs one of these per rank).

- `sft_micro_step`: warmup. Activations are read from the same model with the adapter disabled (the
  frozen target), injected, and the loss is cross-entropy on answer tokens only.
- `update_shard`: GRPO on a `RolloutBatch` (cycle_oracle/batch.py; this rank's shard) -> `UpdateStats`.
  The learner recomputes the old-policy log-probs itself (before any update), uses vLLM's sampling
  log-probs only for truncated importance sampling and the logged train/inference mismatch, and adds
  the KL to the reference (see grpo.py).
DeepSpeed owns the optimizer, LR schedule, gradient clipping, accumulation and the
data-parallel all-reduce (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.modeling_layers import GradientCheckpointingLayer

from cycle_oracle.activations import pad_right, read_residual
from cycle_oracle.data.items import SftExample
from cycle_oracle.devices import check_dtype, model_device
from cycle_oracle.decoder import DecoderBatch, build_batch, completion_mask, completion_token_stats, unflatten
from cycle_oracle.batch import RolloutBatch, micro_batches
from cycle_oracle.grpo import grpo_policy_loss, masked_mean, sequence_kl_k1, truncated_importance_weights
from cycle_oracle.injection import DecoderPrompt, answer_ids, build_decoder_prompt, description_prompt, reference_prompt
from cycle_oracle.models import adapter_state, attach_lora, load_adapter_state, load_causal_lm, load_tokenizer


def deepspeed_config(optim, total_steps: int, grad_accum: int | None = None, micro_batch: int = 1, dtype: str = "float32") -> dict:
    """DeepSpeed config from the recipe's optimiser settings (torch AdamW, CPU-safe). With a bf16 or
    fp16 model DeepSpeed's mixed precision is on: the (LoRA) weights compute in that dtype while
    the optimizer keeps fp32 master weights and moments."""
    # DeepSpeed's schedulers need >= 1 warmup step; "no warmup" = a warmup that starts at the peak.
    warmup = max(1, min(optim.warmup_steps, max(total_steps - 1, 1)))
    start = 0.0 if optim.warmup_steps > 0 else 1.0
    if optim.decay == "cosine":
        params = {"total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup, "warmup_min_ratio": start, "cos_min_ratio": 0.1}
        scheduler = {"type": "WarmupCosineLR", "params": params}
    elif optim.decay == "linear":
        params = {"total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup, "warmup_max_lr": optim.lr, "warmup_min_lr": start * optim.lr}
        scheduler = {"type": "WarmupDecayLR", "params": params}
    else:
        scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": warmup, "warmup_max_lr": optim.lr, "warmup_min_lr": start * optim.lr}}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum or optim.grad_accum,
        "gradient_clipping": optim.grad_clip,
        # 5e7-element buckets (100 MB in bf16) instead of DeepSpeed's 5e8: a LoRA's gradients need no 1 GB bucket
        "zero_optimization": {"stage": optim.zero_stage, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "weight_decay": optim.weight_decay, "torch_adam": True}},
        "scheduler": scheduler,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **({"bf16": {"enabled": True}} if dtype == "bfloat16" else {"fp16": {"enabled": True}} if dtype == "float16" else {}),
    }


def data_parallel_tokens(local_tokens: float, device: torch.device | str = "cpu") -> float:
    """T_global / W: the data-parallel minibatch's token count over the world size (the local
    count when no process group is running), the denominator that makes W ranks' averaged
    gradient equal one learner's on the whole minibatch."""
    local = torch.tensor([float(local_tokens)], device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(local)
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return float(local) / dist.get_world_size()


def data_parallel_max(local: int, device: torch.device | str = "cpu") -> int:
    """The largest `local` over the data-parallel ranks (the local value without a process group)."""
    value = torch.tensor([float(local)], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str | None = None) -> None:
    import deepspeed  # heavy (~3 s): the driver imports this module for the actor class and never trains

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    deepspeed.init_distributed(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


@dataclass
class UpdateStats:
    """What one GRPO update measured (torchtune's `GRPOStats`): one rank's, token-weighted over its
    micro-batches (`DecoderLearner.update_shard`), or the data-parallel step's (`combined`). Every
    field is set by the learner; the GRPO step's metrics are `metrics()` (a renamed field fails
    here, it is not logged as a default)."""

    policy_loss: float
    """Mean clipped surrogate per token, before the KL term (`grpo.grpo_policy_loss`)."""
    clip_fraction: float
    """Share of tokens whose ratio left the clip range on the side that stops their gradient."""
    clip_fraction_low: float
    clip_fraction_high: float
    ratio_mean: float
    """Mean pi / pi_old per token (1 with one update per rollout)."""
    entropy: float
    """Mean per-token entropy of the policy at the sampling temperature."""
    kl: float
    """Mean k3 KL to the reference per token; 0.0 without a reference pass (kl_coef 0 or the reward placement)."""
    importance_weight_mean: float
    importance_weight_max: float
    importance_capped_fraction: float
    """Share of tokens whose importance weight pi_learner / pi_sampler was capped (`grpo.importance_cap`)."""
    logp_mismatch: float
    """Mean |log pi_learner - log pi_sampler| of the sampled tokens (the train/inference mismatch)."""
    lr: float
    tokens: float
    """Completion tokens trained on (summed over ranks)."""
    sft_loss: float | None = None
    """Supervised mixing's answer-token NLL (None when `grpo.sft_mix_weight` is 0)."""

    NO_TOKENS = {"ratio_mean": 1.0, "importance_weight_mean": 1.0, "importance_weight_max": 1.0}
    """What a rank that trained on no token reports: an update that changed nothing (every other mean 0)."""

    @classmethod
    def of_means(cls, means: dict[str, float], lr: float, tokens: float, sft_loss: float | None) -> UpdateStats:
        """From the token means of `grpo.grpo_policy_loss`'s metrics, the entropy and the importance
        stats (`importance_<stat>` of `grpo.truncated_importance_weights`)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"lr", "tokens", "sft_loss"}
        value = {n: float(means.get(n, cls.NO_TOKENS.get(n, 0.0))) for n in names - {"logp_mismatch"}}
        value["logp_mismatch"] = float(means.get("importance_logp_mismatch", 0.0))
        return cls(**value, lr=lr, tokens=tokens, sft_loss=sft_loss)

    @classmethod
    def combined(cls, ranks: Sequence[UpdateStats]) -> UpdateStats:
        """The data-parallel step's: `tokens` summed over the ranks, `importance_weight_max` maxed,
        every other field averaged (each rank's gradient counts equally)."""
        out = {}
        for f in dataclasses.fields(cls):
            values = [getattr(r, f.name) for r in ranks]
            if f.name == "sft_loss" and values[0] is None:
                out[f.name] = None
            else:
                out[f.name] = sum(values) if f.name == "tokens" else max(values) if f.name.endswith("_max") else sum(values) / len(values)
        return cls(**out)

    def metrics(self) -> dict[str, float]:
        """The learner's part of a GRPO step's metrics (`metrics.METRICS["grpo"]`)."""
        out = {k: getattr(self, k) for k in ("policy_loss", "clip_fraction", "ratio_mean", "entropy", "kl", "importance_weight_mean",
                                             "importance_weight_max", "importance_capped_fraction", "logp_mismatch", "lr")}
        return out | ({"sft_loss": self.sft_loss} if self.sft_loss is not None else {})


class DecoderLearner:
    """One rank of the decoder's trainer. `stage` picks the optimiser settings: "warmup" uses
    `decoder_optim` (with its gradient accumulation), "grpo" uses `grpo.decoder_optim` or else
    `decoder_optim`, one optimizer step per minibatch."""

    def __init__(self, model_path: str, cfg, layer: int, injection_norm: float, total_steps: int, stage: str = "warmup",
                 reference_adapter: dict | None = None, model=None, tokenizer=None):
        """`model`/`tokenizer`: a prebuilt HF causal LM (without LoRA) and its tokenizer instead of
        loading `model_path` (the GPU memory probe builds a random-initialised 8B-shaped one)."""
        import deepspeed  # heavy (~3 s): the driver imports this module for the actor class and never trains

        if stage == "warmup":
            optim, grad_accum = cfg.decoder_optim, None
        elif stage == "grpo":
            optim, grad_accum = cfg.grpo_decoder_optim(), 1
        else:
            raise ValueError(f"DecoderLearner stage {stage!r}; expected 'warmup' or 'grpo'")
        self.cfg = cfg
        self.layer = layer
        self.norm = injection_norm
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        # the device DeepSpeed will put this rank on (Ray's GPU when it gave one, else the CPU)
        check_dtype(cfg.model.dtype, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"), engine="deepspeed", role="learner")
        model = attach_lora(model if model is not None else load_causal_lm(model_path, cfg.model.dtype), cfg.decoder_lora)
        if cfg.memory.gradient_checkpointing:  # non-reentrant: the injected embeddings need no grad
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(optim, total_steps, grad_accum, dtype=cfg.model.dtype),
        )
        # DeepSpeed's schedulers start before iteration 0, where WarmupCosineLR's ratio is 0: the
        # first optimizer step would have lr 0 even without warmup. Start them at iteration 0.
        self.engine.lr_scheduler.step(0)
        self.model = self.engine.module
        self.device = model_device(self.model)  # DeepSpeed placed it on this rank's device (Ray's GPU, or the CPU)
        self.reference = None
        if reference_adapter is not None:  # kl_reference: warmup -> a frozen copy with that adapter
            ref = attach_lora(load_causal_lm(model_path, cfg.model.dtype), cfg.decoder_lora)
            load_adapter_state(ref, reference_adapter)
            self.reference = ref.merge_and_unload().eval().to(self.device)
        self.description_prompt = description_prompt(self.tokenizer, layer, cfg.injection, cfg.description_instruction)
        self.reference_prompt = reference_prompt(self.tokenizer)
        self.optimizer_steps = 0
        self.read_offsets: dict[str, torch.Tensor] = {}
        """task -> [P, d] subtracted from that task's activations before injection (`set_read_offset`)."""

    # ---- activations --------------------------------------------------------------------
    @torch.no_grad()
    def read_activations(self, contexts: Sequence[Sequence[int]], positions: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        """The frozen target's layer-L activations (adapter disabled): [B, d] for one position per
        context, [B, P] positions -> [B, P, d]. Each context is read up to its last read position only:
        attention is causal, so what follows it changes nothing that is read."""
        last = [max(p) if isinstance(p, Sequence) else p for p in positions]
        ids, mask = pad_right([list(c)[: i + 1] for c, i in zip(contexts, last)], self.tokenizer.pad_token_id)
        with self.model.disable_adapter():
            hidden = read_residual(self.model, ids, mask, self.layer)
        index = torch.tensor([list(p) if isinstance(p, Sequence) else p for p in positions], device=hidden.device)
        rows = torch.arange(len(positions), device=hidden.device)
        return hidden[rows[:, None], index] if index.dim() == 2 else hidden[rows, index]

    @torch.no_grad()
    def set_read_offset(self, task: str, contexts: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], batch_size: int = 16) -> dict:
        """Centre a task's activations from now on: v_j <- v_j - mu_j before injection, where mu_j is
        the mean activation behind placeholder j over `contexts` (training contexts; held-out and
        control examples get the same mu). For LatentQA's reply header, whose activations are
        96-99% one shared vector in every chat (docs/RESULTS.md), this leaves what differs between
        chats, which injection (v / ||v|| * s) would otherwise scale down to almost nothing.
        Returns the share of the activations' energy that centring keeps, E||v - mu||^2 / E||v||^2."""
        if len(contexts) != len(positions) or not contexts:
            raise ValueError(f"set_read_offset needs one position list per context, got {len(contexts)} contexts and {len(positions)} position lists")
        slots = [self._placeholder_positions(SftExample(task, list(c), list(p), "", "")) for c, p in zip(contexts, positions)]
        vectors = torch.cat([self.read_activations(contexts[i : i + batch_size], slots[i : i + batch_size])
                             for i in range(0, len(contexts), batch_size)])  # [N, P, d]
        mean = vectors.mean(0)
        self.read_offsets[task] = mean
        kept = ((vectors - mean).pow(2).sum(-1).mean() / vectors.pow(2).sum(-1).mean()).item()
        return {"task": task, "contexts": len(contexts), "energy_share_kept": kept, "offset_norm": mean.norm(dim=-1).mean().item()}

    # ---- passes ---------------------------------------------------------------------------
    def _micro_batches(self, lengths: Sequence[int], agree: bool) -> list[list[int]]:
        """This rank's micro-batches under `memory.micro_batch_tokens`; with `agree`, as many as the
        data-parallel rank that needs the most (every rank must make the same number of backward passes)."""
        budget = self.cfg.memory.micro_batch_tokens
        if not agree:
            return micro_batches(lengths, budget)
        return micro_batches(lengths, budget, data_parallel_max(len(micro_batches(lengths, budget)), self.device))

    def _accumulate(self, passes: Sequence[tuple[list[list[int]], Callable[[list[int], float], None]]], boundary: bool = True) -> None:
        """One backward pass per micro-batch of every (micro-batches, backward function) set, then
        one `engine.step()`: DeepSpeed's accumulation boundary is ours (the last micro-batch of a call
        that ends an optimizer step), so the gradients of all of them add up before the step. An
        empty micro-batch (a rank short of samples) runs row 0 with weight 0, so its ZeRO-2
        reductions still meet the other ranks'."""
        flat = [(group, backward_one) for groups, backward_one in passes for group in groups]
        for j, (group, backward_one) in enumerate(flat):
            self.engine.set_gradient_accumulation_boundary(boundary and j == len(flat) - 1)
            backward_one(group or [0], 1.0 if group else 0.0)
        self.engine.step()

    @contextmanager
    def _gradient_pass(self):
        """Dropout off in every GRPO pass (eval mode), while the transformer blocks report
        `training` so that HF's gradient checkpointing, which runs only in training mode,
        recomputes them (`memory.gradient_checkpointing`); their submodules stay in eval mode."""
        self.engine.eval()
        blocks = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)] if self.cfg.memory.gradient_checkpointing else []
        for b in blocks:
            b.training = True
        try:
            yield
        finally:
            for b in blocks:
                b.training = False

    # ---- warmup -------------------------------------------------------------------------
    def _sft_prompts(self, examples: Sequence[SftExample]) -> tuple[list[DecoderPrompt], list[list[int]]]:
        prompts = [build_decoder_prompt(self.tokenizer, self.layer, e.question, self.cfg.injection.num_placeholders, self.cfg.injection.placeholder) for e in examples]
        return prompts, [answer_ids(self.tokenizer, e.answer) for e in examples]

    def _sft_batch(self, examples: Sequence[SftExample]) -> tuple[DecoderBatch, torch.Tensor]:
        prompts, answers = self._sft_prompts(examples)
        vectors = self.read_activations([e.context_ids for e in examples], [self._placeholder_positions(e) for e in examples])
        for row, e in enumerate(examples):
            if e.task in self.read_offsets:
                vectors[row] = vectors[row] - self.read_offsets[e.task]
        return build_batch(prompts, answers, self.tokenizer.pad_token_id), vectors

    def _placeholder_positions(self, example: SftExample) -> list[int]:
        """The read position behind each placeholder: one position is repeated over all of them."""
        p = self.cfg.injection.num_placeholders
        positions = [example.position] if isinstance(example.position, int) else list(example.position)
        if len(positions) == 1:
            return positions * p
        if len(positions) != p:
            raise ValueError(f"{example.task} example has {len(positions)} read positions; expected 1 or injection.num_placeholders={p}")
        return positions

    def _answer_token_losses(self, examples: Sequence[SftExample], vector_override: str | None = None):
        """Per-token answer NLL [B, T] and argmax hits [B, T] (teacher-forced), with the graph, and the mask."""
        batch, vectors = self._sft_batch(examples)
        if vector_override == "zero":  # control: no activation at all
            vectors = torch.zeros_like(vectors)
        elif vector_override is not None:
            raise ValueError(f"vector_override {vector_override!r}; expected None or 'zero' (a shuffled control "
                             f"passes another source's context in the examples)")
        stats = completion_token_stats(self.engine, batch, vectors, self.norm, 1.0, self.cfg.injection.mode,
                                       self.cfg.memory.logits_chunk_tokens, correct=True)
        nll = -unflatten(stats.logp, batch)
        correct = unflatten(stats.correct, batch)
        return nll, correct, completion_mask(batch).to(nll.device)

    def sft_micro_step(self, examples: Sequence[SftExample]) -> dict:
        """Forward + backward on one micro-batch of examples (in token-budget pieces, see
        `memory.micro_batch_tokens`); DeepSpeed steps the optimizer at accumulation boundaries
        (`decoder_optim.grad_accum` calls). Loss of a call = sum of answer-token NLL over the
        data-parallel call's tokens T: loss_r = sum_{r's tokens} nll / (T / W), so the ranks'
        averaged gradient is the token mean over the whole call. Metrics: this rank's token means."""
        self.engine.train()
        prompts, answers = self._sft_prompts(examples)
        lengths = [len(p.input_ids) + len(a) for p, a in zip(prompts, answers)]
        local_tokens = sum(len(a) for a in answers)
        denominator = data_parallel_tokens(local_tokens, self.device)
        sums: dict[str, list[float]] = {}

        def backward_one(group: list[int], weight: float) -> None:
            part = [examples[i] for i in group]
            nll, _, mask = self._answer_token_losses(part)
            self.engine.backward(weight * (nll * mask).sum() / denominator)
            if weight:
                for row, e in enumerate(part):
                    total = sums.setdefault(e.task, [0.0, 0.0])
                    total[0] += float((nll[row] * mask[row]).sum().detach())
                    total[1] += float(mask[row].sum())

        boundary = (self.engine.micro_steps + 1) % self.engine.gradient_accumulation_steps() == 0
        self._accumulate([(self._micro_batches(lengths, agree=True), backward_one)], boundary)
        if boundary:
            self.optimizer_steps += 1
        out = {"loss": sum(v[0] for v in sums.values()) / max(local_tokens, 1), "tokens": float(local_tokens), "lr": self.lr()}
        out.update(self._sft_work(examples, lengths, local_tokens))
        for task in sorted(sums):
            out[f"loss/{task}"] = sums[task][0] / max(sums[task][1], 1.0)
            out[f"tokens/{task}"] = sums[task][1]
        return out

    def _sft_work(self, examples: Sequence[SftExample], lengths: Sequence[int], answer_tokens: int) -> dict[str, float]:
        """What a call's passes compute on, for FLOP counts (bench/flops.py `sft_flops`; padding
        excluded): the gradient pass over prompt + answer (`tokens`, `key_pairs` = sum T(T+1)/2, the keys
        causal attention reads; the LM head on `head_tokens`, the answers) and the frozen target's read
        of each context up to its last read position (`read_tokens`, `read_key_pairs`), per call."""
        reads = [max(self._placeholder_positions(e)) + 1 for e in examples]
        return {"work/sequences": float(len(examples)), "work/tokens": float(sum(lengths)),
                "work/key_pairs": float(sum(t * (t + 1) // 2 for t in lengths)), "work/head_tokens": float(answer_tokens),
                "work/read_tokens": float(sum(reads)), "work/read_key_pairs": float(sum(r * (r + 1) // 2 for r in reads))}

    @torch.no_grad()
    def answer_scores(self, examples: Sequence[SftExample], vector_override: str | None = None) -> dict[str, list[float]]:
        """Held-out scoring: per-example mean answer NLL and token accuracy (with the examples' own
        activations, or "zero"; the shuffled control is built by the caller from other sources)."""
        self.engine.eval()
        prompts, answers = self._sft_prompts(examples)
        out: dict[str, list[float]] = {"nll": [0.0] * len(examples), "token_accuracy": [0.0] * len(examples)}
        for group in self._micro_batches([len(p.input_ids) + len(a) for p, a in zip(prompts, answers)], agree=False):
            nll, correct, mask = self._answer_token_losses([examples[i] for i in group], vector_override)
            for row, i in enumerate(group):
                out["nll"][i] = float((nll[row] * mask[row]).sum() / mask[row].sum())
                out["token_accuracy"][i] = float((correct[row] * mask[row]).sum() / mask[row].sum())
        return out

    # ---- GRPO ---------------------------------------------------------------------------
    def _policy_batch(self, batch: RolloutBatch, prompt: DecoderPrompt) -> DecoderBatch:
        return build_batch([prompt] * len(batch), batch.token_ids, self.tokenizer.pad_token_id)

    def _lengths(self, batch: RolloutBatch, prompt: DecoderPrompt) -> list[int]:
        return [len(prompt.input_ids) + len(ids) for ids in batch.token_ids]

    def _token_logprobs(self, model, batch: RolloutBatch, prompt: DecoderPrompt, with_entropy: bool = False):
        """(log pi [n, T], completion mask [n, T], entropy [n, T] or None) of `model` in one pass."""
        dec = self._policy_batch(batch, prompt)
        stats = completion_token_stats(model, dec, batch.vectors, self.norm, batch.temperature, self.cfg.injection.mode,
                                       self.cfg.memory.logits_chunk_tokens, entropy=with_entropy)
        logp = unflatten(stats.logp, dec)
        entropy = unflatten(stats.entropy, dec) if with_entropy else None
        return logp, completion_mask(dec).to(logp.device), entropy

    def _in_micro_batches(self, batch: RolloutBatch, prompt: DecoderPrompt, run) -> list[torch.Tensor | None]:
        """A no-grad pass over the batch in micro-batches: `run(sub_batch)` -> [n, T_sub] tensors,
        scattered back into [N, T] (zero-padded) in the batch's order."""
        groups = self._micro_batches(self._lengths(batch, prompt), agree=False)
        width = max((len(ids) for ids in batch.token_ids), default=0)
        out: list[torch.Tensor | None] = []
        for group in groups:
            for k, t in enumerate(run(batch.select(group))):
                if len(out) <= k:
                    out.append(None if t is None else t.new_zeros(len(batch), width))
                if t is not None:
                    out[k][group, : t.shape[1]] = t
        return out

    def policy_logprobs(self, batch: RolloutBatch, grad: bool = False, with_entropy: bool = False):
        """(log pi [N, T], completion mask [N, T], entropy [N, T] or None) at the batch's temperature.
        Without grad the batch runs in micro-batches; a gradient call is one pass (`update_shard`
        micro-batches before calling it)."""
        if grad:
            return self._token_logprobs(self.engine, batch, self.description_prompt, with_entropy)
        with torch.no_grad():
            logp, mask, entropy = self._in_micro_batches(batch, self.description_prompt,
                                                         lambda sub: self._token_logprobs(self.engine, sub, self.description_prompt, with_entropy))
        return logp, mask, entropy

    @torch.no_grad()
    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        if self.reference is not None:  # warmup adapter, same prompt and activation
            return self._in_micro_batches(batch, self.description_prompt,
                                          lambda sub: self._token_logprobs(self.reference, sub, self.description_prompt)[:1])[0]
        # bare base model on the generated text only: no oracle prompt, no activation
        with self.model.disable_adapter():
            return self._in_micro_batches(batch, self.reference_prompt,
                                          lambda sub: self._token_logprobs(self.engine, sub, self.reference_prompt)[:1])[0]

    def _sampler_logprobs(self, batch: RolloutBatch, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        for i, lps in enumerate(batch.sampler_logprobs):
            out[i, : len(lps)] = torch.tensor(lps)
        return out

    @torch.no_grad()
    def sequence_kl(self, batch: RolloutBatch) -> list[float]:
        """sum_t k1_t = sum_t (log pi - log pi_ref) per sample (the "reward" KL placement)."""
        self.engine.eval()
        logp, mask, _ = self.policy_logprobs(batch)
        ref = self.reference_logprobs(batch)
        return sequence_kl_k1(logp, ref[:, : logp.shape[1]], mask).tolist()

    @torch.no_grad()
    def sync_error(self, probe: RolloutBatch) -> dict[str, float]:
        """|log pi_learner - log pi_sampler| over the probe's tokens (weight-sync verification):
        mean, 99th percentile and max, and the token count."""
        self.engine.eval()
        logp, mask, _ = self.policy_logprobs(probe)
        diff = (logp - self._sampler_logprobs(probe, logp)).abs()[mask.bool()].float().cpu()
        return {"mean": float(diff.mean()), "p99": float(torch.quantile(diff, 0.99)), "max": float(diff.max()), "tokens": float(len(diff))}

    def update_shard(self, batch: RolloutBatch, sft_examples: Sequence[SftExample] = ()) -> UpdateStats:
        """epochs x minibatches of clipped-surrogate updates on this rank's share of the batch -> its
        `UpdateStats` (token-weighted means over every micro-batch of every update).

        With one epoch of one minibatch (the default and the GPU recipes) there is no separate
        old-policy forward: pi_old is the policy being updated, so old log-probs are the gradient
        pass's detached log-probs (overlap_rollout does not change that: the sampler's older policy
        enters only through the truncated importance weights, computed from the same log-probs).

        Every pass runs with dropout off (eval mode), the gradient pass included, so the ratio
        pi/pi_old compares one function, not two dropout masks. Each rank makes exactly
        `minibatches_per_epoch` optimizer steps per epoch (`torch.tensor_split`; the schema keeps
        every minibatch non-empty), and each minibatch's loss is a token mean over the whole
        data-parallel minibatch: loss_r = sum_{r's tokens} l / (T_global / W), which DeepSpeed's
        average over W ranks turns into sum_{all tokens} l / T_global, the single-learner loss.
        A minibatch runs in micro-batches under `memory.micro_batch_tokens` whose gradients add up
        before its optimizer step (the same sum, so the same gradient).

        Supervised mixing (`grpo.sft_mix_weight` = beta, `sft_examples` this rank's share, split over
        the minibatches like the samples): each minibatch's loss gains beta times the answer-token
        mean NLL of its warmup examples over the data-parallel batch, in the same optimizer step:
            L = L_GRPO + beta * sum_{SFT tokens} nll / T_SFT"""
        g = self.cfg.grpo
        self.engine.eval()
        # One update per rollout: the old policy is the current one, so its log-probs are the
        # gradient pass's own, detached (ratio 1 by construction); no separate forward.
        single_update = g.epochs_per_rollout == 1 and g.minibatches_per_epoch == 1
        if not single_update:
            old_logp, mask, _ = self.policy_logprobs(batch)
            weights, old_stats = truncated_importance_weights(old_logp, self._sampler_logprobs(batch, old_logp), mask, g.importance_cap)
        # the KL's reference pass: only where the loss uses it (in the reward placement the driver
        # already shaped the rewards with `sequence_kl` and logs that KL)
        ref_logp = self.reference_logprobs(batch) if g.kl_coef > 0 and g.kl_placement == "loss" else None
        advantages = batch.advantages.float().to(self.device)
        sums: dict[str, float] = {}  # token-weighted metric sums over every micro-batch of every update
        maxima: dict[str, float] = {}
        counted = 0.0
        order = torch.arange(len(batch))
        sft_chunks = [[sft_examples[i] for i in c.tolist()] for c in torch.tensor_split(torch.arange(len(sft_examples)), g.minibatches_per_epoch)]
        sft_sums = [0.0, 0.0]
        for _epoch in range(g.epochs_per_rollout):
            for chunk, sft_part in zip(torch.tensor_split(order, g.minibatches_per_epoch), sft_chunks):
                idx = chunk.tolist()
                minibatch = batch.select(idx)
                denominator = data_parallel_tokens(sum(len(t) for t in minibatch.token_ids), self.device)

                def backward_one(group: list[int], weight: float) -> None:
                    nonlocal counted
                    rows = [idx[i] for i in group]
                    with self._gradient_pass():
                        logp, sub_mask, entropy = self.policy_logprobs(minibatch.select(group), grad=True, with_entropy=True)
                    width = logp.shape[1]
                    if single_update:
                        old = logp.detach()
                        w, is_stats = truncated_importance_weights(old, self._sampler_logprobs(minibatch.select(group), old), sub_mask, g.importance_cap)
                    else:
                        old, w, is_stats = old_logp[rows][:, :width], weights[rows][:, :width], {}
                    loss, m = grpo_policy_loss(
                        logp, old, advantages[rows], sub_mask,
                        clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high, importance_weights=w,
                        ref_logp=None if ref_logp is None else ref_logp[rows][:, :width],
                        kl_coef=g.kl_coef if g.kl_placement == "loss" else 0.0,
                        kl_estimator=g.kl_estimator, kl_placement=g.kl_placement,
                        num_tokens_for_mean=denominator,
                    )
                    self.engine.backward(weight * loss)
                    if weight:
                        tokens = float(sub_mask.sum())
                        m["entropy"] = float(masked_mean(entropy, sub_mask))
                        m.update({f"importance_{k}": v for k, v in is_stats.items()})
                        for k, v in m.items():
                            if k.endswith("_max"):
                                maxima[k] = max(maxima.get(k, float("-inf")), float(v))
                            else:
                                sums[k] = sums.get(k, 0.0) + float(v) * tokens
                        counted += tokens

                passes = [(self._micro_batches(self._lengths(minibatch, self.description_prompt), agree=True), backward_one)]
                if g.sft_mix_weight > 0:
                    passes.append(self._sft_passes(sft_part, g.sft_mix_weight, sft_sums))
                self._accumulate(passes)
                self.optimizer_steps += 1
        means = {k: v / max(counted, 1.0) for k, v in sums.items()} | maxima
        if not single_update:  # the importance weights of the one old-policy pass
            means.update({f"importance_{k}": float(v) for k, v in old_stats.items()})
        return UpdateStats.of_means(means, lr=self.lr(), tokens=float(sum(len(t) for t in batch.token_ids)),
                                    sft_loss=sft_sums[0] / max(sft_sums[1], 1.0) if g.sft_mix_weight > 0 else None)

    def _sft_passes(self, examples: Sequence[SftExample], weight: float, sums: list[float]):
        """(micro-batches, backward function) adding weight x the answer-token mean NLL of `examples`
        (over the data-parallel batch's answer tokens) to the gradient; sums[0:2] += (NLL, tokens).
        Ranks agree on the pass count, also when a rank has no example (then zero-weight passes)."""
        prompts, answers = self._sft_prompts(examples)
        denominator = data_parallel_tokens(sum(len(a) for a in answers), self.device)
        lengths = [len(p.input_ids) + len(a) for p, a in zip(prompts, answers)]

        def backward_one(group: list[int], w: float) -> None:
            part = [examples[i] for i in group] if examples else []
            if not part:  # nothing here: a zero-weight pass on a stand-in keeps the collectives paired
                part, w = [self._stand_in_example], 0.0
            with self._gradient_pass():
                nll, _, mask = self._answer_token_losses(part)
            self.engine.backward(w * weight * (nll * mask).sum() / max(denominator, 1.0))
            if w:
                sums[0] += float((nll * mask).sum().detach())
                sums[1] += float(mask.sum())

        return self._micro_batches(lengths, agree=True), backward_one

    @property
    def _stand_in_example(self) -> SftExample:
        ids = self.tokenizer.encode("a", add_special_tokens=False) or [0]
        return SftExample("token_prediction", ids, 0, "?", "a")

    # ---- state --------------------------------------------------------------------------
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def adapter(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def save_state(self) -> dict[str, bytes]:
        """DeepSpeed checkpoint (adapter + optimizer + scheduler) as {relative path: bytes}, so the
        driver can store it without a shared file system. The frozen base is left out
        (`exclude_frozen_parameters`): it is the target model, which every run loads anyway."""
        tmp = Path(tempfile.mkdtemp(prefix="cycle-oracle-ds-"))
        try:
            self.engine.save_checkpoint(str(tmp), tag="state", client_state={"optimizer_steps": self.optimizer_steps},
                                        exclude_frozen_parameters=True)
            # DeepSpeed keeps a tied frozen weight (lm_head = the embedding) under its second name: keep
            # only the trainable tensors in the module states
            trainable = {n for n, p in self.engine.module.named_parameters() if p.requires_grad}
            for states in tmp.rglob("*model_states.pt"):
                saved = torch.load(states, weights_only=False)
                saved["module"] = {k: v for k, v in saved["module"].items() if k in trainable}
                torch.save(saved, states)
            return {str(p.relative_to(tmp)): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_state(self, files: dict[str, bytes]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="cycle-oracle-ds-"))
        try:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            # the module states hold only the trainable (LoRA) weights: the base comes from the model
            _, client = self.engine.load_checkpoint(str(tmp), tag="state", load_module_strict=False)
            self.optimizer_steps = int((client or {}).get("optimizer_steps", 0))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapter weights into the module AND the optimizer's fp32 master copy: ZeRO 1/2 keep
        one and copy it back into the module after every step, which would silently undo a
        module-only load at the first update (GRPO would train a fresh LoRA, not the warmup's)."""
        load_adapter_state(self.model, state)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
