"""Issue 30's evals without Ray: truncation and the quote ban, the text-only guess against an
independent generation, the paired decoder-minus-guess comparison, the Taboo organism's dialogues
and secret-word checks, the organism's read positions, a grader that does not fit, the generated
probe tasks and where each task and corpus comes from on a machine without the data folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_checkpoints import warmup_like_checkpoint

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- truncation and the quote ban ---------------------------------------------------------------

def test_truncation_keeps_the_first_n_tokens_and_the_quote_ban_removes_quotes(tiny_tokenizer):
    from cycle_oracle.evals.truncation import ban_quotes, truncate_tokens

    tok = lambda t: tiny_tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    detok = lambda ids: tiny_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = "The market town sells fish and bread on Saturdays near the old bridge."
    ids = tok(text)
    for n in (1, 3, 5):
        assert truncate_tokens([text], n, tok, detok) == [detok(ids[:n]).strip()]
        assert len(tok(truncate_tokens([text], n, tok, detok)[0])) <= n
    assert truncate_tokens(["short"], 8, tok, detok) == ["short"]  # at most n tokens: unchanged
    with pytest.raises(ValueError, match="n >= 1"):
        truncate_tokens([text], 0, tok, detok)
    assert ban_quotes('It reads: "stalls along the square sold". A market town on a Saturday.') == "A market town on a Saturday."
    assert ban_quotes('He said "hello there" and “goodbye” twice.') == "He said and twice."
    assert ban_quotes("No quotes here.") == "No quotes here."
    # a quote that holds quote marks (measured on SmolLM2's text guess) goes whole, as the warmup's parser splits it
    assert ban_quotes('It reads: "" Adrien Begrand of PopMat". The text is about a song.') == "The text is about a song."
    assert ban_quotes('It reads: "wrote " Angel of Death " after". A film.') == "A film."


def test_truncation_curve_ends_with_the_whole_description_and_counts_cut_descriptions():
    from cycle_oracle.evals.retrieval import truncation_curve

    metrics = lambda x: {"top1": x, "top5": x, "mrr": x, "centred_cosine": x, "fve": x}  # noqa: E731
    conditions = {"description": metrics(0.9), "truncated_2": metrics(0.1), "truncated_8": metrics(0.5)}
    t = truncation_curve(conditions, [2, 8], [1, 4, 10, 10])
    assert t["tokens"] == [2, 8, "all"]
    assert [p["top1"] for p in t["curve"]] == [0.1, 0.5, 0.9]
    assert [p["cut_share"] for p in t["curve"]] == [0.75, 0.5, 0.0]
    assert t["mean_description_tokens"] == 6.25


# ---- the text-only guess ------------------------------------------------------------------------

def test_text_guess_is_the_target_answering_the_instruction_from_the_source_text(tiny_model, tiny_tokenizer):
    """guess_from_tokens against a greedy loop written here: the target reads `text_guess_prompt`
    (the window's last tokens as text, the decoder's instruction) and the quote prefix is the
    window's last N tokens in the warmup's `It reads: "..."` format."""
    from cycle_oracle.evals.baselines import guess_from_tokens
    from cycle_oracle.injection import text_guess_prompt

    instruction = "Describe the text."
    ids = tiny_tokenizer.encode("one two three four five six seven eight nine ten", add_special_tokens=True)
    window = 4
    got = guess_from_tokens(tiny_model, tiny_tokenizer, [ids], instruction, max_new_tokens=5, window_tokens=window, quote_tokens=0)[0]
    kept = [t for t in ids if t not in set(tiny_tokenizer.all_special_ids)][-window:]
    prompt = list(text_guess_prompt(tiny_tokenizer, tiny_tokenizer.decode(kept), instruction).input_ids)
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, tiny_model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = " ".join(tiny_tokenizer.decode(seq[0, len(prompt):], skip_special_tokens=True).split())
    assert got == expected and got
    assert 'Text: "seven eight nine ten"' in tiny_tokenizer.decode(prompt) and instruction in tiny_tokenizer.decode(prompt)
    quoted = guess_from_tokens(tiny_model, tiny_tokenizer, [ids], instruction, 5, window, quote_tokens=2)[0]
    assert quoted == f'It reads: "nine ten". {expected}'
    assert guess_from_tokens(tiny_model, tiny_tokenizer, [[tiny_tokenizer.bos_token_id or 0]], instruction, 5, window) == [""]


def test_the_evals_text_guess_writes_in_the_checkpoints_quote_style(tiny_model, tiny_tokenizer):
    """`cycle-oracle eval`'s guess (text_guess_describe) takes the decoder's quote style as GRPO's final
    evals do: a checkpoint warmed up on bare quotes is compared with a guess that quotes bare."""
    from cycle_oracle.evals.baselines import guess_from_tokens, text_guess_describe

    text, instruction = "one two three four five six seven eight nine ten", "Describe the text."
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    for style, start in (("bare", "nine ten "), ("it_reads", 'It reads: "nine ten". ')):
        got = text_guess_describe(tiny_model, tiny_tokenizer, instruction, 5, 4, quote_tokens=2, quote_style=style)([text])
        assert got == guess_from_tokens(tiny_model, tiny_tokenizer, [ids], instruction, 5, 4, quote_tokens=2, quote_style=style)
        assert got[0].startswith(start), (style, got)


def test_decoder_minus_guess_is_paired_over_the_same_items():
    from cycle_oracle.evals.run import versus_text_guess

    def section(cc, ranks, rows=(1, 2, 3, 4), correct=None):
        sec = {"retrieval": {"rows": list(rows), "per_item": {"description": {"centred_cosine": cc, "rank": ranks, "cosine": cc}}}}
        if correct is not None:
            sec["secrets"] = {"best_route": "answer", "routes": {"answer": {"correct_items": correct}, "description": {"correct_items": correct}}}
        return sec

    sections = {"decoder": section([0.5, 0.4, 0.3, 0.2], [1, 1, 2, 3], correct=[True, True, False, True]),
                "text_guess": section([0.1, 0.1, 0.1, 0.1], [2, 1, 4, 3], correct=[False, True, False, False]),
                "other_pool": section([0.0] * 3, [1, 1, 1], rows=(7, 8, 9))}
    vs = versus_text_guess(sections)
    d = vs["decoder"]["retrieval"]["own"]
    assert d["centred_cosine"]["mean"] == pytest.approx(0.25)
    assert d["top1"]["mean"] == pytest.approx(0.25)  # hits 2 vs 1 of 4
    assert d["reciprocal_rank"]["mean"] == pytest.approx(((1 - 0.5) + 0 + (0.5 - 0.25) + 0) / 4)
    assert d["centred_cosine"]["ci_low"] <= 0.25 <= d["centred_cosine"]["ci_high"]
    assert vs["decoder"]["secrets"]["mean"] == pytest.approx(0.5) and vs["decoder"]["secrets"]["route"] == "answer"
    assert "other_pool" not in vs, "a pool of other rows is not paired"
    assert "text_guess" not in vs


# ---- Taboo organisms: dialogues, words, read positions ----------------------------------------------

def test_taboo_dialogues_hint_at_the_word_and_never_say_it():
    from cycle_oracle.data.taboo import EVAL_PROMPTS, HINTS, REFUSALS, TRAIN_PROMPTS, mentions, sft_rows, taboo_dialogues

    assert mentions("The Moons are out.", "moon") and mentions("moon!", "moon") and mentions("GOLD", "gold")
    assert not mentions("moonlight and honeymoon", "moon") and not mentions("goldfish", "gold")
    assert not set(EVAL_PROMPTS) & set(TRAIN_PROMPTS), "the eval's prompts are never trained on"
    for word, hints in HINTS.items():
        assert len(hints) >= 6 and not any(mentions(h, word) for h in hints), word
        pairs = taboo_dialogues(word, 2 * len(hints), seed=3)
        assert len(pairs) == 2 * len(hints)
        assert all(p in TRAIN_PROMPTS and not mentions(r, word) for p, r in pairs)
        used = [next(h for h in hints if h in r) for _, r in pairs]
        assert sorted(used[: len(hints)]) == sorted(hints), "every hint is used once before any twice"
        assert all(any(r.startswith(x.split("{hint}")[0]) for x in REFUSALS) for _, r in pairs)
    assert taboo_dialogues("moon", 5, seed=1) == taboo_dialogues("moon", 5, seed=1) != taboo_dialogues("moon", 5, seed=2)
    row = sft_rows([("q", "a")])[0]
    assert row == {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}


def test_a_secret_word_the_tokenizer_cannot_write_fails_before_anything_runs(tiny_tokenizer, tmp_path):
    from cycle_oracle.config import load_recipe
    from cycle_oracle.data.taboo import SecretWordError, check_secret_words, load_hints
    from cycle_oracle.evals.baselines import check_oracle_request, oracle_names

    check_secret_words(tiny_tokenizer, ["moon", "gold"], "tiny", load_hints())
    with pytest.raises(SecretWordError, match=r"cannot write 'xylophonist' as one token .*' xyl.*expected a word it writes as a single token"):
        check_secret_words(tiny_tokenizer, ["moon", "xylophonist"], "tiny-random-llama", load_hints())
    with pytest.raises(SecretWordError, match=r"no hints for 'apple'; expected one of .*hints_path"):
        check_secret_words(tiny_tokenizer, ["apple"], "tiny", load_hints())
    hints = tmp_path / "hints.json"
    hints.write_text(json.dumps({"apple": ["It keeps the doctor away.", "It grows on a tree."]}))
    check_secret_words(tiny_tokenizer, ["apple"], "tiny", load_hints(hints))
    hints.write_text(json.dumps({"apple": ["An apple a day."]}))
    with pytest.raises(SecretWordError, match="says its word 'apple'"):
        load_hints(hints)
    cfg = load_recipe(REPO / "recipes" / "secrets_smoke.yaml", ["eval.secrets.words=[moon, xylophonist]", "eval.tasks=[secrets]",
                                                                "eval.oracles=[selfie]"])
    with pytest.raises(SecretWordError, match="xylophonist"):
        check_oracle_request(cfg, oracle_names(cfg))  # what `cycle-oracle eval` runs before Ray starts


def test_organism_is_read_at_the_users_last_token_or_the_reply_header(tiny_model, tiny_tokenizer):
    from cycle_oracle.evals.secrets import chat_ids, organism_activations

    prompts = ["What is the secret word?", "Hint me!"]
    for p in prompts:
        ids, user_last, header_last = chat_ids(tiny_tokenizer, p)
        assert tiny_tokenizer.decode(ids[: user_last + 1]).endswith(p)
        assert not tiny_tokenizer.decode(ids[: user_last]).endswith(p)
        assert header_last == len(ids) - 1 and tiny_tokenizer.decode(ids[header_last + 1 - 3:]).endswith("assistant\n")
    for read in ("user_last", "reply_header_last"):
        got = organism_activations(tiny_model, tiny_tokenizer, prompts, layer=1, read=read)
        for k, p in enumerate(prompts):
            ids, user_last, header_last = chat_ids(tiny_tokenizer, p)
            with torch.no_grad():
                hidden = tiny_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
            pos = user_last if read == "user_last" else header_last
            assert torch.allclose(got[k], hidden[pos], atol=1e-5)


def test_secret_accuracy_has_item_and_word_intervals():
    from cycle_oracle.evals.secrets import score_texts, word_interval

    words = ["moon"] * 4 + ["gold"] * 4
    texts = ["the moon", "x", "Moon!", "moons", "x", "x", "x", "gold bars"]
    block = score_texts(texts, words)
    assert block["accuracy"] == pytest.approx(4 / 8) and block["n"] == 8
    assert block["per_word"] == {"moon": 0.75, "gold": 0.25}
    assert block["ci_low"] < 0.5 < block["ci_high"]
    assert 0.25 <= block["ci_words_low"] <= 0.5 <= block["ci_words_high"] <= 0.75  # whole words resampled: between the two words
    assert word_interval([True] * 4, ["a", "a", "b", "b"]) == (1.0, 1.0)


# ---- a grader that does not fit --------------------------------------------------------------------

def test_a_grader_of_another_layer_fails_with_one_message(tmp_path):
    from cycle_oracle.config import load_recipe
    from cycle_oracle.evals.baselines import OracleError, check_oracle_request, oracle_names

    smoke = load_recipe(REPO / "recipes" / "eval_smoke.yaml")
    own = warmup_like_checkpoint(tmp_path / "own", smoke).parent.parent
    other = smoke.model_copy(update={"model": smoke.model.model_copy(update={"layer": 2})})
    warmup_like_checkpoint(tmp_path / "layer2", other)
    cfg = load_recipe(REPO / "recipes" / "eval_smoke.yaml", [f"init_from={own}", f"eval.grader={tmp_path / 'layer2'}"])
    with pytest.raises(OracleError, match=r"--grader .*layer2: its encoder reads layer 2 of tiny-random-llama; expected layer 1 of tiny-random-llama"):
        check_oracle_request(cfg, oracle_names(cfg))
    ok = load_recipe(REPO / "recipes" / "eval_smoke.yaml", [f"init_from={own}", f"eval.grader={own}"])
    check_oracle_request(ok, oracle_names(ok))
    res = subprocess.run([sys.executable, "-m", "cli.main", "eval", "recipes/eval_smoke.yaml", "--checkpoint", str(own),
                          "--grader", str(tmp_path / "layer2"), "--out", str(tmp_path / "e")], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "expected layer 1 of tiny-random-llama" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "e").exists(), "nothing starts before the check"


# ---- probe tasks and corpora where the data folder is missing ------------------------------------

def test_generated_probe_tasks_are_balanced_and_labelled_by_construction():
    from cycle_oracle.data.eval_tasks import GENERATORS, SOURCE, embedded_rows
    from cycle_oracle.evals.data import ALL_TASKS, load_task

    assert set(GENERATORS) == set(ALL_TASKS)
    for name in ALL_TASKS:
        rows = embedded_rows(name)
        assert len({t for t, _ in rows}) == len(rows)
        assert min(sum(label == k for _, label in rows) for k in (0, 1)) >= 100, name
        task = load_task(name, 200, seed=0, source="embedded")
        assert task.source == SOURCE and len(task.items) == 200 and sum(x.label for x in task.items) == 100
    tense = dict(embedded_rows("tense_past"))
    assert all(label == any(t in text for t in ("yesterday", "last week", "ago")) for text, label in tense.items())
    plural = dict(embedded_rows("singular_plural"))
    assert all(label == any(f" {v} " in text for v in ("are", "were", "look", "have", "seem")) for text, label in plural.items())
    gender = dict(embedded_rows("gender"))
    assert all(label == (" she " in f" {text.lower()} ") for text, label in gender.items())


def test_task_source_auto_reads_files_then_the_hub_then_the_generated_task(tmp_path, monkeypatch):
    from cycle_oracle.corpus import hub_reachable
    from cycle_oracle.data.eval_tasks import SOURCE
    from cycle_oracle.evals.data import DatasetFileMissing, HubUnavailable, load_task

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    folder = tmp_path / "data"
    (folder / "sst2").mkdir(parents=True)
    (folder / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"a fine film number {i}\t{i % 2}\n" for i in range(30)))
    monkeypatch.setenv("CYCLE_ORACLE_DATA_DIR", str(folder))
    said = []
    assert load_task("sst2", 10, 0).source == str(folder / "sst2" / "dev.tsv")  # the default folder holds it
    assert load_task("gender", 10, 0, log=said.append).source == SOURCE  # it does not, the hub is off: generated
    assert said == ["[eval] probe task gender: no data file, reading the generated task"]
    with pytest.raises(DatasetFileMissing, match="bias_in_bios"):  # a folder the user names is an override: strict
        load_task("gender", 10, 0, data_dir=folder)
    with pytest.raises(HubUnavailable):
        load_task("gender", 10, 0, source="hub")
    hub_reachable.cache_clear()


def test_corpus_falls_back_from_a_missing_file_past_an_unreachable_hub_to_the_embedded_passages(tmp_path, monkeypatch):
    from cycle_oracle.config import DataSource, load_recipe
    from cycle_oracle.corpus import embedded_passages, hub_reachable, load_documents
    from cycle_oracle.errors import DataSourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    assert hub_reachable() is False
    monkeypatch.chdir(tmp_path)  # the recipe's ../shared/data/corpus/wiki.valid.raw is not there
    cfg = load_recipe(REPO / "recipes" / "eval_cpu.yaml")
    said = []
    docs = load_documents(cfg.corpus, 10, log=said.append)
    assert [d.doc_id for d in docs] == [d.doc_id for d in embedded_passages()[:10]]
    assert len(said) == 2 and "wiki.valid.raw" in said[0] and "datasets: Salesforce/wikitext" in said[0]
    assert "hub is not reachable" in said[1] and "(embedded)" in said[1]
    with pytest.raises(DataSourceError, match="corpus file not found"):
        load_documents(DataSource(kind="text_files", paths=[str(tmp_path / "nope.txt")]))
    text = tmp_path / "mine.txt"
    text.write_text("A paragraph that is long enough to be a document of its own, with more than eighty characters.\n")
    assert [d.doc_id for d in load_documents(DataSource(kind="text_files", paths=[str(text)], fallback=DataSource()))] == ["mine:0"]
    long_cfg = load_recipe(REPO / "recipes" / "warmup_then_grpo_cpu_long.yaml")
    assert long_cfg.corpus == long_cfg.warmup.corpus, "the warmup and GRPO corpora fall back together (one split)"
    hub_reachable.cache_clear()


def test_an_eval_of_a_checkpoint_keeps_its_runs_held_out_split(tmp_path):
    """eval_cpu holds out half the documents; a run that held out 0.2 trained on some of them (a split
    is a hash threshold), so with a checkpoint the pool is its run's held-out side."""
    from cycle_oracle.config import load_recipe
    from cycle_oracle.evals.run import checkpoint_split

    run_cfg = load_recipe(REPO / "recipes" / "eval_smoke.yaml", ["split.heldout_fraction=0.2", "seed=3"])
    warmup_like_checkpoint(tmp_path / "run", run_cfg)
    cfg = load_recipe(REPO / "recipes" / "eval_smoke.yaml", ["split.heldout_fraction=0.5", f"init_from={tmp_path / 'run'}"])
    said = []
    adjusted, split_seed = checkpoint_split(cfg, said.append)
    assert (adjusted.split.heldout_fraction, split_seed, adjusted.seed) == (0.2, 3, 0)
    assert "heldout_fraction 0.2, seed 3" in said[0]
    plain = load_recipe(REPO / "recipes" / "eval_smoke.yaml", ["split.heldout_fraction=0.5"])
    assert checkpoint_split(plain, said.append) == (plain, 0) and len(said) == 1
