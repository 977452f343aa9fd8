"""The closing report of a training job: the stage results (GRPO's and, when it ran, the warmup's
`results.json` dicts) turned into what a person reads at the end — a one-line verdict, tables for
the terminal (rich) and the same content as Markdown (`<out>/report.md`).

    closing_report(grpo_results, warmup_results=None, viewer=None) -> ClosingReport
        .verdict   one line, in words, that claims no more than the intervals allow
        .markdown  the report as Markdown text
        .renderable()  a rich Group (verdict + tables) for the terminal

A pure function of the dicts (no model, no files): what is missing (no warmup, no starting
checkpoint, no controls, no examples) is left out with a note. Sections:

- retrieval on the held-out pool of N activations: top-1 (with a 95% Wilson interval) and top-5 of
  the GRPO decoder and of the warmup (starting) decoder, under the starting checkpoint's encoder,
  frozen (it never saw GRPO output: the unbiased comparison, first), then under the final,
  co-trained encoder (which favours the GRPO decoder's outputs), each next to chance (1/N,
  5/N) and the predict-the-mean floor, with the shuffled / zero controls and the context-only
  ceiling (the encoder reading the true source text);
- the paired GRPO-minus-warmup difference per item with its 95% bootstrap interval: centred and
  raw cosine as `results.json` holds them (`grpo_minus_warmup`), and top-1 computed here from the
  per-item ranks (`cycle_oracle.stats.paired_difference`, the same bootstrap);
- every oracle under every grader, top-1 and FVE with their intervals: the decoders beside the
  training-free baselines (Patchscopes, the logit lens, the text-only guess) and the format
  controls (the true read token and quote window written bare and in the decoder's format);
- the warmup's held-out gaps (does the decoder read the activation?): per task the answer NLL with
  the real, another source's (shuffled) and a zero activation, the gap shuffled - real with its
  interval and item count, and LatentQA's ranking of the true answer (top-1 real vs shuffled);
  the encoder warm start's held-out centred cosine before -> after;
- five example descriptions (the first five items of the pool, not selected) next to the end of
  their source text, with the warmup decoder's description of the same activation;
- the viewer page, when the job wrote one.

The verdict leads with the trained decoder against the best training-free baseline under each grader
that never saw GRPO output (frozen starting encoder, text encoder; `evals/verdict.py`: a win needs both
paired intervals, top-1 and FVE, above 0, and a baseline that wins on either is named first). Then:
top-1 is "above chance" only when its Wilson interval's lower end exceeds 1/N;
the GRPO decoder is "better" ("worse") than the warmup decoder only when the interval of the paired
centred-cosine difference (the measure training optimises; the top-1 difference is in the table)
lies above (below) 0; everything else says it cannot tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from cycle_oracle.evals.probes import wilson_interval
from cycle_oracle.files import atomic_write_text
from cycle_oracle.stats import paired_difference

TASK_NAMES = {"latentqa": "LatentQA", "token_prediction": "token prediction", "description": "description"}


# ---- formatting ---------------------------------------------------------------------------

def _num(x) -> float | None:
    """A finite float, or None (missing, null in results.json, NaN)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _f(x, digits: int = 3, signed: bool = False) -> str:
    x = _num(x)
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _ci(lo, hi, digits: int = 3, signed: bool = False) -> str:
    if _num(lo) is None or _num(hi) is None:
        return ""
    return f"[{_f(lo, digits, signed)}, {_f(hi, digits, signed)}]"


def _times(x, chance) -> str:
    x, chance = _num(x), _num(chance)
    if x is None or not chance:
        return "–"
    r = x / chance
    return f"{r:.1f}×" if r < 10 else f"{r:.0f}×"


def _clip(text, n: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _tail(text, n: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else "…" + text[-(n - 1):]


@dataclass
class Section:
    """One table: a title, column names (a newline may break a terminal header), rows of strings
    (a row of one string is a group label spanning the table), notes under it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def group(self, label: str) -> None:
        self.rows.append([label])


@dataclass
class ClosingReport:
    verdict: str
    sections: list[Section]
    header: list[str]
    viewer: str | None = None

    @property
    def markdown(self) -> str:
        lines = ["# Run report", "", f"**Verdict:** {self.verdict}", ""]
        lines += [f"- {h}" for h in self.header] + ([""] if self.header else [])
        for s in self.sections:
            lines += [f"## {s.title}", ""]
            if s.rows:
                lines.append("| " + " | ".join(_md_cell(c) for c in s.columns) + " |")
                lines.append("|" + "---|" * len(s.columns))
                for row in s.rows:
                    cells = [f"**{row[0]}**"] + [""] * (len(s.columns) - 1) if len(row) == 1 else row
                    lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
                lines.append("")
            for note in s.notes:
                lines += [note, ""]
        if self.viewer:
            lines += ["## Viewer", "", f"Every token of one embedded passage described by the GRPO checkpoint: `{self.viewer}` (open it in a browser; hover or click a token).", ""]
        return "\n".join(lines).rstrip() + "\n"

    def renderable(self, compact: bool = False) -> Group:
        """Everything (as report.md has it), or `compact`: the verdict and the first table (every oracle)
        table only, for the end of a job's terminal output."""
        parts: list = [Text("Verdict: ", style="bold") + Text(self.verdict)]
        parts += [Text(h, style="dim") for h in self.header]
        for s in self.sections[:1] if compact else self.sections:
            table = Table(title=s.title, title_justify="left", title_style="bold", expand=False)
            cells = [row for row in s.rows if len(row) > 1]
            for j, c in enumerate(s.columns):  # short columns (numbers) never wrap; text wraps at spaces
                short = max([len(row[j]) for row in cells] + [0]) <= 10
                table.add_column(c, overflow="fold", no_wrap=short)
            for row in s.rows:  # Text cells: a description's "[...]" is not rich markup
                if len(row) == 1:
                    table.add_row(Text(row[0], style="bold"), *[""] * (len(s.columns) - 1))
                else:
                    table.add_row(*(Text(c) for c in row))
            parts.append(table if s.rows else Text(s.title, style="bold"))
            parts += [] if compact else [Text(n, style="dim") for n in s.notes]
        if compact and len(self.sections) > 1:
            parts.append(Text("report.md also has: " + "; ".join(s.title.split(":")[0] for s in self.sections[1:]), style="dim"))
        if self.viewer:
            parts.append(Text("Viewer: ", style="bold") + Text(f"{self.viewer} (open in a browser; hover a token)"))
        return Group(*parts)

    def print(self, console: Console | None = None, compact: bool = False) -> None:
        (console or Console()).print(self.renderable(compact))


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# ---- the numbers --------------------------------------------------------------------------

def _hits(block: dict | None, condition: str = "description") -> tuple[int, int] | None:
    """(top-1 hits, N) of a retrieval condition: from the per-item ranks, else top-1 x N."""
    if not block:
        return None
    ranks = ((block.get("per_item") or {}).get(condition) or {}).get("rank")
    if ranks:
        return sum(1 for r in ranks if r is not None and r <= 1), len(ranks)
    c = (block.get("conditions") or {}).get(condition) or {}
    n, top1 = block.get("n"), _num(c.get("top1"))
    if not n or top1 is None:
        return None
    return round(top1 * n), int(n)


def _top1_ci(block: dict | None, condition: str = "description") -> tuple[float, float] | None:
    h = _hits(block, condition)
    return wilson_interval(*h) if h and h[1] else None


def top1_difference(a: dict | None, b: dict | None) -> dict | None:
    """Paired top-1 difference a - b per pool item (1 if the true activation ranks first), with the
    bootstrap interval of `cycle_oracle.stats.paired_difference`; None without per-item ranks or
    when the pools differ."""
    if not a or not b or a.get("rows") != b.get("rows"):
        return None
    ra = ((a.get("per_item") or {}).get("description") or {}).get("rank")
    rb = ((b.get("per_item") or {}).get("description") or {}).get("rank")
    if not ra or not rb or len(ra) != len(rb) or len(ra) < 2:
        return None

    hit = lambda ranks: torch.tensor([1.0 if r <= 1 else 0.0 for r in ranks])  # noqa: E731
    return paired_difference(hit(ra), hit(rb))


def _encoders(grpo: dict) -> list[tuple[str, str, dict | None, dict | None, dict | None]]:
    """(key, label, GRPO decoder's retrieval, warmup decoder's, stored paired difference) per encoder, frozen first."""
    out = []
    frozen = grpo.get("frozen_start_encoder")
    if frozen:
        out.append(("frozen", "frozen start", frozen.get("grpo_decoder"), frozen.get("warmup_decoder"), frozen.get("grpo_minus_warmup")))
    text = grpo.get("text_encoder")
    if text and text.get("grpo_decoder"):
        out.append(("text", "text encoder", text.get("grpo_decoder"), text.get("warmup_decoder"), text.get("grpo_minus_warmup")))
    if grpo.get("retrieval"):
        out.append(("final", "final (co-trained)", grpo.get("retrieval"), grpo.get("retrieval_warmup_decoder"), grpo.get("grpo_minus_warmup")))
    return out


ENCODER_WORDS = {"frozen": "the frozen starting encoder", "final": "the final (co-trained) encoder",
                 "text": "a text encoder (trained on source text only, never on descriptions)"}


def gain_only_under_own_encoder(grpo: dict) -> bool:
    """True when GRPO beats the warmup decoder (centred cosine, interval above 0) under its own
    co-trained encoder but under no encoder that was not co-trained with it (frozen start, text)."""
    def above(diff: dict | None) -> bool | None:
        d = (diff or {}).get("centred_cosine")
        return None if not d else d.get("ci_low", 0) > 0

    own = above(grpo.get("grpo_minus_warmup"))
    others = [above((grpo.get("frozen_start_encoder") or {}).get("grpo_minus_warmup")),
              above((grpo.get("text_encoder") or {}).get("grpo_minus_warmup"))]
    others = [x for x in others if x is not None]
    return bool(own) and bool(others) and not any(others)
CONDITION_LABELS = {"shuffled": "shuffled control", "zero": "zero control", "context_only": "context only (ceiling)",
                    "mean_floor": "predict the mean (floor)"}


def retrieval_section(grpo: dict) -> Section | None:
    encoders = _encoders(grpo)
    if not encoders:
        return None
    first = encoders[0][2] or {}
    n = first.get("n")
    chance = first.get("chance") or {}
    docs = (first.get("pool") or {}).get("documents")
    title = f"Retrieval: pick the described activation out of N = {n} held-out activations"
    if docs and docs != n:
        title += f" ({docs} documents)"
    s = Section(title, ["decoder / condition", "top-1 [95% CI]", "×\nchance", "top-5", "cosine", "centred\ncosine"])
    for key, _label, g, w, _diff in encoders:
        s.group(f"under {ENCODER_WORDS[key]}")
        rows: list[tuple[str, dict, str]] = []
        if g:
            rows.append(("GRPO decoder", g, "description"))
        if w:
            rows.append(("warmup decoder", w, "description"))
        if g:
            conds = g.get("conditions") or {}
            rows += [(CONDITION_LABELS[c], g, c) for c in ("shuffled", "zero", "context_only", "mean_floor") if c in conds]
        for name, block, cond in rows:
            c = block["conditions"][cond]
            ci = _top1_ci(block, cond)
            top1 = _f(c.get("top1")) + (f" {_ci(*ci, digits=2)}" if ci else "")
            ch = (block.get("chance") or {}).get("top1")
            s.rows.append([name, top1, _times(c.get("top1"), ch), _f(c.get("top5")), _f(c.get("cosine")),
                           "–" if cond == "mean_floor" else _f(c.get("centred_cosine"))])
    s.rows.append([f"chance (1/{n}, {min(5, n or 5)}/{n})", _f(chance.get("top1")), "1.0×", _f(chance.get("top5")), "", ""])
    final = grpo.get("retrieval") or {}
    controls = [f"{CONDITION_LABELS[c]}: {what}" for c, what in (
        ("shuffled", "another pool item's description"), ("zero", "the GRPO decoder's description of a zero activation"),
        ("context_only", f"the encoder reading the true source text ({final.get('context_tokens', '?')} tokens) instead of a description"),
        ("mean_floor", "the corpus mean as the reconstruction")) if c in (final.get("conditions") or {})]
    if controls:
        s.notes.append("Controls (final encoder) — " + "; ".join(controls) + ".")
    s.notes.append("Rank ties count against the true activation. The frozen starting encoder never saw GRPO output "
                   "(the unbiased comparison); the final encoder was co-trained on the GRPO decoder's descriptions, "
                   "so it favours them.")
    if not grpo.get("frozen_start_encoder"):
        s.notes.append("No frozen-encoder comparison: the run did not start from a checkpoint with an encoder.")
    if docs and n and docs < n:
        s.notes.append(f"The {n} items come from {docs} held-out documents (eval.rows_per_document): items of one document "
                       f"share their context, so the intervals, which treat items as independent, are too narrow.")
    return s


def difference_section(grpo: dict) -> Section | None:
    s = Section("GRPO decoder minus warmup decoder, paired over the pool's items (95% bootstrap interval)",
                ["measure", "GRPO −\nwarmup", "95% interval", "GRPO better\non items", "interval"])
    for key, _label, g, w, diff in _encoders(grpo):
        first = True
        t1 = top1_difference(g, w)
        measures = [("top-1", t1)] + [(m.replace("_", " "), (diff or {}).get(m)) for m in ("centred_cosine", "cosine")]
        for name, d in measures:
            if not d:
                continue
            if first:
                s.group(f"under {ENCODER_WORDS[key]}")
                first = False
            share = _num(d.get("share_a_better"))
            s.rows.append([name, _f(d.get("mean"), signed=True), _ci(d.get("ci_low"), d.get("ci_high"), signed=True),
                           "–" if share is None else f"{100 * share:.0f}%", _excludes(d)])
    if not s.rows:
        return None
    s.notes.append("Top-1 is computed here from the per-item ranks; the cosine differences are results.json's `grpo_minus_warmup`.")
    return s


def _excludes(d: dict) -> str:
    lo, hi = _num(d.get("ci_low")), _num(d.get("ci_high"))
    if lo is None or hi is None:
        return "–"
    if lo > 0:
        return "above 0"
    if hi < 0:
        return "below 0"
    return "includes 0"


def warmup_section(warmup: dict) -> Section | None:
    held = warmup.get("heldout") or {}
    if not held:
        return None
    s = Section("Warmup, held-out: does the decoder read the activation?",
                ["task: measure", "real", "shuffled", "zero", "gap [95% CI]", "items\n(sources)", "reads it?"])
    ranking_note = None
    for task in sorted(held, key=lambda t: list(TASK_NAMES).index(t) if t in TASK_NAMES else len(TASK_NAMES)):
        r = held[task] or {}
        name = TASK_NAMES.get(task, task)
        items = f"{r.get('items', '–')}" + (f" ({r['sources']})" if r.get("sources") is not None else "")
        gap = _gap(r.get("nll_gap_shuffled_minus_real"), r.get("nll_gap_ci_low"), r.get("nll_gap_ci_high"))
        s.rows.append([f"{name}: answer NLL", _f(r.get("nll_real")), _f(r.get("nll_shuffled")), _f(r.get("nll_zero")), gap, items,
                       _reads({"ci_low": r.get("nll_gap_ci_low"), "ci_high": r.get("nll_gap_ci_high")})])
        if "ranking_top1_real" in r:
            real, shuf = _num(r.get("ranking_top1_real")), _num(r.get("ranking_top1_shuffled"))
            k = r.get("ranking_candidates")
            diff = None if real is None or shuf is None else real - shuf
            lo, hi = r.get("ranking_gap_ci_low"), r.get("ranking_gap_ci_high")
            s.rows.append([f"{name}: true answer ranked first", _f(real), _f(shuf), "", _gap(diff, lo, hi),
                           f"{r.get('ranking_items', '–')}", _reads({"ci_low": lo, "ci_high": hi})])
            ranking_note = (f"Ranking: the true answer among {k} answers (other behaviours' answers to the same question) "
                            f"by NLL, top-1 share (chance {_f(1 / k, 2) if k else '–'}); its gap is real − shuffled.")
    s.notes.append("Answer NLL in nats per token (lower is better) with the item's own activation (real), another source's "
                   "(shuffled: a different document or behaviour) and a zero one; the NLL gap is shuffled − real, so every "
                   "gap is > 0 when the real activation helps, and \"reads it?\" is yes when its 95% interval lies above 0.")
    if ranking_note:
        s.notes.append(ranking_note)
    enc = warmup.get("encoder_warm_start") or {}
    before, after = enc.get("heldout_before") or {}, enc.get("heldout_after") or {}
    if before or after:
        line = (f"Encoder warm start, held-out centred cosine of its reconstructions: {_f(before.get('centred_cosine'))} before → "
                f"{_f(after.get('centred_cosine'))} after ({enc.get('heldout_pairs', '–')} descriptions)")
        window = enc.get("heldout_source_window") or {}
        if window:
            line += f"; reading the true source text instead: {_f(window.get('centred_cosine'))}"
        s.notes.append(line + ".")
    return s


def _gap(mean, lo, hi) -> str:
    return f"{_f(mean, signed=True)} {_ci(lo, hi, signed=True)}".strip()


def _reads(d: dict) -> str:
    return {"above 0": "yes", "below 0": "no (worse than shuffled)", "includes 0": "cannot tell", "–": "–"}[_excludes(d)]


def examples_section(grpo: dict, k: int = 5) -> Section | None:
    encoders = _encoders(grpo)
    if not encoders:
        return None
    key, _label, g, w, _d = encoders[0]
    items = (g or {}).get("items") or (grpo.get("retrieval") or {}).get("items") or []
    if not items:
        return None
    warm_by_row = {it.get("row"): it for it in ((w or {}).get("items") or [])}
    n = (g or {}).get("n", len(items))
    cols = ["source text (…end) → token", "GRPO decoder's description", f"rank of 1..{n}"]
    if warm_by_row:
        cols.append("warmup decoder's description")
    s = Section(f"Examples: the first {min(k, len(items))} items of the pool (not selected); rank under {ENCODER_WORDS[key]}", cols)
    for it in items[:k]:
        source = f"{_tail(it.get('context'), 90)} → {it.get('token', '')!r}" if it.get("context") else f"token {it.get('token', '')!r} of {it.get('doc_id', '')}"
        row = [source, _clip(it.get("description"), 200), str(it.get("description_rank", "–"))]
        if warm_by_row:
            row.append(_clip((warm_by_row.get(it.get("row")) or {}).get("description"), 200))
        s.rows.append(row)
    zero = (grpo.get("retrieval") or {}).get("zero_description")
    if zero is not None:
        s.notes.append(f"With nothing injected the GRPO decoder writes: {_clip(zero, 200)!r}")
    return s


ORACLE_LABELS = {"grpo_decoder": "GRPO decoder", "warmup_decoder": "warmup decoder", "patchscopes": "Patchscopes (untrained target)",
                 "logit_lens": "logit lens (untrained)", "text_guess": "text-only guess (no activation)",
                 "true_token_bare": "true read token, bare", "true_window_bare": "true quote window, bare",
                 "true_token_decoder_format": "true read token, decoder's format", "true_window_decoder_format": "true quote window, decoder's format"}
GRADER_ORDER = (("frozen_start_encoder", "frozen"), ("text_encoder", "text"), ("final_encoder", "final"))


def oracles_section(grpo: dict) -> Section | None:
    """Every oracle's top-1 and FVE under each grader (results.json's `headlines`)."""
    headlines = grpo.get("headlines") or {}
    if not headlines:
        return None
    s = Section("Trained decoders beside training-free oracles and format controls: top-1 and FVE on the same items",
                ["oracle", "top-1 [95% CI]", "FVE [95% CI]"])
    for grader, key in GRADER_ORDER:
        if grader not in headlines:
            continue
        s.group(f"under {ENCODER_WORDS[key]}")
        for name, h in headlines[grader].items():
            s.rows.append([ORACLE_LABELS.get(name, name), f"{_f(h['top1'])} {_ci(*h['top1_ci'])}", f"{_f(h['fve'], signed=True)} {_ci(*h['fve_ci'], signed=True)}"])
    s.notes.append("FVE = 1 - sum(1 - cos(v_hat, v)) / sum(1 - cos(mean, v)): 0 is predicting the corpus mean. Training-free: "
                   "Patchscopes and the logit lens read v through the untrained target; the text-only guess reads the source text "
                   "and no activation. Format controls hold the true content (the read token; the decoder's quote window) in each "
                   "format: a gap between them is the grader's taste for a format, not content.")
    return s


def baseline_verdicts(grpo: dict) -> list[str]:
    """The trained decoder against the best training-free baseline, one line per independent grader."""
    verdicts = grpo.get("verdicts") or {}
    return [verdicts[g]["line"] for g, _ in GRADER_ORDER[:2] if g in verdicts and verdicts[g].get("best_baseline")]


# ---- the verdict --------------------------------------------------------------------------

def verdict(grpo: dict | None) -> str:
    encoders = _encoders(grpo or {})
    if not encoders or not encoders[0][2]:
        return "no retrieval results: the GRPO stage wrote no final eval"
    key, _label, g, _w, diff = encoders[0]
    c = (g.get("conditions") or {}).get("description") or {}
    top1, chance, n = _num(c.get("top1")), _num((g.get("chance") or {}).get("top1")), g.get("n")
    ci = _top1_ci(g)
    where = f"under {ENCODER_WORDS[key]}" + ("" if key == "frozen" else ", which favours its outputs")
    if top1 is None or chance is None:
        return f"GRPO decoder: retrieval results incomplete ({where})"
    digits = 3 if chance < 0.05 else 2  # chance 1/94 reads 0.011, not 0.01
    head = f"GRPO decoder top-1 {top1:.{digits}f} vs chance {chance:.{digits}f} on {n} held-out activations"
    interval = f"95% interval {_ci(*ci, digits=digits)}" if ci else "no interval"
    if ci and ci[0] > chance:
        head += f" ({_times(top1, chance)}, above chance: {interval}) {where}"
    elif ci and ci[1] < chance:
        head += f" (below chance: {interval}) {where}"
    elif top1 <= 2 * chance:
        head += f": no better than chance ({interval}) {where}"
    else:  # a pool too small to tell
        head += f": not distinguishable from chance at N = {n} ({interval}) {where}"
    d = (diff or {}).get("centred_cosine")
    if d and _num(d.get("mean")) is not None:
        word = {"above 0": "better than", "below 0": "worse than", "includes 0": "not distinguishable from"}[_excludes(d)]
        tail = {"above 0": "interval excludes 0", "below 0": "interval excludes 0", "includes 0": "interval includes 0"}[_excludes(d)]
        head += (f"; {word} the warmup decoder: centred cosine {_f(d['mean'], signed=True)} "
                 f"{_ci(d.get('ci_low'), d.get('ci_high'), signed=True)}, {tail}")
    elif grpo.get("retrieval_warmup_decoder") is None and not grpo.get("frozen_start_encoder"):
        head += "; no warmup decoder to compare with (the run did not start from a checkpoint)"
    if gain_only_under_own_encoder(grpo):
        head += ("; FLAG: GRPO's gain over the warmup decoder shows only under its own co-trained encoder, "
                 "under no independent one")
    against = baseline_verdicts(grpo)
    return ". ".join([*(line[0].upper() + line[1:] for line in against), head[0].upper() + head[1:]]) if against else head


# ---- the report ---------------------------------------------------------------------------

def closing_report(grpo: dict | None, warmup: dict | None = None, viewer: str | None = None) -> ClosingReport:
    """The report of a GRPO run (`grpo`: its results.json dict) and, when given, of the warmup it
    started from (`warmup`: the warmup's results.json dict); `viewer`: a viewer page's path."""
    grpo = grpo or {}
    header = []
    if grpo:
        steps = grpo.get("steps")
        planned = grpo.get("steps_planned")
        line = f"GRPO: {steps} of {planned} steps" if planned is not None else f"GRPO: {steps} steps"
        if planned is not None and steps is not None and steps < planned:
            line += " (stopped early by grpo.max_minutes)"
        line += f", read layer {grpo.get('layer')}, weight version {grpo.get('weight_version')}"
        if grpo.get("role_restarts"):
            line += f", {grpo['role_restarts']} role restart(s)"
        header.append(line + ".")
    if warmup and warmup.get("steps") is not None and warmup["steps"] < warmup.get("steps_planned", warmup["steps"]):
        header.append(f"Warmup: {warmup['steps']} of {warmup['steps_planned']} steps (stopped early by warmup.max_minutes).")
    if warmup is None and (grpo.get("frozen_start_encoder") or grpo.get("retrieval_warmup_decoder")):
        header.append("Warmup held-out gaps: not in this report (the starting checkpoint's own results.json has them).")
    sections = [oracles_section(grpo), retrieval_section(grpo), difference_section(grpo), warmup_section(warmup or {}), examples_section(grpo)]
    return ClosingReport(verdict(grpo), [s for s in sections if s is not None], header, viewer)


def report_from_results(results: dict | None) -> ClosingReport | None:
    """The closing report of what a recipe driver returned: a `warmup_then_grpo` job ({"grpo",
    "warmup", "viewer"}) or a `grpo` job (its results); None for other kinds."""
    if not isinstance(results, dict):
        return None
    if results.get("kind") == "warmup_then_grpo" and isinstance(results.get("grpo"), dict):
        return closing_report(results["grpo"], results.get("warmup"), results.get("viewer"))
    if results.get("kind") == "grpo":
        return closing_report(results)
    return None


def write_closing_report(out, grpo: dict | None, warmup: dict | None = None, viewer: str | None = None) -> Path | None:
    """`<out>/report.md` (the closing report of these results), written atomically -> its path, or
    None after one printed line if it could not be (the job's results.json stands without it)."""
    path = Path(out) / "report.md"
    try:
        atomic_write_text(path, closing_report(grpo, warmup, viewer).markdown)
        return path
    except Exception as err:  # a report bug must not fail a finished job
        print(f"[report] {path} not written ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})")
        return None
