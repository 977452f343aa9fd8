"""The `Oracle`: the few callables every eval takes, so evals run on any checkpoint.

An eval never touches models directly; it calls

    describe(V [N, d])              -> N greedy descriptions (the one description instruction)
    encode(texts)                   -> V_hat [N, d] (encoder reconstructions)
    encode_with_weights(texts)      -> (V_hat [N, d], per text [(token, pooling weight), ...])
    ask_yes_no(V [N, d], question)  -> s [N],  s = logsumexp_y z_y - logsumexp_n z_n
    judge_yes_no(texts, question)   -> s [N]   (optional: the target reading a description)
    read(texts, positions)          -> V [N, d] (target activation at the read layer: last token or mean)
    read_tokens(text)               -> (token strings [T], V [T, d], readable [T] bool)   (viewer)
    detokenize(token_ids)           -> str      (context windows of an ActivationStore)
    paraphrase(texts, instruction, max_new_tokens) -> texts rewritten by the target (paraphrase test)
    answer(V [N, d], question, max_new_tokens) -> N greedy answers to a question about v (QA route)
    tokenize(text)                  -> token ids without special tokens (truncation to n tokens)
    describe_text(texts)            -> N descriptions written from source TEXT, no activation (the
                                       text-only guess, evals/baselines.text_guess; None elsewhere)

`describe_items(oracle, V, texts)` is what an eval calls: `describe_text(texts)` for an oracle that
reads text, `describe(V)` for every other one.

`encode` / `encode_with_weights` are None for an oracle without an encoder (a training-free
baseline without a checkpoint: no retrieval, no reconstruction route) and `ask_yes_no` for one
that cannot answer questions about v (logit lens, Patchscopes, LatentLens: no oracle route).

where z is the next-token logit vector at the first answer position (right after the assistant
header), y ranges over the "yes" tokens ("Yes", " Yes") and n over the "no" tokens ("No", " No").
With one token per side this is exactly logit(Yes) - logit(No); answers are never parsed from text.

`make_hf_oracle` builds these from HF models with plain torch. An untrained decoder (decoder =
target, fresh identity-initialised encoder) is the floor every trained checkpoint is compared with.
The lead engineer's vLLM `describe` can replace the HF one: `dataclasses.replace(oracle, describe=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cycle_oracle.activations import pad_right, read_residual, readable_positions
from cycle_oracle.checkpoint import load_trained
from cycle_oracle.config import DEFAULT_DESCRIPTION_INSTRUCTION, InjectionSettings, LoraSettings
from cycle_oracle.encoder import ActivationEncoder, reconstruct_texts
from cycle_oracle.evals.paraphrase import rewrite_texts
from cycle_oracle.injection import build_decoder_prompt, decoder_inputs, description_prompt, mean_embedding_norm, target_norm
from cycle_oracle.models import (adapter_off, attach_lora, causal_lm_parts, load_adapter_state, load_causal_lm, load_tokenizer, num_layers,
                                 render_chat, resolve_layer, resolve_model_path)

Vectors = torch.Tensor
YES_TOKENS = ("Yes", " Yes")
NO_TOKENS = ("No", " No")


@dataclass
class Oracle:
    """Callables an eval needs (see module docstring for shapes). `info` describes the checkpoint."""

    describe: Callable[[Vectors], list[str]]
    encode: Callable[[Sequence[str]], Vectors] | None
    encode_with_weights: Callable[[Sequence[str]], tuple[Vectors, list[list[tuple[str, float]]]]] | None
    ask_yes_no: Callable[[Vectors, str], torch.Tensor] | None
    read: Callable[..., Vectors]
    judge_yes_no: Callable[[Sequence[str], str], torch.Tensor] | None = None
    read_tokens: Callable[[str], tuple[list[str], Vectors, torch.Tensor]] | None = None
    detokenize: Callable[[Sequence[int]], str] | None = None
    info: dict = field(default_factory=dict)
    paraphrase: Callable[[Sequence[str], str, int], list[str]] | None = None
    answer: Callable[[Vectors, str, int], list[str]] | None = None
    tokenize: Callable[[str], list[int]] | None = None
    describe_text: Callable[[Sequence[str]], list[str]] | None = None


def describe_items(oracle: Oracle, vectors: Vectors, texts: Sequence[str] | None = None) -> list[str]:
    """The oracle's descriptions of N items: from their source texts for the text-only guess
    (`oracle.describe_text`), from their activations vectors [N, d] for every other oracle."""
    if oracle.describe_text is not None:
        if texts is None:
            raise ValueError(f"oracle {oracle.info.get('name')!r} describes source texts, and this eval passed none")
        return list(oracle.describe_text(list(texts)))
    return oracle.describe(vectors)


def _single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids = []
    for w in words:
        enc = tokenizer.encode(w, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"answer token {w!r} is not a single token for this tokenizer (ids {enc})")
        ids.append(enc[0])
    return ids


def yes_no_score(logits: torch.Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> torch.Tensor:
    """[N, V] next-token logits -> [N] logsumexp(logits[yes]) - logsumexp(logits[no])."""
    logits = logits.float()
    return torch.logsumexp(logits[:, list(yes_ids)], dim=-1) - torch.logsumexp(logits[:, list(no_ids)], dim=-1)


def batch_slices(n: int, size: int):
    """Slices of at most `size` items covering 0..n-1, in order."""
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def make_hf_oracle(
    decoder_model: nn.Module,
    encoder: nn.Module | None,
    target_model: nn.Module,
    tokenizer,
    layer: int,
    injection_norm: float,
    injection_mode: str = "replace",
    description_instruction: str | None = None,
    max_new_tokens: int = 48,
    encoder_prefix: str = "Description: ",
    *,
    num_placeholders: int = 1,
    placeholder: str = " ?",
    encoder_max_tokens: int = 128,
    max_context_tokens: int = 128,
    batch_size: int = 16,
    yes_no_suffix: str = " Answer Yes or No.",
    judge_model: nn.Module | None = None,
    skip_first: int = 1,
    min_new_tokens: int = 0,
) -> Oracle:
    """Build an `Oracle` from HF models (plain torch, greedy decoding, no Ray).

    decoder_model: causal LM (optionally PEFT) that receives v at the placeholder embeddings;
    encoder: `ActivationEncoder` (None: no encode / encode_with_weights); target_model: the frozen
    target (a PEFT model is read with its adapter disabled; it also writes the paraphrases); layer: read layer L; injection_norm: s in e_p' = s v/||v|| (see injection.py);
    judge_model: the LLM judge (default: the target itself, adapter disabled);
    min_new_tokens: forbid the end token before this many tokens (0: empty descriptions allowed).
    `read` tokenises texts like extraction does (no chat template, `max_context_tokens` cap) and
    skips positions < skip_first and special tokens, as `activations.extract` does.
    """
    instruction = description_instruction or DEFAULT_DESCRIPTION_INSTRUCTION
    yes_ids, no_ids = _single_token_ids(tokenizer, YES_TOKENS), _single_token_ids(tokenizer, NO_TOKENS)
    end_ids = {tokenizer.eos_token_id}
    special = set(tokenizer.all_special_ids)
    judge = judge_model if judge_model is not None else target_model
    emb = decoder_model.get_input_embeddings()
    width = int(emb.weight.shape[1])

    def _prompt_embeds(prompt, vectors: torch.Tensor) -> torch.Tensor:
        n = vectors.shape[0]
        return decoder_inputs(emb, [prompt.input_ids] * n, [prompt.placeholder_positions] * n, vectors.float(), injection_norm, injection_mode)

    @torch.no_grad()
    def describe(vectors: torch.Tensor) -> list[str]:
        prompt = description_prompt(tokenizer, layer, InjectionSettings(num_placeholders=num_placeholders, placeholder=placeholder), instruction)
        texts: list[str] = []
        for sl in batch_slices(vectors.shape[0], batch_size):
            embeds = _prompt_embeds(prompt, vectors[sl])
            out = decoder_model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=list(end_ids),
            )
            # with inputs_embeds only, generate returns the new tokens only
            texts.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tolist())
        return texts

    @torch.no_grad()
    def answer(vectors: torch.Tensor, question: str, max_new: int = 16) -> list[str]:
        """Greedy answer of the decoder, v injected, to `question` (the QA route: warmup's LatentQA format)."""
        prompt = build_decoder_prompt(tokenizer, layer, question.strip(), num_placeholders, placeholder)
        texts: list[str] = []
        for sl in batch_slices(vectors.shape[0], batch_size):
            embeds = _prompt_embeds(prompt, vectors[sl])
            out = decoder_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                         max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=list(end_ids))
            texts.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tolist())
        return texts

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def encode_with_weights(texts: Sequence[str]):
        """v_hat [N, d] and each text's (token, pooling weight) pairs; an empty description gets
        v_hat = 0 and no pairs (`encoder.reconstruct_texts`, the rule every encoding follows)."""
        v_hat, token_ids, weights = reconstruct_texts(encoder, tokenizer, list(texts), encoder_prefix, encoder_max_tokens, batch_size)
        pooled = [[(tokenizer.decode([int(t)]), float(w)) for t, w in zip(ids, ws)] for ids, ws in zip(token_ids, weights)]
        return v_hat, pooled

    def encode(texts: Sequence[str]) -> torch.Tensor:
        return encode_with_weights(texts)[0]

    @torch.no_grad()
    def ask_yes_no(vectors: torch.Tensor, question: str) -> torch.Tensor:
        prompt = build_decoder_prompt(tokenizer, layer, question.strip() + yes_no_suffix, num_placeholders, placeholder)
        scores = []
        for sl in batch_slices(vectors.shape[0], batch_size):
            embeds = _prompt_embeds(prompt, vectors[sl])
            logits = decoder_model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), use_cache=False, logits_to_keep=1).logits
            scores.append(yes_no_score(logits[:, -1], yes_ids, no_ids))
        return torch.cat(scores) if scores else torch.zeros(0)

    @torch.no_grad()
    def judge_yes_no(texts: Sequence[str], question: str) -> torch.Tensor:
        seqs = []
        for t in texts:
            message = f"Here is a description of a piece of text:\n\n{t.strip() or '(empty)'}\n\n{question.strip()}{yes_no_suffix}"
            chat = render_chat(tokenizer, [{"role": "user", "content": message}])
            seqs.append(tokenizer.encode(chat, add_special_tokens=False))
        scores = []
        inner, lm_head, _embedding = causal_lm_parts(judge)
        with adapter_off(judge):
            for sl in batch_slices(len(seqs), batch_size):
                ids, mask = pad_right(seqs[sl], tokenizer.pad_token_id)
                hidden = inner(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                last = mask.sum(1) - 1  # right padding: the first answer position is after the last real token
                logits = lm_head(hidden[torch.arange(len(ids)), last])
                scores.append(yes_no_score(logits, yes_ids, no_ids))
        return torch.cat(scores) if scores else torch.zeros(0)

    def _tokenize(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_context_tokens)["input_ids"]
        if not ids:
            raise ValueError(f"cannot read activations of an empty text: {text!r}")
        return list(ids)

    def _readable(toks: list[int]) -> list[int]:
        pos = readable_positions(toks, "all", skip_first, special)
        return pos or [len(toks) - 1]  # a one-token text: read its only token

    @torch.no_grad()
    def read(texts: Sequence[str], positions: str = "last") -> torch.Tensor:
        """texts -> [N, d]: h_L at the last readable token, or the mean of h_L over readable tokens."""
        if positions not in ("last", "mean"):
            raise ValueError(f"positions={positions!r}; expected 'last' or 'mean'")
        token_lists = [_tokenize(t) for t in texts]
        rows = []
        with adapter_off(target_model):
            for sl in batch_slices(len(token_lists), batch_size):
                chunk = token_lists[sl]
                ids, mask = pad_right(chunk, tokenizer.pad_token_id)
                hidden = read_residual(target_model, ids, mask, layer)
                for b, toks in enumerate(chunk):
                    pos = _readable(toks)
                    rows.append(hidden[b, pos[-1]] if positions == "last" else hidden[b, pos].mean(0))
        return torch.stack(rows) if rows else torch.zeros(0, width)

    @torch.no_grad()
    def read_tokens(text: str):
        toks = _tokenize(text)
        ids, mask = pad_right([toks], tokenizer.pad_token_id)
        with adapter_off(target_model):
            hidden = read_residual(target_model, ids, mask, layer)[0]
        readable = torch.zeros(len(toks), dtype=torch.bool)
        readable[readable_positions(toks, "all", skip_first, special)] = True
        return [tokenizer.decode([t]) for t in toks], hidden, readable

    def detokenize(token_ids: Sequence[int]) -> str:
        return tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def paraphrase(texts: Sequence[str], instruction: str, max_new: int) -> list[str]:
        with adapter_off(target_model):
            return rewrite_texts(target_model, tokenizer, texts, instruction, max_new, batch_size)

    info = {
        "backend": "hf",
        "layer": layer,
        "d_model": width,
        "injection_norm": float(injection_norm),
        "injection_mode": injection_mode,
        "description_instruction": instruction,
        "max_new_tokens": max_new_tokens,
        "encoder_prefix": encoder_prefix,
        "yes_tokens": list(YES_TOKENS),
        "no_tokens": list(NO_TOKENS),
        "yes_no_suffix": yes_no_suffix,
    }
    if encoder is None:
        encode = encode_with_weights = None
    return Oracle(describe, encode, encode_with_weights, ask_yes_no, read, judge_yes_no, read_tokens, detokenize, info, paraphrase,
                  answer=answer, tokenize=tokenize)


def untrained_hf_oracle(model_name: str, layer: float | int, *, encoder_lora_r: int = 8, injection=None, **kwargs) -> Oracle:
    """The floor: decoder = target (no adapter), encoder = fresh `ActivationEncoder` with an
    identity-initialised LoRA (B = 0) and head (P = I, uniform pooling). Injection norm follows
    `injection` (an `InjectionSettings`, default: embedding_norm); layer_norm scaling needs
    `layer_norm=...` in kwargs."""
    path = resolve_model_path(model_name)
    tok = load_tokenizer(path)
    target = load_causal_lm(path)
    L = resolve_layer(layer, num_layers(target))
    encoder = ActivationEncoder(load_causal_lm(path), L, LoraSettings(r=encoder_lora_r, alpha=2 * encoder_lora_r))
    settings = injection or InjectionSettings()
    norm = target_norm(settings, mean_embedding_norm(target.get_input_embeddings()), kwargs.pop("layer_norm", None))
    oracle = make_hf_oracle(
        target, encoder, target, tok, L, norm, settings.mode,
        num_placeholders=settings.num_placeholders, placeholder=settings.placeholder, **kwargs,
    )
    oracle.info.update({"model": model_name, "checkpoint": None, "decoder": "untrained (decoder = target)", "encoder": f"fresh, LoRA r={encoder_lora_r}, identity init"})
    return oracle


@dataclass
class CheckpointModels:
    """What `load_oracle` loads from a checkpoint, shared with the baselines (evals/baselines.py) so
    every oracle of one eval reads the same target and is graded by the same encoder."""

    path: Path
    config: object  # the run's RecipeConfig
    record: object  # its CheckpointRecord
    tokenizer: object
    target: nn.Module
    decoder: nn.Module | None  # the PEFT decoder (None when not asked for)
    encoder: nn.Module  # the checkpoint's encoder, or a fresh one when it has none
    has_encoder: bool
    layer: int
    options: dict  # make_hf_oracle keywords of this run (placeholders, token caps)


def load_checkpoint_models(checkpoint: str | Path, model: str | None = None, layer: float | int | None = None, *, decoder: bool = True) -> CheckpointModels:
    """Load a checkpoint's target, decoder (LoRA adapter `decoder_adapter`) and encoder (LoRA + head
    `encoder`; a fresh encoder when the checkpoint has none) as its recipe (`config.yaml`) defines them."""
    trained = load_trained(checkpoint)
    trained.require_tensors("decoder_adapter")
    cfg, rec, tensors = trained.config(), trained.record, trained.tensors
    model_path = resolve_model_path(model or cfg.model.name)
    tok = load_tokenizer(model_path)
    target = load_causal_lm(model_path, cfg.model.dtype)
    L = rec.layer if layer is None else resolve_layer(layer, num_layers(target))
    if L != rec.layer:
        raise ValueError(f"checkpoint {trained.path} was trained at layer {rec.layer}; asked to read layer {L}")
    dec = None
    if decoder:
        dec = attach_lora(load_causal_lm(model_path, cfg.model.dtype), cfg.decoder_lora)
        load_adapter_state(dec, tensors["decoder_adapter"])
        dec.eval()
    encoder = ActivationEncoder(load_causal_lm(model_path, cfg.model.dtype), L, cfg.encoder.lora)
    if "encoder" in tensors:
        unknown = set(tensors["encoder"]) - set(encoder.state_dict())
        if unknown:
            raise ValueError(f"encoder tensors of {trained.path} do not fit this encoder: {sorted(unknown)[:3]}")
        encoder.load_state_dict(tensors["encoder"], strict=False)
    options = dict(
        num_placeholders=cfg.injection.num_placeholders, placeholder=cfg.injection.placeholder,
        encoder_max_tokens=cfg.encoder.max_description_tokens, max_context_tokens=cfg.model.max_context_tokens,
    )
    return CheckpointModels(Path(trained.path), cfg, rec, tok, target, dec, encoder, "encoder" in tensors, L, options)


def load_oracle(checkpoint: str | Path | None = None, model: str | None = None, layer: float | int | str | None = None, *, layer_norm: float | None = None, **kwargs) -> Oracle:
    """An HF oracle for a trained checkpoint, or the untrained floor when checkpoint is None.

    checkpoint: anything `checkpoint.load_trained` accepts (a run folder, a `warmup_then_grpo`
    folder, or one checkpoint folder); the recipe is the run's `config.yaml`, the read layer and
    injection norm are the checkpoint record's (`served_injection_norm`). Tensors used:
    `decoder_adapter` (PEFT LoRA state of the decoder) and `encoder` (LoRA + head of the encoder;
    a fresh encoder if the checkpoint has none). layer_norm: the read layer's mean norm, used only
    by the untrained floor with `injection.scale: layer_norm`."""
    if isinstance(layer, str):
        layer = float(layer) if "." in layer else int(layer)
    if checkpoint is None:
        return untrained_hf_oracle(model or "smollm2-135m-instruct", 0.5 if layer is None else layer, layer_norm=layer_norm, **kwargs)
    return checkpoint_oracle(load_checkpoint_models(checkpoint, model, layer), **kwargs)


def checkpoint_oracle(models: CheckpointModels, **kwargs) -> Oracle:
    """The trained decoder's oracle from loaded checkpoint models (kwargs override make_hf_oracle's)."""
    if models.decoder is None:
        raise ValueError("checkpoint_oracle needs the decoder: load_checkpoint_models(..., decoder=True)")
    cfg, rec = models.config, models.record
    defaults = dict(models.options)
    defaults.update(kwargs)
    max_new = defaults.pop("max_new_tokens", cfg.sampling.max_new_tokens)
    oracle = make_hf_oracle(models.decoder, models.encoder, models.target, models.tokenizer, models.layer, rec.injection_norm, cfg.injection.mode,
                            cfg.description_instruction, max_new, cfg.encoder.prefix, **defaults)
    oracle.info.update({"model": cfg.model.name, "checkpoint": str(models.path), "step": rec.step, "stage": rec.stage,
                        "encoder": "from checkpoint" if models.has_encoder else "fresh (checkpoint has none)"})
    return oracle
