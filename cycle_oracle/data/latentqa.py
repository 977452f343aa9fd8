"""LatentQA data in the public format (Pan et al.; github.com/aypan17/latentqa) -> warmup items.

A folder in that format holds JSON lists of rows keyed by behaviour `label`:
  system.json               {system, stimulus_user, label}
  stimulus.json             {control_user, control_thought, control_model, stimulus_user, label}
  stimulus_completion.json  the same + stimulus_model (the target's reply under the control)
  control.json              {control_user, label}   (no stimulus: see below)
and `qa.json`: {label: [[question, answer], ...]}.

For each row the TARGET reads a chat: the control (the behaviour's instruction) as the system turn,
then the stimulus user turn, then the completion as the assistant turn where present
(`control_as="turns"` keeps upstream's layout for stimulus rows: control as a user turn + the
model's acknowledgement). `read_positions` never cover the control turn (LatentQA's masking): the
decoder must recover the control from its effect on later tokens, not read it off. Which later
tokens (`read`, see READ_MODES): the stimulus and completion text (`content`), the reply header
(`reply_header`: the template tokens between the end of the user's message and the start of the
reply, e.g. "\n<|im_start|>assistant\n" minus special tokens, where the target has read the whole
prompt and is about to answer), or both. Measured on SmolLM2-135M at layer 15 (docs/DATA.md):
a linear probe reads a held-out behaviour's tone from the last reply-header activation (0.83,
majority 0.20) but not from a stimulus or completion token (0.17, 0.03). control.json rows
have nothing to read but the control itself (upstream reads them unmasked), so they are skipped
and counted.

Every (context, QA pair) of a label becomes one item with `source_id = label`; splits are by label.
Malformed rows are reported with file and row index: fatal with `strict=True`, otherwise skipped,
counted and logged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cycle_oracle.data.items import ProblemLog, WarmupItem, log
from cycle_oracle.data.mixture import split_by_source
from cycle_oracle.models import render_chat

ROW_FILES = ("system.json", "stimulus.json", "stimulus_completion.json")
READ_MODES = ("content", "reply_header", "reply_header_last", "both")
_MARK = "\u2063CTX{}\u2063"  # never produced from user text; one per message content


class ChatTemplateError(ValueError):
    pass


def chat_context(
    tokenizer,
    messages: Sequence[dict],
    read_roles_from: int,
    max_tokens: int | None = None,
    read: str = "reply_header",
) -> tuple[list[int], list[int]] | None:
    """Tokenize a chat and say which positions may be read.

    `messages[read_roles_from:]` are readable; everything before is the control and never readable.
    `read="content"`: their content tokens only, not the template's role headers or end markers;
    `"reply_header"`: the non-special template tokens after the last user message's content up to
    the reply's first content token (a chat ending on a user turn gets the generation prompt, so
    there is a header to read); `"reply_header_last"`: only its last token, the one position where
    a probe finds the behaviour (the others carry no more of it than chance); `"both"`: the union
    of `content` and `reply_header`. Each message content is tokenized on its own
    between the template's pieces, so token boundaries never straddle a turn. Truncated to
    `max_tokens` (cutting the end); returns None when nothing readable survives (for `content`:
    when no token of the first readable message does).
    """
    if read not in READ_MODES:
        raise ValueError(f"read={read!r}: expected one of {READ_MODES}")
    contents = [str(m["content"]).strip() for m in messages]
    marked = [{"role": m["role"], "content": _MARK.format(i)} for i, m in enumerate(messages)]
    generation_prompt = read != "content" and messages[-1]["role"] == "user"
    text = render_chat(tokenizer, marked, add_generation_prompt=generation_prompt)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    rest = text
    for i, content in enumerate(contents):
        mark = _MARK.format(i)
        if rest.count(mark) != 1:
            raise ChatTemplateError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} drops or repeats message "
                f"{i} ({messages[i]['role']}); cannot locate the turns to mask"
            )
        before, rest = rest.split(mark)
        ids += tokenizer.encode(before, add_special_tokens=False)
        start = len(ids)
        ids += tokenizer.encode(content, add_special_tokens=False)
        spans.append((start, len(ids)))
    ids += tokenizer.encode(rest, add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    limit = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    readable: set[int] = set()
    if read in ("content", "both"):
        first = [p for p in range(*spans[read_roles_from]) if p < limit and ids[p] not in special]
        if not first:
            return None
        readable.update(p for s, e in spans[read_roles_from:] for p in range(s, min(e, limit)) if ids[p] not in special)
    if read in ("reply_header", "reply_header_last", "both"):
        users = [i for i in range(read_roles_from, len(messages)) if messages[i]["role"] == "user"]
        if not users:
            raise ValueError("read='reply_header' needs a readable user turn to find the reply header after it")
        last = users[-1]
        end = spans[last + 1][0] if last + 1 < len(spans) else len(ids)
        header = [p for p in range(spans[last][1], min(end, limit)) if ids[p] not in special]
        if not header:
            return None
        readable.update(header[-1:] if read == "reply_header_last" else header)
    return ids[:limit], sorted(readable)


@dataclass
class LatentQAResult:
    items: list[WarmupItem]
    malformed: int
    problems: list[str]
    stats: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return sorted({it.source_id for it in self.items})

    def split(self, heldout_fraction: float, seed: int) -> tuple[list[WarmupItem], list[WarmupItem]]:
        """(train, held-out) by behaviour label."""
        return split_by_source(self.items, heldout_fraction, seed)


def _nonempty_str(row: dict, key: str) -> bool:
    return isinstance(row.get(key), str) and bool(row[key].strip())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def load_qa(path: Path, problems: ProblemLog) -> dict[str, list[tuple[str, str]]]:
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object label -> [[question, answer], ...], got {type(raw).__name__}")
    qa: dict[str, list[tuple[str, str]]] = {}
    for label, pairs in raw.items():
        if not isinstance(pairs, list):
            problems.report(f"{path} label {label!r}", f"expected a list of [question, answer] pairs, got {type(pairs).__name__}")
            continue
        good = []
        for j, pair in enumerate(pairs):
            if (
                isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(isinstance(x, str) and x.strip() for x in pair)
            ):
                good.append((pair[0].strip(), pair[1].strip()))
            else:
                problems.report(f"{path} label {label!r} pair {j}", f"expected [question, answer] (two non-empty strings), got {pair!r:.80}")
        if good:
            qa[label] = good
    return qa


def row_messages(row: dict, control_as: str = "system") -> tuple[list[dict], int] | str:
    """(messages, index of the first readable message) for one row, or a reason string if malformed.
    Returns "control_only" for rows without a stimulus (nothing readable under LatentQA masking)."""
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    if not _nonempty_str(row, "label"):
        return "missing or empty 'label'"
    completion = next((row[k] for k in ("stimulus_model", "completion") if _nonempty_str(row, k)), None)
    if _nonempty_str(row, "system"):
        control = [{"role": "system", "content": row["system"]}]
    elif _nonempty_str(row, "control_user"):
        if not _nonempty_str(row, "stimulus_user"):
            return "control_only"
        if control_as == "turns":
            control = [{"role": "user", "content": row["control_user"]}]
            if _nonempty_str(row, "control_model"):
                control.append({"role": "assistant", "content": row["control_model"]})
        else:
            control = [{"role": "system", "content": row["control_user"]}]
    else:
        return "no control: needs a non-empty 'system' or 'control_user'"
    if not _nonempty_str(row, "stimulus_user"):
        return "missing or empty 'stimulus_user'"
    messages = control + [{"role": "user", "content": row["stimulus_user"]}]
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages, len(control)


def load_latentqa(
    folders: str | Path | Sequence[str | Path],
    tokenizer,
    strict: bool = False,
    max_tokens: int = 256,
    control_as: str = "system",
    files: Sequence[str] = ROW_FILES,
    read: str = "reply_header",
) -> LatentQAResult:
    """Load LatentQA folder(s) in the public format into `latentqa` items (one per context x QA pair).

    `read` picks the readable positions (READ_MODES, see `chat_context`). Labels without QA pairs
    (e.g. upstream's train/ folder, whose qa.json is not public) give no items and are counted in
    `stats["labels_without_qa"]`. Identical contexts of a label (upstream's stimulus.json repeats
    system.json) are kept once.
    """
    if control_as not in ("system", "turns"):
        raise ValueError(f"control_as must be 'system' or 'turns', got {control_as!r}")
    if isinstance(folders, (str, Path)):
        folders = [folders]
    problems = ProblemLog(strict=strict)
    stats = {"rows": 0, "control_only_rows": 0, "too_long_rows": 0, "duplicate_contexts": 0, "labels_without_qa": 0, "files": []}
    items: list[WarmupItem] = []
    seen_labels: dict[str, str] = {}
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"LatentQA folder not found: {folder} (expected a folder with system.json / stimulus*.json and qa.json)")
        qa_path = folder / "qa.json"
        qa = load_qa(qa_path, problems) if qa_path.is_file() else {}
        if not qa_path.is_file():
            log.warning("%s has no qa.json: its behaviours give no items", folder)
        contexts: dict[str, dict[tuple[int, ...], tuple[int, ...]]] = {}
        no_qa: set[str] = set()
        present = [name for name in files if (folder / name).is_file()]
        if not present:
            raise FileNotFoundError(f"{folder} holds none of {list(files)}")
        for name in present:
            path = folder / name
            rows = _read_json(path)
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
            stats["files"].append(str(path))
            for i, row in enumerate(rows):
                stats["rows"] += 1
                parsed = row_messages(row, control_as)
                if parsed == "control_only":
                    stats["control_only_rows"] += 1
                    continue
                if isinstance(parsed, str):
                    problems.report(f"{path} row {i}", parsed)
                    continue
                messages, first_read = parsed
                label = row["label"].strip()
                owner = seen_labels.setdefault(label, str(folder))
                if owner != str(folder):
                    problems.report(f"{path} row {i}", f"label {label!r} also appears in {owner}; labels must be unique across folders")
                    continue
                if label not in qa:  # nothing to ask about it: do not spend time tokenizing
                    no_qa.add(label)
                    continue
                built = chat_context(tokenizer, messages, first_read, max_tokens, read)
                if built is None:
                    stats["too_long_rows"] += 1
                    continue
                ids, readable = built
                per_label = contexts.setdefault(label, {})
                if tuple(ids) in per_label:
                    stats["duplicate_contexts"] += 1
                    continue
                per_label[tuple(ids)] = tuple(readable)
        stats["labels_without_qa"] += len(no_qa)
        for label, ctxs in contexts.items():
            for ids, readable in ctxs.items():
                for q, a in qa[label]:
                    items.append(WarmupItem("latentqa", label, ids, readable, q, a))
    if problems.count:
        log.warning("LatentQA: skipped %d malformed row(s); first: %s", problems.count, problems.messages[:3])
    stats["labels"] = len({it.source_id for it in items})
    stats["items"] = len(items)
    return LatentQAResult(items, problems.count, problems.messages, stats)
