"""The decoder's input: one prompt builder and one injection function for HF and vLLM alike.

Prompt (user turn of the chat template): `Layer: L` line, `num_placeholders` placeholder tokens
(default one " ?"), then the question or the description instruction.

Injection is at the embedding layer: the input embedding at each placeholder position p becomes

    replace:  e_p' = s * v / ||v||
    add:      e_p' = e_p + s * v / ||v||

where s is the target norm (a recipe choice, `injection.scale`):
    embedding_norm  s = scale_factor * mean_t ||E[t]||   (typical token-embedding norm: the write site)
    layer_norm      s = scale_factor * mean ||v||         (the read layer's typical norm)
    fixed           s = scale_factor * fixed_norm
Embedding-level injection is the path vLLM can serve (`prompt_embeds`); Activation Oracles add
after block 1 instead, so their hyperparameters do not transfer as-is. The injected vector is
detached: no gradient flows into the target's activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cycle_oracle.models import render_chat

_MARK = "\u2063PLACEHOLDERS\u2063"  # never produced by a tokenizer from user text


@dataclass(frozen=True)
class DecoderPrompt:
    """Token ids of one decoder prompt and where its placeholders sit."""

    input_ids: tuple[int, ...]
    placeholder_positions: tuple[int, ...]
    layer: int


def placeholder_token_id(tokenizer, placeholder: str) -> int:
    ids = tokenizer.encode(placeholder, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"placeholder {placeholder!r} must be a single token for this tokenizer, got ids {ids}")
    return ids[0]


def build_decoder_prompt(tokenizer, layer: int, question: str, num_placeholders: int = 1, placeholder: str = " ?") -> DecoderPrompt:
    """Chat-templated prompt: `Layer: L`, placeholders, question; ends with the assistant header."""
    if not question or not question.strip():
        raise ValueError("the decoder question / description instruction is empty")
    if num_placeholders < 1:
        raise ValueError(f"num_placeholders must be >= 1, got {num_placeholders}")
    message = f"Layer: {layer}\n{_MARK}\n{question}"
    text = render_chat(tokenizer, [{"role": "user", "content": message}])
    before, after = text.split(_MARK)
    pre = tokenizer.encode(before, add_special_tokens=False)
    post = tokenizer.encode(after, add_special_tokens=False)
    ph = placeholder_token_id(tokenizer, placeholder)
    ids = pre + [ph] * num_placeholders + post
    return DecoderPrompt(tuple(ids), tuple(range(len(pre), len(pre) + num_placeholders)), layer)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer, ended with the chat turn's end token (what the decoder learns to emit)."""
    if answer is None or not str(answer).strip():
        raise ValueError("empty answer text")
    end = tokenizer.eos_token_id
    return tokenizer.encode(str(answer).strip(), add_special_tokens=False) + [end]


def mean_embedding_norm(embedding: nn.Embedding) -> float:
    with torch.no_grad():
        return float(embedding.weight.float().norm(dim=-1).mean())


def target_norm(settings, embedding_norm: float, layer_norm: float | None) -> float:
    """The norm the injected vector is rescaled to (see module docstring)."""
    if settings.scale == "embedding_norm":
        base = embedding_norm
    elif settings.scale == "layer_norm":
        if layer_norm is None:
            raise ValueError("injection.scale=layer_norm needs the read layer's mean norm (activation stats)")
        base = layer_norm
    else:
        base = settings.fixed_norm
    return settings.scale_factor * base


def check_activations(vectors: torch.Tensor, d_model: int) -> None:
    if vectors.shape[-1] != d_model:
        raise ValueError(f"activation width {vectors.shape[-1]} does not match the decoder's d_model {d_model}")
    if vectors.device.type != "meta" and not torch.isfinite(vectors).all():
        raise FloatingPointError("activation to inject contains NaN/inf")


def inject(
    embeddings: torch.Tensor,
    placeholder_positions: torch.Tensor,
    vectors: torch.Tensor,
    norm: float,
    mode: str = "replace",
) -> torch.Tensor:
    """Write activations into input embeddings at the placeholder positions.

    embeddings: [B, T, d]; placeholder_positions: [B, P] (long); vectors: [B, d] (repeated over the
    P placeholders) or [B, P, d]. Returns a new tensor; positions other than the placeholders are
    untouched. e_p' = s v/||v|| (replace) or e_p + s v/||v|| (add).
    """
    B, T, d = embeddings.shape
    check_activations(vectors, d)
    if vectors.dim() == 2:
        vectors = vectors[:, None, :].expand(B, placeholder_positions.shape[1], d)
    if vectors.shape[:2] != placeholder_positions.shape:
        raise ValueError(f"vectors {list(vectors.shape)} do not match placeholder positions {list(placeholder_positions.shape)}")
    v = vectors.detach().to(device=embeddings.device, dtype=embeddings.dtype)
    # A zero vector (the zero-activation control) stays zero thanks to the clamp.
    scaled = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm
    out = embeddings.clone()
    placeholder_positions = placeholder_positions.to(embeddings.device)
    rows = torch.arange(B, device=embeddings.device)[:, None].expand_as(placeholder_positions)
    if mode == "replace":
        out[rows, placeholder_positions] = scaled
    elif mode == "add":
        out[rows, placeholder_positions] = out[rows, placeholder_positions] + scaled
    else:
        raise ValueError(f"injection mode {mode!r}; expected 'replace' or 'add'")
    return out


def decoder_inputs(
    embedding: nn.Embedding,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    placeholder_positions: Sequence[Sequence[int]] | torch.Tensor,
    vectors: torch.Tensor,
    norm: float,
    mode: str = "replace",
) -> torch.Tensor:
    """The one path into the decoder: token ids [B, T] -> input embeddings [B, T, d] with `vectors`
    injected. HF training passes the result as `inputs_embeds`; vLLM sampling sends row b (cut to its
    prompt length) as `prompt_embeds`."""
    ids = prompts if isinstance(prompts, torch.Tensor) else torch.tensor([list(p) for p in prompts], dtype=torch.long)
    pos = placeholder_positions if isinstance(placeholder_positions, torch.Tensor) else torch.tensor(
        [list(p) for p in placeholder_positions], dtype=torch.long
    )
    with torch.no_grad():
        emb = embedding(ids.to(embedding.weight.device))
    return inject(emb, pos.to(emb.device), vectors.to(emb.device), norm, mode)


def description_prompt(tokenizer, layer: int, settings, instruction: str) -> DecoderPrompt:
    """The one description prompt GRPO, warmup and the evals share."""
    return build_decoder_prompt(tokenizer, layer, instruction, settings.num_placeholders, settings.placeholder)


def text_guess_message(text: str, instruction: str) -> str:
    """The black-box control's user turn (`evals/baselines.text_guess`): the description prompt with
    the source text written where the decoder's `Layer: L` line and placeholders carry the
    activation, then the same instruction, so the guess answers the decoder's own question from
    the text alone."""
    if not instruction or not instruction.strip():
        raise ValueError("the description instruction is empty")
    return f'Text: "{" ".join(text.split())}"\n{instruction}'


def text_guess_prompt(tokenizer, text: str, instruction: str) -> DecoderPrompt:
    """`text_guess_message` chat-templated, ending with the assistant header (no placeholders)."""
    rendered = render_chat(tokenizer, [{"role": "user", "content": text_guess_message(text, instruction)}])
    return DecoderPrompt(tuple(tokenizer.encode(rendered, add_special_tokens=False)), (), 0)


def reference_prompt(tokenizer) -> DecoderPrompt:
    """The bare assistant header (no oracle prompt, no placeholder): the context under which the
    `base` KL reference scores the generated text alone."""
    text = render_chat(tokenizer, [{"role": "user", "content": _MARK}])
    header = text.split(_MARK, 1)[1]
    return DecoderPrompt(tuple(tokenizer.encode(header, add_special_tokens=False)), (), 0)
