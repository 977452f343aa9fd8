"""The per-token HTML viewer: self-contained page, data round trip, and a click in headless Chromium
(skipped when /usr/bin/chromium is absent; the CI script installs Debian's chromium)."""

import html
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from cycle_oracle.evals.viewer import render_viewer, viewer_data, write_viewer

CHROMIUM = Path("/usr/bin/chromium")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOKENS = ["<bos>", "Paris", " is", " the", " capital", "</script>"]
PER_TOKEN = [
    None,
    {"description": "A sentence about a European city </script><b>bold</b> & more", "cosine": 0.8125,
     "pooling": [("A", 0.1), (" sentence", 0.2), (" about", 0.3), (" a", 0.4)]},
    {"description": "the verb", "cosine": 0.5, "pooling": [("the", 0.5), (" verb", 0.5)]},
    {"description": "", "cosine": None, "pooling": []},
    {"description": "capital cities", "cosine": -0.25, "pooling": [("capital", 1.0)]},
    None,
]


def _embedded_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S)
    assert m, "embedded data block missing"
    return json.loads(m.group(1))


def test_page_is_self_contained_and_data_round_trips(tmp_path):
    path = write_viewer(tmp_path / "v.html", TOKENS, PER_TOKEN, title="t <x>")
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external assets
    assert "http://" not in page and "https://" not in page
    assert "<title>t &lt;x&gt;</title>" in page
    data = _embedded_json(page)  # the embedded JSON survives "</script>" inside descriptions
    assert data["texts"][0]["tokens"] == TOKENS
    got = data["texts"][0]["per_token"]
    assert got[0] is None and got[5] is None
    assert got[1]["description"] == PER_TOKEN[1]["description"]
    assert got[1]["pooling"] == [[t, w] for t, w in PER_TOKEN[1]["pooling"]]
    assert got[4]["cosine"] == -0.25
    with pytest.raises(ValueError, match="tokens but"):
        render_viewer([(TOKENS, PER_TOKEN[:2])])


def _dump_dom(page: Path, tmp_path: Path) -> str:
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri() + "#selftest",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _selftest(dom: str) -> tuple[dict, str]:
    m = re.search(r'<pre id="selftest-result">(.*?)</pre>', dom, re.S)
    assert m and m.group(1).strip(), "the page's self-test did not run"
    errors = re.search(r'<pre id="errors">(.*?)</pre>', dom, re.S)
    return json.loads(html.unescape(m.group(1))), html.unescape(errors.group(1)) if errors else ""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_click_shows_description_in_headless_chromium(tmp_path):
    page = write_viewer(tmp_path / "v.html", TOKENS, PER_TOKEN)
    result, errors = _selftest(_dump_dom(page, tmp_path))
    assert errors == "" and result["errors"] == []
    assert result["clicked"] == {"text": 0, "index": 1, "token": "Paris"}  # the first described token
    assert result["shown_description"] == PER_TOKEN[1]["description"]
    assert result["shown_cosine"] == "0.812" or result["shown_cosine"] == "0.813"
    assert result["pool_spans"] == len(PER_TOKEN[1]["pooling"])


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_page_errors_are_caught_by_the_selftest(tmp_path):
    # the error capture itself can fail the test: a page with a broken script must report it
    page = tmp_path / "broken.html"
    page.write_text(render_viewer([(TOKENS, PER_TOKEN)]).replace("</body>", "<script>notDefinedAnywhere();</script></body>"))
    _, errors = _selftest(_dump_dom(page, tmp_path))
    assert "notDefinedAnywhere" in errors


def test_viewer_data_from_the_tiny_oracle(tiny_model, tiny_path, tiny_tokenizer):
    from cycle_oracle.config import LoraSettings
    from cycle_oracle.encoder import ActivationEncoder, cosine
    from cycle_oracle.evals.oracle import make_hf_oracle
    from cycle_oracle.models import load_causal_lm

    encoder = ActivationEncoder(load_causal_lm(tiny_path), 1, LoraSettings(r=4, alpha=8))
    oracle = make_hf_oracle(tiny_model, encoder, tiny_model, tiny_tokenizer, 1, 3.0, "replace", "What is this about?", 4, min_new_tokens=2)
    text = "The river flows past the old mill."
    tokens, per_token = viewer_data(oracle, text)
    assert "".join(tokens) == text
    assert per_token[0] is None and all(e is not None for e in per_token[1:])  # position 0 is never read
    _, hidden, _ = oracle.read_tokens(text)
    e = per_token[3]
    ref = cosine(oracle.encode([e["description"]]), hidden[3:4])
    assert e["cosine"] == pytest.approx(float(ref), abs=1e-5)
    assert sum(w for _, w in e["pooling"]) == pytest.approx(1.0, abs=1e-5)


def test_load_oracle_uses_the_checkpoint_adapter_and_encoder(tmp_path, tiny_path, tiny_tokenizer):
    """A run folder written like the recipes write it (config.yaml + checkpoints/) loads into an
    oracle whose decoder and encoder are the checkpoint's, not fresh ones."""
    from cycle_oracle.checkpoint import save_checkpoint
    from cycle_oracle.files import atomic_write_text
    from cycle_oracle.config import LoraSettings, dump_recipe, validate_recipe
    from cycle_oracle.encoder import ActivationEncoder
    from cycle_oracle.evals.oracle import load_oracle
    from cycle_oracle.models import adapter_state, attach_lora, load_causal_lm

    cfg = validate_recipe({"kind": "grpo", "model": {"name": str(tiny_path), "layer": 1},
                           "decoder_lora": {"r": 2, "alpha": 4}, "encoder": {"lora": {"r": 2, "alpha": 4}},
                           "sampling": {"max_new_tokens": 3}, "description_instruction": "What is this about?"})
    atomic_write_text(tmp_path / "config.yaml", dump_recipe(cfg))
    torch.manual_seed(5)
    decoder = attach_lora(load_causal_lm(tiny_path), LoraSettings(r=2, alpha=4))
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-identity adapter
    encoder = ActivationEncoder(load_causal_lm(tiny_path), 1, LoraSettings(r=2, alpha=4))
    with torch.no_grad():
        encoder.projection.weight.mul_(-1.0)
    enc_tensors = {k: v for k, v in encoder.state_dict().items() if "lora_" in k or k.startswith(("scorer", "projection"))}
    from cycle_oracle.checkpoint import CheckpointRecord
    from cycle_oracle.injection import mean_embedding_norm

    rec = CheckpointRecord(stage="grpo", step=7, model=str(tiny_path), layer=1, injection=cfg.injection.model_dump(mode="json"),
                           injection_norm=mean_embedding_norm(decoder.get_input_embeddings()), weight_version=3, world_size=1)
    save_checkpoint(tmp_path, rec, {"decoder_adapter": adapter_state(decoder), "encoder": enc_tensors})

    oracle = load_oracle(tmp_path)
    floor = load_oracle(None, model=str(tiny_path), layer="1", max_new_tokens=3)
    assert oracle.info["step"] == 7 and oracle.info["layer"] == 1
    v = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    q = "Is it about sports?"
    from cycle_oracle.evals.oracle import make_hf_oracle

    reference = make_hf_oracle(decoder, encoder, load_causal_lm(tiny_path), tiny_tokenizer, 1, oracle.info["injection_norm"], "replace", "What is this about?", 3)
    torch.testing.assert_close(oracle.ask_yes_no(v, q), reference.ask_yes_no(v, q), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(oracle.ask_yes_no(v, q), floor.ask_yes_no(v, q), atol=1e-3)
    torch.testing.assert_close(oracle.encode(["a cat"]), reference.encode(["a cat"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(oracle.encode(["a cat"]), -floor.encode(["a cat"]), atol=1e-4, rtol=1e-4)
    # reads are the frozen target's, whatever the adapter
    torch.testing.assert_close(oracle.read(["The river flows."]), floor.read(["The river flows."]))
