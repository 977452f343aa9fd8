"""The beyond-transcription experiment's table (issue 20, item 6) from the folders `run_arms.sh` wrote.

For each arm (GRPO from the shared warmup: baseline, + copy penalty, + supervised mixing; the
quote-free arm from its own warmup): retrieval top-1 and FVE of its GRPO decoder under the frozen
warmup encoder, the text encoder and its own co-trained encoder (GRPO's final evals, one pool), the
context-copy rate (bigrams of the description found in the 16-token source window), the GRPO step
time, and from `cycle-oracle eval` on its checkpoint the paraphrase and word-shuffle drops and the
six probe tasks' text-route accuracy; the description-parts split (quote vs sentence, under the
frozen encoder) where `parts_<arm>.json` exists. Then the training-free baselines on the same pool,
graded by the frozen warmup encoder. JSON to --out, Markdown to stdout.

    .venv/bin/python -m experiments.beyond_transcription.summarize runs/exp --out experiments/beyond_transcription/result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ARMS = ("baseline", "copy_penalty", "sft_mix", "quote_free")


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cond(r: dict | None, name: str = "description") -> dict:
    return ((r or {}).get("conditions") or {}).get(name) or {}


def copy2(r: dict | None) -> float | None:
    return (((r or {}).get("text_controls") or {}).get("copy_rate") or {}).get("2")


def probe_accuracy(ev: dict | None, route: str = "decoder") -> dict:
    """Test accuracy per probe task at the last position for one route: "decoder" = a text
    classifier on the descriptions, "probe" = a linear probe on v (the ceiling)."""
    out = {}
    for task, res in (((ev or {}).get("probes") or {}).get("tasks") or {}).items():
        block = ((res.get("positions") or {}).get("last") or {}).get(route) or {}
        out[task] = block.get("accuracy")
    return out


def paraphrase_drops(ev: dict | None) -> dict:
    return (((ev or {}).get("retrieval") or {}).get("paraphrase") or {}).get("drops") or {}


def arm_row(root: Path, arm: str) -> dict | None:
    res = read(root / arm / "grpo" / "results.json")
    if res is None:
        return None
    frozen = res.get("frozen_start_encoder") or {}
    text = res.get("text_encoder") or {}
    metrics = [json.loads(line) for line in (root / arm / "grpo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if m.get("stage") == "grpo"]
    ev = read(root / f"eval_{arm}" / "results.json")
    row = {
        "arm": arm, "pool": res["retrieval"]["n"], "chance_top1": res["retrieval"]["chance"]["top1"], "grpo_steps": len(steps),
        "step_s_median": statistics.median(m["time_step"] for m in steps) if steps else None,
        "reward_last5": statistics.mean(m["reward_mean"] for m in steps[-5:]) if steps else None,
        "copy_rate_train_last5": statistics.mean(m["copy_rate"] for m in steps[-5:]) if steps and "copy_rate" in steps[-1] else None,
        "frozen": {"grpo": cond(frozen.get("grpo_decoder")), "warmup": cond(frozen.get("warmup_decoder")),
                   "diff": (frozen.get("grpo_minus_warmup") or {}).get("centred_cosine")},
        "text": {"grpo": cond(text.get("grpo_decoder")), "warmup": cond(text.get("warmup_decoder")),
                 "diff": (text.get("grpo_minus_warmup") or {}).get("centred_cosine")},
        "final": {"grpo": cond(res.get("retrieval")), "warmup": cond(res.get("retrieval_warmup_decoder"))},
        "context_only_top1": cond(res.get("retrieval"), "context_only").get("top1"),
        "copy_rate_2": {"grpo": copy2(res.get("retrieval")), "warmup": copy2(res.get("retrieval_warmup_decoder"))},
        "examples": [it["description"] for it in res["retrieval"]["items"][:3]],
        "eval": None if ev is None else {"top1": cond(ev.get("retrieval")).get("top1"), "paraphrase_drops": paraphrase_drops(ev),
                                         "probes": probe_accuracy(ev), "linear_probe": probe_accuracy(ev, "probe")},
        "parts": read(root / f"parts_{arm}.json"),
    }
    return row


def baseline_rows(root: Path) -> dict:
    ev = read(root / "eval_baselines" / "results.json")
    if ev is None:
        return {}
    sections = {ev["oracles"][0]: ev, **(ev.get("other_oracles") or {})}
    return {name: {"top1": cond(s.get("retrieval")).get("top1"), "fve": cond(s.get("retrieval")).get("fve"),
                   "centred_cosine": cond(s.get("retrieval")).get("centred_cosine"), "copy_rate_2": copy2(s.get("retrieval")),
                   "paraphrase_drops": paraphrase_drops(s), "probes": probe_accuracy(s),
                   "linear_probe": probe_accuracy(s, "probe")} for name, s in sections.items()}


def f(x, d=3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def drop_cell(d: dict | None) -> str:
    if not d:
        return "-"
    c = d.get("centred_cosine_drop") or {}
    return f"{f(d.get('drop_top1'))}, {f(c.get('mean'))} [{f(c.get('ci_low'))}, {f(c.get('ci_high'))}]"


def markdown(rows: list[dict], baselines: dict) -> str:
    L = ["| arm | steps (median s) | frozen top-1 GRPO / warmup | frozen FVE GRPO | GRPO - warmup centred [95%] | text-enc top-1 GRPO / warmup "
         "| own-enc top-1 | copy-2 GRPO / warmup | eval top-1 (own enc, greedy) | paraphrase drop: top-1, centred [95%] | word-shuffle drop: top-1, centred [95%] |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["frozen"]["diff"] or {}
        drops = (r["eval"] or {}).get("paraphrase_drops") or {}
        L.append(f"| {r['arm']} | {r['grpo_steps']} ({f(r['step_s_median'], 1)}) | {f(r['frozen']['grpo'].get('top1'))} / {f(r['frozen']['warmup'].get('top1'))} "
                 f"| {f(r['frozen']['grpo'].get('fve'))} | {f(d.get('mean'))} [{f(d.get('ci_low'))}, {f(d.get('ci_high'))}] "
                 f"| {f(r['text']['grpo'].get('top1'))} / {f(r['text']['warmup'].get('top1'))} | {f(r['final']['grpo'].get('top1'))} "
                 f"| {f(r['copy_rate_2']['grpo'], 2)} / {f(r['copy_rate_2']['warmup'], 2)} "
                 f"| {f((r['eval'] or {}).get('top1'))} | {drop_cell(drops.get('paraphrased'))} | {drop_cell(drops.get('word_shuffled'))} |")
    if rows:
        L += ["", f"Pool {rows[0]['pool']} held-out activations, chance top-1 {f(rows[0]['chance_top1'])}; context-only ceiling "
                  f"(own encoder) {f(rows[0]['context_only_top1'])}."]
    if baselines:
        L += ["", "| baseline (frozen warmup encoder) | top-1 | FVE | copy-2 | paraphrase drop: top-1, centred [95%] | word-shuffle drop |", "|---|---|---|---|---|---|"]
        for name, b in baselines.items():
            L.append(f"| {name} | {f(b['top1'])} | {f(b['fve'])} | {f(b['copy_rate_2'], 2)} | {drop_cell((b['paraphrase_drops'] or {}).get('paraphrased'))} | {drop_cell((b['paraphrase_drops'] or {}).get('word_shuffled'))} |")
    tasks = sorted({t for r in rows for t in ((r['eval'] or {}).get('probes') or {})} | {t for b in baselines.values() for t in b['probes']})
    if tasks:
        L += ["", "| probe accuracy (text route) | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name, probes in [(r["arm"], (r["eval"] or {}).get("probes") or {}) for r in rows] + [(n, b["probes"]) for n, b in baselines.items()]:
            L.append(f"| {name} | " + " | ".join(f(probes.get(t), 2) for t in tasks) + " |")
        linear = next((b["linear_probe"] for b in baselines.values() if b.get("linear_probe")), None)
        if linear:
            L.append("| linear probe on v | " + " | ".join(f(linear.get(t), 2) for t in tasks) + " |")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [r for r in (arm_row(args.root, a) for a in ARMS) if r is not None]
    baselines = baseline_rows(args.root)
    if args.out:
        args.out.write_text(json.dumps({"arms": rows, "baselines": baselines}, indent=1, default=float) + "\n")
    print(markdown(rows, baselines))


if __name__ == "__main__":
    main()
