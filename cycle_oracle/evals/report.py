"""One run folder per eval: `results.json` (schema in docs/EVALS.md), `report.md` with tables,
and PNG plots (matplotlib, Agg backend):

- `retrieval_ranks.png`       histogram of the true activation's rank (description vs shuffled control);
- `cosine_distributions.png`  per-item cosine (raw and centred) of each condition, against the
                              predict-the-mean floor;
- `probe_accuracy.png`        per-task accuracy of each route with 95% Wilson intervals, per position;
- `arithmetic.png`            exact-match / first-digit rates per answer length vs the probe;
- `truncation.png`            retrieval top-1 and FVE against the description tokens kept, per oracle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cycle_oracle.files import atomic_write_text

SCHEMA_VERSION = 1
ROUTE_ORDER = ("probe", "decoder", "judge", "reconstruction", "oracle")
PARAPHRASE_KEYS = {"paraphrased": "paraphrase", "word_shuffled": "word_shuffle"}
"""retrieval condition -> the prefix of its drop keys in the summary."""


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _acc(block: dict | None) -> str:
    if not block or block.get("accuracy") is None:
        return "–"
    return f"{block['accuracy']:.3f} [{block['ci_low']:.2f}, {block['ci_high']:.2f}]"


def _sections(results: dict) -> dict[str, dict]:
    """{oracle name: its sections}: the primary's are the top level, the others' `other_oracles`."""
    names = results.get("oracles") or [results.get("oracle", {}).get("name", "decoder")]
    return {names[0]: results} | dict(results.get("other_oracles") or {})


def eval_summary(results: dict) -> dict[str, float]:
    """Flat headline numbers ("<eval>/<name>") for logs and dashboards: the primary oracle's, and
    with several oracles every oracle's as "oracles/<oracle>/<eval>/<name>"; the secrets eval's
    organism-side numbers as "secrets/black_box" and "secrets/leak_rate"."""
    sections = {name: dict(sec, _versus_text_guess=(results.get("versus_text_guess") or {}).get(name)) for name, sec in _sections(results).items()}
    s = _section_summary(next(iter(sections.values())))
    controls = results.get("secret_controls")
    if controls:
        s["secrets/black_box"] = controls["black_box"]["accuracy"]
        s["secrets/leak_rate"] = controls["leak_rate"]["accuracy"]
    if len(sections) > 1:
        for name, sec in sections.items():
            s.update({f"oracles/{name}/{k}": v for k, v in _section_summary(sec).items()})
    return s


def _section_summary(results: dict) -> dict[str, float]:
    s: dict[str, float] = {}
    r = results.get("retrieval")
    if r:
        c = r["conditions"]
        d = c["description"]
        s.update({f"retrieval/{k}": d[k] for k in ("top1", "top5", "mrr", "cosine", "centred_cosine", "fve")})
        s["retrieval/n"] = r["n"]
        s["retrieval/chance_top1"] = r["chance"]["top1"]
        s["retrieval/chance_top5"] = r["chance"]["top5"]
        s["retrieval/mean_floor_cosine"] = d["mean_baseline_cosine"]
        for name in ("shuffled", "zero", "context_only"):
            if name in c:
                s[f"retrieval/{name}_cosine"] = c[name]["cosine"]
                s[f"retrieval/{name}_top1"] = c[name]["top1"]
        if "shuffled_gap" in r:
            s["retrieval/shuffled_gap"] = r["shuffled_gap"]
        for name, key in PARAPHRASE_KEYS.items():
            if name in c:
                s[f"retrieval/{name}_top1"] = c[name]["top1"]
                s[f"retrieval/{name}_fve"] = c[name]["fve"]
                drop = r["paraphrase"]["drops"][name]
                for m in ("top1", "fve", "centred_cosine"):
                    s[f"retrieval/{key}_drop_{m}"] = drop[f"drop_{m}"]
        for name, cond in c.items():
            if name.startswith("truncated_") or name == "quote_banned":
                s[f"retrieval/{name}_top1"] = cond["top1"]
                s[f"retrieval/{name}_fve"] = cond["fve"]
        for grader, graded in (r.get("graders") or {}).items():
            gd = graded["conditions"]["description"]
            s.update({f"retrieval/graded_by_{grader}/{k}": gd[k] for k in ("top1", "fve", "centred_cosine")})
        tc = r.get("text_controls", {})
        if tc.get("copy_rate"):
            s["retrieval/copy_rate_2"] = tc["copy_rate"].get("2")
        s["retrieval/distinct_2"] = tc.get("distinct_2")
        s["retrieval/same_start_share"] = tc.get("same_start_share")
    p = results.get("probes")
    if p:
        for name, t in p["tasks"].items():
            s[f"probes/{name}/majority"] = t["majority"]["accuracy"]
            for pos, res in t["positions"].items():
                for route in ROUTE_ORDER:
                    if route in res:
                        s[f"probes/{name}/{pos}/{route}"] = res[route]["accuracy"]
    a = results.get("arithmetic")
    if a:
        for nd, blk in a["by_digits"].items():
            s[f"arithmetic/exact_match_{nd}digit"] = blk["exact_match"]["accuracy"]
            s[f"arithmetic/first_digit_{nd}digit"] = blk["first_digit"]["accuracy"]
        s["arithmetic/probe_first_digit"] = a["probe_first_digit"].get("accuracy")
    sec = results.get("secrets")
    if sec:
        for route, blk in sec["routes"].items():
            s[f"secrets/{route}"] = blk["accuracy"]
    vs = results.get("_versus_text_guess")
    if vs:
        for grader, pd in (vs.get("retrieval") or {}).items():
            prefix = "retrieval/minus_text_guess" if grader == "own" else f"retrieval/graded_by_{grader}/minus_text_guess"
            s[f"{prefix}_centred_cosine"] = pd["centred_cosine"]["mean"]
            s[f"{prefix}_top1"] = pd["top1"]["mean"]
        if vs.get("secrets"):
            s["secrets/minus_text_guess"] = vs["secrets"]["mean"]
    return {k: v for k, v in s.items() if v is not None}


def comparison_rows(sections: dict[str, dict]) -> list[dict]:
    """One row of headline numbers per oracle (results.json `comparison`, the report's side-by-side
    tables): retrieval under the grading encoder, the paraphrase drops, the text controls, the
    probes' description route (TF-IDF) per task and position, arithmetic exact match."""
    rows = []
    for name, sec in sections.items():
        info = sec.get("oracle", {})
        row: dict = {"oracle": name, "decoder": info.get("decoder"), "encoder": info.get("encoder")}
        r = sec.get("retrieval")
        if r:
            c = r["conditions"]
            row["retrieval"] = {k: c["description"][k] for k in ("top1", "top5", "mrr", "cosine", "centred_cosine", "fve")}
            row["chance_top1"] = r["chance"]["top1"]
            row["retrieval"]["shuffled_gap"] = r.get("shuffled_gap")
            for cond in PARAPHRASE_KEYS:
                if cond in c:
                    drop = r["paraphrase"]["drops"][cond]
                    row["retrieval"][cond] = {"top1": c[cond]["top1"], "fve": c[cond]["fve"], "drop_top1": drop["drop_top1"],
                                              "drop_fve": drop["drop_fve"], "kept_top1": drop["kept_top1"]}
            tc = r.get("text_controls", {})
            row["text_controls"] = {"copy_rate_2": (tc.get("copy_rate") or {}).get("2"), "distinct_2": tc.get("distinct_2"),
                                    "same_start_share": tc.get("same_start_share")}
        p = sec.get("probes")
        if p:
            row["probes"] = {f"{task}/{pos}": {route: res[route]["accuracy"] for route in ROUTE_ORDER if route in res}
                             for task, t in p["tasks"].items() for pos, res in t["positions"].items()}
        if r and r.get("truncation"):
            row["truncation"] = r["truncation"]["curve"]
        if r and r.get("graders"):
            row["graders"] = {g: {k: graded["conditions"]["description"][k] for k in ("top1", "fve", "centred_cosine")}
                              for g, graded in r["graders"].items()}
        if r and "quote_banned" in r["conditions"]:
            row["quote_banned"] = {k: r["conditions"]["quote_banned"][k] for k in ("top1", "fve")}
        a = sec.get("arithmetic")
        if a:
            row["arithmetic_exact_match"] = a["overall"]["exact_match"]["accuracy"]
        sc = sec.get("secrets")
        if sc:
            row["secrets"] = {route: {k: blk[k] for k in ("accuracy", "ci_low", "ci_high", "ci_words_low", "ci_words_high", "n")}
                              for route, blk in sc["routes"].items()}
        rows.append(row)
    return rows


def _comparison_md(rows: list[dict]) -> list[str]:
    lines = ["## Oracles side by side", "",
             "Same pool, probe items and problems for every oracle; retrieval under each oracle's encoder (named below).", ""]
    if any("retrieval" in r for r in rows):
        chance = next((r["chance_top1"] for r in rows if r.get("chance_top1") is not None), None)
        lines += ["| oracle | top-1 | FVE | top-5 | centred cosine | paraphrased top-1 (drop) | word-shuffled top-1 (drop) | copy rate (2-grams) | distinct-2 | same start |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| predict the mean (v_hat = corpus mean) | {_fmt(chance)} | 0 | – | 0 | – | – | – | – | – |"]
        for r in rows:
            if "retrieval" not in r:
                continue
            m, tc = r["retrieval"], r["text_controls"]

            def cond(name: str) -> str:
                c = m.get(name)
                return f"{_fmt(c['top1'])} ({_fmt(c['drop_top1'])})" if c else "–"

            lines.append(f"| {r['oracle']} | {_fmt(m['top1'])} | {_fmt(m['fve'])} | {_fmt(m['top5'])} | {_fmt(m['centred_cosine'])} | "
                         f"{cond('paraphrased')} | {cond('word_shuffled')} | {_fmt(tc['copy_rate_2'])} | {_fmt(tc['distinct_2'])} | {_fmt(tc['same_start_share'])} |")
        lines.append("")
    keys = sorted({k for r in rows for k in r.get("probes", {})}, key=lambda k: (k.split("/")[1], k))
    if keys:
        probe = rows[0]["probes"]
        lines += ["Probes, the description route (TF-IDF classifier on each oracle's descriptions), test accuracy; "
                  "`probe` reads v itself (the same for every oracle).", "",
                  "| task / position | probe | " + " | ".join(r["oracle"] for r in rows) + " |", "|---" * (2 + len(rows)) + "|"]
        for k in keys:
            lines.append(f"| {k} | {_fmt(probe.get(k, {}).get('probe'))} | " + " | ".join(_fmt(r.get("probes", {}).get(k, {}).get("decoder")) for r in rows) + " |")
        lines.append("")
    lines += _truncation_md(rows) + _graders_md(rows)
    lines += ["| oracle | decoder | encoder |", "|---|---|---|"] + [f"| {r['oracle']} | {r['decoder']} | {r['encoder']} |" for r in rows] + [""]
    return lines


def _ci(pd: dict | None) -> str:
    if not pd:
        return "–"
    return f"{pd['mean']:+.3f} [{pd['ci_low']:+.3f}, {pd['ci_high']:+.3f}]"


def _truncation_md(rows: list[dict]) -> list[str]:
    """Top-1 / FVE per oracle with each description cut to its first n tokens, and with quotes banned."""
    rows = [r for r in rows if r.get("truncation")]
    if not rows:
        return []
    tokens = [p["tokens"] for p in rows[0]["truncation"]]
    lines = ["What survives truncation: retrieval top-1 / FVE with each description cut to its first n tokens "
             "(a description of at most n tokens is unchanged), and with its quoted spans removed.", "",
             "| oracle | " + " | ".join(f"n = {t}" for t in tokens) + " | quote banned |", "|---" * (len(tokens) + 2) + "|"]
    for r in rows:
        qb = r.get("quote_banned")
        lines.append(f"| {r['oracle']} | " + " | ".join(f"{_fmt(p['top1'])} / {_fmt(p['fve'])}" for p in r["truncation"])
                     + f" | {_fmt(qb['top1']) + ' / ' + _fmt(qb['fve']) if qb else '–'} |")
    return lines + [""]


def _graders_md(rows: list[dict]) -> list[str]:
    rows_g = [r for r in rows if r.get("graders")]
    if not rows_g:
        return []
    graders = sorted({g for r in rows_g for g in r["graders"]})
    lines = ["The same descriptions graded by another checkpoint's encoder (`--grader`), beside each oracle's own: top-1 / FVE.", "",
             "| oracle | own encoder | " + " | ".join(f"{g} encoder" for g in graders) + " |", "|---" * (2 + len(graders)) + "|"]
    for r in rows_g:
        m = r["retrieval"]
        lines.append(f"| {r['oracle']} | {_fmt(m['top1'])} / {_fmt(m['fve'])} | "
                     + " | ".join(f"{_fmt(r['graders'][g]['top1'])} / {_fmt(r['graders'][g]['fve'])}" if g in r["graders"] else "–" for g in graders) + " |")
    return lines + [""]


def _versus_guess_md(vs: dict) -> list[str]:
    """Each oracle minus the text-only guess, paired over the same items, with 95% bootstrap intervals."""
    if not vs:
        return []
    lines = ["## Minus the text-only guess", "",
             "Each oracle minus `text_guess` (the target reading the source text, no activation), paired over the same items, "
             "95% bootstrap interval. An interval above 0 is what the activation added to what the text already said.", "",
             "| oracle | grader | centred cosine | top-1 | reciprocal rank | secrets (item named) |", "|---|---|---|---|---|---|"]
    for name, row in vs.items():
        graded = row.get("retrieval") or {"own": None}
        for k, (grader, pd) in enumerate(graded.items()):
            secrets = _ci(row.get("secrets")) if k == 0 else ""
            lines.append(f"| {name} | {grader} | {_ci(pd and pd['centred_cosine'])} | {_ci(pd and pd['top1'])} | {_ci(pd and pd['reciprocal_rank'])} | {secrets} |")
    return lines + [""]


def _secrets_md(results: dict, sections: dict[str, dict]) -> list[str]:
    controls = results.get("secret_controls")
    if not controls:
        return []
    bb, leak = controls["black_box"], controls["leak_rate"]
    lines = ["## Secret elicitation (Taboo organisms)", "",
             f"{len(controls['words'])} organisms ({', '.join(controls['words'])}), {controls['items']} items (words x held-out prompts), "
             f"each organism read at layer {controls['layer']}, position `{controls['read']}`. An item is correct when the text says the word. "
             "Accuracy with a 95% Wilson interval over items and a bootstrap interval over words.", "",
             "| oracle / baseline | route | accuracy | 95% CI (items) | 95% CI (words) |", "|---|---|---|---|---|",
             f"| black box: asking the organism | its reply | {_fmt(bb['accuracy'])} | [{bb['ci_low']:.2f}, {bb['ci_high']:.2f}] | "
             f"[{bb['ci_words_low']:.2f}, {bb['ci_words_high']:.2f}] |"]
    for name, sec in sections.items():
        for route, blk in (sec.get("secrets") or {}).get("routes", {}).items():
            lines.append(f"| {name} | {route} | {_fmt(blk['accuracy'])} | [{blk['ci_low']:.2f}, {blk['ci_high']:.2f}] | "
                         f"[{blk['ci_words_low']:.2f}, {blk['ci_words_high']:.2f}] |")
    lines += ["", f"Organism leak rate (its own replies to the eval prompts that say the word): {_fmt(leak['accuracy'])} "
              f"[{leak['ci_low']:.2f}, {leak['ci_high']:.2f}] of {leak['n']}.", ""]
    words = controls["words"]
    lines += ["Per word: " + " | ".join(words), "", "| oracle / route | " + " | ".join(words) + " |", "|---" * (1 + len(words)) + "|",
              "| black box | " + " | ".join(_fmt(bb["per_word"].get(w)) for w in words) + " |",
              "| leak rate | " + " | ".join(_fmt(leak["per_word"].get(w)) for w in words) + " |"]
    for name, sec in sections.items():
        for route, blk in (sec.get("secrets") or {}).get("routes", {}).items():
            lines.append(f"| {name} / {route} | " + " | ".join(_fmt(blk["per_word"].get(w)) for w in words) + " |")
    lines += ["", "Examples:", ""]
    for name, sec in sections.items():
        for ex in (sec.get("secrets") or {}).get("examples", [])[:2]:
            said = "; ".join(f"{r}: {ex[r][:100]!r}" for r in ("answer", "description") if r in ex)
            lines.append(f"- {name}, secret `{ex['word']}`, \"{ex['prompt']}\" → {said}")
    for ex in controls.get("reply_examples", [])[:3]:
        lines.append(f"- organism `{ex['word']}`, \"{ex['prompt']}\" → {ex['reply'][:160]!r}")
    return lines + [""]


# ---- markdown -----------------------------------------------------------------------------

def _retrieval_md(r: dict) -> list[str]:
    ch = r["chance"]
    lines = [
        "## Retrieval",
        "",
        f"Pool of N = {r['n']} activations ({r['pool']['documents']} documents). Chance: top-1 {ch['top1']:.3f}, "
        f"top-5 {ch['top5']:.3f}, MRR {ch['mrr']:.3f}. Rank ties count against the true activation.",
        "",
        "| condition | top-1 | FVE | top-5 | MRR | median rank | cosine | centred cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in r["conditions"].items():
        label = "mean_floor (predict the mean: FVE 0 by definition)" if name == "mean_floor" else name
        lines.append(f"| {label} | {_fmt(c['top1'])} | {_fmt(c['fve'])} | {_fmt(c['top5'])} | {_fmt(c['mrr'])} | {_fmt(c['median_rank'], 1)} | "
                     f"{_fmt(c['cosine'])} | {_fmt(c['centred_cosine'])} |")
    if r.get("truncation"):
        t = r["truncation"]
        lines += ["", f"Truncation (descriptions average {t['mean_description_tokens']:.1f} tokens): "
                  + "; ".join(f"n = {p['tokens']}: top-1 {_fmt(p['top1'])}, FVE {_fmt(p['fve'])} ({p['cut_share']:.0%} cut)" for p in t["curve"])]
    for g, graded in (r.get("graders") or {}).items():
        gd = graded["conditions"]
        lines += ["", f"Graded by the {g} encoder: " + "; ".join(f"{k} top-1 {_fmt(v['top1'])}, FVE {_fmt(v['fve'])}" for k, v in gd.items())]
    lines.append("")
    lines.append(f"Predict-the-mean floor cosine: {_fmt(r['conditions']['description']['mean_baseline_cosine'])}. "
                 + (f"Shuffled-activation gap (cosine): {_fmt(r['shuffled_gap'])}; centred: {_fmt(r.get('shuffled_gap_centred'))}." if "shuffled_gap" in r else ""))
    tc = r.get("text_controls", {})
    lines += ["", "| text control | value |", "|---|---|"]
    for n, v in (tc.get("copy_rate") or {}).items():
        lines.append(f"| context-copy rate, {n}-grams | {_fmt(v)} |")
    for k in ("distinct_1", "distinct_2", "same_start_share", "empty_share", "mean_words"):
        lines.append(f"| {k} | {_fmt(tc.get(k))} |")
    lines.append(f"| most common start | `{tc.get('most_common_start', '')}` |")
    if r.get("paraphrase"):
        pp = r["paraphrase"]
        lines += ["", f"Paraphrase test (hidden-channel check): each description rewritten by the target (greedy, \"{pp['instruction']}\") "
                  f"and with its words shuffled (seed {pp['seed']}), then encoded; drop = description - condition.", "",
                  "| condition | drop top-1 | top-1 kept above chance | drop FVE | drop centred cosine [95%] |", "|---|---|---|---|---|"]
        for name, d in pp["drops"].items():
            ci = d["centred_cosine_drop"]
            lines.append(f"| {name} | {_fmt(d['drop_top1'])} | {_fmt(d['kept_top1'])} | {_fmt(d['drop_fve'])} | "
                         f"{_fmt(ci['mean'])} [{_fmt(ci['ci_low'])}, {_fmt(ci['ci_high'])}] |")
    if r.get("zero_description") is not None:
        lines += ["", f"Zero-activation description: `{r['zero_description'][:200]}`"]
    lines += ["", "Examples:", ""]
    for it in r["items"][:5]:
        ctx = (it.get("context") or "").replace("\n", " ")[-80:]
        lines.append(f"- …{ctx}**{it['token']!s}** → {it['description'][:200]!r} (cos {it['description_cosine']:.3f}, rank {it['description_rank']})")
        for name in PARAPHRASE_KEYS:
            if f"{name}_description" in it:
                lines.append(f"  - {name}: {it[f'{name}_description'][:200]!r} (rank {it[f'{name}_rank']})")
    return lines + [""]


def _probes_md(p: dict) -> list[str]:
    lines = ["## Probes", "", "Accuracy on the test split with 95% Wilson intervals.", ""]
    for pos in p.get("positions", ["last", "mean"]):
        routes = [r for r in ROUTE_ORDER if any(r in t["positions"].get(pos, {}) for t in p["tasks"].values())]
        lines += [f"### position: {pos}", "", "| task | n test | majority | " + " | ".join(routes) + " |", "|---" * (3 + len(routes)) + "|"]
        for name, t in p["tasks"].items():
            res = t["positions"].get(pos, {})
            lines.append(f"| {name} | {t['n_test']} | {_acc(t['majority'])} | " + " | ".join(_acc(res.get(r)) for r in routes) + " |")
        lines.append("")
    skipped = {route: why for t in p["tasks"].values() for route, why in t.get("skipped_routes", {}).items()}
    if skipped:
        lines += ["Routes this oracle cannot run: " + "; ".join(f"`{r}` ({why})" for r, why in skipped.items()) + ".", ""]
    return lines


def _arith_md(a: dict) -> list[str]:
    pb = a["probe_first_digit"]
    lines = ["## Arithmetic", "", "| answer digits | n | exact match | first digit | states a number |", "|---|---|---|---|---|"]
    for nd, b in a["by_digits"].items():
        lines.append(f"| {nd} | {b['n']} | {_acc(b['exact_match'])} | {_acc(b['first_digit'])} | {_fmt(b['states_number'])} |")
    lines += ["", f"Linear probe for the answer's first digit (same activations): {_acc(pb) if pb.get('accuracy') is not None else '–'} "
              f"on {pb.get('n_test')} test problems; majority baseline {_fmt(pb.get('majority_baseline'))}.", ""]
    for ex in a.get("examples", []):
        lines.append(f"- `{ex['prompt']}` (answer {ex['answer']}) → {ex['description'][:160]!r}")
    return lines + [""]


def _oracle_line(info: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.items() if k in ("name", "model", "checkpoint", "layer", "backend", "decoder", "encoder", "reference"))


def _sections_md(sec: dict) -> list[str]:
    lines = []
    if sec.get("retrieval"):
        lines += _retrieval_md(sec["retrieval"])
    if sec.get("probes"):
        lines += _probes_md(sec["probes"])
    if sec.get("arithmetic"):
        lines += _arith_md(sec["arithmetic"])
    return lines


def render_markdown(results: dict) -> str:
    info = results.get("oracle", {})
    lines = ["# Eval report", "", f"Created {results.get('created', '')}. Oracle: " + _oracle_line(info), ""]
    others = results.get("other_oracles") or {}
    if others:
        lines += _comparison_md(results.get("comparison") or comparison_rows(_sections(results)))
    lines += _versus_guess_md(results.get("versus_text_guess") or {})
    lines += _secrets_md(results, _sections(results))
    if others:
        lines += [f"# Oracle `{info.get('name', 'decoder')}`", ""]
    lines += _sections_md(results)
    for name, sec in others.items():
        lines += [f"# Oracle `{name}`", "", _oracle_line(sec.get("oracle", {})), ""] + _sections_md(sec)
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------

def _plt():
    import matplotlib  # matplotlib: only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: only the plots need it

    return plt


def plot_retrieval_ranks(r: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    n = r["n"]
    width = max(1, math.ceil(n / 20))
    bins = list(range(1, n + width + 1, width))
    colors = {"description": "C0", "shuffled": "C1", "context_only": "C2"}
    for name in ("description", "shuffled", "context_only"):
        if name in r["per_item"]:
            ax.hist(r["per_item"][name]["rank"], bins=bins, histtype="step", lw=1.5, color=colors[name], label=name)
    ax.axhline(width, color="grey", ls=":", label=f"chance ({width} per bin)")
    ax.set_xlabel(f"rank of the true activation (1 = retrieved, N = {n})")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cosines(r: dict, path: Path) -> None:
    plt = _plt()
    colors = {"description": "C0", "mean_floor": "C7", "shuffled": "C1", "zero": "C3", "context_only": "C2"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("cosine", "centred_cosine")):
        # the mean's centred cosine is undefined (mu - mu = 0), so it is left out of the right panel
        series = {n: lists[key] for n, lists in r["per_item"].items() if not (n == "mean_floor" and key == "centred_cosine")}
        values = [x for xs in series.values() for x in xs]
        lo, hi = min(values), max(values)
        bins = [lo + (hi - lo + 1e-9) * i / 30 for i in range(31)]
        for name, xs in series.items():
            ax.hist(xs, bins=bins, histtype="step", lw=1.5, color=colors.get(name), label=name)
        if key == "cosine":
            ax.axvline(r["conditions"]["description"]["mean_baseline_cosine"], color="k", ls="--", label="mean floor (avg)")
        ax.set_xlabel(key.replace("_", " ") + " with the original activation")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_probes(p: dict, path: Path) -> None:
    plt = _plt()
    positions = p.get("positions", ["last", "mean"])
    tasks = list(p["tasks"])
    fig, axes = plt.subplots(len(positions), 1, figsize=(max(6, 1.6 * len(tasks)), 3.2 * len(positions)), squeeze=False)
    for ax, pos in zip(axes[:, 0], positions):
        routes = [r for r in ROUTE_ORDER if any(r in p["tasks"][t]["positions"].get(pos, {}) for t in tasks)]
        width = 0.8 / max(1, len(routes))
        for j, route in enumerate(routes):
            xs, ys, lo, hi = [], [], [], []
            for i, t in enumerate(tasks):
                blk = p["tasks"][t]["positions"].get(pos, {}).get(route)
                if blk:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(blk["accuracy"])
                    lo.append(blk["accuracy"] - blk["ci_low"])
                    hi.append(blk["ci_high"] - blk["accuracy"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=route)
        for i, t in enumerate(tasks):
            ax.plot([i - 0.4, i + 0.4], [p["tasks"][t]["majority"]["accuracy"]] * 2, "k--", lw=1, label="majority" if i == 0 else None)
        ax.set_xticks(range(len(tasks)), tasks, rotation=15, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"accuracy ({pos})")
        ax.legend(fontsize=7, ncol=len(routes) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_arithmetic(a: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    nds = list(a["by_digits"])
    for j, key in enumerate(("exact_match", "first_digit")):
        ys = [a["by_digits"][nd][key]["accuracy"] for nd in nds]
        lo = [y - a["by_digits"][nd][key]["ci_low"] for y, nd in zip(ys, nds)]
        hi = [a["by_digits"][nd][key]["ci_high"] - y for y, nd in zip(ys, nds)]
        ax.bar([i - 0.2 + 0.4 * j for i in range(len(nds))], ys, 0.4, yerr=[lo, hi], capsize=2, label=key)
    acc = a["probe_first_digit"].get("accuracy")
    if acc is not None:
        ax.axhline(acc, color="k", ls="--", label="probe: first digit")
    ax.set_xticks(range(len(nds)), [f"{nd}-digit" for nd in nds])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_truncation(sections: dict[str, dict], path: Path) -> None:
    """Top-1 and FVE against the number of description tokens kept, one line per oracle."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, sec in sections.items():
        t = (sec.get("retrieval") or {}).get("truncation")
        if not t:
            continue
        xs = list(range(len(t["curve"])))
        for ax, key in zip(axes, ("top1", "fve")):
            ax.plot(xs, [p[key] if p[key] is not None else float("nan") for p in t["curve"]], marker="o", label=name)
            ax.set_xticks(xs, [str(p["tokens"]) for p in t["curve"]])
    first = next(sec["retrieval"] for sec in sections.values() if (sec.get("retrieval") or {}).get("truncation"))
    axes[0].axhline(first["chance"]["top1"], color="grey", ls=":", label="chance")
    axes[1].axhline(0, color="k", ls="--", label="predict the mean (FVE 0)")
    for ax, key in zip(axes, ("retrieval top-1", "FVE")):
        ax.set_xlabel("description tokens kept")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_eval_report(out_dir: str | Path, results: dict) -> dict:
    """Write plots, `results.json` and `report.md` into out_dir; returns results (with `plots`,
    `summary` and `schema_version` filled in)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    jobs = []
    if results.get("retrieval"):
        jobs += [("retrieval_ranks.png", plot_retrieval_ranks, results["retrieval"]), ("cosine_distributions.png", plot_cosines, results["retrieval"])]
    if results.get("probes"):
        jobs.append(("probe_accuracy.png", plot_probes, results["probes"]))
    if results.get("arithmetic"):
        jobs.append(("arithmetic.png", plot_arithmetic, results["arithmetic"]))
    if (results.get("retrieval") or {}).get("truncation"):
        jobs.append(("truncation.png", plot_truncation, _sections(results)))
    for name, fn, data in jobs:
        fn(data, out / name)
        plots.append(name)
    results["plots"] = plots
    results["schema_version"] = SCHEMA_VERSION
    results["summary"] = eval_summary(results)
    atomic_write_text(out / "results.json", json.dumps(_finite(results), indent=2, default=_json_default, allow_nan=False))
    atomic_write_text(out / "report.md", render_markdown(results))
    return results


def _finite(x):
    """NaN / inf -> None, recursively (results.json is strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x):
    if hasattr(x, "tolist"):  # tensors and numpy values
        return x.tolist()
    return str(x)
