"""The lever runs side by side: top-1 and FVE (with intervals) of every oracle each run's final evals
graded, under the frozen warmup encoder and the text encoder, on the same 112-item pool (same seed,
split and corpus in every run), from the runs' results.json (runs made before the final evals had
baselines are read from their per-item lists; their baselines come from `diagnose.py`).

    .venv/bin/python -m experiments.quality_diagnosis.levers before=/work/runs/before e2=/work/runs/e2_bare_quote ... \
        --out experiments/quality_diagnosis/levers.json

`--paired NEW:OLD` (repeatable) adds, per grader, the paired difference NEW minus OLD of the GRPO
decoder's top-1 and FVE over the pool's items (the runs must share the pool: same rows), each run
graded by its own grader of that kind (`verdict.compare`, 95% bootstrap intervals).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cycle_oracle.activations import ActivationStore
from cycle_oracle.encoder import cosine
from cycle_oracle.evals.verdict import compare, headline, oracle_scores

GRADERS = ("frozen_start_encoder", "text_encoder")
ORACLES = ("grpo_decoder", "warmup_decoder", "patchscopes", "logit_lens", "text_guess", "true_token_bare", "true_window_bare")


def load_run(run: Path) -> tuple[dict, list[int], torch.Tensor]:
    """(GRPO results.json, the final evals' pool rows, cos(mean, v) per row: the FVE floor)."""
    results = json.loads((run / "grpo" / "results.json").read_text())
    store = ActivationStore(run / "grpo" / "activations")
    rows = results["retrieval"]["rows"]
    v = store.activations[rows].float()
    return results, rows, cosine(store.mean.float()[None].expand_as(v), v)


def run_table(run: Path) -> dict:
    results, rows, floor = load_run(run)
    out = {"pool": len(rows), "rows_hash": hash(tuple(rows)) & 0xFFFFFFFF}
    for grader in GRADERS:
        section = results.get(grader) or {}
        out[grader] = {}
        for oracle in ORACLES:
            if oracle in section:
                h = headline(oracle_scores(section[oracle]["per_item"]["description"]), floor)
                out[grader][oracle] = {k: (round(x, 4) if isinstance(x, float) else [round(y, 4) for y in x] if isinstance(x, list) else x)
                                       for k, x in h.items()}
    return out


def paired_runs(new: Path, old: Path, oracle: str = "grpo_decoder") -> dict:
    """NEW minus OLD for `oracle`, paired over the items of their common pool, under each grader."""
    (res_new, rows, floor), (res_old, rows_old, _) = load_run(new), load_run(old)
    if rows != rows_old:
        raise SystemExit(f"{new} and {old} graded different pools: a paired difference needs the same rows")
    res = {"new": res_new, "old": res_old}
    out = {}
    for grader in GRADERS:
        a, b = (oracle_scores(res[k][grader][oracle]["per_item"]["description"]) for k in ("new", "old"))
        d = compare(a, b, floor)
        out[grader] = {m: {k: round(float(x), 4) for k, x in d[m].items() if k in ("mean", "ci_low", "ci_high")} for m in ("top1", "fve")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR (a warmup_then_grpo run folder)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--paired", action="append", default=[], metavar="NEW:OLD", help="names of two runs: NEW minus OLD, paired over items")
    args = ap.parse_args()
    paths = {name: Path(path) for name, path in (r.split("=", 1) for r in args.runs)}
    table = {name: run_table(path) for name, path in paths.items()}
    for spec in args.paired:
        new, old = spec.split(":")
        table.setdefault("paired", {})[f"{new}_minus_{old}"] = d = paired_runs(paths[new], paths[old])
        for grader, m in d.items():
            print(f"{new} - {old} {grader:>22}: " + "  ".join(f"{k} {x['mean']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]" for k, x in m.items()))
    for name, t in ((n, t) for n, t in table.items() if n != "paired"):
        for grader in GRADERS:
            cells = "  ".join(f"{o} {h['top1']:.3f}/{h['fve']:+.3f}" for o, h in t[grader].items())
            print(f"{name:>10} {grader:>22}: {cells}")
    if args.out:
        args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
