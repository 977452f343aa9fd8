"""Warmup targets that say what can be read and stop: the current-token question and the quote-only
description (no target generation), as recipe options (issue 26's levers)."""

from __future__ import annotations

import pytest

from cycle_oracle.corpus import Document

DOCS = [Document(f"d{i}", f"Paragraph {i} is about the {w} and how people in the valley live next to it every day of the year.")
        for i, w in enumerate(["river", "forest", "mountain", "lake"])]


class NoGenerate:
    """A generate_fn that must never be called."""

    model_id = "none"
    batch_size = 8

    def __call__(self, chats, max_new_tokens):
        raise AssertionError("a quote-only description must not ask the target to write anything")


def test_current_token_question_answers_the_read_token(tiny_tokenizer):
    from cycle_oracle.data.token_prediction import token_prediction_items

    items, _ = token_prediction_items(DOCS, tiny_tokenizer, seed=0, items_per_document=6, max_tokens=64,
                                      directions=("previous", "next", "current"))
    current = [it for it in items if it.question == "What is the current token?"]
    assert current and len(current) < len(items)
    for it in current:
        p = it.read_positions[0]
        assert p == len(it.context_ids) - 1
        assert it.answer == tiny_tokenizer.decode([it.context_ids[p]]).strip()


def test_default_directions_draw_the_same_items_as_before(tiny_tokenizer):
    """Adding the `current` direction must not change what a recipe without it trains on."""
    from cycle_oracle.data.token_prediction import token_prediction_items

    default, _ = token_prediction_items(DOCS, tiny_tokenizer, seed=3, items_per_document=5, max_tokens=64)
    explicit, _ = token_prediction_items(DOCS, tiny_tokenizer, seed=3, items_per_document=5, max_tokens=64, directions=("previous", "next"))
    assert default == explicit
    assert not any("current" in it.question for it in default)


def test_quote_only_description_is_the_true_tail_and_generates_nothing(tiny_tokenizer):
    from cycle_oracle.data.description import build_description_items, split_quoted_description

    items, info = build_description_items(DOCS, tiny_tokenizer, NoGenerate(), "Describe this.", seed=0, items_per_document=5,
                                          progress=False, quote_tokens=4, sentence=False)
    assert len(items) == 5 * len(DOCS) and info["generated"] == 0
    for it in items:
        p = it.read_positions[0]
        quote, rest = split_quoted_description(it.answer)
        assert rest == ""
        assert quote == " ".join(tiny_tokenizer.decode(list(it.context_ids[p - 3 : p + 1])).split())
    with pytest.raises(ValueError, match="quote_tokens >= 1"):
        build_description_items(DOCS, tiny_tokenizer, NoGenerate(), "Describe this.", sentence=False, quote_tokens=0, progress=False)


def test_recipe_refuses_a_sentence_free_description_without_a_quote():
    from cycle_oracle.config import ConfigError, load_recipe

    cfg = load_recipe("recipes/warmup_then_grpo.yaml", ["warmup.description_sentence=false", "warmup.description_items_per_document=4"])
    assert cfg.warmup.description_sentence is False
    with pytest.raises(ConfigError, match="description_quote_tokens >= 1"):
        load_recipe("recipes/warmup_then_grpo.yaml", ["warmup.description_sentence=false", "warmup.description_quote_tokens=0"])


def test_bare_quote_style_is_the_tail_itself(tiny_tokenizer):
    from cycle_oracle.data.description import build_description_items, quote_text

    items, _ = build_description_items(DOCS, tiny_tokenizer, NoGenerate(), "Describe this.", seed=0, items_per_document=3,
                                       progress=False, quote_tokens=2, sentence=False, quote_style="bare")
    for it in items:
        p = it.read_positions[0]
        assert it.answer == " ".join(tiny_tokenizer.decode(list(it.context_ids[p - 1 : p + 1])).split())
    assert quote_text(" a  b ", "it_reads") == 'It reads: "a b".'
    with pytest.raises(ValueError, match="quote style"):
        quote_text("a", "italic")
