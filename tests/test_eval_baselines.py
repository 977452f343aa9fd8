"""Training-free baselines as oracles, the paraphrase test and user-defined probe files: each
baseline's descriptions against an independent computation, every oracle through retrieval,
probes, controls and arithmetic on the tiny random Llama (the CI smoke eval, in-process), the
paraphrase conditions with their drops, probe files good and bad, and the CLI's oracle names."""

import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from fake_checkpoints import warmup_like_checkpoint

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- fixtures: a warmup-like checkpoint and the smoke recipe's store ----------------------------

def _smoke(overrides=()):
    from cycle_oracle.config import load_recipe

    return load_recipe(REPO / "recipes" / "eval_smoke.yaml", list(overrides))


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory):
    """The smoke eval recipe's corpus activations, extracted in-process (the recipe does it in a Ray task)."""
    from cycle_oracle.activations import extract, write_store
    from cycle_oracle.corpus import load_documents
    from cycle_oracle.models import load_causal_lm, load_tokenizer, resolve_model_path

    cfg = _smoke()
    path = resolve_model_path(cfg.model.name)
    docs = load_documents(cfg.corpus, cfg.num_documents)
    batches = extract(load_causal_lm(path), load_tokenizer(path), docs, 1, max_tokens=cfg.model.max_context_tokens, progress=False)
    return write_store(tmp_path_factory.mktemp("store"), batches, cfg.model.name, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("warm")
    warmup_like_checkpoint(run, _smoke())
    return run


def _probe_jsonl(path: Path, n: int = 24) -> Path:
    rows = [{"text": f"Note {i}: the {'cat' if i % 2 else 'dog'} sat by door {i}.", "label": i % 2} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- every oracle through every eval ------------------------------------------------------------

def test_every_baseline_runs_retrieval_probes_controls_and_paraphrase_side_by_side(tmp_path, checkpoint, smoke_store, shared_data):
    """The CI smoke eval (recipes/eval_smoke.yaml: the checkpoint and all four baselines) with a
    user-defined probe file, in-process: one report, every oracle on the same pool and items."""
    from cycle_oracle.evals.baselines import ORACLES
    from cycle_oracle.evals.run import run_evals_from_recipe
    from cycle_oracle.metrics import unknown_metrics

    probe_file = _probe_jsonl(tmp_path / "cats.jsonl")
    cfg = _smoke([f"init_from={checkpoint}", f"eval.data_dir={shared_data}", "eval.probe_positions=[last]", "eval.probe_tasks=[sst2]",
                  f"eval.probe_files=[{{path: {probe_file}, question: 'Is it about a cat?'}}]", "eval.paraphrase_max_new_tokens=4"])
    res = run_evals_from_recipe(cfg, smoke_store, tmp_path / "eval", log=None)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["oracles"] == list(ORACLES) and set(saved["other_oracles"]) == set(ORACLES[1:])
    sections = {"decoder": saved} | saved["other_oracles"]
    pool = saved["retrieval"]["rows"]
    for name, sec in sections.items():
        assert sec["oracle"]["name"] == name and sec["oracle"]["encoder"] == "from checkpoint", name
        r = sec["retrieval"]
        assert r["rows"] == pool, name  # the same pool for every oracle
        controls = {"description", "shuffled", "zero", "context_only", "paraphrased", "word_shuffled", "truncated_2", "quote_banned"}
        assert controls - ({"zero"} if name == "text_guess" else set()) <= set(r["conditions"]), name  # the guess reads text: no zero activation
        assert all(isinstance(it["description"], str) and "paraphrased_description" in it for it in r["items"])
        for cond in ("paraphrased", "word_shuffled"):
            d = r["paraphrase"]["drops"][cond]
            assert d["drop_top1"] == pytest.approx(r["conditions"]["description"]["top1"] - r["conditions"][cond]["top1"])
            assert d["centred_cosine_drop"]["n"] == len(pool)
        assert set(r["text_controls"]) >= {"copy_rate", "distinct_2", "same_start_share"}
        tasks = sec["probes"]["tasks"]
        assert set(tasks) == {"sst2", "cats"} and tasks["cats"]["source"] == str(probe_file)
        for t in tasks.values():
            res_last = t["positions"]["last"]
            assert {"probe", "decoder", "reconstruction"} <= set(res_last), name
            assert ("oracle" in res_last) == (name in ("decoder", "selfie")), name
        assert sec["arithmetic"]["n"] == 12
    for name in ("patchscopes", "logit_lens", "latentlens"):
        assert sections[name]["probes"]["tasks"]["sst2"]["skipped_routes"] == {"oracle": "the oracle cannot answer questions about v"}
    # textual baselines wrote text for every pool item (the tiny untrained decoder may write nothing)
    for name in ("logit_lens", "latentlens"):
        assert all(it["description"].strip() for it in sections[name]["retrieval"]["items"]), name
    assert [row["oracle"] for row in saved["comparison"]] == list(ORACLES)
    assert saved["comparison"][3]["retrieval"]["top1"] == sections["logit_lens"]["retrieval"]["conditions"]["description"]["top1"]
    summary = res["summary"]
    assert "oracles/latentlens/retrieval/top1" in summary and "retrieval/paraphrase_drop_top1" in summary
    assert "oracles/patchscopes/probes/cats/last/decoder" in summary
    assert unknown_metrics("eval", summary) == []  # the recipe logs every summary key
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Oracles side by side" in md and "Paraphrase test" in md
    for name in ORACLES:
        assert f"# Oracle `{name}`" in md


def test_without_a_checkpoint_textual_baselines_need_one_for_retrieval(tmp_path, smoke_store, shared_data):
    """The floor (decoder -> selfie) keeps its fresh identity encoder; logit_lens has none, so
    retrieval is a clear error before anything runs and its probes skip the reconstruction route."""
    from cycle_oracle.evals.baselines import OracleError, build_oracles, check_oracle_request, oracle_names
    from cycle_oracle.evals.run import run_evals_from_recipe

    cfg = _smoke(["eval.oracles=[decoder, logit_lens]"])
    assert oracle_names(cfg) == ["selfie", "logit_lens"]
    with pytest.raises(OracleError, match=r"logit_lens needs a trained encoder.*no --checkpoint.*eval.tasks=\[probes,arithmetic\]"):
        check_oracle_request(cfg, oracle_names(cfg))
    probes_only = _smoke(["eval.oracles=[decoder, logit_lens]", "eval.tasks=[probes]", f"eval.data_dir={shared_data}",
                          "eval.probe_tasks=[sst2]", "eval.probe_positions=[last]"])
    check_oracle_request(probes_only, oracle_names(probes_only))
    oracles = build_oracles(probes_only)
    assert oracles["selfie"].encode is not None and "fresh, identity init" in oracles["selfie"].info["encoder"]
    assert oracles["logit_lens"].encode is None and oracles["logit_lens"].ask_yes_no is None
    res = run_evals_from_recipe(probes_only, None, tmp_path / "eval", log=None)
    sst2 = res["other_oracles"]["logit_lens"]["probes"]["tasks"]["sst2"]
    assert set(sst2["skipped_routes"]) == {"reconstruction", "oracle"} and set(sst2["positions"]["last"]) >= {"probe", "decoder"}
    with pytest.raises(OracleError, match="oracle 'logit_lens' has no encoder"):
        from cycle_oracle.evals.run import run_evals

        run_evals(oracles, smoke_store, ["retrieval"], tmp_path / "e2", pool_size=4, log=None)


# ---- each baseline's descriptions, by an independent path -----------------------------------------

@pytest.fixture(scope="module")
def floor_oracles(smoke_store):
    from cycle_oracle.evals.baselines import build_oracles

    cfg = _smoke(["eval.tasks=[probes]", "eval.logit_lens_top_k=4", "eval.latentlens_top_k=3", "eval.latentlens_context_tokens=4"])
    return cfg, build_oracles(cfg, smoke_store, ["selfie", "patchscopes", "logit_lens", "latentlens"])


def test_logit_lens_is_the_unembedded_final_norm(floor_oracles, tiny_path, tiny_tokenizer):
    from cycle_oracle.models import load_causal_lm

    _, oracles = floor_oracles
    model = load_causal_lm(tiny_path)
    v = 3 * torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(v))
    logits[:, tiny_tokenizer.all_special_ids] = float("-inf")
    expected = [" ".join(w for w in (tiny_tokenizer.decode([i]).strip() for i in row) if w) for row in logits.topk(4, -1).indices.tolist()]
    assert oracles["logit_lens"].describe(v) == expected
    assert oracles["logit_lens"].info["reference"].startswith("nostalgebraist")


def test_latentlens_bank_is_training_documents_and_finds_itself(floor_oracles, smoke_store):
    from cycle_oracle.evals.baselines import ContextBank
    from cycle_oracle.evals.retrieval import select_pool

    cfg, oracles = floor_oracles
    bank = ContextBank.from_store(smoke_store, cfg.split.heldout_fraction, cfg.seed, max_rows=10_000)
    pool = select_pool(smoke_store, 8, cfg.seed, cfg.split.heldout_fraction, cfg.seed)
    group = lambda i: smoke_store.records[i].get("group", smoke_store.records[i]["doc_id"])  # noqa: E731
    assert pool and not {group(i) for i in pool} & {group(i) for i in bank.rows}  # the held-out pool is never in the bank
    assert oracles["latentlens"].info["bank_rows"] == len(bank.rows) == len(smoke_store.split_by_document(cfg.split.heldout_fraction, cfg.seed)[0])
    row = bank.rows[5]
    sims, rows = bank.nearest(smoke_store.activations[[row]], 3)
    assert int(rows[0, 0]) == row and float(sims[0, 0]) == pytest.approx(1.0, abs=1e-5) and sims[0, 0] >= sims[0, 1] >= sims[0, 2]
    text = oracles["latentlens"].describe(smoke_store.activations[[row]])[0]
    token = smoke_store.records[row]["token"].strip()
    context = oracles["latentlens"].detokenize(smoke_store.context_window(row, before=4))
    assert text.startswith(f'{token}: "...{" ".join(context.split())}"') and text.count("; ") == 2
    small = ContextBank.from_store(smoke_store, cfg.split.heldout_fraction, cfg.seed, max_rows=7)
    assert len(small.rows) == 7 and set(small.rows) <= set(bank.rows)
    from cycle_oracle.evals.baselines import OracleError

    with pytest.raises(OracleError, match="held-out split"):
        ContextBank.from_store(smoke_store, None, 0, 10)


def test_patchscopes_injects_v_at_the_question_mark_of_the_identity_prompt(floor_oracles, tiny_path, tiny_tokenizer):
    from cycle_oracle.evals.baselines import first_answer, patchscopes_prompt
    from cycle_oracle.injection import decoder_inputs
    from cycle_oracle.models import load_causal_lm

    cfg, oracles = floor_oracles
    ids, pos = patchscopes_prompt(tiny_tokenizer, cfg.eval.patchscopes_prompt)
    assert ids[pos[0]] == tiny_tokenizer.encode(" ?", add_special_tokens=False)[0]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == cfg.eval.patchscopes_prompt
    assert first_answer(" cat; dog -> dog") == "cat" and first_answer("a\nb") == "a"
    # independent path: one row, generate from the injected embeddings
    model = load_causal_lm(tiny_path)
    v = 3 * torch.randn(2, 128, generator=torch.Generator().manual_seed(3))
    norm = oracles["patchscopes"].info["injection_norm"]
    expected = []
    for row in v:
        embeds = decoder_inputs(model.get_input_embeddings(), [ids], [pos], row[None], norm, "replace")
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), max_new_tokens=cfg.eval.patchscopes_max_new_tokens,
                             do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=[tiny_tokenizer.eos_token_id])
        expected.append(first_answer(tiny_tokenizer.decode(out[0], skip_special_tokens=True)))
    assert oracles["patchscopes"].describe(v) == expected


def test_selfie_is_the_floor(floor_oracles, tiny_path):
    """`selfie` without a checkpoint is exactly today's untrained oracle (decoder = target, fresh encoder)."""
    from cycle_oracle.evals.oracle import untrained_hf_oracle

    cfg, oracles = floor_oracles
    floor = untrained_hf_oracle(str(tiny_path), 1, max_new_tokens=cfg.sampling.max_new_tokens, max_context_tokens=cfg.model.max_context_tokens,
                                encoder_max_tokens=cfg.encoder.max_description_tokens)
    v = 3 * torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    assert oracles["selfie"].describe(v) == floor.describe(v)
    q = "Is it about sports?"
    torch.testing.assert_close(oracles["selfie"].ask_yes_no(v, q), floor.ask_yes_no(v, q))
    torch.testing.assert_close(oracles["selfie"].encode(["a cat sat"]), floor.encode(["a cat sat"]))


# ---- paraphrase test ------------------------------------------------------------------------------

def test_word_shuffle_and_drops_by_hand():
    from cycle_oracle.evals.paraphrase import ParaphraseOptions, drops, shuffle_words

    texts = ["the cat sat on the mat", "", "one"]
    shuffled = shuffle_words(texts, seed=1)
    assert sorted(shuffled[0].split()) == sorted(texts[0].split()) and shuffled[0] != texts[0]
    assert shuffled[1:] == ["", "one"] and shuffle_words(texts, seed=1) == shuffled
    base = {"top1": 0.5, "top5": 1.0, "mrr": 0.7, "cosine": 0.8, "centred_cosine": 0.4, "fve": 0.3}
    para = {"top1": 0.3, "top5": 0.9, "mrr": 0.5, "cosine": 0.7, "centred_cosine": 0.1, "fve": 0.1}
    per_item = {"description": {"centred_cosine": [0.4, 0.5, 0.3, 0.4]}, "paraphrased": {"centred_cosine": [0.1, 0.1, 0.1, 0.1]}}
    d = drops({"description": base, "paraphrased": para}, per_item, chance_top1=0.25, names=["paraphrased"])["paraphrased"]
    assert d["drop_top1"] == pytest.approx(0.2) and d["drop_fve"] == pytest.approx(0.2)
    assert d["kept_top1"] == pytest.approx((0.3 - 0.25) / (0.5 - 0.25))
    assert d["centred_cosine_drop"]["mean"] == pytest.approx(0.3) and d["centred_cosine_drop"]["ci_low"] > 0
    at_chance = drops({"description": dict(base, top1=0.25), "paraphrased": para}, per_item, 0.25, ["paraphrased"])["paraphrased"]
    assert at_chance["kept_top1"] is None
    with pytest.raises(ValueError, match="unknown paraphrase condition"):
        ParaphraseOptions(conditions=("backwards",))


def test_rewrite_is_batched_greedy_generation_through_the_chat_template(tiny_model, tiny_tokenizer):
    from cycle_oracle.evals.paraphrase import rewrite_texts

    texts = ["A short one.", "", "A much longer description of a market that opened and closed higher on the day."]
    batched = rewrite_texts(tiny_model, tiny_tokenizer, texts, "Rewrite this in different words, keeping its meaning.", 5, batch_size=3)
    assert batched[1] == ""
    for text, got in zip(texts, batched):
        if not text:
            continue
        chat = tiny_tokenizer.apply_chat_template([{"role": "user", "content": f"Rewrite this in different words, keeping its meaning.\n\n{text}"}],
                                                  tokenize=False, add_generation_prompt=True, enable_thinking=False)
        ids = torch.tensor([tiny_tokenizer.encode(chat, add_special_tokens=False)])
        out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        assert got == tiny_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()  # left padding changes nothing


# ---- user-defined probe files ---------------------------------------------------------------------

def test_probe_files_jsonl_and_csv_load_like_built_in_tasks(tmp_path):
    from cycle_oracle.config import ProbeFileSettings
    from cycle_oracle.evals.data import load_probe_file, split_items

    jsonl = _probe_jsonl(tmp_path / "pets.jsonl")
    task = load_probe_file(ProbeFileSettings(path=str(jsonl), question="Is it about a cat?"), n_items=12, seed=0)
    assert task.name == "pets" and task.question == "Is it about a cat?" and len(task.items) == 12
    assert sum(x.label for x in task.items) == 6 and all(("cat" in x.text) == bool(x.label) for x in task.items)
    train, test = split_items(task.items, 0.5, 0)
    assert not {x.doc_id for x in train} & {x.doc_id for x in test}
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('review,positive\n"Great, loved it",1\nAwful film,0\n"Fine, really fine",1\nBoring,0\nSuperb, 1 \n')
    task = load_probe_file(ProbeFileSettings(path=str(csv_path), question="Positive?", text_column="review", label_column="positive", name="rev"), 10, 0)
    assert task.name == "rev" and sorted((x.text, x.label) for x in task.items) == [("Awful film", 0), ("Boring", 0), ("Fine, really fine", 1), ("Great, loved it", 1)]
    booleans = tmp_path / "b.jsonl"
    booleans.write_text('{"text": "yes one", "label": true}\n{"text": "no one", "label": "0"}\n')
    assert sorted(x.label for x in load_probe_file(ProbeFileSettings(path=str(booleans), question="Q?"), 10, 0).items) == [0, 1]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\nyes one\t1\nno one\t0\n")
    assert len(load_probe_file(ProbeFileSettings(path=str(tsv), question="Q?"), 10, 0).items) == 2


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n', r"bad.jsonl, row 2: expected the label 0 or 1 in column 'label', got 2"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "yes"}\n', r"row 2: expected the label 0 or 1 .*got 'yes'"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0\n', r"bad.jsonl, row 3: not valid JSON"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "  ", "label": 0}\n', r"row 2: expected a non-empty text in column 'text'"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', r"row 2: expected the label 0 or 1 .*got None"),
    ("bad.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n', r"row 1: expected the label 0 or 1 .*got 1.0"),
    ("bad.jsonl", '[1, 2]\n', r"row 1: expected a JSON object"),
    ("bad.jsonl", '{"text": "a", "y": 1}\n', r"bad.jsonl has no label_column 'label' \(columns: \['text', 'y'\]\)"),
    ("bad.csv", "sentence,label\nhello,1\n", r"bad.csv has no text_column 'text' \(columns: \['label', 'sentence'\]\)"),
    ("bad.csv", "text,label\na,1\nb,0,extra\n", r"bad.csv, row 2: more fields than the header"),
    ("bad.csv", "text,label\na,1\nb,-1\n", r"bad.csv, row 2: expected the label 0 or 1 .*got '-1'"),
    ("bad.csv", "text,label\na,1\nb,1\n", r"every label is 1; a binary task needs rows of both labels"),
    ("bad.csv", "text,label\n", r"bad.csv has no rows"),
    ("bad.txt", "a 1\n", r"unknown format '.txt'"),
])
def test_bad_probe_files_are_named_errors(tmp_path, name, content, message):
    from cycle_oracle.config import ProbeFileSettings
    from cycle_oracle.errors import UserError
    from cycle_oracle.evals.data import ProbeFileError, load_probe_file

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ProbeFileError, match=message) as err:
        load_probe_file(ProbeFileSettings(path=str(path), question="Q?"), 10, 0)
    assert isinstance(err.value, UserError)  # the CLI prints it as one line


def test_probe_file_names_and_paths_are_checked_before_compute(tmp_path, shared_data):
    from cycle_oracle.evals.data import ProbeFileError
    from cycle_oracle.evals.run import load_probe_tasks

    sst2 = _probe_jsonl(tmp_path / "sst2.jsonl")
    with pytest.raises(ProbeFileError, match="task name 'sst2' is already taken"):
        load_probe_tasks([], [{"path": str(sst2), "question": "Q?"}], 10, 0, shared_data, False)
    with pytest.raises(ProbeFileError, match="probe file not found"):
        load_probe_tasks([], [{"path": str(tmp_path / "nope.jsonl"), "question": "Q?"}], 10, 0, shared_data, False)
    tasks = load_probe_tasks(["sst2"], [{"path": str(sst2), "question": "Q?", "name": "mine"}], 10, 0, shared_data, False)
    assert list(tasks) == ["sst2", "mine"]


# ---- recipe and CLI --------------------------------------------------------------------------------

def test_recipe_validates_oracle_names_and_the_patchscopes_prompt():
    from cycle_oracle.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval.oracles.1: Input should be 'decoder', 'selfie', 'patchscopes', 'logit_lens', 'latentlens' or 'text_guess' \(got 'nope'\)"):
        _smoke(["eval.oracles=[decoder, nope]"])
    with pytest.raises(ConfigError, match=r"exactly one '\?'"):
        _smoke(["eval.patchscopes_prompt=a -> a; b ->"])
    with pytest.raises(ConfigError, match=r"eval.probe_files.0.question"):
        _smoke(["eval.probe_files=[{path: x.jsonl}]"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_eval_help_lists_every_oracle():
    from cli.main import ORACLE_HELP
    from cycle_oracle.config import OracleName

    assert list(ORACLE_HELP) == list(get_args(OracleName))
    res = _cli("eval", "--help")
    assert res.returncode == 0, res.stderr
    for name in get_args(OracleName):
        assert f"  {name} " in res.stdout, name


def test_unknown_oracle_is_one_message_without_a_traceback():
    res = _cli("eval", "recipes/eval_smoke.yaml", "--oracle", "logit_lens,tuned_lens")
    assert res.returncode == 2
    assert "unknown oracle 'tuned_lens'; expected one of decoder, selfie, patchscopes, logit_lens, latentlens" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
