"""A self-contained HTML page to read an oracle's descriptions token by token.

`write_viewer(path, text_tokens, per_token)` writes one page (no external assets; the data is
embedded as JSON in the page): the text's tokens, and for each described token (hover or click it)
its description, the reconstruction cosine cos(v, encode(description)), and the encoder's pooling
weights over the description's tokens as shaded spans. `per_token[i]` is None for tokens that were
not read (BOS, the attention-sink position, chat markers).

Opening the page with `#selftest` clicks the first described token and writes what the panel
shows, plus any JavaScript errors (window.onerror, console.error), into `<pre id="selftest-result">`
and document.title; headless Chromium's `--dump-dom` can then check it (tests/test_evals_viewer.py).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from cycle_oracle.encoder import cosine
from cycle_oracle.evals.oracle import load_oracle
from cycle_oracle.files import atomic_write_text


def _template() -> str:
    return resources.files("cycle_oracle.evals").joinpath("viewer_template.html").read_text(encoding="utf-8")


def _script_safe_json(data) -> str:
    """JSON that cannot close its <script> element: <, >, & and U+2028/9 become \\u escapes
    (valid JSON, since they only occur inside strings)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _entry(e: dict | None) -> dict | None:
    if e is None:
        return None
    cos = e.get("cosine")
    return {
        "description": str(e.get("description", "")),
        "cosine": None if cos is None else float(cos),
        "pooling": [[str(tok), float(w)] for tok, w in e.get("pooling", [])],
    }


def render_viewer(texts: Sequence[tuple[Sequence[str], Sequence[dict | None]]], title: str = "Activation descriptions") -> str:
    """HTML for one or more texts, each (tokens [T], per_token [T] of dict | None)."""
    payload = {"title": title, "texts": []}
    for tokens, per_token in texts:
        if len(tokens) != len(per_token):
            raise ValueError(f"{len(tokens)} tokens but {len(per_token)} per-token entries")
        payload["texts"].append({"tokens": [str(t) for t in tokens], "per_token": [_entry(e) for e in per_token]})
    return _template().replace("__TITLE__", html.escape(title)).replace("__DATA__", _script_safe_json(payload))


def write_viewer(path: str | Path, text_tokens: Sequence[str], per_token: Sequence[dict | None], title: str = "Activation descriptions") -> Path:
    """Write the viewer page for one text. per_token[i] = {"description": str, "cosine": float,
    "pooling": [(token, weight), ...]} or None (token not described)."""
    path = Path(path)
    atomic_write_text(path, render_viewer([(text_tokens, per_token)], title))
    return path


def write_viewer_multi(path: str | Path, texts: Sequence[tuple[Sequence[str], Sequence[dict | None]]], title: str = "Activation descriptions") -> Path:
    path = Path(path)
    atomic_write_text(path, render_viewer(texts, title))
    return path


def viewer_data(oracle, text: str) -> tuple[list[str], list[dict | None]]:
    """Describe every readable token of `text` with the oracle: (tokens, per_token entries)."""
    if oracle.read_tokens is None:
        raise ValueError("this oracle has no read_tokens (needed to read every token of a text)")
    tokens, hidden, readable = oracle.read_tokens(text)
    idx = readable.nonzero().squeeze(1).tolist()
    per_token: list[dict | None] = [None] * len(tokens)
    if not idx:
        return tokens, per_token
    vectors = hidden[idx].float()
    descriptions = oracle.describe(vectors)
    v_hat, pooling = oracle.encode_with_weights(descriptions)
    cos = cosine(v_hat, vectors)
    for k, i in enumerate(idx):
        per_token[i] = {"description": descriptions[k], "cosine": float(cos[k]), "pooling": pooling[k]}
    return tokens, per_token


def describe_texts_to_html(checkpoint, texts: Sequence[str], html_path: str | Path, model: str | None = None, layer=None, oracle=None, **oracle_kwargs) -> Path:
    """What `cycle-oracle describe --html` calls: describe every token of each text with a
    checkpoint's decoder (None: the untrained decoder) and write one viewer page."""
    if oracle is None:
        oracle = load_oracle(checkpoint, model=model, layer=layer, **oracle_kwargs)
    with torch.no_grad():
        pages = [viewer_data(oracle, t) for t in texts]
    name = oracle.info.get("checkpoint") or "untrained decoder"
    return write_viewer_multi(html_path, pages, title=f"Descriptions by {name} (layer {oracle.info.get('layer')})")
