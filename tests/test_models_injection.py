"""Models, injection, extraction and encoder on the tiny random Llama (real HF + PEFT, no mocks)."""

import json

import pytest
import torch

from cycle_oracle.activations import ActivationStore, extract, pad_right, read_residual, write_store
from cycle_oracle.corpus import Document
from cycle_oracle.config import InjectionSettings, LoraSettings
from cycle_oracle.decoder import build_batch, completion_logprobs
from cycle_oracle.encoder import ActivationEncoder, encoder_inputs, fve, scaled_mse_loss, cosine_loss
from cycle_oracle.injection import build_decoder_prompt, decoder_inputs, inject
from cycle_oracle.models import (
    ModelNotFoundError,
    attach_lora,
    load_causal_lm,
    merged_lora_weights,
    resolve_layer,
    resolve_model_path,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France.",
    "In 1969 the first humans walked on the Moon, watched by millions on television around the world.",
]


def test_layer_resolution_and_errors():
    assert resolve_layer(0.5, 30) == 15
    assert resolve_layer(10, 30) == 10
    with pytest.raises(ValueError, match="layer 30 is out of range.*1..29"):
        resolve_layer(30, 30)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(0, 30)
    with pytest.raises(ValueError, match="fraction 1.5"):
        resolve_layer(1.5, 30)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))


def test_read_residual_is_hidden_states_of_that_layer(tiny_model, tiny_tokenizer):
    ids, mask = pad_right([tiny_tokenizer.encode(TEXTS[0])], tiny_tokenizer.pad_token_id)
    ours = read_residual(tiny_model, ids, mask, 1)
    ref = tiny_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(ours, ref.float())
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        read_residual(tiny_model, ids, mask, 2)


def test_batched_extraction_equals_one_by_one(tiny_model, tiny_tokenizer):
    docs = [Document(f"d{i}", t) for i, t in enumerate(TEXTS)]
    batched = list(extract(tiny_model, tiny_tokenizer, docs, layer=1, batch_size=3, progress=False))
    single = [b for d in docs for b in extract(tiny_model, tiny_tokenizer, [d], layer=1, batch_size=1, progress=False)]
    acts_b = batched[0][0]
    acts_s = torch.cat([s[0] for s in single])
    assert acts_b.shape == acts_s.shape
    torch.testing.assert_close(acts_b, acts_s, atol=1e-5, rtol=1e-5)
    records = batched[0][1]
    assert all(r["token_index"] >= 1 for r in records), "position 0 (attention sink) must be skipped"
    assert {r["doc_id"] for r in records} == {"d0", "d1", "d2"}


def test_extraction_positions_and_empty_text(tiny_model, tiny_tokenizer):
    docs = [Document("a", TEXTS[1])]
    (acts, recs, _), = list(extract(tiny_model, tiny_tokenizer, docs, layer=1, positions="last", progress=False))
    assert len(recs) == 1 and recs[0]["token_index"] == len(tiny_tokenizer.encode(TEXTS[1])) - 1
    with pytest.raises(ValueError, match="empty text"):
        list(extract(tiny_model, tiny_tokenizer, [Document("e", "  ")], layer=1, progress=False))


def test_store_roundtrip_and_document_split(tmp_path, tiny_model, tiny_tokenizer):
    docs = [Document(f"d{i}", t) for i, t in enumerate(TEXTS * 2)]
    docs = [Document(f"d{i}", d.text) for i, d in enumerate(docs)]
    store = write_store(tmp_path, extract(tiny_model, tiny_tokenizer, docs, 1, batch_size=1, progress=False), "tiny", 1, shard_size=16)
    again = ActivationStore(tmp_path)
    assert len(again) == len(store) and len(again.meta["shards"]) >= 2
    torch.testing.assert_close(again.mean, again.activations.mean(0))
    train, held = again.split_by_document(0.34, seed=0)
    train_docs = {again.records[i]["doc_id"] for i in train}
    held_docs = {again.records[i]["doc_id"] for i in held}
    assert train_docs and held_docs and not (train_docs & held_docs)
    assert json.loads((tmp_path / "meta.json").read_text())["layer"] == 1


def test_injection_touches_only_placeholders(tiny_tokenizer):
    prompt = build_decoder_prompt(tiny_tokenizer, 1, "What is this?", num_placeholders=2)
    assert [prompt.input_ids[p] for p in prompt.placeholder_positions] == [tiny_tokenizer.encode(" ?", add_special_tokens=False)[0]] * 2
    emb = torch.randn(2, len(prompt.input_ids), 128)
    pos = torch.tensor([prompt.placeholder_positions] * 2)
    v = torch.randn(2, 128)
    out = inject(emb, pos, v, norm=3.0)
    others = [t for t in range(emb.shape[1]) if t not in prompt.placeholder_positions]
    torch.testing.assert_close(out[:, others], emb[:, others])
    for p in prompt.placeholder_positions:
        torch.testing.assert_close(out[:, p].norm(dim=-1), torch.full((2,), 3.0))
        torch.testing.assert_close(torch.cosine_similarity(out[:, p], v, dim=-1), torch.ones(2))
    added = inject(emb, pos, v, norm=3.0, mode="add")
    p0 = prompt.placeholder_positions[0]
    torch.testing.assert_close(added[:, p0] - emb[:, p0], out[:, p0])


def test_injection_bad_inputs(tiny_tokenizer):
    emb = torch.randn(1, 5, 128)
    pos = torch.tensor([[2]])
    with pytest.raises(ValueError, match="width 64 does not match.*128"):
        inject(emb, pos, torch.randn(1, 64), 1.0)
    bad = torch.randn(1, 128)
    bad[0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        inject(emb, pos, bad, 1.0)
    with pytest.raises(ValueError, match="empty"):
        build_decoder_prompt(tiny_tokenizer, 1, "   ")


def test_decoder_reads_the_activation(tiny_model, tiny_tokenizer):
    """Two different activations in one batch give different completion log-probs."""
    prompt = build_decoder_prompt(tiny_tokenizer, 1, "Describe.")
    completion = tiny_tokenizer.encode("a cat sat", add_special_tokens=False)
    batch = build_batch([prompt, prompt], [completion, completion], tiny_tokenizer.pad_token_id)
    v = torch.randn(2, 128)
    lp = completion_logprobs(tiny_model, batch, v, norm=1.0)
    assert lp.shape == (2, len(completion))
    assert not torch.allclose(lp[0], lp[1])
    lp_same = completion_logprobs(tiny_model, batch, v[:1].expand(2, -1), norm=1.0)
    torch.testing.assert_close(lp_same[0], lp_same[1])


def test_lora_gradients_reach_only_lora(tiny_model, tiny_tokenizer):
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8))
    prompt = build_decoder_prompt(tiny_tokenizer, 1, "Describe.")
    batch = build_batch([prompt], [tiny_tokenizer.encode("hello", add_special_tokens=False)], tiny_tokenizer.pad_token_id)
    lp = completion_logprobs(model, batch, torch.randn(1, 128), norm=1.0)
    lp.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_merged_weights_reproduce_the_adapter(tiny_path, tiny_tokenizer):
    model = attach_lora(load_causal_lm(tiny_path), LoraSettings(r=4, alpha=8))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    merged = merged_lora_weights(model)
    plain = load_causal_lm(tiny_path)
    missing = set(merged) - set(dict(plain.named_parameters()))
    assert not missing, f"merged names not in the HF model: {sorted(missing)[:3]}"
    plain.load_state_dict(merged, strict=False)
    ids = torch.tensor([tiny_tokenizer.encode(TEXTS[0])])
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_encoder_identity_init_and_gradients(tiny_path, tiny_tokenizer):
    lm = load_causal_lm(tiny_path)
    enc = ActivationEncoder(lm, layer=1, lora_settings=LoraSettings(r=4, alpha=8))
    ids, attn, pool = encoder_inputs(tiny_tokenizer, ["a red apple", "the stock market fell sharply"])
    v_hat, w = enc(ids, attn, pool)
    # identity init: the reconstruction is the mean of the layer-1 hidden states over description tokens
    ref_lm = load_causal_lm(tiny_path)
    hidden = read_residual(ref_lm, ids, attn, 1)
    pooled = (hidden * pool[..., None]).sum(1) / pool.sum(1, keepdim=True)
    torch.testing.assert_close(v_hat, pooled, atol=1e-5, rtol=1e-5)
    assert torch.all(w[~pool] == 0) and torch.allclose(w.sum(1), torch.ones(2))
    cosine_loss(v_hat, torch.randn(2, 128)).backward()
    named = dict(enc.named_parameters())
    grads = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(("lora_" in n) or n.startswith(("scorer", "projection")) for n in grads)
    assert any(n.startswith("projection") for n in grads)
    with pytest.raises(ValueError, match="empty description"):
        encoder_inputs(tiny_tokenizer, [""])


def test_losses_and_fve_maths():
    torch.manual_seed(0)
    v, v_hat = torch.randn(8, 16), torch.randn(8, 16)
    torch.testing.assert_close(scaled_mse_loss(v_hat, v), 2 * cosine_loss(v_hat, v))
    mean = torch.randn(16)
    assert abs(fve(v, v, mean) - 1.0) < 1e-6
    assert abs(fve(mean.expand(8, 16), v, mean)) < 1e-6


def test_decoder_inputs_shapes(tiny_model, tiny_tokenizer):
    prompt = build_decoder_prompt(tiny_tokenizer, 1, "Describe.")
    emb = decoder_inputs(tiny_model.get_input_embeddings(), [prompt.input_ids] * 3, [prompt.placeholder_positions] * 3, torch.randn(3, 128), 1.0)
    assert emb.shape == (3, len(prompt.input_ids), 128)
    settings = InjectionSettings()
    assert settings.num_placeholders == 1
