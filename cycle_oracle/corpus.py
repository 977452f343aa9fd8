"""Source documents whose activations are described (describe, GRPO, retrieval).

Kinds (`DataSource.kind`): `embedded` (passages written for this project, shipped in the package),
`text_files` (plain text; documents are paragraphs separated by blank lines, `= Heading =` lines
dropped), `datasets` (a HF `datasets` name with a `text` column, where a hub is reachable).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from cycle_oracle.activations import Document

_HEADING = re.compile(r"^\s*=+ .* =+\s*$")


def split_paragraphs(text: str, source: str, min_chars: int = 80) -> list[Document]:
    """Paragraph documents; paragraphs under one top-level `= Title =` share a split group."""
    docs, block = [], []
    article = 0

    def flush() -> None:
        para = " ".join(block)
        if len(para) >= min_chars:
            docs.append(Document(f"{source}:{len(docs)}", para, group=f"{source}:article{article}"))
        block.clear()

    for line in text.splitlines() + [""]:
        if _HEADING.match(line):
            flush()
            if line.strip().startswith("= ") and not line.strip().startswith("= ="):
                article += 1
        elif line.strip():
            block.append(line.strip())
        else:
            flush()
    return docs


def embedded_passages() -> list[Document]:
    text = resources.files("cycle_oracle.data").joinpath("embedded/passages.txt").read_text()
    return [Document(f"embedded:{i}", line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]


def load_documents(source, limit: int | None = None) -> list[Document]:
    if source.kind == "embedded":
        docs = embedded_passages()
    elif source.kind == "text_files":
        if not source.paths:
            raise ValueError("corpus.kind=text_files needs corpus.paths (a list of text files)")
        docs = []
        for p in source.paths:
            path = Path(p).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"corpus file not found: {path} (set corpus.paths to existing text files)")
            docs.extend(split_paragraphs(path.read_text(encoding="utf-8", errors="replace"), path.stem))
    elif source.kind == "datasets":
        try:
            import datasets

            ds = datasets.load_dataset(source.name, split="train")
        except Exception as err:
            raise FileNotFoundError(
                f"could not load the datasets corpus {source.name!r} ({type(err).__name__}: {err}); offline machines "
                f"should use corpus.kind=text_files with local paths"
            ) from err
        docs = [Document(f"{source.name}:{i}", row["text"]) for i, row in enumerate(ds) if row.get("text", "").strip()]
    else:
        raise ValueError(f"corpus kind {source.kind!r} is not a document corpus (expected embedded, text_files or datasets)")
    cap = min(x for x in (limit, source.max_documents) if x is not None) if (limit or source.max_documents) else None
    return docs[:cap] if cap else docs
