"""Evals: hand-checked maths and text controls, the warmup's held-out eval against fake scorers, data
loaders on the shared data, the HF oracle against independent code paths, and one small end-to-end
`run_evals` on the tiny random Llama."""

import json
import math

import pytest
import torch

from cycle_oracle.evals.arithmetic import Problem, first_digit_match, make_problems, numbers_in, states_answer
from cycle_oracle.evals.controls import copy_rate, derangement, mean_copy_rate, shuffled_gap, text_controls
from cycle_oracle.evals.probes import accuracy_block, best_threshold, wilson_interval
from cycle_oracle.evals.retrieval import chance_metrics, ranking_metrics, similarity_matrix, true_ranks
from cycle_oracle.stats import distinct_n, paired_difference, same_start_share, text_diversity, words



pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---- retrieval maths ----------------------------------------------------------------------

def test_ranks_topk_mrr_on_a_crafted_similarity_matrix():
    # row 0: true (0.9) is the best -> rank 1; row 1: two others beat 0.5 -> rank 3;
    # row 2: one other beats it -> rank 2; row 3: a tie with the true value counts against it -> rank 2.
    sim = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],
        [0.6, 0.5, 0.7, 0.1],
        [0.0, 0.8, 0.4, 0.3],
        [0.2, 0.3, 0.7, 0.7],
    ])
    ranks = true_ranks(sim)
    assert ranks.tolist() == [1, 3, 2, 2]
    m = ranking_metrics(ranks, ks=(1, 2))
    assert m["top1"] == pytest.approx(0.25)
    assert m["top2"] == pytest.approx(0.75)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    assert m["median_rank"] == 2.0
    # all equal similarities (a constant or zero reconstruction): every row ranks last
    assert true_ranks(torch.zeros(5, 5)).tolist() == [5] * 5


def test_similarity_matrix_and_chance():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(similarity_matrix(q, k), torch.tensor([[1.0, s, 0.0], [0.0, s, -1.0]]))
    c = chance_metrics(4)
    assert c["top1"] == 0.25 and c["top5"] == 1.0
    assert c["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_derangement_has_no_fixed_point_and_is_a_permutation():
    for n in (2, 3, 10, 57):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n))
        assert (p != torch.arange(n)).all()


# ---- probes maths -------------------------------------------------------------------------

def test_wilson_interval_known_values():
    # 8/10 at 95%: the textbook Wilson interval is (0.4902, 0.9433)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # 0/10: lower bound 0, upper z^2/(n+z^2) = 3.8415/13.8415
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / 13.841459, abs=1e-5)
    blk = accuracy_block([1, 0, 1, 1], [1, 1, 1, 0])
    assert blk["accuracy"] == 0.5 and blk["correct"] == 2 and blk["n"] == 4
    # the interval holds p for every n, also at p = 0 and 1 where float rounding put 0/7's bound at 2.8e-17
    assert all(wilson_interval(k, n)[0] <= k / n <= wilson_interval(k, n)[1] for n in range(1, 300) for k in (0, n // 3, n))


def test_best_threshold_separates_when_possible():
    t = best_threshold([-2.0, -1.0, 0.5, 3.0], [0, 0, 1, 1])
    assert -1.0 < t < 0.5
    # scores anti-correlated with labels: the best single threshold predicts all 0 or all 1 (acc 0.5)
    t = best_threshold([1.0, 2.0], [1, 0])
    acc = ((torch.tensor([1.0, 2.0]) > t).int() == torch.tensor([1, 0])).float().mean()
    assert acc == 0.5


# ---- controls (hand-made text examples) -----------------------------------------------------

def test_copy_rate_by_hand():
    source = "The cat sat on the mat."
    # description bigrams: (the cat) (cat sat) (sat quietly) -> 2 of 3 in the source
    assert copy_rate("The cat sat quietly", source, n=2) == pytest.approx(2 / 3)
    # unigrams: the, cat, sat, quietly -> 3 of 4
    assert copy_rate("The cat sat quietly", source, n=1) == pytest.approx(3 / 4)
    assert copy_rate("A dog barked loudly", source, n=2) == 0.0
    assert copy_rate("cat", source, n=2) is None  # fewer than n words
    assert copy_rate("On the MAT, the cat!", source, n=2) == pytest.approx(3 / 4)  # case/punctuation ignored
    assert mean_copy_rate(["The cat sat quietly", "x", "a dog barked loudly"], [source] * 3, n=2) == pytest.approx((2 / 3 + 0) / 2)


def test_distinct_n_and_same_start_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(["a"], 2) is None
    descs = ["The expression is about math.", "The expression is about sums", "A story about a dog", "the EXPRESSION, is about x"]
    assert same_start_share(descs, k=4) == pytest.approx(3 / 4)
    assert same_start_share(descs, k=1) == pytest.approx(3 / 4)
    assert same_start_share(["a b", "c d"], k=4) == 0.5
    assert words("Hello, wörld! 42") == ["hello", "wörld", "42"]
    # GRPO's per-step diversity metrics are the evals' text controls (undefined ones left out)
    controls = text_controls(descs)
    assert text_diversity(descs) == {k: controls[k] for k in ("distinct_1", "distinct_2", "same_start_share")}
    assert text_diversity(["a"]) == {"distinct_1": 1.0, "same_start_share": 1.0} and text_diversity([]) == {}


def test_paired_difference_interval_covers_the_shift_and_excludes_zero():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(400, generator=g)
    a = b + 0.05 + 0.02 * torch.randn(400, generator=g)
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(float((a - b).mean()))
    assert d["ci_low"] < 0.05 < d["ci_high"] and d["ci_low"] > 0
    assert d["share_a_better"] > 0.9 and d["n"] == 400
    same = paired_difference(b, b.flip(0))  # no systematic difference: the interval holds 0
    assert same["ci_low"] < 0 < same["ci_high"]
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(a, b[:10])


def test_shuffled_gap():
    assert shuffled_gap(torch.tensor([0.9, 0.7]), torch.tensor([0.5, 0.5])) == pytest.approx(0.3)


# ---- the warmup's held-out eval, against a fake scorer ----------------------------------------

def _source_scorer(calls: list):
    """A deterministic stand-in for the learner's `answer_scores`: the answer "answer b" of source b
    is cheap (NLL 0.5) when the activation comes from a context of source b (first token 100 + b),
    dear (1.5) otherwise or with a zero activation (2.0). Question "Q2?" ignores the activation:
    its NLL depends on the answer alone."""

    def score_answers(examples, vector_override=None):
        calls.append((len(examples), vector_override))
        nll = []
        for ex in examples:
            answer_source = int(ex.answer.split()[-1])
            if ex.question == "Q2?":
                nll.append(1.0 + 0.1 * answer_source)
            elif vector_override == "zero":
                nll.append(2.0)
            else:
                nll.append(0.5 if ex.context_ids[0] == 100 + answer_source else 1.5)
        return {"nll": nll, "token_accuracy": [float(v == 0.5) for v in nll]}

    return score_answers


def test_warmup_heldout_eval_measures_what_the_activation_buys():
    from cycle_oracle.config import RecipeConfig
    from cycle_oracle.data.items import WarmupItem
    from cycle_oracle.evals.warmup import heldout_eval

    def item(task, b, j, question):
        return WarmupItem(task, f"b{b}", (100 + b, j, 7, 8, 9), (2, 3, 4), question, f"answer {b}")

    heldout = {
        "token_prediction": [item("token_prediction", b, j, "What comes next?") for b in range(5) for j in range(4)],
        "latentqa": [item("latentqa", b, j, q) for b in range(5) for q in ("Q1?", "Q2?") for j in range(3)],
        "description": [],
    }
    cfg = RecipeConfig(kind="warmup", injection={"num_placeholders": 2}, warmup={"eval_items": 10})
    calls = []
    out = heldout_eval(_source_scorer(calls), heldout, cfg, seed=0)
    assert set(out) == {"token_prediction", "latentqa"}  # a task without items is left out
    assert max(n for n, _ in calls) <= 8 and {mode for _, mode in calls} == {None, "zero"}

    tp = out["token_prediction"]
    assert tp["items"] == 10 and tp["sources"] == 5
    assert (tp["nll_real"], tp["nll_shuffled"], tp["nll_zero"]) == pytest.approx((0.5, 1.5, 2.0))
    assert tp["token_accuracy_real"] == 1.0 and tp["token_accuracy_shuffled"] == 0.0
    assert tp["nll_gap_shuffled_minus_real"] == pytest.approx(1.0) and tp["nll_gap_ci_low"] > 0

    lqa = out["latentqa"]
    by_q = lqa["nll_gap_by_question"]
    assert sum(row["items"] for row in by_q.values()) == lqa["items"] == 10
    assert by_q["Q1?"]["nll_gap_shuffled_minus_real"] == pytest.approx(1.0)
    assert by_q["Q2?"]["nll_gap_shuffled_minus_real"] == 0.0  # the activation does not inform Q2
    assert lqa["nll_gap_shuffled_minus_real"] == pytest.approx(by_q["Q1?"]["items"] / 10)
    # ranking among all five behaviours' answers: Q1 always right with the real activation, always
    # wrong with another behaviour's; Q2 ranks the same either way
    rank = lqa["ranking_by_question"]
    assert lqa["ranking_items"] == 10 and lqa["ranking_candidates"] == 5
    assert (rank["Q1?"]["top1_real"], rank["Q1?"]["top1_shuffled"]) == (1.0, 0.0)
    assert rank["Q2?"]["top1_real"] == rank["Q2?"]["top1_shuffled"]
    assert lqa["ranking_top1_real"] > lqa["ranking_top1_shuffled"]

    # a scorer that ignores the activation shows no gap at all
    blind = heldout_eval(lambda examples, mode=None: {"nll": [1.0] * len(examples), "token_accuracy": [0.0] * len(examples)},
                         heldout, cfg, seed=0)
    assert blind["token_prediction"]["nll_gap_shuffled_minus_real"] == 0.0
    assert blind["token_prediction"]["nll_zero"] == blind["token_prediction"]["nll_real"]


# ---- arithmetic parsing ---------------------------------------------------------------------

def test_arithmetic_number_matching_by_hand():
    p = Problem(12, "+", 35, 47)
    assert numbers_in("it is 1,234 or 47.") == ["1234", "47"]
    assert states_answer("12 + 35 makes 47", p)
    assert not states_answer("12 + 35 makes 470", p)  # 47 inside 470 is not the number 47
    assert not states_answer("the sum of 12 and 35", p)
    assert first_digit_match("12 + 35 is about 40", p)  # operands skipped; 40 starts with 4
    assert not first_digit_match("12 + 35 is 50 or 47", p)  # the first stated non-operand number counts
    assert not first_digit_match("12 plus 35", p)


def test_make_problems_lengths_and_no_trivial_answers():
    probs = make_problems(10, seed=3)
    assert len(probs) == 30
    for p in probs:
        assert p.answer == eval(f"{p.a} {p.op} {p.b}") and p.answer >= 0
        assert p.answer not in (p.a, p.b)
        assert p.prompt.endswith("= ")
    assert sorted({p.digits for p in probs}) == [1, 2, 3]
    assert make_problems(10, seed=3) == probs


# ---- data -----------------------------------------------------------------------------------

def test_every_task_loads_balanced_and_splits_by_item(shared_data):
    from cycle_oracle.evals.data import ALL_TASKS, load_task, split_items

    assert len(ALL_TASKS) == 6
    for name in ALL_TASKS:
        task = load_task(name, n_items=40, seed=1, data_dir=shared_data)
        labels = [x.label for x in task.items]
        assert len(labels) == 40 and sum(labels) == 20, name
        assert len({x.text for x in task.items}) == 40  # deduplicated
        assert all(x.text.strip() for x in task.items)
        train, test = split_items(task.items, 0.5, seed=1)
        assert not {x.doc_id for x in train} & {x.doc_id for x in test}
        assert sum(x.label for x in test) == 10
        again = load_task(name, n_items=40, seed=1, data_dir=shared_data)
        assert again.items == task.items


def test_labels_follow_the_files(shared_data):
    from cycle_oracle.evals.data import load_task

    # spot checks against the raw files' conventions (positive = the question's "Yes")
    lang = load_task("language_english", 60, 0, shared_data)
    english = [x.text for x in lang.items if x.label == 1]
    rows = [json.loads(line) for line in (shared_data / "language_id/tatoeba_langid.jsonl").read_text().splitlines()]
    eng = {r["text"].strip() for r in rows if r["lang"] == "eng"}
    assert all(t in eng for t in english)
    sports = load_task("ag_news_sports", 40, 0, shared_data)
    assert all("\\" not in x.text for x in sports.items)


def test_missing_data_file_error_names_file_and_fix(tmp_path):
    from cycle_oracle.evals.data import DatasetFileMissing, load_task

    with pytest.raises(DatasetFileMissing, match=r"sst2/dev.tsv.*eval.data_dir.*--data-dir"):
        load_task("sst2", 20, 0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown eval task"):
        load_task("nope", 20, 0, data_dir=tmp_path)


def test_hub_path_fails_offline_with_a_clear_error(monkeypatch):
    from cycle_oracle.evals.data import HubUnavailable, load_task

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="hub.*network access.*--data-dir"):
        load_task("sst2", 20, 0, hub=True)
    with pytest.raises(HubUnavailable, match="no Hugging Face"):
        load_task("tense_past", 20, 0, hub=True)


# ---- the HF oracle against independent paths ------------------------------------------------

@pytest.fixture()
def tiny_oracle(tiny_model, tiny_path, tiny_tokenizer):
    from cycle_oracle.config import LoraSettings
    from cycle_oracle.encoder import ActivationEncoder
    from cycle_oracle.evals.oracle import make_hf_oracle
    from cycle_oracle.models import load_causal_lm

    encoder = ActivationEncoder(load_causal_lm(tiny_path), 1, LoraSettings(r=4, alpha=8))
    # this instruction makes the random tiny model write words rather than whitespace (empty after strip)
    oracle = make_hf_oracle(tiny_model, encoder, tiny_model, tiny_tokenizer, 1, 3.0, "replace", "What is this about?", 6,
                            "Description: ", batch_size=4, min_new_tokens=3)
    return oracle, encoder


def test_read_matches_extraction(tiny_oracle, tiny_model, tiny_tokenizer):
    from cycle_oracle.activations import extract
    from cycle_oracle.corpus import Document

    oracle, _ = tiny_oracle
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and", "Hi there"]
    batches = list(extract(tiny_model, tiny_tokenizer, [Document(f"d{i}", t) for i, t in enumerate(texts)], 1, "all", batch_size=1, progress=False))
    per_doc = {}
    for acts, recs, _ in batches:
        for a, r in zip(acts, recs):
            per_doc.setdefault(r["doc_id"], []).append(a)
    last = oracle.read(texts, "last")
    mean = oracle.read(texts, "mean")
    for i in range(len(texts)):
        rows = torch.stack(per_doc[f"d{i}"])
        torch.testing.assert_close(last[i], rows[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mean[i], rows.mean(0), atol=1e-4, rtol=1e-4)


def test_ask_yes_no_matches_teacher_forced_logits(tiny_oracle, tiny_model, tiny_tokenizer):
    from cycle_oracle.decoder import build_batch, completion_logits
    from cycle_oracle.injection import build_decoder_prompt

    oracle, _ = tiny_oracle
    v = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    question = "Is this about sports?"
    scores = oracle.ask_yes_no(v, question)
    # independent path: teacher-force the one-token completion "Yes" and read the logits that predict it
    prompt = build_decoder_prompt(tiny_tokenizer, 1, question + oracle.info["yes_no_suffix"])
    ids = {w: tiny_tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", " Yes", "No", " No")}
    batch = build_batch([prompt] * 3, [[ids["Yes"]]] * 3, tiny_tokenizer.pad_token_id)
    logits = completion_logits(tiny_model, batch, v, 3.0, "replace")
    expected = torch.logsumexp(logits[:, [ids["Yes"], ids[" Yes"]]], -1) - torch.logsumexp(logits[:, [ids["No"], ids[" No"]]], -1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores, scores[0].expand(3))  # the injected activation matters


def test_judge_matches_unpadded_full_forward(tiny_oracle, tiny_model, tiny_tokenizer):
    oracle, _ = tiny_oracle
    texts = ["A short one.", "A much longer description of a text about sports, football and a match in the rain."]
    scores = oracle.judge_yes_no(texts, "Is it about sports?")  # batched with right padding
    ids = {w: tiny_tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", " Yes", "No", " No")}
    for text, score in zip(texts, scores):
        message = f"Here is a description of a piece of text:\n\n{text}\n\nIs it about sports?" + oracle.info["yes_no_suffix"]
        chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([tiny_tokenizer.encode(chat, add_special_tokens=False)])).logits[0, -1]
        expected = torch.logsumexp(logits[[ids["Yes"], ids[" Yes"]]], -1) - torch.logsumexp(logits[[ids["No"], ids[" No"]]], -1)
        assert float(score) == pytest.approx(float(expected), abs=1e-4)


def test_describe_is_deterministic_and_encode_matches_encoder(tiny_oracle, tiny_tokenizer):
    from cycle_oracle.encoder import encoder_inputs

    oracle, encoder = tiny_oracle
    v = 5 * torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    d1, d2 = oracle.describe(v), oracle.describe(v)
    assert d1 == d2 and len(d1) == 5 and all(d.strip() for d in d1)
    v_hat, pooling = oracle.encode_with_weights(d1 + [""])
    ids, attn, pool = encoder_inputs(tiny_tokenizer, d1, "Description: ")
    ref, w = encoder(ids, attn, pool)
    torch.testing.assert_close(v_hat[:5], ref, atol=1e-4, rtol=1e-4)
    assert (v_hat[5] == 0).all() and pooling[5] == []  # an empty description reconstructs to 0
    assert len(pooling[0]) == int(pool[0].sum()) and sum(x for _, x in pooling[0]) == pytest.approx(1.0, abs=1e-5)


# ---- end to end -----------------------------------------------------------------------------

def test_run_evals_end_to_end_on_the_tiny_model(tmp_path, tiny_oracle, tiny_model, tiny_tokenizer, shared_data):
    from cycle_oracle.activations import extract, write_store
    from cycle_oracle.corpus import Document
    from cycle_oracle.evals.run import run_evals

    from cycle_oracle.evals.oracle import make_hf_oracle

    _, encoder = tiny_oracle
    oracle = make_hf_oracle(tiny_model, encoder, tiny_model, tiny_tokenizer, 1, 3.0, "replace", "What is this about?", 4,
                            "Description: ", batch_size=16, min_new_tokens=3)
    docs = [Document(f"doc{i}", f"Note {i}: the {w} market opened at {10 + i} and closed higher on day {i}.")
            for i, w in enumerate(["fish", "stock", "flower", "car", "book", "grain", "coffee", "gold"] * 2)]
    store = write_store(tmp_path / "store", extract(tiny_model, tiny_tokenizer, docs, 1, progress=False), "tiny-random-llama", 1)
    out = tmp_path / "eval"
    res = run_evals(oracle, store, ["retrieval", "probes", "arithmetic"], out, pool_size=16, heldout_fraction=None,
                    probe_tasks=["sst2", "language_english"], probe_items_per_task=12, arithmetic_per_digits=3,
                    data_dir=shared_data, judge=True, log=None)
    for name in ("results.json", "report.md", "retrieval_ranks.png", "cosine_distributions.png", "probe_accuracy.png", "arithmetic.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema_version"] == 1 and saved["kind"] == "eval"
    assert set(saved) >= {"created", "evals", "oracle", "store", "settings", "timings", "summary", "plots", "retrieval", "probes", "arithmetic"}
    r = saved["retrieval"]
    assert r["n"] == 16 and r["pool"]["documents"] == 16  # one row per document
    assert set(r["conditions"]) == {"description", "mean_floor", "shuffled", "zero", "context_only"}
    for cond in r["conditions"].values():
        assert 0 <= cond["top1"] <= cond["top5"] <= 1 and 1 / 16 <= cond["mrr"] <= 1
        assert -1 <= cond["cosine"] <= 1 and cond["fve"] <= 1
    assert r["chance"]["top1"] == pytest.approx(1 / 16)
    assert len(r["items"]) == 16 and all(it["description"].strip() for it in r["items"])
    assert all(1 <= rank <= 16 for rank in r["per_item"]["description"]["rank"])
    assert 0 <= r["text_controls"]["copy_rate"]["2"] <= 1
    for name in ("sst2", "language_english"):
        t = saved["probes"]["tasks"][name]
        assert t["n_train"] + t["n_test"] == 12
        for pos in ("last", "mean"):
            for route in ("probe", "decoder", "reconstruction", "oracle", "oracle_raw", "judge"):
                blk = t["positions"][pos][route]
                assert 0 <= blk["ci_low"] <= blk["accuracy"] <= blk["ci_high"] <= 1 and blk["n"] == 6
    a = saved["arithmetic"]
    assert a["n"] == 9 and set(a["by_digits"]) == {"1", "2", "3"}
    for k, v in saved["summary"].items():
        if k.endswith(("cosine", "_gap")):
            assert -1 <= v <= 1, k
        elif k.endswith("fve"):
            assert v <= 1, k
        elif not k.endswith("/n"):
            assert 0 <= v <= 1, k  # accuracies, top-k, MRR, rates, shares
    md = (out / "report.md").read_text()
    assert "## Retrieval" in md and "## Probes" in md and "## Arithmetic" in md


def test_run_evals_fails_fast_on_missing_data(tmp_path, tiny_oracle):
    from cycle_oracle.evals.data import DatasetFileMissing
    from cycle_oracle.evals.run import run_evals

    oracle, _ = tiny_oracle
    with pytest.raises(DatasetFileMissing, match="tense_processed.json"):
        run_evals(oracle, None, ["probes"], tmp_path / "e", probe_tasks=["tense_past"], data_dir=tmp_path, log=None)
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="unknown eval"):
        run_evals(oracle, None, ["bogus"], tmp_path / "e", log=None)
