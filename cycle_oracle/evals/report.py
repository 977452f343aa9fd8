"""One run folder per eval: `results.json` (schema in docs/EVALS.md), `report.md` with tables,
and PNG plots (matplotlib, Agg backend):

- `retrieval_ranks.png`       histogram of the true activation's rank (description vs shuffled control);
- `cosine_distributions.png`  per-item cosine (raw and centred) of each condition, against the
                              predict-the-mean floor;
- `probe_accuracy.png`        per-task accuracy of each route with 95% Wilson intervals, per position;
- `arithmetic.png`            exact-match / first-digit rates per answer length vs the probe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cycle_oracle.files import atomic_write_text

SCHEMA_VERSION = 1
ROUTE_ORDER = ("probe", "decoder", "judge", "reconstruction", "oracle")


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


def summarise(results: dict) -> dict[str, float]:
    """Flat headline numbers ("<eval>/<name>") for logs and dashboards."""
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
    return {k: v for k, v in s.items() if v is not None}


# ---- markdown -----------------------------------------------------------------------------

def _retrieval_md(r: dict) -> list[str]:
    ch = r["chance"]
    lines = [
        "## Retrieval",
        "",
        f"Pool of N = {r['n']} activations ({r['pool']['documents']} documents). Chance: top-1 {ch['top1']:.3f}, "
        f"top-5 {ch['top5']:.3f}, MRR {ch['mrr']:.3f}. Rank ties count against the true activation.",
        "",
        "| condition | top-1 | top-5 | MRR | median rank | cosine | centred cosine | FVE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in r["conditions"].items():
        lines.append(f"| {name} | {_fmt(c['top1'])} | {_fmt(c['top5'])} | {_fmt(c['mrr'])} | {_fmt(c['median_rank'], 1)} | "
                     f"{_fmt(c['cosine'])} | {_fmt(c['centred_cosine'])} | {_fmt(c['fve'])} |")
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
    if r.get("zero_description") is not None:
        lines += ["", f"Zero-activation description: `{r['zero_description'][:200]}`"]
    lines += ["", "Examples:", ""]
    for it in r["items"][:5]:
        ctx = (it.get("context") or "").replace("\n", " ")[-80:]
        lines.append(f"- …{ctx}**{it['token']!s}** → {it['description'][:200]!r} (cos {it['description_cosine']:.3f}, rank {it['description_rank']})")
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


def render_markdown(results: dict) -> str:
    info = results.get("oracle", {})
    lines = ["# Eval report", "", f"Created {results.get('created', '')}. Oracle: " + ", ".join(f"{k}={v}" for k, v in info.items() if k in ("model", "checkpoint", "layer", "backend", "decoder", "encoder")), ""]
    if results.get("retrieval"):
        lines += _retrieval_md(results["retrieval"])
    if results.get("probes"):
        lines += _probes_md(results["probes"])
    if results.get("arithmetic"):
        lines += _arith_md(results["arithmetic"])
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_report(results: dict, out_dir: str | Path) -> dict:
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
    for name, fn, data in jobs:
        fn(data, out / name)
        plots.append(name)
    results["plots"] = plots
    results["schema_version"] = SCHEMA_VERSION
    results["summary"] = summarise(results)
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
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
