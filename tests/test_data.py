"""Warmup data package: LatentQA masking and loading, splits, malformed rows, token prediction,
description targets, the embedded builder and its cache, the mixture, and HF generation."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pytest

from cycle_oracle.config import DEFAULT_DESCRIPTION_INSTRUCTION, DataSource, WarmupSettings
from cycle_oracle.corpus import Document
from cycle_oracle.data.items import MalformedDataError, WarmupItem


class FakeGenerate:
    """A pure function of the chat (stands in for the target model) that counts its calls."""

    model_id = "fake-model"
    batch_size = 16

    def __init__(self):
        self.calls = 0
        self.chats = []

    def __call__(self, chats, max_new_tokens):
        self.calls += 1
        self.chats.extend(chats)
        out = []
        for chat in chats:
            h = hashlib.sha256(json.dumps(chat, sort_keys=True).encode()).hexdigest()
            out.append(f"Reply {h[:6]} about {h[6:12]}. A second sentence {h[12:18]}.")
        return out


def im_start_positions(tok, ids):
    start = tok.convert_tokens_to_ids("<|im_start|>")
    return [i for i, t in enumerate(ids) if t == start]


def decode_runs(tok, ids, positions):
    """Decode each maximal run of consecutive positions separately."""
    runs, cur = [], []
    for p in sorted(positions):
        if cur and p != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(p)
    if cur:
        runs.append(cur)
    return [tok.decode([ids[p] for p in r]) for r in runs]


# ---------------------------------------------------------------- LatentQA


def test_latentqa_public_masking_never_reads_the_control(shared_data, tiny_tokenizer):
    from cycle_oracle.data.latentqa import load_latentqa

    folder = shared_data / "latentqa" / "eval"
    rows = {r["label"]: r for r in json.loads((folder / "system.json").read_text())}
    qa = json.loads((folder / "qa.json").read_text())
    result = load_latentqa(folder, tiny_tokenizer, read="content")
    assert result.malformed == 0
    assert set(result.labels) == set(rows)
    assert len(result.items) == sum(len(qa[label]) for label in rows)  # stimulus.json duplicates are dropped
    seen = set()
    for item in result.items:
        if (item.source_id, item.context_ids) in seen:
            continue
        seen.add((item.source_id, item.context_ids))
        row = rows[item.source_id]
        starts = im_start_positions(tiny_tokenizer, item.context_ids)
        assert len(starts) == 2  # system turn, user turn: no default system prompt slipped in
        assert min(item.read_positions) > starts[1]
        control_part = tiny_tokenizer.decode(item.context_ids[: starts[1]])
        assert row["system"].strip() in control_part
        read_text = "".join(decode_runs(tiny_tokenizer, item.context_ids, item.read_positions))
        assert read_text == row["stimulus_user"].strip()
        assert (item.question, item.answer) in {tuple(p) for p in qa[item.source_id]}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_latentqa_completion_is_read_and_control_turns_masked(tmp_path, tiny_tokenizer):
    from cycle_oracle.data.latentqa import load_latentqa

    rows = [
        {"control_user": "Speak only about volcanoes from now on.", "control_thought": "ok", "control_model": "Understood, volcanoes it is.",
         "stimulus_user": "What is your favourite food?", "stimulus_model": "Lava cake, because it reminds me of eruptions.", "label": "goal-volcano"},
        {"control_user": "Pretend to be a sleepy owl.", "control_model": "Hoo, fine.", "stimulus_user": "How was your day?",
         "stimulus_model": "Very long, I was awake all night.", "label": "persona-owl"},
    ]
    _write(tmp_path / "stimulus_completion.json", rows)
    _write(tmp_path / "control.json", [{"control_user": "Be an owl.", "label": "persona-owl"}])
    _write(tmp_path / "qa.json", {"goal-volcano": [["What is the topic?", "Volcanoes."]], "persona-owl": [["Who is it?", "A sleepy owl."]]})
    by_label = {r["label"]: r for r in rows}
    # "turns": upstream's layout (control as a user turn + the model's acknowledgement); SmolLM2's
    # template then adds its default system turn in front, which is masked too
    for control_as, n_starts in (("system", 3), ("turns", 5)):
        result = load_latentqa(tmp_path, tiny_tokenizer, control_as=control_as,
                               files=("stimulus_completion.json", "control.json"), read="content")
        assert len(result.items) == 2 and result.malformed == 0
        assert result.stats["control_only_rows"] == 1  # control.json has nothing readable under the masking
        for item in result.items:
            row = by_label[item.source_id]
            starts = im_start_positions(tiny_tokenizer, item.context_ids)
            assert len(starts) == n_starts
            stimulus_turn = starts[-2]
            assert min(item.read_positions) > stimulus_turn
            hidden = tiny_tokenizer.decode(item.context_ids[:stimulus_turn])
            assert row["control_user"] in hidden
            runs = decode_runs(tiny_tokenizer, item.context_ids, item.read_positions)
            assert runs == [row["stimulus_user"], row["stimulus_model"]]
            assert row["control_user"] not in "".join(runs)


def test_latentqa_reply_header_reads_between_prompt_and_reply(tmp_path, tiny_tokenizer):
    """`reply_header`: exactly the non-special template tokens after the user's message and before
    the reply (the generation prompt when the chat ends on the user turn); `both` = that + the text."""
    from cycle_oracle.data.latentqa import chat_context, load_latentqa

    chat = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Arr, fine."}]
    special = set(tiny_tokenizer.all_special_ids)
    ids, header = chat_context(tiny_tokenizer, chat, 1, read="reply_header")
    starts = im_start_positions(tiny_tokenizer, ids)
    assert header == [p for p in range(starts[2] - 1, starts[2] + 4) if ids[p] not in special]
    assert tiny_tokenizer.decode([ids[p] for p in header]) == "\nassistant\n"
    assert "Arr" in tiny_tokenizer.decode(ids[header[-1] + 1:])  # the reply starts right after
    _, text = chat_context(tiny_tokenizer, chat, 1, read="content")
    _, both = chat_context(tiny_tokenizer, chat, 1, read="both")
    assert both == sorted(set(text) | set(header)) and not set(text) & set(header)
    assert chat_context(tiny_tokenizer, chat, 1, read="reply_header_last") == (ids, header[-1:])
    # a chat ending on the user turn gets the generation prompt, which is its reply header
    ids2, header2 = chat_context(tiny_tokenizer, chat[:2], 1, read="reply_header")
    assert tiny_tokenizer.decode([ids2[p] for p in header2]) == "\nassistant\n" and header2[-1] == len(ids2) - 1
    assert chat_context(tiny_tokenizer, chat[:2], 1, read="content")[0] == ids2[: starts[2]]
    assert chat_context(tiny_tokenizer, chat, 1, max_tokens=starts[2] - 1, read="reply_header") is None  # header cut off
    with pytest.raises(ValueError, match="read='everything'"):
        chat_context(tiny_tokenizer, chat, 1, read="everything")
    # the loader: every item reads only its reply header, never the control
    _write(tmp_path / "system.json", [{"system": "Talk like a pirate.", "stimulus_user": "Hello there?", "label": "persona-pirate"}])
    _write(tmp_path / "qa.json", {"persona-pirate": [["Who is it?", "A pirate."]]})
    (item,) = load_latentqa(tmp_path, tiny_tokenizer).items
    assert tiny_tokenizer.decode([item.context_ids[p] for p in item.read_positions]) == "\nassistant\n"


def test_latentqa_malformed_rows_counted_or_raised(tmp_path, tiny_tokenizer):
    from cycle_oracle.data.latentqa import load_latentqa

    rows = [
        {"system": "Talk like a pirate.", "stimulus_user": "Hello there?", "label": "persona-pirate"},
        {"system": "Be terse.", "label": "tone-terse"},  # row 1: no stimulus
        "not a row",  # row 2
        {"system": "Be kind.", "stimulus_user": "Help me.", "label": "tone-kind"},
        {"system": "", "stimulus_user": "Hm?", "label": "tone-empty"},  # row 4: empty control
    ]
    _write(tmp_path / "system.json", rows)
    _write(tmp_path / "qa.json", {
        "persona-pirate": [["How will it speak?", "Like a pirate."], ["broken"]],  # pair 1 malformed
        "tone-kind": [["What tone?", "Kind."]],
    })
    result = load_latentqa(tmp_path, tiny_tokenizer, strict=False)
    assert result.malformed == 4
    assert sorted(it.source_id for it in result.items) == ["persona-pirate", "tone-kind"]
    joined = "\n".join(result.problems)
    for where in ("system.json row 1", "system.json row 2", "system.json row 4", "qa.json label 'persona-pirate' pair 1"):
        assert where in joined, where
    with pytest.raises(MalformedDataError, match=r"qa\.json label 'persona-pirate' pair 1"):
        load_latentqa(tmp_path, tiny_tokenizer, strict=True)
    _write(tmp_path / "qa.json", {"persona-pirate": [["How will it speak?", "Like a pirate."]], "tone-kind": [["What tone?", "Kind."]]})
    with pytest.raises(MalformedDataError, match=r"system\.json row 1"):
        load_latentqa(tmp_path, tiny_tokenizer, strict=True)

    from cycle_oracle.data.build import build_warmup_data

    settings = WarmupSettings(mixture={"latentqa": 1.0}, latentqa=DataSource(kind="latentqa", paths=[str(tmp_path)]), strict=False)
    _, _, report = build_warmup_data(settings, 0.2, tiny_tokenizer, None, DEFAULT_DESCRIPTION_INSTRUCTION, progress=False)
    assert report["malformed_rows"] == 3
    with pytest.raises(MalformedDataError, match=r"system\.json row 1"):
        build_warmup_data(settings.model_copy(update={"strict": True}), 0.2, tiny_tokenizer, None, DEFAULT_DESCRIPTION_INSTRUCTION, progress=False)


# ---------------------------------------------------------------- splits and mixture


def _items(n_sources, per_source, task="latentqa"):
    return [
        WarmupItem(task, f"src{s}", (1, 2, 3, s), (3,), f"q{s}.{j}", f"a{s}.{j}")
        for s in range(n_sources)
        for j in range(per_source)
    ]


def test_split_by_source_is_disjoint_complete_and_seeded():
    from cycle_oracle.data.mixture import split_by_source

    items = _items(50, 3)
    train, held = split_by_source(items, 0.2, seed=3)
    tr, he = {i.source_id for i in train}, {i.source_id for i in held}
    assert tr.isdisjoint(he)
    assert tr | he == {i.source_id for i in items}
    assert 4 <= len(he) <= 16 and len(train) + len(held) == len(items)  # 0.2 of 50 sources on average
    assert split_by_source(items, 0.2, seed=3) == (train, held)
    assert {i.source_id for i in split_by_source(items, 0.2, seed=4)[1]} != he
    # a source's side does not depend on which other sources are loaded (warmup and GRPO agree)
    subset = [i for i in items if int(i.source_id.removeprefix("src")) % 3 == 0]
    assert {i.source_id for i in split_by_source(subset, 0.2, seed=3)[1]} == he & {i.source_id for i in subset}
    # two sources: one on each side whatever the hashes say
    pair = _items(2, 1)
    assert [len(side) for side in split_by_source(pair, 0.01, seed=0)] == [1, 1]
    assert [len(side) for side in split_by_source(pair, 0.99, seed=0)] == [1, 1]


def test_mixture_deterministic_resumable_and_weighted():
    from cycle_oracle.data.mixture import WarmupMixture

    sources = {"latentqa": _items(10, 3), "token_prediction": _items(7, 2, "token_prediction"), "description": _items(5, 1, "description")}
    weights = {"latentqa": 0.6, "token_prediction": 0.3, "description": 0.1}
    a = WarmupMixture(sources, weights, seed=1)
    first = a.sample(50)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    assert all(isinstance(v, int) for v in state["drawn"].values()) and isinstance(state["position"], int)
    rest = a.sample(40)
    b = WarmupMixture(sources, weights, seed=1)
    b.load_state_dict(state)
    assert b.sample(40) == rest
    assert WarmupMixture(sources, weights, seed=1).sample(90) == first + rest
    assert WarmupMixture(sources, weights, seed=2).sample(90) != first + rest

    big = WarmupMixture(sources, weights, seed=0)
    draws = big.sample(4000)
    counts = Counter(it.task for it in draws)
    assert counts == Counter(big.counts())
    for task, w in weights.items():
        assert abs(counts[task] / 4000 - w) < 0.03, (task, counts)
    # every item of a pool comes once per epoch
    lqa = [it for it in draws if it.task == "latentqa"][:30]
    assert len(set(lqa)) == 30
    # a mixture over other data refuses the state; tasks without items or weight are left out
    with pytest.raises(ValueError, match="sizes"):
        WarmupMixture({**sources, "description": _items(6, 1, "description")}, weights, seed=1).load_state_dict(state)
    only = WarmupMixture({**sources, "description": []}, weights, seed=0)
    assert only.tasks == ["latentqa", "token_prediction"]


# ---------------------------------------------------------------- token prediction

WIKI_LIKE = """ = First Article =

 The first article begins with a paragraph that is long enough to be used as a document for token prediction , with many words .

 = = A Section = =

 A second paragraph of the first article talks about rivers , mountains and the long history of a small town by the sea .

 = Second Article =

 The second article is about a completely different subject : the migration of birds across continents in the autumn months .
"""


def test_split_documents_by_article(tmp_path):
    from cycle_oracle.corpus import load_documents, load_text_files
    from cycle_oracle.data.token_prediction import load_corpus

    path = tmp_path / "wiki.raw"
    path.write_text(WIKI_LIKE)
    docs = load_text_files([path])
    assert docs[0].group == docs[1].group != docs[2].group
    assert not any("=" in d.text for d in docs)
    assert docs[2].text.startswith("The second article")
    # the warmup's documents are GRPO's and the evals' documents: same ids, same article groups
    source = DataSource(kind="text_files", paths=[str(path)])
    warmup_docs, _ = load_corpus(source, None, num_documents=10)
    assert [(d.doc_id, d.group, d.text) for d in load_documents(source)] == [(d.doc_id, d.group, d.text) for d in warmup_docs]


def test_token_prediction_answers_are_the_true_tokens(tmp_path, tiny_tokenizer):
    from cycle_oracle.corpus import load_text_files
    from cycle_oracle.data.token_prediction import token_prediction_items

    path = tmp_path / "wiki.raw"
    path.write_text(WIKI_LIKE)
    docs = load_text_files([path])
    items, stats = token_prediction_items(docs, tiny_tokenizer, seed=0, items_per_document=6, max_tokens=64)
    assert stats["items"] == len(items) >= 12
    texts = {d.group: [] for d in docs}
    for d in docs:
        texts[d.group].append(tiny_tokenizer(d.text)["input_ids"][:64])
    directions = Counter()
    for it in items:
        m = re.fullmatch(r"What (?:is|are) the (previous|next) (?:(\d+) )?tokens?\?", it.question)
        assert m, it.question
        direction, k = m.group(1), int(m.group(2) or 1)
        directions[direction] += 1
        assert 1 <= k <= 16
        p = len(it.context_ids) - 1
        assert it.read_positions == (p,) and p >= 8
        doc = next(t for t in texts[it.source_id] if tuple(t[: p + 1]) == it.context_ids)
        truth = doc[p + 1 : p + 1 + k] if direction == "next" else doc[p - k : p]
        assert len(truth) == k
        assert it.answer == tiny_tokenizer.decode(truth).strip()
    assert directions["previous"] > 0 and directions["next"] > 0


def test_datasets_corpus_from_local_files(tmp_path):
    from cycle_oracle.corpus import load_datasets_corpus

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Document number {i} talks about topic {i}."}) + "\n" for i in range(5)))
    docs = load_datasets_corpus(None, [str(path)])
    assert [d.text for d in docs] == [f"Document number {i} talks about topic {i}." for i in range(5)]
    with pytest.raises(FileNotFoundError, match="could not load the datasets corpus"):
        load_datasets_corpus(None, [str(tmp_path / "missing.jsonl")])


def test_datasets_corpus_columns_groups_and_joined_rows(tmp_path):
    """A `datasets` corpus names its text column and keeps rows of one group on one side of the
    split; wikitext-like line rows are joined and cut into paragraphs grouped by article."""
    from cycle_oracle.config import DataSource
    from cycle_oracle.corpus import load_datasets_corpus, load_documents

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": f"Paragraph {i} of article {i // 2}.", "article": i // 2}) + "\n" for i in range(6)))
    docs = load_documents(DataSource(kind="datasets", paths=[str(rows)], text_column="body", group_column="article"))
    assert [d.group for d in docs] == ["rows:0", "rows:0", "rows:1", "rows:1", "rows:2", "rows:2"]
    with pytest.raises(FileNotFoundError, match="no text column 'nope'"):
        load_datasets_corpus(None, [str(rows)], text_column="nope")
    lines = tmp_path / "wiki.jsonl"
    text = [" = Cats = ", "", " Cats are small carnivorous mammals that people have kept as pets for thousands of years . ", "",
            " = = Habits = = ", " A cat sleeps for most of the day and hunts at dusk , when its prey is most active . ", "",
            " = Dogs = ", " Dogs were the first animals that humans domesticated , long before farming began anywhere . "]
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    joined = load_datasets_corpus(None, [str(lines)], join_rows=True)
    assert len(joined) == 3 and joined[0].group == joined[1].group != joined[2].group


# ---------------------------------------------------------------- description


def test_description_targets_from_the_window_and_cached(tmp_path, tiny_tokenizer):
    from cycle_oracle.data.description import build_description_items

    docs = [Document(f"d{i}", f"Paragraph {i} is about the {w} and how people in the valley live next to it every day of the year.")
            for i, w in enumerate(["river", "forest", "mountain", "lake"])]
    gen = FakeGenerate()
    instruction = "Describe this."
    items, info = build_description_items(docs, tiny_tokenizer, gen, instruction, seed=0, items_per_document=2,
                                          window=6, cache_dir=tmp_path, progress=False)
    assert len(items) == 8 and gen.calls == 1 and not info["cached"]
    prompts = [c[0]["content"] for c in gen.chats]
    for it in items:
        assert it.question == instruction and it.task == "description"
        p = it.read_positions[0]
        assert p == len(it.context_ids) - 1 and p >= 8
        ids = tiny_tokenizer(next(d.text for d in docs if d.doc_id == it.source_id))["input_ids"]
        assert tuple(ids[: p + 1]) == it.context_ids
        window = tiny_tokenizer.decode(ids[p - 6 : p + 1]).strip()
        prompt = f"Here is a passage:\n\n{window}\n\nIn one sentence, describe what this passage is about."
        assert prompt in prompts
        reply = gen([[{"role": "user", "content": prompt}]], 1)[0]
        assert it.answer == reply.split(". ")[0] + "."  # first sentence only
    calls = gen.calls
    again, info2 = build_description_items(docs, tiny_tokenizer, gen, instruction, seed=0, items_per_document=2,
                                           window=6, cache_dir=tmp_path, progress=False)
    assert gen.calls == calls and info2["cached"] and again == items
    from cycle_oracle.data.description import split_quoted_description

    quoted, _ = build_description_items(docs, tiny_tokenizer, gen, instruction, seed=0, items_per_document=2,
                                        window=6, cache_dir=tmp_path, progress=False, quote_tokens=3)
    assert gen.calls == calls, "the quote is added on load: no new generation"
    for plain, it in zip(items, quoted):
        p = it.read_positions[0]
        tail = " ".join(tiny_tokenizer.decode(list(it.context_ids[p - 2 : p + 1])).split())
        assert it.answer == f'It reads: "{tail}". {plain.answer}'
        assert split_quoted_description(it.answer) == (tail, plain.answer)  # the inverse, on real targets
    assert split_quoted_description("The text is about a town.") == (None, "The text is about a town.")


def test_clean_description_first_sentence_without_the_lead_in():
    from cycle_oracle.data.description import clean_description

    assert clean_description("This passage is about a quiet market town on a Saturday. Then more.") == "A quiet market town on a Saturday."
    assert clean_description("The passage explores the history of printing.\nIt also...") == "The history of printing."
    assert clean_description("This passage is about a market, with food, drinks,") == ""  # cut off: unusable
    assert clean_description("  The heart   pumps blood! ") == "The heart pumps blood!"
    assert clean_description("This passage is about it.") == "This passage is about it."  # too little left
    assert clean_description("This passage is about a fox.", strip_lead_in=False) == "This passage is about a fox."


# ---------------------------------------------------------------- embedded builder


def test_embedded_builder_many_behaviours_masked_and_cached(tmp_path, tiny_tokenizer):
    from cycle_oracle.data.behaviours import seed_prompts, stimuli
    from cycle_oracle.data.embedded import build_embedded_latentqa

    assert len(stimuli()) >= 40 and len(seed_prompts()) >= 40
    gen = FakeGenerate()
    res = build_embedded_latentqa(tiny_tokenizer, gen, num_behaviours=120, stimuli_per_behaviour=2, seed=0,
                                  cache_dir=tmp_path, progress=False, read="both")
    labels = {it.source_id for it in res.items}
    assert len(labels) >= 100
    assert len(gen.chats) == 240 and gen.calls > 0
    systems = {c[0]["content"] for c in gen.chats}
    assert all(c[0]["role"] == "system" and c[1]["role"] == "user" for c in gen.chats)
    assert len(systems) == 120
    kinds = Counter(label.split("-")[0] for label in labels)
    assert set(kinds) == {"persona", "goal", "hidden"}
    for it in res.items[:: 37]:
        starts = im_start_positions(tiny_tokenizer, it.context_ids)
        assert len(starts) == 3 and min(it.read_positions) > starts[1]
        system_text = tiny_tokenizer.decode(it.context_ids[: starts[1]])
        assert any(s in system_text for s in systems)
        read = "".join(decode_runs(tiny_tokenizer, it.context_ids, it.read_positions))
        assert not any(s in read for s in systems)
        assert "Reply " in read  # the completion is read
    qs = {it.question for it in res.items if it.source_id.startswith("persona-")}
    assert {"How will the assistant speak?", "What will the reply be like?", "Does the assistant have an agenda?"} <= qs

    calls = gen.calls
    again = build_embedded_latentqa(tiny_tokenizer, gen, num_behaviours=120, stimuli_per_behaviour=2, seed=0,
                                    cache_dir=tmp_path, progress=False, read="both")
    assert gen.calls == calls and again.stats["cached"] and again.items == res.items
    fresh = build_embedded_latentqa(tiny_tokenizer, FakeGenerate(), num_behaviours=120, seed=0, cache_dir=tmp_path / "other", progress=False, read="both")
    assert fresh.items == res.items  # deterministic given the seed
    other = build_embedded_latentqa(tiny_tokenizer, FakeGenerate(), num_behaviours=120, seed=1, cache_dir=tmp_path, progress=False)
    assert {it.source_id for it in other.items} != labels


def test_recipe_asking_for_more_embedded_behaviours_or_stimuli_than_exist_is_rejected():
    from cycle_oracle.config import ConfigError, validate_recipe
    from cycle_oracle.data.behaviours import all_behaviours, stimuli

    total = sum(len(v) for v in all_behaviours().values())
    ok = validate_recipe({"kind": "warmup", "warmup": {"num_behaviours": total, "stimuli_per_behaviour": len(stimuli())}})
    assert ok.warmup.stimuli_per_behaviour == len(stimuli())
    for key, value in (("num_behaviours", total + 1), ("stimuli_per_behaviour", len(stimuli()) + 1)):
        with pytest.raises(ConfigError, match=f"warmup.{key}={value}"):
            validate_recipe({"kind": "warmup", "warmup": {key: value}})


def test_build_warmup_data_splits_and_report(tmp_path, tiny_tokenizer, shared_data):
    from cycle_oracle.data.build import build_warmup_data

    settings = WarmupSettings(
        latentqa=DataSource(kind="latentqa", max_documents=40),
        corpus=DataSource(kind="text_files", paths=[str(shared_data / "corpus" / "wiki.valid.raw")]),
        num_corpus_documents=30,
    )
    gen = FakeGenerate()
    train, held, report = build_warmup_data(settings, 0.2, tiny_tokenizer, gen, "Describe it.", shared_data_dir=shared_data,
                                            seed=0, cache_dir=tmp_path, progress=False)
    json.dumps(report)
    for task in ("latentqa", "token_prediction", "description"):
        assert train[task] and held[task], task
        assert {i.source_id for i in train[task]}.isdisjoint({i.source_id for i in held[task]})
        assert report["train"][task] == len(train[task])
    assert report["train_sources"]["latentqa"] + report["heldout_sources"]["latentqa"] == 40
    assert {i.source_id for i in held["description"]} <= {i.source_id for i in held["token_prediction"]}
    assert {i.source_id for i in train["description"]}.isdisjoint({i.source_id for i in held["token_prediction"]})
    assert all(i.question == "Describe it." for i in train["description"])
    # a task with weight 0 is not built: no generation for it
    gen2 = FakeGenerate()
    no_desc = settings.model_copy(update={"mixture": {"latentqa": 0.5, "token_prediction": 0.5}})
    train2, _, _ = build_warmup_data(no_desc, 0.2, tiny_tokenizer, gen2, "Describe it.", shared_data_dir=shared_data,
                                     seed=0, cache_dir=tmp_path / "x", progress=False)
    assert gen2.calls == 0 and not train2["description"] and train2["token_prediction"]


# ---------------------------------------------------------------- HF generation (the real path)


def test_hf_generate_fn_left_pads_a_batch(tiny_model, tiny_tokenizer):
    import torch

    from cycle_oracle.data.embedded import hf_generate_fn

    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Tell me a long story about a dragon, a knight and a very old castle."}]]
    texts = hf_generate_fn(tiny_model, tiny_tokenizer, batch_size=2)(chats, 4)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    for chat, text in zip(chats, texts):  # each equals the unpadded, one-at-a-time greedy reply
        prompt = tiny_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                      pad_token_id=tiny_tokenizer.pad_token_id)
        assert text == tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_warmup_eval_controls_never_reuse_the_source():
    """The held-out controls: items spread over sources, the shuffled partner always from another
    source, LatentQA read at several distinct positions (one per placeholder)."""
    import random

    from cycle_oracle.data.read_positions import read_positions
    from cycle_oracle.evals.warmup import other_source, spread_by_source

    items = [WarmupItem("latentqa", f"b{b}", (1, 2, 3, 4, 5, 6), (2, 3, 4, 5), "Q?", f"A{b}") for b in range(3) for _ in range(10)]
    rng = random.Random(0)
    chosen = spread_by_source(items, 6, rng)
    assert len(chosen) == 6 and Counter(it.source_id for it in chosen) == {"b0": 2, "b1": 2, "b2": 2}
    for it, other in zip(chosen, other_source(chosen, rng)):
        assert other.source_id != it.source_id
    pos = read_positions(items[0], rng, 3)
    assert len(pos) == 3 and len(set(pos)) == 3 and list(pos) == sorted(pos) and set(pos) <= {2, 3, 4, 5}
    padded = read_positions(WarmupItem("latentqa", "x", (1, 2, 3), (1, 2), "Q?", "A"), rng, 3)
    assert padded == (1, 2, 2)
    assert isinstance(read_positions(WarmupItem("token_prediction", "x", (1, 2, 3), (2,), "Q?", "A"), rng, 3), int)
