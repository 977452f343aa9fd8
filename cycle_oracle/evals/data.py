"""Binary classification tasks for the probe evals, from the offline data folder (../shared/data).

Every task is a list of `Item(text, label, doc_id)` with label 1 for the class the task's yes/no
question asks about. Each text is its own document (`doc_id = "<task>:<row>"`), so a split by
item is a split by document. Duplicate texts are dropped before sampling (a duplicate on both
sides of a split would leak).

| task              | file (under the data folder)                        | label 1 (question answer "Yes") |
|-------------------|-----------------------------------------------------|---------------------------------|
| sst2              | sst2/dev.tsv  (`sentence\\tlabel`)                   | label == 1 (positive)           |
| gender            | bias_in_bios/bios_gender_balanced.csv (`hard_text,profession,gender`) | gender == Female |
| ag_news_sports    | ag_news/test.csv (`label,title,description`)        | label == 2 (Sports)             |
| tense_past        | classification/tense/tense_processed.json (`[{sentence,label}]`) | label == past (vs present/future) |
| singular_plural   | classification/singular_plural/singular_plural.csv (`sentence,n_subjects`) | n_subjects == multiple |
| language_english  | language_id/tatoeba_langid.jsonl (`{text,lang}`)    | lang == eng (vs 19 others)      |

User-defined tasks (`eval.probe_files`, `load_probe_file`): a JSONL file (one JSON object per
line) or a CSV / TSV file (a header row, then one item per row) with a text column, a 0/1 label
column (1 = the question's "Yes"; JSON true/false and the strings "0"/"1" are accepted) and a yes/no
question given in the settings: {path, question, text_column: text, label_column: label, name}.
A row that cannot be read (not JSON, no text, a label that is not 0/1) is an error naming the file,
the row and what was expected; so is a file without the label column or with one label only.

The data folder is, in order: the `data_dir` argument (recipe `eval.data_dir`, CLI `--data-dir`),
the `CYCLE_ORACLE_DATA_DIR` environment variable, `<repo>/../shared/data`.
`load_task(..., hub=True)` loads the HF `datasets` equivalent instead where one exists and a hub
is reachable (it fails offline, with an error that says so).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cycle_oracle.errors import UserError


@dataclass(frozen=True)
class Item:
    text: str
    label: int
    doc_id: str


@dataclass(frozen=True)
class BinaryTask:
    name: str
    question: str
    """Yes/no question whose answer is "Yes" exactly for label 1 (oracle route and LLM judge)."""
    items: tuple[Item, ...]
    source: str


class DatasetFileMissing(FileNotFoundError):
    """An eval data file is not in the data folder; the message names the file and the fix."""


class HubUnavailable(RuntimeError):
    """A `datasets` hub load failed (offline, unknown name, ...)."""


class ProbeFileError(UserError, ValueError):
    """A user-defined probe file that cannot be read as a binary task; the message names the file,
    the row (1-based, after a CSV header) and what was expected."""


@dataclass(frozen=True)
class _TaskSpec:
    path: str
    question: str
    rows: Callable[[Path], list[tuple[str, int]]]
    hub: tuple[str, str, str, str, object] | None = None
    """(dataset name, split, text column, label column, label value meaning 1)."""


def _csv_rows(path: Path, delimiter: str = ",") -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _sst2(path: Path):
    return [(r["sentence"].strip(), int(r["label"])) for r in _csv_rows(path, "\t")]


def _gender(path: Path):
    return [(r["hard_text"].strip(), int(r["gender"] == "Female")) for r in _csv_rows(path)]


def _ag_news(path: Path):
    def clean(s: str) -> str:
        return " ".join(s.replace("\\", " ").split())

    return [(f"{clean(r['title'])}. {clean(r['description'])}", int(r["label"] == "2")) for r in _csv_rows(path)]


def _tense(path: Path):
    return [(r["sentence"].strip(), int(r["label"] == "past")) for r in json.loads(path.read_text(encoding="utf-8"))]


def _singular_plural(path: Path):
    return [(r["sentence"].strip(), int(r["n_subjects"] == "multiple")) for r in _csv_rows(path)]


def _language(path: Path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append((r["text"].strip(), int(r["lang"] == "eng")))
    return rows


TASKS: dict[str, _TaskSpec] = {
    "sst2": _TaskSpec("sst2/dev.tsv", "Is the sentiment of this text positive?", _sst2, ("stanfordnlp/sst2", "validation", "sentence", "label", 1)),
    "gender": _TaskSpec("bias_in_bios/bios_gender_balanced.csv", "Is the person described in this text a woman?", _gender, ("LabHC/bias_in_bios", "test", "hard_text", "gender", 1)),
    "ag_news_sports": _TaskSpec("ag_news/test.csv", "Is this news text about sports?", _ag_news, ("fancyzhx/ag_news", "test", "text", "label", 1)),
    "tense_past": _TaskSpec("classification/tense/tense_processed.json", "Is this sentence in the past tense?", _tense),
    "singular_plural": _TaskSpec("classification/singular_plural/singular_plural.csv", "Is the subject of this sentence plural (more than one person or thing)?", _singular_plural),
    "language_english": _TaskSpec("language_id/tatoeba_langid.jsonl", "Is this text in English?", _language),
}
ALL_TASKS = tuple(TASKS)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The eval data folder (see module docstring); the first candidate that exists, else the first."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    candidates = []
    if os.environ.get("CYCLE_ORACLE_DATA_DIR"):
        candidates.append(Path(os.environ["CYCLE_ORACLE_DATA_DIR"]).expanduser())
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def task_file(name: str, data_dir: str | Path | None = None) -> Path:
    spec = _spec(name)
    root = resolve_data_dir(data_dir)
    path = root / spec.path
    if not path.is_file():
        raise DatasetFileMissing(
            f"eval task {name!r} needs the file {spec.path} under the data folder {root}, and {path} does not exist. "
            f"Point the evals at a folder holding it with `eval.data_dir` in the recipe or `--data-dir` on the command "
            f"line (or the CYCLE_ORACLE_DATA_DIR environment variable); docs/EVALS.md lists every file and its format."
            + (" Where a Hugging Face hub is reachable, hub=True loads the task from " + spec.hub[0] + " instead." if spec.hub else "")
        )
    return path


def _spec(name: str) -> _TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; expected one of {list(TASKS)}")
    return TASKS[name]


def _hub_rows(name: str) -> list[tuple[str, int]]:
    spec = _spec(name)
    if spec.hub is None:
        raise HubUnavailable(f"eval task {name!r} has no Hugging Face `datasets` equivalent; supply its file {spec.path} via eval.data_dir / --data-dir")
    dataset, split, text_col, label_col, positive = spec.hub
    try:
        import datasets

        ds = datasets.load_dataset(dataset, split=split)
    except Exception as err:
        raise HubUnavailable(
            f"could not load {dataset!r} (split {split}) from the Hugging Face hub for eval task {name!r}: "
            f"{type(err).__name__}: {err}. This path needs network access to the hub; offline machines must use the "
            f"local file {spec.path} via eval.data_dir / --data-dir."
        ) from err
    return [(str(r[text_col]).strip(), int(r[label_col] == positive)) for r in ds]


def balanced_sample(items: Sequence[Item], n: int, seed: int) -> list[Item]:
    """Up to n items, half of each label (fewer when a class is short), deterministic in seed,
    returned in a seeded random order."""
    rng = random.Random(seed)
    by_label = {0: [x for x in items if x.label == 0], 1: [x for x in items if x.label == 1]}
    k = min(n // 2, len(by_label[0]), len(by_label[1]))
    if k == 0:
        raise ValueError(f"cannot draw a balanced sample of {n} items: class sizes {[len(v) for v in by_label.values()]}")
    chosen = rng.sample(by_label[0], k) + rng.sample(by_label[1], k)
    rng.shuffle(chosen)
    return chosen


def load_task(name: str, n_items: int = 200, seed: int = 0, data_dir: str | Path | None = None, hub: bool = False) -> BinaryTask:
    """A balanced sample of n_items (label 0/1 half each) of task `name` (see module table)."""
    spec = _spec(name)
    if hub:
        rows, source = _hub_rows(name), f"hf:{spec.hub[0]}"
    else:
        path = task_file(name, data_dir)
        rows, source = spec.rows(path), str(path)
    seen: set[str] = set()
    items = []
    for i, (text, label) in enumerate(rows):
        if text and text not in seen:
            seen.add(text)
            items.append(Item(text, label, f"{name}:{i}"))
    return BinaryTask(name, spec.question, tuple(balanced_sample(items, n_items, seed)), source)


def split_items(items: Sequence[Item], test_fraction: float = 0.5, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(train, test), stratified by label, by item (= by document: each text is its own)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    train, test = [], []
    for label in (0, 1):
        group = [x for x in items if x.label == label]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    overlap = {x.doc_id for x in train} & {x.doc_id for x in test}
    if overlap:
        raise ValueError(f"train/test share documents {sorted(overlap)[:3]}")
    return train, test


# ---- user-defined tasks (eval.probe_files) ---------------------------------------------------

_LABELS = {0: 0, 1: 1, "0": 0, "1": 1}


def _probe_rows(path: Path, text_column: str, label_column: str) -> list[tuple[str, int]]:
    """(text, label) per row of a JSONL / CSV / TSV probe file. The standard-library readers are
    used (not `datasets`) so that a bad row can be named: Arrow's readers fail a malformed line with
    a parser error for the whole file and infer a column's type across rows."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise ProbeFileError(f"probe file {path}: unknown format {suffix!r}; expected .jsonl (one JSON object per line), .csv or .tsv (with a header row)")
    records: list[tuple[int, dict]] = []  # (row number, fields)
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f]
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProbeFileError(f"probe file {path}, row {number}: not valid JSON ({err.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise ProbeFileError(f"probe file {path}, row {number}: expected a JSON object with {text_column!r} and {label_column!r}, got {type(record).__name__}")
            records.append((number, record))
        columns = set().union(*(r.keys() for _, r in records)) if records else set()
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            columns = set(reader.fieldnames or [])
            records = list(enumerate(reader, start=1))
    if not records:
        raise ProbeFileError(f"probe file {path} has no rows")
    for column, what in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in columns:
            raise ProbeFileError(f"probe file {path} has no {what} {column!r} (columns: {sorted(columns)}); set {what} in eval.probe_files")
    rows = []
    for number, record in records:
        if None in record:  # csv.DictReader puts a row's extra fields under the key None
            raise ProbeFileError(f"probe file {path}, row {number}: more fields than the header's {len(columns)}; expected one value per column (quote texts holding the delimiter)")
        text, label = record.get(text_column), record.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise ProbeFileError(f"probe file {path}, row {number}: expected a non-empty text in column {text_column!r}, got {text!r}")
        value = label.strip() if isinstance(label, str) else label
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, str)) or value not in _LABELS:
            raise ProbeFileError(f"probe file {path}, row {number}: expected the label 0 or 1 in column {label_column!r}, got {label!r}")
        rows.append((text.strip(), _LABELS[value]))
    present = {label for _, label in rows}
    if present != {0, 1}:
        raise ProbeFileError(f"probe file {path}: every label is {present.pop()}; a binary task needs rows of both labels 0 and 1")
    return rows


def probe_file_name(settings) -> str:
    return settings.name or Path(settings.path).stem


def load_probe_file(settings, n_items: int = 200, seed: int = 0) -> BinaryTask:
    """A balanced sample of n_items of a user-defined probe file (`config.ProbeFileSettings`)."""
    path = Path(settings.path).expanduser()
    if not path.is_file():
        raise ProbeFileError(f"probe file not found: {path} (eval.probe_files path; relative paths start from the current folder)")
    name = probe_file_name(settings)
    rows = _probe_rows(path, settings.text_column, settings.label_column)
    seen: set[str] = set()
    items = []
    for i, (text, label) in enumerate(rows):
        if text not in seen:
            seen.add(text)
            items.append(Item(text, label, f"{name}:{i}"))
    return BinaryTask(name, settings.question, tuple(balanced_sample(items, n_items, seed)), str(path))
