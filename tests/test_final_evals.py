"""GRPO's final evals (`cycle_oracle/evals/final.py`) and the rules they share with `cycle-oracle eval`:
one rule for an empty description whichever backend encodes it."""

import torch

from cycle_oracle.config import validate_recipe
from cycle_oracle.encoder import ActivationEncoder
from cycle_oracle.encoder_trainer import EncoderTrainer
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
