"""Documents, and the one loader of a `DataSource` (config.py) that every corpus reads through.

Kinds (`DataSource.kind`):
- `embedded`: passages written for this project, shipped in the package (`embedded/passages.txt`).
- `text_files`: plain text files. Documents are paragraphs (blocks separated by blank lines);
  WikiText-style headings `= Title =` start a new article and are dropped, as are sub-headings
  `= = Section = =`. Paragraphs of one article share a `group`, so a split never puts one article
  on both sides.
- `datasets`: a HF `datasets` name (and/or `paths` as data files) with a text column; needs a
  reachable hub or local files, and fails with a clear message otherwise.

A source with a `fallback` (another `DataSource`, itself with an optional fallback) reads the
fallback when it cannot be read (a missing file, a hub that is not reachable: `hub_reachable`),
and says so in one line. The CPU recipes read WikiText-2's validation split from the local file,
else from the hub (`datasets`), else the embedded passages: they run on a fresh machine with only
PyPI (`load_documents`).

The activation corpus (describe, GRPO, evals: `corpus`) and the warmup's token-prediction /
description corpus (`warmup.corpus`, `data/token_prediction.load_corpus`) both read documents
here, so a file yields the same doc ids, texts and groups for both. The one exception is
`embedded` in the warmup, which means the target model's own replies (generated and cached there).
"""

from __future__ import annotations

import functools
import os
import random
import re
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cycle_oracle.errors import DataSourceError

_HEADING = re.compile(r"^\s*=+ .* =+\s*$")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    group: str = ""
    """The unit splits are made by (the article a paragraph belongs to, the seed prompt of generated
    replies, ...); defaults to doc_id."""

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.doc_id)


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


def load_text_files(paths: Sequence[str | Path], min_chars: int = 80) -> list[Document]:
    """Paragraph documents of text files (`split_paragraphs`, ids `<file stem>:<n>`)."""
    if not paths:
        raise DataSourceError("corpus kind text_files needs `paths` (a list of text files)")
    docs: list[Document] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise DataSourceError(f"corpus file not found: {path} (set the corpus `paths` to existing text files)")
        docs.extend(split_paragraphs(path.read_text(encoding="utf-8", errors="replace"), path.stem, min_chars))
    if not docs:
        raise DataSourceError(f"no documents of at least {min_chars} characters in {list(paths)}")
    return docs


def load_datasets_corpus(name: str | None, paths: Sequence[str] = (), split: str = "train", *, config: str | None = None,
                         text_column: str | None = None, group_column: str | None = None, join_rows: bool = False) -> list[Document]:
    """A HF `datasets` corpus: by name (hub or local script/folder, with its `config`) and/or local
    data files, one `split`. Each row's `text_column` (default: `text`, else the first string
    column) is a document; rows that are empty or only whitespace are skipped (the document ids
    `<name>:<row>` still count them). Documents are split by `group_column` when given (rows with
    one value stay on one side). `join_rows`: the rows are lines of one text (wikitext), joined
    and cut into paragraph documents grouped by article, as `text_files` does."""
    try:
        import datasets  # datasets: only a hub or dataset source needs it (slow to import)
    except ImportError as err:
        raise ImportError("corpus kind 'datasets' needs the `datasets` package: pip install datasets") from err
    if not name and not paths:
        raise DataSourceError("corpus kind 'datasets' needs a `name` (hub dataset) or `paths` (data files)")
    builder = name
    if not builder:
        ext = Path(paths[0]).suffix.lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(ext, "text")
    try:
        ds = datasets.load_dataset(builder, config, data_files=list(paths) or None, split=split)
    except Exception as err:
        raise DataSourceError(
            f"could not load the datasets corpus {name or list(paths)!r} (config {config!r}, split {split!r}; "
            f"{type(err).__name__}: {err}). Offline machines should use kind=text_files with local paths "
            f"(or, for the warmup corpus, kind=embedded)"
        ) from err
    columns = ds.column_names
    column = text_column or ("text" if "text" in columns else next((c for c in columns if ds.features[c].dtype == "string"), None))
    if column is None or column not in columns:
        raise DataSourceError(f"datasets corpus {builder!r} has no text column {column!r} (columns: {columns}); set text_column")
    if group_column is not None and group_column not in columns:
        raise DataSourceError(f"datasets corpus {builder!r} has no group_column {group_column!r} (columns: {columns})")
    tag = name or Path(paths[0]).stem
    if join_rows:
        return split_paragraphs("\n".join(str(row[column] or "") for row in ds), tag)
    return [Document(f"{tag}:{i}", str(row[column]), group=f"{tag}:{row[group_column]}" if group_column else None)
            for i, row in enumerate(ds) if str(row[column] or "").strip()]


def sample_documents(docs: list[Document], limit: int | None, seed: int) -> list[Document]:
    """A seeded subset of `limit` documents in their original order (spread over the whole corpus)."""
    if limit is None or limit >= len(docs):
        return docs
    keep = sorted(random.Random(f"docs:{seed}").sample(range(len(docs)), limit))
    return [docs[i] for i in keep]


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (once per process): False at once when HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE is set, else one HEAD request to the hub's endpoint with a short timeout, so
    an offline machine falls back in seconds instead of waiting on `datasets`' retries."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        from huggingface_hub import constants  # only a hub check needs it (a heavy import)

        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
        return True
    except Exception:  # no network, DNS, proxy, TLS: all mean "not reachable from here"
        return False


def load_documents(source, limit: int | None = None, seed: int | None = None, log: Callable[[str], None] | None = print) -> list[Document]:
    """The documents of a `DataSource`, at most `limit` and `source.max_documents`: the first ones,
    or with a `seed` a seeded subset kept in corpus order (`sample_documents`). A source that cannot
    be read (`DataSourceError`: a missing file, an unreachable hub) is replaced by its `fallback`,
    with one line through `log`; without a fallback the error stands."""
    try:
        return _load_one(source, limit, seed)
    except DataSourceError as err:
        if getattr(source, "fallback", None) is None:
            raise
        if log:
            log(f"[corpus] {str(err).split(';')[0]}; reading the fallback corpus ({describe_source(source.fallback)})")
        return load_documents(source.fallback, limit, seed, log)


def describe_source(source) -> str:
    """A short name of a corpus source for messages: `embedded`, `text_files: a.txt`, `datasets: wikitext`."""
    what = source.name or ", ".join(source.paths)
    return source.kind + (f": {what}" if what else "")


def _load_one(source, limit: int | None, seed: int | None) -> list[Document]:
    if source.kind == "datasets" and source.name and not hub_reachable() and not Path(source.name).exists():
        raise DataSourceError(f"the Hugging Face hub is not reachable for the datasets corpus {source.name!r} "
                              f"(offline, or HF_HUB_OFFLINE set); use local text_files or the embedded corpus")
    if source.kind == "embedded":
        docs = embedded_passages()
    elif source.kind == "text_files":
        docs = load_text_files(source.paths)
    elif source.kind == "datasets":
        docs = load_datasets_corpus(source.name, source.paths, source.split, config=source.config, text_column=source.text_column,
                                    group_column=source.group_column, join_rows=source.join_rows)
    else:
        raise ValueError(f"corpus kind {source.kind!r} is not a document corpus (expected embedded, text_files or datasets)")
    caps = [x for x in (limit, source.max_documents) if x]
    cap = min(caps) if caps else None
    return docs[:cap] if seed is None else sample_documents(docs, cap, seed)
