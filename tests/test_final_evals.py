"""GRPO's final evals (`cycle_oracle/evals/final.py`) and the rules they share with `cycle-oracle eval`:
one rule for an empty description whichever backend encodes it."""

import torch

from cycle_oracle.activations import write_store
from cycle_oracle.config import validate_recipe
from cycle_oracle.encoder import ActivationEncoder
from cycle_oracle.encoder_trainer import EncoderTrainer
from cycle_oracle.evals.final import decoder_comparison, final_evals, final_summary
from cycle_oracle.evals.oracle import make_hf_oracle
from cycle_oracle.models import load_causal_lm, load_tokenizer


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

    assert list(out) == ["retrieval", "text_encoder", "frozen_start_encoder", "retrieval_warmup_decoder", "grpo_minus_warmup"]
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
