"""The final evals of a training run: every oracle under every grader, on one held-out pool.

An oracle is a decoder that describes activations (`describe`: V [N, d] -> N greedy texts), a
grader an encoder that reads descriptions (`encode`: N texts -> V_hat [N, d]). `final_evals`
describes one retrieval pool (`evals/retrieval.py`: held-out documents of the one split, at most
`eval.rows_per_document` rows each) once per oracle and scores the descriptions under every grader.
Neither side needs to know where it runs: GRPO's end (recipes/grpo.py) passes oracles served by
its rollout group and graders backed by its encoder actor, an in-process caller HF models.

GRPO's end passes, in this order, the oracles
    grpo_decoder          the trained decoder
    warmup_decoder        the decoder the run started from (with init_from)
and the graders
    final_encoder         the co-trained encoder (it learned from the GRPO decoder's outputs, so it favours them)
    text_encoder          a fresh encoder trained on source windows of training documents only
                          (`eval.text_encoder_steps`, `text_encoder_pairs`): it never read a description
    frozen_start_encoder  the starting checkpoint's encoder, frozen: it never saw GRPO output (the
                          unbiased comparison, reported first)

Beside the decoders, oracles that write from the pool's rows rather than from v (`written`: texts
already written for `pool_rows`, in its order) are graded the same way: the training-free baselines
(Patchscopes, the logit lens: the untrained target reading v; the text-only guess: the target
reading the source text, no v) and the format controls (the true read token and the decoder's
quote window, written bare and in the decoder's format).

The first oracle under the first grader also runs the controls (shuffled, zero, context-only);
every later oracle is compared with the first per item under each grader (`decoder_comparison`).
Under every grader the first (trained) oracle meets the best of `baselines` on top-1 and FVE with
paired intervals (evals/verdict.py). The results (the keys `final_summary`, recipes/report.py and
results.json readers use):

    retrieval                 the first oracle under the first grader
    retrieval_<oracle>        another oracle under the first grader
    <a>_minus_<b>             the first oracle minus another under the first grader (grpo_minus_warmup)
    <grader>                  every other grader: {<oracle>: ..., <a>_minus_<b>: ..., and its `notes`}
    headlines                 {grader: {oracle: top-1 and FVE with intervals}}
    verdicts                  {grader: the trained oracle against the best baseline (`verdict.verdict`)}
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import torch

from cycle_oracle.data.description import quote_text
from cycle_oracle.encoder import cosine
from cycle_oracle.evals.oracle import Oracle
from cycle_oracle.evals.retrieval import evaluate_retrieval, select_pool
from cycle_oracle.evals.verdict import FORMATS, format_controls, headline, oracle_scores, verdict
from cycle_oracle.stats import paired_difference

Describe = Callable[[torch.Tensor], list[str]]
"""An oracle's describe: activations [N, d] -> N greedy descriptions."""
Encode = Callable[[Sequence[str]], torch.Tensor]
"""A grader: N descriptions -> reconstructions [N, d] (an empty description -> 0, `encoder.reconstruct_texts`)."""

CONTROLS = ("shuffled", "zero", "context_only")
"""The controls the first oracle runs under the first grader (`evals/retrieval.py`)."""
TEXT_ENCODER_PAIRS = 50 * 32
"""At most this many (source window, activation) pairs of training documents train the text encoder."""


def pool_rows(store, cfg) -> list[int]:
    """The held-out rows every oracle is graded on (`evals/retrieval.select_pool` with the run's split,
    seed, `eval.pool_size` and `eval.rows_per_document`), in the order `evaluate_retrieval` uses."""
    return select_pool(store, cfg.eval.pool_size, cfg.seed, cfg.split.heldout_fraction, cfg.seed, cfg.eval.rows_per_document)


def _written_describe(name: str, texts: Sequence[str]) -> Callable[[Sequence[str]], list[str]]:
    """An oracle's describe_text that returns texts already written for the pool's rows."""

    def describe_text(contexts: Sequence[str]) -> list[str]:
        if len(contexts) != len(texts):
            raise ValueError(f"{name}: {len(texts)} texts were written for the pool, the eval asks for {len(contexts)}")
        return list(texts)

    return describe_text


def final_evals(oracles: Mapping[str, Describe], graders: Mapping[str, Encode], store, cfg, detokenize: Callable[[Sequence[int]], str],
                notes: Mapping[str, dict] | None = None, on_pair: Callable[[str, str, dict], None] | None = None,
                written: Mapping[str, Sequence[str]] | None = None, baselines: Sequence[str] = ()) -> dict:
    """Retrieval of every oracle under every grader on one pool (the module docstring's layout).
    Oracles are visited one after another, the graders in their order within each (an oracle is asked
    for the pool's descriptions under each grader: a memoising describe such as
    `RolloutGroup.describer` writes them once, and serves its adapter once); `written` oracles come
    after them (their texts for `pool_rows`, in order); `baselines` names those of them the verdict
    compares the first oracle with; `notes` are added to a grader's section (e.g. how it was
    trained); `on_pair(oracle, grader, result)` runs after each pair (a caller's progress or timing)."""
    first_oracle, first_grader = next(iter(oracles)), next(iter(graders))
    written = dict(written or {})
    scored = {}
    for name in [*oracles, *written]:
        for grader, encode in graders.items():
            controls = CONTROLS if (name, grader) == (first_oracle, first_grader) else ()
            if name in written:
                oracle = Oracle(describe=None, encode=encode, encode_with_weights=None, ask_yes_no=None, read=None, detokenize=detokenize,
                                describe_text=_written_describe(name, written[name]))
            else:
                oracle = Oracle(describe=oracles[name], encode=encode, encode_with_weights=None, ask_yes_no=None, read=None, detokenize=detokenize)
            scored[name, grader] = evaluate_retrieval(oracle, store, cfg.eval.pool_size, cfg.seed, heldout_fraction=cfg.split.heldout_fraction,
                                                      split_seed=cfg.seed, rows_per_document=cfg.eval.rows_per_document, controls=controls)
            if on_pair is not None:
                on_pair(name, grader, scored[name, grader])
    names = [*oracles, *written]
    others = [name for name in names if name != first_oracle]
    out: dict = {"retrieval": scored[first_oracle, first_grader]}
    for grader in graders:
        if grader == first_grader:
            continue
        section = dict((notes or {}).get(grader, {}))
        for name in names:
            section[name] = scored[name, grader]
        for name in others:
            section[comparison_key(first_oracle, name)] = decoder_comparison(scored[first_oracle, grader], scored[name, grader])
        out[grader] = section
    for name in others:
        out[f"retrieval_{name}"] = scored[name, first_grader]
        out[comparison_key(first_oracle, name)] = decoder_comparison(scored[first_oracle, first_grader], scored[name, first_grader])
    rows = scored[first_oracle, first_grader]["rows"]
    v = store.activations[rows].float()
    floor = cosine(store.mean.float()[None, :].expand_as(v), v)  # cos(mu, v_i): the predict-the-mean floor per item
    out["headlines"], out["verdicts"] = {}, {}
    for grader in graders:
        scores = {name: oracle_scores(scored[name, grader]["per_item"]["description"]) for name in names}
        out["headlines"][grader] = {name: headline(scores[name], floor) for name in names}
        out["verdicts"][grader] = verdict(scores, floor, first_oracle, [b for b in baselines if b in scores], grader)
    return out


def format_control_texts(store, rows: Sequence[int], tokenizer, quote_tokens: int, quote_style: str) -> dict[str, list[str]]:
    """The format controls of a pool: each row's true read token and its last `quote_tokens` tokens
    (the decoder's quote), written bare and, unless the decoder quotes bare, in the decoder's quote
    format -> {"true_token_bare", "true_window_bare", "true_token_decoder_format", ...: N texts}."""
    tokens = [tokenizer.decode(store.context_window(i, before=1), skip_special_tokens=True) for i in rows]
    windows = [tokenizer.decode(store.context_window(i, before=max(1, quote_tokens)), skip_special_tokens=True) for i in rows]
    formats = {"bare": FORMATS["bare"]}
    if quote_style != "bare":
        formats["decoder_format"] = lambda content: quote_text(content, quote_style)
    out = {}
    for key, texts in format_controls(tokens, windows, formats).items():
        fmt, what = key.split("/")
        out[f"true_{what}_{fmt}"] = texts
    return out


def comparison_key(a: str, b: str) -> str:
    """The results key of oracle a minus oracle b: grpo_decoder, warmup_decoder -> grpo_minus_warmup."""
    return f"{a.removesuffix('_decoder')}_minus_{b.removesuffix('_decoder')}"


def decoder_comparison(a: dict, b: dict) -> dict:
    """Per pool item, oracle a's score minus oracle b's (same pool, same grader): mean, 95% bootstrap
    interval and share of items where a is better, for the cosine and the centred cosine."""
    x, y = a["per_item"]["description"], b["per_item"]["description"]
    return {k: paired_difference(torch.tensor(x[k]), torch.tensor(y[k])) for k in ("cosine", "centred_cosine")}


def text_encoder_pairs(store, tokenizer, cfg) -> tuple[list[str], torch.Tensor]:
    """The text encoder's training data: (source window of `eval.text_encoder_window_tokens` tokens,
    activation [d]) for up to `TEXT_ENCODER_PAIRS` rows of training documents (the one split), drawn
    with the run's seed -> (texts [M], activations [M, d])."""
    train_rows, _held = store.split_by_document(cfg.split.heldout_fraction, cfg.seed)
    rows = random.Random(f"text-encoder:{cfg.seed}").sample(train_rows, min(len(train_rows), TEXT_ENCODER_PAIRS))
    return store.source_windows(rows, tokenizer, cfg.eval.text_encoder_window_tokens), store.activations[rows]


def final_summary(results: dict) -> dict:
    """The numbers to read first: GRPO vs warmup decoder under the frozen starting encoder (no
    co-training bias), under the text encoder, then under the final encoder; every oracle's top-1 and
    FVE under each grader and the verdict lines; then the pool and chance."""
    out = {}

    def conditions(label: str, r: dict | None) -> None:
        for cond, m in (r or {}).get("conditions", {}).items():
            out[f"{label}/{cond}"] = {k: round(float(m[k]), 4) for k in ("top1", "top5", "cosine", "centred_cosine", "fve") if k in m}

    def difference(label: str, diff: dict | None) -> None:
        for key, d in (diff or {}).items():
            out[f"{label}/{key}"] = {k: round(float(d[k]), 4) for k in ("mean", "ci_low", "ci_high", "share_a_better")}

    frozen = results.get("frozen_start_encoder")
    if frozen:
        conditions("frozen_encoder/grpo_decoder", frozen["grpo_decoder"])
        conditions("frozen_encoder/warmup_decoder", frozen["warmup_decoder"])
        difference("frozen_encoder/grpo_minus_warmup", frozen["grpo_minus_warmup"])
    text = results.get("text_encoder")
    if text:
        conditions("text_encoder/grpo_decoder", text.get("grpo_decoder"))
        conditions("text_encoder/warmup_decoder", text.get("warmup_decoder"))
        difference("text_encoder/grpo_minus_warmup", text.get("grpo_minus_warmup"))
    conditions("final_encoder/grpo_decoder", results.get("retrieval"))
    conditions("final_encoder/warmup_decoder", results.get("retrieval_warmup_decoder"))
    difference("final_encoder/grpo_minus_warmup", results.get("grpo_minus_warmup"))
    for grader, lines in (results.get("headlines") or {}).items():
        for oracle, h in lines.items():
            out[f"{grader}/{oracle}/top1_fve"] = [round(float(h["top1"]), 4), round(float(h["fve"]), 4)]
    for grader, v in (results.get("verdicts") or {}).items():
        out[f"verdict/{grader}"] = v["line"]
    r = results.get("retrieval")
    if r:
        out["pool_size"] = r["n"]
        out["chance_top1"] = r["chance"]["top1"]
    return out
