"""The decoder learner: a PEFT LoRA decoder trained with DeepSpeed (no Ray here; `actors/learner.py`
runs one of these per rank).

- `sft_micro_step`: warmup. Activations are read from the same model with the adapter disabled (the
  frozen target), injected, and the loss is cross-entropy on answer tokens only.
- `grpo_step`: GRPO on a `RolloutBatch` (cycle_oracle/batch.py; this rank's shard). The learner recomputes the old-policy log-probs itself
  (before any update), uses vLLM's sampling log-probs only for truncated importance sampling
  and the logged train/inference mismatch, and adds the KL to the reference (see grpo.py).
DeepSpeed owns the optimizer, LR schedule, gradient clipping, accumulation and the
data-parallel all-reduce (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from cycle_oracle.activations import pad_right, read_residual
from cycle_oracle.data.items import SftExample
from cycle_oracle.devices import model_device
from cycle_oracle.decoder import DecoderBatch, build_batch, completion_logits, completion_mask, unflatten
from cycle_oracle.batch import RolloutBatch
from cycle_oracle.grpo import grpo_policy_loss, masked_mean, sequence_kl_k1, token_entropy, token_logprobs, truncated_importance_weights
from cycle_oracle.injection import DecoderPrompt, build_decoder_prompt, reference_prompt
from cycle_oracle.models import adapter_state, attach_lora, load_adapter_state, load_causal_lm, load_tokenizer


def deepspeed_config(optim, total_steps: int, grad_accum: int | None = None, micro_batch: int = 1) -> dict:
    """DeepSpeed config from the recipe's optimiser settings (CPU-safe: torch Adam, fp32)."""
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
        "zero_optimization": {"stage": optim.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "weight_decay": optim.weight_decay, "torch_adam": True}},
        "scheduler": scheduler,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def data_parallel_tokens(mask: torch.Tensor) -> float:
    """T_global / W: the data-parallel minibatch's token count over the world size (the local
    count when no process group is running), the denominator that makes W ranks' averaged
    gradient equal one learner's on the whole minibatch."""
    import torch.distributed as dist

    local = mask.sum().float().reshape(1)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(local)
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return float(local) / dist.get_world_size()


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str | None = None) -> None:
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    deepspeed.init_distributed(backend or ("nccl" if torch.cuda.is_available() else "gloo"))


class DecoderLearner:
    """One rank of the decoder's trainer. `stage` picks the optimiser settings: "warmup" uses
    `decoder_optim` (with its gradient accumulation), "grpo" uses `grpo.decoder_optim` or else
    `decoder_optim`, one optimizer step per minibatch."""

    def __init__(self, model_path: str, cfg, layer: int, injection_norm: float, total_steps: int, stage: str = "warmup",
                 reference_adapter: dict | None = None, model=None, tokenizer=None):
        """`model`/`tokenizer`: a prebuilt HF causal LM (without LoRA) and its tokenizer instead of
        loading `model_path` (the GPU memory probe builds a random-initialised 8B-shaped one)."""
        import deepspeed

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
        model = attach_lora(model if model is not None else load_causal_lm(model_path, cfg.model.dtype), cfg.decoder_lora)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(optim, total_steps, grad_accum),
        )
        self.model = self.engine.module
        self.device = model_device(self.model)  # DeepSpeed placed it on this rank's device (Ray's GPU, or the CPU)
        self.reference = None
        if reference_adapter is not None:  # kl_reference: warmup -> a frozen copy with that adapter
            ref = attach_lora(load_causal_lm(model_path, cfg.model.dtype), cfg.decoder_lora)
            load_adapter_state(ref, reference_adapter)
            self.reference = ref.merge_and_unload().eval().to(self.device)
        self.description_prompt = build_decoder_prompt(self.tokenizer, layer, cfg.description_instruction, cfg.injection.num_placeholders, cfg.injection.placeholder)
        self.reference_prompt = reference_prompt(self.tokenizer)
        self.optimizer_steps = 0
        self.read_offsets: dict[str, torch.Tensor] = {}
        """task -> [P, d] subtracted from that task's activations before injection (`set_read_offset`)."""

    # ---- activations --------------------------------------------------------------------
    @torch.no_grad()
    def read_activations(self, contexts: Sequence[Sequence[int]], positions: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        """The frozen target's layer-L activations (adapter disabled): [B, d] for one position per
        context, [B, P] positions -> [B, P, d]."""
        ids, mask = pad_right(contexts, self.tokenizer.pad_token_id)
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

    # ---- warmup -------------------------------------------------------------------------
    def _sft_batch(self, examples: Sequence[SftExample]) -> tuple[DecoderBatch, torch.Tensor]:
        from cycle_oracle.injection import answer_ids

        prompts = [build_decoder_prompt(self.tokenizer, self.layer, e.question, self.cfg.injection.num_placeholders, self.cfg.injection.placeholder) for e in examples]
        answers = [answer_ids(self.tokenizer, e.answer) for e in examples]
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
        """Per-example mean answer NLL [B] and argmax accuracy [B] (teacher-forced), with the graph."""
        batch, vectors = self._sft_batch(examples)
        if vector_override == "zero":  # control: no activation at all
            vectors = torch.zeros_like(vectors)
        elif vector_override is not None:
            raise ValueError(f"vector_override {vector_override!r}; expected None or 'zero' (a shuffled control "
                             f"passes another source's context in the examples)")
        logits = completion_logits(self.engine, batch, vectors, self.norm, self.cfg.injection.mode)
        targets = batch.targets().to(logits.device)
        nll = unflatten(torch.nn.functional.cross_entropy(logits, targets, reduction="none"), batch)
        correct = unflatten((logits.argmax(-1) == targets).float(), batch)
        mask = completion_mask(batch).to(logits.device)
        return nll, correct, mask

    def sft_micro_step(self, examples: Sequence[SftExample]) -> dict:
        """Forward + backward on one micro-batch; DeepSpeed steps the optimizer at accumulation
        boundaries. Loss = mean NLL over all answer tokens of the micro-batch; also per task."""
        self.engine.train()
        nll, _, mask = self._answer_token_losses(examples)
        loss = (nll * mask).sum() / mask.sum()
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self.optimizer_steps += 1
        out = {"loss": loss.item(), "tokens": float(mask.sum()), "lr": self.lr()}
        for task in sorted({e.task for e in examples}):
            rows = torch.tensor([e.task == task for e in examples], device=nll.device)
            out[f"loss/{task}"] = ((nll[rows] * mask[rows]).sum() / mask[rows].sum()).item()
            out[f"tokens/{task}"] = float(mask[rows].sum())
        return out

    @torch.no_grad()
    def answer_scores(self, examples: Sequence[SftExample], vector_override: str | None = None) -> dict[str, list[float]]:
        """Held-out scoring: per-example mean answer NLL and token accuracy (with the examples' own
        activations, or "zero"; the shuffled control is built by the caller from other sources)."""
        self.engine.eval()
        nll, correct, mask = self._answer_token_losses(examples, vector_override)
        return {"nll": ((nll * mask).sum(1) / mask.sum(1)).tolist(), "token_accuracy": ((correct * mask).sum(1) / mask.sum(1)).tolist()}

    # ---- GRPO ---------------------------------------------------------------------------
    def _policy_batch(self, batch: RolloutBatch, prompt: DecoderPrompt) -> DecoderBatch:
        return build_batch([prompt] * len(batch), batch.token_ids, self.tokenizer.pad_token_id)

    def policy_logprobs(self, batch: RolloutBatch, grad: bool = False, with_entropy: bool = False):
        """(log pi [N, T], completion mask [N, T], entropy [N, T] or None) at the batch's temperature."""
        dec = self._policy_batch(batch, self.description_prompt)
        with torch.set_grad_enabled(grad):
            logits = completion_logits(self.engine, dec, batch.vectors, self.norm, self.cfg.injection.mode)
            targets = dec.targets().to(logits.device)
            logp = unflatten(token_logprobs(logits[None], targets[None], batch.temperature)[0], dec)
            entropy = unflatten(token_entropy(logits[None].detach(), batch.temperature)[0], dec) if with_entropy else None
        return logp, completion_mask(dec).to(logp.device), entropy

    @torch.no_grad()
    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        if self.reference is not None:  # warmup adapter, same prompt and activation
            dec = self._policy_batch(batch, self.description_prompt)
            logits = completion_logits(self.reference, dec, batch.vectors, self.norm, self.cfg.injection.mode)
        else:  # bare base model on the generated text only: no oracle prompt, no activation
            dec = self._policy_batch(batch, self.reference_prompt)
            with self.model.disable_adapter():
                logits = completion_logits(self.engine, dec, batch.vectors, self.norm, self.cfg.injection.mode)
        return unflatten(token_logprobs(logits[None], dec.targets().to(logits.device)[None], batch.temperature)[0], dec)

    def _sampler_logprobs(self, batch: RolloutBatch, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        for i, lps in enumerate(batch.sampler_logprobs):
            out[i, : len(lps)] = torch.tensor(lps)
        return out

    @torch.no_grad()
    def sequence_kl(self, batch: RolloutBatch) -> list[float]:
        """sum_t k1_t = sum_t (log pi - log pi_ref) per sample (the "reward" KL placement)."""
        logp, mask, _ = self.policy_logprobs(batch)
        ref = self.reference_logprobs(batch)
        return sequence_kl_k1(logp, ref[:, : logp.shape[1]], mask).tolist()

    @torch.no_grad()
    def sync_error(self, probe: RolloutBatch) -> float:
        """max_t |log pi_learner - log pi_sampler| over the probe's tokens (weight-sync verification)."""
        self.engine.eval()
        logp, mask, _ = self.policy_logprobs(probe)
        diff = (logp - self._sampler_logprobs(probe, logp)).abs() * mask
        return float(diff.max())

    def grpo_step(self, batch: RolloutBatch) -> dict:
        """epochs x minibatches of clipped-surrogate updates on this rank's share of the batch.

        With one epoch of one minibatch (the default and the GPU recipes) there is no separate
        old-policy forward: pi_old is the policy being updated, so old log-probs are the gradient
        pass's detached log-probs (overlap_rollout does not change that: the sampler's older policy
        enters only through the truncated importance weights, computed from the same log-probs).

        Every pass runs with dropout off (eval mode), the gradient pass included, so the ratio
        pi/pi_old compares one function, not two dropout masks. Each rank makes exactly
        `minibatches_per_epoch` optimizer steps per epoch (`torch.tensor_split`; the schema keeps
        every minibatch non-empty), and each minibatch's loss is a token mean over the whole
        data-parallel minibatch: loss_r = sum_{r's tokens} l / (T_global / W), which DeepSpeed's
        average over W ranks turns into sum_{all tokens} l / T_global, the single-learner loss."""
        g = self.cfg.grpo
        self.engine.eval()
        # One update per rollout: the old policy is the current one, so its log-probs are the
        # gradient pass's own, detached (ratio 1 by construction); no separate forward.
        single_update = g.epochs_per_rollout == 1 and g.minibatches_per_epoch == 1
        if not single_update:
            old_logp, mask, _ = self.policy_logprobs(batch)
            weights, is_stats = truncated_importance_weights(old_logp, self._sampler_logprobs(batch, old_logp), mask, g.importance_cap)
        ref_logp = self.reference_logprobs(batch) if g.kl_coef > 0 else None
        advantages = batch.advantages.float().to(self.device)
        metrics: dict[str, float] = {}
        order = torch.arange(len(batch))
        steps = 0
        for _epoch in range(g.epochs_per_rollout):
            for chunk in torch.tensor_split(order, g.minibatches_per_epoch):
                idx = chunk.tolist()
                logp, sub_mask, entropy = self.policy_logprobs(batch.select(idx), grad=True, with_entropy=True)
                if single_update:
                    old_logp, mask = logp.detach(), sub_mask
                    weights, is_stats = truncated_importance_weights(old_logp, self._sampler_logprobs(batch, old_logp), mask, g.importance_cap)
                loss, m = grpo_policy_loss(
                    logp, old_logp[idx][:, : logp.shape[1]], advantages[idx], sub_mask,
                    clip_eps_low=g.clip_eps_low, clip_eps_high=g.clip_eps_high,
                    importance_weights=weights[idx][:, : logp.shape[1]],
                    ref_logp=None if ref_logp is None else ref_logp[idx][:, : logp.shape[1]],
                    kl_coef=g.kl_coef if g.kl_placement == "loss" else 0.0,
                    kl_estimator=g.kl_estimator, kl_placement=g.kl_placement,
                    num_tokens_for_mean=data_parallel_tokens(sub_mask),
                )
                self.engine.backward(loss)
                self.engine.step()
                self.optimizer_steps += 1
                steps += 1
                m["entropy"] = float(masked_mean(entropy, sub_mask))
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v)
        out = {k: v / steps for k, v in metrics.items()}
        out.update({f"importance_{k}": float(v) for k, v in is_stats.items()})
        out["lr"] = self.lr()
        out["tokens"] = float(mask.sum())
        return out

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
