"""GRPO's final evals (`cycle_oracle/evals/final.py`) and the rules they share with `cycle-oracle eval`:
one rule for an empty description whichever backend encodes it."""

import pytest
import torch

from cycle_oracle.activations import write_store
from cycle_oracle.config import validate_recipe
from cycle_oracle.encoder import ActivationEncoder
from cycle_oracle.encoder_trainer import EncoderTrainer
from cycle_oracle.evals.final import decoder_comparison, final_evals, final_summary, format_control_texts, pool_rows
from cycle_oracle.evals.oracle import make_hf_oracle
from cycle_oracle.models import load_causal_lm, load_tokenizer
from recipes.report import closing_report


def test_an_empty_description_is_encoded_the_same_way_by_both_oracle_backends(tiny_path):
    """GRPO's final evals encode through the encoder actor (`EncoderTrainer.reconstruct`),
    `cycle-oracle eval` through the HF oracle (`make_hf_oracle(...).encode`): with the same encoder
    weights they give the same v_hat for the same descriptions, and an empty one (also whitespace
    only) is v_hat = 0 in both (it was the text "(empty)" encoded in one and 0 in the other)."""
    cfg = validate_recipe({"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, "encoder": {"lora": {"r": 2, "alpha": 4}}})
    torch.manual_seed(0)
    trainer = EncoderTrainer(str(tiny_path), cfg, 1, torch.zeros(128))
    texts = ["a cat sat on the mat", "", "   ", "prices rose again in the spring"]
    trainer.train_step([texts[0], texts[3]], torch.randn(2, 128, generator=torch.Generator().manual_seed(1)))  # not the identity init
    encoder = ActivationEncoder(load_causal_lm(str(tiny_path)), 1, cfg.encoder.lora)
    encoder.load_state_dict(trainer.state()[0], strict=False)
    target = load_causal_lm(str(tiny_path))
    oracle = make_hf_oracle(target, encoder, target, load_tokenizer(str(tiny_path)), 1, 1.0, encoder_prefix=cfg.encoder.prefix,
                            encoder_max_tokens=cfg.encoder.max_description_tokens)

    by_actor, weights = trainer.reconstruct(texts)
    by_hf, pooled = oracle.encode_with_weights(texts)
    torch.testing.assert_close(by_actor, by_hf, atol=1e-5, rtol=1e-5)
    for empty in (1, 2):
        assert not by_actor[empty].any() and not by_hf[empty].any(), "an empty description reconstructs to v_hat = 0"
        assert len(weights[empty]) == 0 and pooled[empty] == []
    assert by_actor[0].norm() > 0 and abs(float(weights[0].sum()) - 1) < 1e-5 and len(pooled[0]) == len(weights[0])


def test_every_oracle_is_scored_under_every_grader_on_one_pool(tmp_path):
    """`final_evals` on a small real ActivationStore: oracle after oracle, each asked for the pool
    once per grader (and the zero control once); the first oracle under the first grader runs the
    controls; the layout is the one results.json and the closing report read (`retrieval`,
    `retrieval_<oracle>`, `<a>_minus_<b>`, one section per other grader with its notes)."""
    g = torch.Generator().manual_seed(0)
    docs = {f"d{k}": list(range(10 * k, 10 * k + 6)) for k in range(24)}
    records = [{"doc_id": f"d{k}", "group": f"d{k}", "token_index": i, "token": f"t{i}"} for k in range(24) for i in (2, 4)]
    store = write_store(tmp_path / "store", [(1.0 + torch.randn(len(records), 8, generator=g), records, docs)], "fake", 1)
    cfg = validate_recipe({"kind": "grpo", "eval": {"pool_size": 12}, "split": {"heldout_fraction": 0.5}})
    row_of = {tuple(v.tolist()): i for i, v in enumerate(store.activations)}
    calls: dict[str, int] = {}

    def oracle(name: str, noisy: bool):
        def describe(vectors):
            calls[name] = calls.get(name, 0) + 1
            return [f"row {row_of.get(tuple(v.tolist()), -1)}" + (" roughly" if noisy else "") for v in vectors]
        return describe

    def grader(seed: int):
        def encode(texts):
            noise = torch.Generator().manual_seed(seed)
            rows = [int(t.split()[1]) if t.startswith("row ") else -1 for t in texts]  # a context window: the mean
            return torch.stack([(store.activations[r] if r >= 0 else store.mean) + (0.8 if "roughly" in t else 0.1) * torch.randn(8, generator=noise)
                                for r, t in zip(rows, texts)])
        return encode

    oracles = {"grpo_decoder": oracle("grpo", False), "warmup_decoder": oracle("warmup", True)}
    graders = {"final_encoder": grader(1), "text_encoder": grader(2), "frozen_start_encoder": grader(3)}
    pairs = []
    out = final_evals(oracles, graders, store, cfg, lambda ids: " ".join(map(str, ids)), notes={"text_encoder": {"training": {"steps": 2}}},
                      on_pair=lambda oracle, grader, result: pairs.append((oracle, grader, result["n"])))

    assert list(out) == ["retrieval", "text_encoder", "frozen_start_encoder", "retrieval_warmup_decoder", "grpo_minus_warmup", "headlines", "verdicts"]
    assert [p[:2] for p in pairs] == [(o, g) for o in oracles for g in graders] and {p[2] for p in pairs} == {out["retrieval"]["n"]}
    assert calls == {"grpo": 3 + 1, "warmup": 3}, "the pool once per grader, and the zero control once"
    assert {"shuffled", "zero", "context_only"} <= set(out["retrieval"]["conditions"])
    assert "shuffled" not in out["retrieval_warmup_decoder"]["conditions"]
    assert out["text_encoder"]["training"] == {"steps": 2} and set(out["frozen_start_encoder"]) == {"grpo_decoder", "warmup_decoder", "grpo_minus_warmup"}
    assert out["retrieval"]["rows"] == out["frozen_start_encoder"]["warmup_decoder"]["rows"], "one pool for every pair"
    assert out["grpo_minus_warmup"] == decoder_comparison(out["retrieval"], out["retrieval_warmup_decoder"])
    assert out["grpo_minus_warmup"]["centred_cosine"]["mean"] > 0, "the exact oracle beats the rough one"
    summary = final_summary(out)
    assert {"frozen_encoder/grpo_minus_warmup/centred_cosine", "text_encoder/grpo_decoder/description", "pool_size"} <= set(summary)


def _store_and_grader(tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = {f"d{k}": list(range(10 * k, 10 * k + 6)) for k in range(24)}
    records = [{"doc_id": f"d{k}", "group": f"d{k}", "token_index": i, "token": f"t{i}"} for k in range(24) for i in (2, 4)]
    store = write_store(tmp_path / "store", [(1.0 + torch.randn(len(records), 8, generator=g), records, docs)], "fake", 1)

    def grader(seed: int):  # "row R" -> activation R (+ noise: more for "roughly"); anything else -> the mean
        def encode(texts):
            noise = torch.Generator().manual_seed(seed)
            rows = [int(t.split()[1]) if t.startswith("row ") else -1 for t in texts]
            return torch.stack([(store.activations[r] if r >= 0 else store.mean) + (0.8 if "roughly" in t else 0.05) * torch.randn(8, generator=noise)
                                for r, t in zip(rows, texts)])
        return encode

    return store, grader


def test_written_oracles_are_graded_beside_the_decoders_and_each_grader_gives_a_verdict(tmp_path):
    """Training-free baselines written for the pool's rows (`written`, in `pool_rows` order) are graded
    on the same items as the decoders under every grader; each grader's verdict compares the first
    oracle with the best baseline (top-1, then FVE), and the closing report leads with those verdicts."""
    store, grader = _store_and_grader(tmp_path)
    cfg = validate_recipe({"kind": "grpo", "eval": {"pool_size": 40}, "split": {"heldout_fraction": 0.5}})
    row_of = {tuple(v.tolist()): i for i, v in enumerate(store.activations)}
    rows = pool_rows(store, cfg)
    oracles = {"grpo_decoder": lambda vectors: [f"row {row_of.get(tuple(v.tolist()), -1)}" for v in vectors]}
    written = {"patchscopes": [f"row {r} roughly" for r in rows], "logit_lens": ["nothing"] * len(rows)}
    graders = {"frozen_start_encoder": grader(3), "text_encoder": grader(2)}
    out = final_evals(oracles, graders, store, cfg, lambda ids: " ".join(map(str, ids)), written=written, baselines=["patchscopes", "logit_lens"])

    assert out["retrieval"]["rows"] == rows and out["text_encoder"]["patchscopes"]["rows"] == rows, "one pool: the written texts' rows"
    assert list(out["headlines"]["text_encoder"]) == ["grpo_decoder", "patchscopes", "logit_lens"]
    for name in graders:
        v = out["verdicts"][name]
        assert v["grader"] == name and v["best_baseline"] == "patchscopes", "the rough copy beats the mean on top-1"
        assert v["difference"]["fve"]["mean"] > 0 and v["difference"]["fve"]["ci_low"] > 0 and v["wins"] == (v["difference"]["top1"]["ci_low"] > 0)
        assert out["headlines"][name]["logit_lens"]["fve"] == pytest.approx(0.0, abs=0.05), "(about) the mean explains nothing"
    report = closing_report(out)
    assert report.verdict.startswith(out["verdicts"]["frozen_start_encoder"]["line"][:1].upper() + out["verdicts"]["frozen_start_encoder"]["line"][1:])
    assert report.sections[0].title.startswith("Trained decoders beside training-free oracles")
    with pytest.raises(ValueError, match="patchscopes: 3 texts were written for the pool"):
        final_evals(oracles, graders, store, cfg, lambda ids: "", written={"patchscopes": ["a", "b", "c"]}, baselines=["patchscopes"])


class _Words:
    """A tokenizer stand-in: token id k decodes to "w<k>" (id 0 is special)."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == 0))


def test_format_controls_hold_the_true_token_and_quote_window_in_each_format(tmp_path):
    store, _ = _store_and_grader(tmp_path)
    rows = [0, 5]
    texts = format_control_texts(store, rows, _Words(), quote_tokens=3, quote_style="it_reads")
    assert set(texts) == {"true_token_bare", "true_window_bare", "true_token_decoder_format", "true_window_decoder_format"}
    for k, r in enumerate(rows):
        ids = store.context_window(r, before=3)
        assert texts["true_token_bare"][k] == f"w{ids[-1]}" and texts["true_window_bare"][k] == " ".join(f"w{i}" for i in ids if i)
        assert texts["true_window_decoder_format"][k] == f'It reads: "{texts["true_window_bare"][k]}".'
    assert set(format_control_texts(store, rows, _Words(), 3, "bare")) == {"true_token_bare", "true_window_bare"}, "a bare decoder format is the bare one"
