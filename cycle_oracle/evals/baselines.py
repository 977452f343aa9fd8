"""Training-free baselines as oracles of the eval suite, and `build_oracles`: every oracle an eval
recipe asks for (`eval.oracles`, `cycle-oracle eval --oracle NAME`), built on one frozen target.

| name          | description of v                                                            | reference |
|---------------|-----------------------------------------------------------------------------|-----------|
| `decoder`     | the checkpoint's decoder, greedy, the description instruction               | this project |
| `selfie`      | the untrained decoder (the target, no adapter) with the same description instruction and injection: the floor | Chen et al. 2024, SelfIE (arXiv 2403.10949) |
| `patchscopes` | the untrained target continuing "cat -> cat; 1135 -> 1135; hello -> hello; ? ->" with v injected at "?" (the project's injection), greedy, cut at the first ";" or line end | Ghandeharioun et al. 2024, Patchscopes (arXiv 2401.06102) |
| `logit_lens`  | the top-k tokens of lm_head(final_norm(v)) (special tokens excluded), space-joined | nostalgebraist 2020, "interpreting GPT: the logit lens" |
| `latentlens`  | the k nearest contextual activations of v (cosine, same layer) in a bank of training-document activations, written as `token: "...context"` per neighbour | Krojer et al. 2026, LatentLens (arXiv 2602.00462) |
| `text_guess`  | no activation: the target (adapter off) reads the item's source text (the `eval.text_guess_window_tokens` tokens ending at v's token) and answers the decoder's description instruction, greedy; with a quote format (`warmup.description_quote_tokens` N), prefixed by the quote of its last N tokens | the black-box control of Li et al. 2026, "Do Activation Verbalization Methods Convey Privileged Information?" |

Every oracle of one eval reads the same frozen target (`read`, the LLM `judge_yes_no`, the
paraphrase test's rewrites), so the probe routes, the controls and retrieval treat a baseline's
descriptions exactly like the decoder's. Graders: with a checkpoint, every oracle is graded by the
checkpoint's encoder. Without a trained encoder, `selfie` (and `decoder`, which is then `selfie`)
keeps the floor's fresh identity-initialised encoder (v_hat = mean of the description tokens'
layer-L states); the other baselines have none, so their retrieval needs `--checkpoint` with an
encoder and their probes skip the reconstruction route. Only `decoder` and `selfie` answer
questions about v (the probes' `oracle` route); a baseline that only writes text skips it.

LatentLens's bank is the eval store's training side of the one split (`store.split_by_document`
with the retrieval pool's `heldout_fraction` and seed), so no pool document is ever in it. The
nearest-neighbour search is torch (`ContextBank`), not the `latentlens` package: docs/ARCHITECTURE.md
says why.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from cycle_oracle.checkpoint import load_trained
from cycle_oracle.config import OracleName
from cycle_oracle.data.description import quoted_tail
from cycle_oracle.data.generation import hf_generate_fn
from cycle_oracle.data.taboo import check_secret_words, load_hints
from cycle_oracle.encoder import ActivationEncoder
from cycle_oracle.errors import UserError
from cycle_oracle.evals.oracle import Oracle, batch_slices, checkpoint_oracle, load_checkpoint_models, make_hf_oracle
from cycle_oracle.injection import decoder_inputs, mean_embedding_norm, placeholder_token_id, target_norm, text_guess_message
from cycle_oracle.models import adapter_off, causal_lm_parts, load_causal_lm, load_tokenizer, num_layers, resolve_layer, resolve_model_path

ORACLES: tuple[str, ...] = get_args(OracleName)
BASELINES = ("selfie", "patchscopes", "logit_lens", "latentlens", "text_guess")
NEEDS_TRAINED_ENCODER = ("patchscopes", "logit_lens", "latentlens", "text_guess")
REFERENCES = {
    "decoder": "this project (cycle-consistent decoder)",
    "selfie": "Chen, Vondrick, Mao 2024: SelfIE: Self-Interpretation of Large Language Model Embeddings (arXiv 2403.10949)",
    "patchscopes": "Ghandeharioun et al. 2024: Patchscopes: A Unifying Framework for Inspecting Hidden Representations of Language Models (arXiv 2401.06102)",
    "logit_lens": "nostalgebraist 2020: interpreting GPT: the logit lens (LessWrong)",
    "latentlens": "Krojer et al. 2026: LatentLens: Revealing Highly Interpretable Visual Tokens in LLMs (arXiv 2602.00462)",
    "text_guess": "Li et al. 2026 (ICML): Do Activation Verbalization Methods Convey Privileged Information? (the text-only black-box control)",
}


class OracleError(UserError, ValueError):
    """An oracle that cannot be built or cannot run the asked evals as configured."""


# ---- names and checks (nothing loaded) ----------------------------------------------------------

def check_oracle_names(names: Sequence[str]) -> list[str]:
    """The names in order without repeats; an unknown one is an error naming it and the known ones."""
    out = []
    for name in names:
        if name not in ORACLES:
            raise OracleError(f"unknown oracle {name!r}; expected one of {', '.join(ORACLES)} (`cycle-oracle eval --help` describes each)")
        if name not in out:
            out.append(name)
    return out


def oracle_names(cfg) -> list[str]:
    """`cfg.eval.oracles` checked and deduplicated; without a checkpoint `decoder` is `selfie`."""
    names = check_oracle_names(cfg.eval.oracles)
    if cfg.init_from is None:
        names = check_oracle_names(["selfie" if n == "decoder" else n for n in names])
    return names


def _checkpoint_has_encoder(checkpoint) -> bool:
    return "encoder" in load_trained(checkpoint).tensors


def check_oracle_request(cfg, names: Sequence[str]) -> None:
    """Errors a user can fix, raised before anything is extracted: a baseline that only writes text
    is graded in retrieval by the checkpoint's encoder, so it needs a checkpoint that has one."""
    check_grader(cfg)
    if "secrets" in cfg.eval.tasks:
        model = load_trained(cfg.init_from).record.model if cfg.init_from is not None else cfg.model.name
        trained_here = [w for w in cfg.eval.secrets.words if w not in cfg.eval.secrets.organisms]
        check_secret_words(load_tokenizer(resolve_model_path(model)), cfg.eval.secrets.words, model,
                           load_hints(cfg.eval.secrets.hints_path) if trained_here else None)
    wants_retrieval = bool({"retrieval", "controls"} & set(cfg.eval.tasks))
    textual = [n for n in names if n in NEEDS_TRAINED_ENCODER]
    if wants_retrieval and textual and (cfg.init_from is None or not _checkpoint_has_encoder(cfg.init_from)):
        where = "no --checkpoint was given" if cfg.init_from is None else f"the checkpoint {cfg.init_from} has no encoder"
        raise OracleError(
            f"retrieval of the oracle(s) {', '.join(textual)} needs a trained encoder to reconstruct v from their descriptions, and {where}: "
            f"pass --checkpoint with a run or checkpoint that holds an encoder, or leave retrieval out (--set 'eval.tasks=[probes,arithmetic]')")


def check_grader(cfg) -> None:
    """`eval.grader` (`--grader`) must be a checkpoint with an encoder that reads the eval's model at
    the eval's layer (the checkpoint's, or the recipe's without one): else one message naming it."""
    if cfg.eval.grader is None:
        return
    grader = load_trained(cfg.eval.grader)
    if "encoder" not in grader.tensors:
        raise OracleError(f"--grader {cfg.eval.grader}: the checkpoint {grader.path} has no encoder; expected a run or checkpoint "
                          f"folder that holds one (a warmup or GRPO checkpoint)")
    if cfg.init_from is not None:
        own = load_trained(cfg.init_from).record
        model, layer, whose = own.model, own.layer, f"the checkpoint's ({cfg.init_from})"
    else:
        model, whose = cfg.model.name, "the recipe's"
        layer = cfg.model.layer if isinstance(cfg.model.layer, int) else resolve_layer(cfg.model.layer, _depth(cfg.model.name))
    got = grader.record
    if got.model != model or got.layer != layer:
        raise OracleError(f"--grader {cfg.eval.grader}: its encoder reads layer {got.layer} of {got.model}; expected layer {layer} of "
                          f"{model}, {whose}: a grader must reconstruct the same activations")


def _depth(model_name: str) -> int:
    return int(json.loads((resolve_model_path(model_name) / "config.json").read_text())["num_hidden_layers"])


def needs_store(cfg, names: Sequence[str]) -> bool:
    """Whether the eval needs the corpus activations: retrieval's pool, LatentLens's bank, or the
    read layer's norm for an untrained decoder injected at `injection.scale: layer_norm`."""
    untrained_injection = cfg.init_from is None and cfg.injection.scale == "layer_norm" and bool({"selfie", "patchscopes"} & set(names))
    return bool({"retrieval", "controls"} & set(cfg.eval.tasks)) or "latentlens" in names or untrained_injection


# ---- the baselines' describe callables ----------------------------------------------------------

def logit_lens_describe(target: nn.Module, tokenizer, top_k: int, batch_size: int = 64) -> Callable[[torch.Tensor], list[str]]:
    """describe(V [N, d]) -> the top_k tokens of lm_head(final_norm(v)) per row, space-joined
    (special tokens excluded; tokens that are only whitespace are dropped from the text)."""
    inner, lm_head, _embedding = causal_lm_parts(target)
    final_norm = getattr(inner, "norm", None)
    if final_norm is None:
        raise OracleError(f"logit_lens needs the target's final norm (model.model.norm); {type(inner).__name__} has none")
    special = sorted(set(tokenizer.all_special_ids))

    @torch.no_grad()
    def describe(vectors: torch.Tensor) -> list[str]:
        out = []
        for sl in batch_slices(vectors.shape[0], batch_size):
            h = vectors[sl].to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
            logits = lm_head(final_norm(h)).float()
            logits[:, special] = float("-inf")
            for row in logits.topk(top_k, dim=-1).indices.tolist():
                out.append(" ".join(w for w in (tokenizer.decode([i]).strip() for i in row) if w))
        return out

    return describe


def patchscopes_prompt(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """(token ids, [placeholder position]) of the identity prompt: its one "?" (with the space
    before it, when there is one) becomes the single placeholder token where v is injected."""
    q = prompt.index("?")
    spaced = q > 0 and prompt[q - 1] == " "
    before, after = prompt[: q - 1 if spaced else q], prompt[q + 1 :]
    pre = tokenizer.encode(before, add_special_tokens=True)
    ph = placeholder_token_id(tokenizer, " ?" if spaced else "?")
    return pre + [ph] + tokenizer.encode(after, add_special_tokens=False), [len(pre)]


def first_answer(text: str) -> str:
    """The continuation up to the identity prompt's separator (";") or the end of the line."""
    return text.split(";", 1)[0].split("\n", 1)[0].strip()


def patchscopes_describe(target: nn.Module, tokenizer, prompt: str, injection_norm: float, injection_mode: str = "replace",
                         max_new_tokens: int = 8, batch_size: int = 16) -> Callable[[torch.Tensor], list[str]]:
    """describe(V [N, d]) -> the target's greedy continuation of the identity prompt with v injected
    at its placeholder (injection.decoder_inputs, the decoder's own path), cut by `first_answer`."""
    ids, positions = patchscopes_prompt(tokenizer, prompt)
    emb = target.get_input_embeddings()

    @torch.no_grad()
    def describe(vectors: torch.Tensor) -> list[str]:
        texts = []
        for sl in batch_slices(vectors.shape[0], batch_size):
            n = sl.stop - sl.start
            embeds = decoder_inputs(emb, [ids] * n, [positions] * n, vectors[sl].float(), injection_norm, injection_mode)
            out = target.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=[tokenizer.eos_token_id])
            texts.extend(first_answer(tokenizer.decode(row, skip_special_tokens=True)) for row in out.tolist())
        return texts

    return describe


@dataclass
class ContextBank:
    """LatentLens's bank: unit-norm activations [M, d] of training-document tokens at the read layer,
    with the store rows they came from (for their tokens and source contexts)."""

    vectors: torch.Tensor
    rows: list[int]
    store: object  # the ActivationStore
    documents: int

    @classmethod
    def from_store(cls, store, heldout_fraction: float | None, split_seed: int, max_rows: int, seed: int = 0) -> ContextBank:
        """Training-side rows of the one split (`store.split_by_document`), at most max_rows (seeded)."""
        if heldout_fraction is None:
            raise OracleError("latentlens builds its bank from training documents only, so it needs a held-out split (heldout_fraction), "
                              "and this eval uses every store row as the pool")
        train, _ = store.split_by_document(heldout_fraction, split_seed)
        if not train:
            raise OracleError(f"latentlens: the store {store.root} has no training-side documents at heldout_fraction={heldout_fraction}")
        if len(train) > max_rows:
            train = sorted(random.Random(seed).sample(train, max_rows))
        vectors = F.normalize(store.activations[train].float(), dim=-1)
        return cls(vectors, train, store, len({store.records[i]["doc_id"] for i in train}))

    @torch.no_grad()
    def nearest(self, vectors: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine [N, k], store rows [N, k]) of the k nearest bank entries of each query [N, d]."""
        k = min(k, len(self.rows))
        rows = torch.tensor(self.rows)
        sims, idx = [], []
        for sl in batch_slices(vectors.shape[0], chunk):
            s = F.normalize(vectors[sl].float().cpu(), dim=-1) @ self.vectors.T
            top = s.topk(k, dim=-1)
            sims.append(top.values)
            idx.append(rows[top.indices])
        if not sims:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat(sims), torch.cat(idx)

    def neighbour_text(self, row: int, context_tokens: int, detokenize: Callable[[Sequence[int]], str]) -> str:
        """`token: "...context"`: the neighbour's token and the source text ending at it."""
        token = self.store.records[row]["token"].strip() or repr(self.store.records[row]["token"])
        context = " ".join(detokenize(self.store.context_window(row, before=context_tokens)).split())
        return f'{token}: "...{context}"'


def latentlens_describe(bank: ContextBank, top_k: int, context_tokens: int, detokenize) -> Callable[[torch.Tensor], list[str]]:
    """describe(V [N, d]) -> the k nearest bank contexts of each v, joined with "; "."""

    def describe(vectors: torch.Tensor) -> list[str]:
        _, rows = bank.nearest(vectors, top_k)
        return ["; ".join(bank.neighbour_text(r, context_tokens, detokenize) for r in row) for row in rows.tolist()]

    return describe


def guess_from_tokens(model: nn.Module, tokenizer, token_lists: Sequence[Sequence[int]], instruction: str, max_new_tokens: int,
                      window_tokens: int = 32, quote_tokens: int = 0, batch_size: int = 16, quote_style: str = "it_reads") -> list[str]:
    """The text-only guess per item: `model` (adapter off: the target) reads the last `window_tokens`
    tokens of each token list (special tokens dropped) as text (`injection.text_guess_message`) and
    writes a greedy description under the decoder's instruction; with `quote_tokens` N > 0 it is
    prefixed by `It reads: "<the last N tokens>".` (or the bare tokens: `quote_style`), the quote format
    the decoder was warmed up on (`data/description.quoted_tail`). An item without text gets the empty
    description."""
    special = set(tokenizer.all_special_ids)
    windows = [[t for t in ids if t not in special][-window_tokens:] for ids in token_lists]
    texts = [tokenizer.decode(w).strip() for w in windows]
    todo = [i for i, t in enumerate(texts) if t]
    generate = hf_generate_fn(model, tokenizer, batch_size)
    with adapter_off(model):
        replies = generate([[{"role": "user", "content": text_guess_message(texts[i], instruction)}] for i in todo], max_new_tokens) if todo else []
    out = ["" for _ in texts]
    for i, reply in zip(todo, replies):
        quote = quoted_tail(tokenizer, windows[i], len(windows[i]) - 1, quote_tokens, special, quote_style) + " " if quote_tokens else ""
        out[i] = (quote + " ".join(reply.split())).strip()
    return out


def text_guess_describe(model: nn.Module, tokenizer, instruction: str, max_new_tokens: int, window_tokens: int = 32,
                        quote_tokens: int = 0, batch_size: int = 16, quote_style: str = "it_reads") -> Callable[[Sequence[str]], list[str]]:
    """describe_text(source texts) -> the text-only guess of each (`guess_from_tokens`)."""

    def describe_text(texts: Sequence[str]) -> list[str]:
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return guess_from_tokens(model, tokenizer, ids, instruction, max_new_tokens, window_tokens, quote_tokens, batch_size, quote_style)

    return describe_text


def training_free_descriptions(names: Sequence[str], target: nn.Module, tokenizer, vectors: torch.Tensor,
                               token_lists: Sequence[Sequence[int]], eval_settings, injection_norm: float, injection_mode: str,
                               instruction: str, max_new_tokens: int, quote_tokens: int = 0, quote_style: str = "it_reads") -> dict[str, list[str]]:
    """{name: N texts} of the training-free oracles `names` (patchscopes, logit_lens, text_guess) for N
    pool items: activations vectors [N, d] (read by the untrained target) and the items' source
    token lists (the text-only guess reads their last `eval_settings.text_guess_window_tokens`).
    GRPO's final evals grade these beside the decoders (`evals/final.py`, `written`)."""
    e, out = eval_settings, {}
    for name in names:
        if name == "patchscopes":
            describe = patchscopes_describe(target, tokenizer, e.patchscopes_prompt, injection_norm, injection_mode, e.patchscopes_max_new_tokens)
            out[name] = describe(vectors)
        elif name == "logit_lens":
            out[name] = logit_lens_describe(target, tokenizer, e.logit_lens_top_k)(vectors)
        elif name == "text_guess":
            quote = e.text_guess_quote_tokens if e.text_guess_quote_tokens is not None else quote_tokens
            out[name] = guess_from_tokens(target, tokenizer, token_lists, instruction, max_new_tokens, e.text_guess_window_tokens, quote,
                                          quote_style=quote_style)
        else:
            raise OracleError(f"{name!r} is not a training-free oracle GRPO's final evals run; expected patchscopes, logit_lens or text_guess")
    return out


def _needs_source_text(vectors: torch.Tensor) -> list[str]:
    raise OracleError("text_guess writes from the source text, not from v: evals call evals/oracle.describe_items with the items' texts")


# ---- building every oracle of an eval -------------------------------------------------------------

def _baseline(name: str, base: Oracle, target, tokenizer, cfg, store, injection_norm: float, injection_mode: str, split_seed: int,
              quote_tokens: int = 0, quote_style: str = "it_reads") -> Oracle:
    e = cfg.eval
    info = dict(base.info, name=name, reference=REFERENCES[name], decoder=f"none: {name} (training-free)")
    if name == "selfie":
        return dataclasses.replace(base, info=dict(info, decoder="untrained (decoder = target, no adapter): selfie, the floor"))
    if name == "logit_lens":
        describe = logit_lens_describe(target, tokenizer, e.logit_lens_top_k)
        info.update(top_k=e.logit_lens_top_k)
    elif name == "patchscopes":
        describe = patchscopes_describe(target, tokenizer, e.patchscopes_prompt, injection_norm, injection_mode, e.patchscopes_max_new_tokens)
        info.update(prompt=e.patchscopes_prompt, max_new_tokens=e.patchscopes_max_new_tokens)
    elif name == "latentlens":
        if store is None:
            raise OracleError("latentlens needs the eval's activation store (its bank is the store's training documents)")
        if store.layer != base.info["layer"]:
            raise OracleError(f"latentlens: the store was read at layer {store.layer}, the oracle reads layer {base.info['layer']}")
        bank = ContextBank.from_store(store, cfg.split.heldout_fraction, split_seed, e.latentlens_bank_rows, cfg.seed)
        describe = latentlens_describe(bank, e.latentlens_top_k, e.latentlens_context_tokens, base.detokenize)
        info.update(top_k=e.latentlens_top_k, context_tokens=e.latentlens_context_tokens, bank_rows=len(bank.rows), bank_documents=bank.documents)
    elif name == "text_guess":
        quote = e.text_guess_quote_tokens if e.text_guess_quote_tokens is not None else quote_tokens
        guess = text_guess_describe(target, tokenizer, base.info["description_instruction"], base.info["max_new_tokens"],
                                    e.text_guess_window_tokens, quote, quote_style=quote_style)
        info.update(window_tokens=e.text_guess_window_tokens, quote_tokens=quote, quote_style=quote_style, decoder="none: the target reads the source text (no activation)")
        return dataclasses.replace(base, describe=_needs_source_text, describe_text=guess, ask_yes_no=None, answer=None, info=info)
    else:
        raise OracleError(f"{name!r} is not a baseline; expected one of {BASELINES}")
    return dataclasses.replace(base, describe=describe, ask_yes_no=None, answer=None, info=info)


def build_oracles(cfg, store=None, names: Sequence[str] | None = None, split_seed: int | None = None) -> dict[str, Oracle]:
    """{name: Oracle} for an eval recipe (`kind: eval`; `init_from` = the checkpoint or None), in
    the order asked. All share one tokenizer, one frozen target and (with a checkpoint) its encoder;
    `decoder` is loaded only when asked for. The untrained decoders (selfie, patchscopes) inject at
    the checkpoint's served norm (so they differ from `decoder` only by the adapter) or, without a
    checkpoint, at the recipe's `injection` settings (the store gives the layer norm)."""
    names = check_oracle_names(names) if names is not None else oracle_names(cfg)
    split_seed = cfg.seed if split_seed is None else split_seed
    max_new = cfg.sampling.max_new_tokens
    oracles: dict[str, Oracle] = {}
    if cfg.init_from is not None:
        models = load_checkpoint_models(cfg.init_from, decoder="decoder" in names)
        run_cfg, tok, target, L = models.config, models.tokenizer, models.target, models.layer
        norm, mode, options = models.record.injection_norm, run_cfg.injection.mode, dict(models.options)
        instruction, prefix = run_cfg.description_instruction, run_cfg.encoder.prefix
        if models.has_encoder:
            encoder, encoder_note = models.encoder, "from checkpoint"
        else:
            encoder, encoder_note = None, "none (the checkpoint has none)"
        if "decoder" in names:
            oracles["decoder"] = checkpoint_oracle(models, max_new_tokens=max_new)
            oracles["decoder"].info.update(name="decoder", decoder=f"trained: the {models.record.stage} checkpoint's (step {models.record.step})")
        fresh_for_selfie = models.encoder if not models.has_encoder else None
    else:
        path = resolve_model_path(cfg.model.name)
        tok, target = load_tokenizer(path), load_causal_lm(path, cfg.model.dtype)
        L = resolve_layer(cfg.model.layer, num_layers(target))
        layer_norm = store.mean_norm if store is not None else None
        norm, mode = target_norm(cfg.injection, mean_embedding_norm(target.get_input_embeddings()), layer_norm), cfg.injection.mode
        options = dict(num_placeholders=cfg.injection.num_placeholders, placeholder=cfg.injection.placeholder,
                       encoder_max_tokens=cfg.encoder.max_description_tokens, max_context_tokens=cfg.model.max_context_tokens)
        instruction, prefix = cfg.description_instruction, cfg.encoder.prefix
        encoder, encoder_note = None, "none (no checkpoint)"
        fresh_for_selfie = ActivationEncoder(load_causal_lm(path, cfg.model.dtype), L, cfg.encoder.lora) if "selfie" in names else None
        run_cfg = cfg
    base = make_hf_oracle(target, encoder, target, tok, L, norm, mode, instruction, max_new, prefix, **options)
    base.info.update({"model": run_cfg.model.name, "checkpoint": None if cfg.init_from is None else str(cfg.init_from), "encoder": encoder_note})
    quote_tokens, quote_style = run_cfg.warmup.description_quote_tokens, run_cfg.warmup.description_quote_style  # the decoder's format
    for name in names:
        if name == "decoder":
            continue
        if name == "selfie" and encoder is None:  # the floor's grader: a fresh identity-initialised encoder
            floor = make_hf_oracle(target, fresh_for_selfie, target, tok, L, norm, mode, instruction, max_new, prefix, **options)
            floor.info.update({k: base.info[k] for k in ("model", "checkpoint")},
                              encoder=f"fresh, identity init (v_hat = mean of the description tokens' layer-{L} states)")
            oracles[name] = _baseline(name, floor, target, tok, cfg, store, norm, mode, split_seed, quote_tokens, quote_style)
        else:
            oracles[name] = _baseline(name, base, target, tok, cfg, store, norm, mode, split_seed, quote_tokens, quote_style)
    return {name: oracles[name] for name in names}


def build_graders(cfg) -> dict[str, Callable[[Sequence[str]], torch.Tensor]]:
    """{"grader": encode} for `eval.grader` (`--grader CHECKPOINT`; {} without one): that
    checkpoint's encoder, with its own recipe's description prefix and token cap, reading texts ->
    v_hat [N, d]. `check_grader` has checked its model and layer."""
    if cfg.eval.grader is None:
        return {}
    models = load_checkpoint_models(cfg.eval.grader, decoder=False)
    run_cfg = models.config
    grader = make_hf_oracle(models.target, models.encoder, models.target, models.tokenizer, models.layer, models.record.injection_norm,
                            run_cfg.injection.mode, run_cfg.description_instruction, run_cfg.sampling.max_new_tokens, run_cfg.encoder.prefix,
                            **models.options)
    return {"grader": grader.encode}
