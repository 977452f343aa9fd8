"""`cycle-oracle` command line: run recipes, extract activations, describe texts, evaluate, bench.

Recipes run on Ray (local by default, `--address auto` for an existing cluster); this module only
parses arguments and hands over to the recipe drivers in `recipes/`, the library (`cycle_oracle/`)
and the benchmark (`bench/`). Drivers are imported lazily, so `--help` and `--dry-run` start nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap
import warnings
from datetime import datetime
from pathlib import Path

from typing import get_args

from cycle_oracle.config import OracleName, field_help, load_recipe, schema_section
from cycle_oracle.errors import LayerError, UserError

RECIPE_DRIVERS = {
    "describe": "recipes.describe",
    "warmup": "recipes.warmup",
    "grpo": "recipes.grpo",
    "warmup_then_grpo": "recipes.warmup_then_grpo",
    "eval": "recipes.evaluate",
}


ORACLE_HELP = {
    "decoder": "the checkpoint's decoder (the default; without --checkpoint it is selfie)",
    "selfie": "the untrained decoder with the description instruction: the floor (SelfIE, Chen et al. 2024)",
    "patchscopes": 'the untrained target continuing "cat -> cat; 1135 -> 1135; hello -> hello; ? ->" with v at "?" (Ghandeharioun et al. 2024)',
    "logit_lens": "the top-k tokens of unembed(final_norm(v)) (eval.logit_lens_top_k; nostalgebraist 2020)",
    "latentlens": "the k nearest training-corpus token activations of v, shown in their contexts (Krojer et al. 2026)",
    "text_guess": "no activation: the target reads the source text and answers the description instruction (the black-box control)",
}
"""`cycle-oracle eval --oracle NAME`: one line per name of `config.OracleName` (a test checks they match)."""


def _oracle_names(values: list[str] | None) -> list[str]:
    """--oracle values (repeatable, or comma-separated) checked against the known names."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    known = get_args(OracleName)
    for name in names:
        if name not in known:
            raise UserError(f"--oracle {name}: unknown oracle {name!r}; expected one of {', '.join(known)} (cycle-oracle eval --help describes each)")
    return names


def _default_out(recipe: str) -> str:
    return str(Path("runs") / f"{Path(recipe).stem}-{datetime.now():%Y%m%d-%H%M%S}")


def _load(args):
    overrides = list(args.set or [])
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    if getattr(args, "verbose", False):
        overrides.append("logging.verbose=true")
    return load_recipe(args.recipe, overrides)


def check_model_and_layer(cfg) -> str:
    """What `--dry-run` can check without starting anything: the model is a local folder, an
    embedded name or (unchecked offline) a hub name, and the read layer fits its depth when its
    config is local. Raises a UserError naming the bad value."""
    # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
    from cycle_oracle.models import EMBEDDED_MODELS, ModelNotFoundError, cache_root, resolve_layer

    name = cfg.model.name
    folder = cache_root() / "models" / name if name in EMBEDDED_MODELS else Path(name).expanduser()
    if folder.is_dir() and (name not in EMBEDDED_MODELS or (folder / "config.json").is_file()):
        config = folder / "config.json"
        if not config.is_file():
            raise ModelNotFoundError(f"model.name={name!r} is a folder without config.json; expected a HF model folder")
        n_layers = int(json.loads(config.read_text())["num_hidden_layers"])
        try:
            layer = resolve_layer(cfg.model.layer, n_layers)
        except LayerError as err:
            raise LayerError(f"model.layer={cfg.model.layer!r} does not fit {name}: {err}") from None
        return f"model folder {folder} ({n_layers} blocks): read layer {layer}"
    if name in EMBEDDED_MODELS:
        return f"embedded model {name} (its depth is checked when it is first loaded)"
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return f"hub model {name} (not checked here: it is resolved on the machines that load it)"
    raise ModelNotFoundError(f"model.name={name!r} is neither a local model folder, an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}) "
                             f"nor a hub name like 'Qwen/Qwen3-8B'")


def cmd_run(args) -> int:
    cfg = _load(args)
    if args.dry_run:
        # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
        from actors.placement import check_plan_fits, placement_plan

        plan = placement_plan(cfg)
        print(f"recipe {args.recipe}: kind={cfg.kind}, model={cfg.model.name}, layer={cfg.model.layer}")
        print(f"  {check_model_and_layer(cfg)}")
        for item in plan:
            print(f"  {item['role']}[{item['index']}]: {item['bundle']} threads={item['threads']}")
        shape = cfg.ray.cluster_shape
        if shape:
            problems = check_plan_fits(plan, shape)
            print(f"  against the declared cluster {shape}: " + ("fits" if not problems else "; ".join(problems)))
            return 1 if problems else 0
        return 0
    out = args.out or _default_out(args.recipe)
    module = importlib.import_module(RECIPE_DRIVERS[cfg.kind])
    results = module.run(cfg, out, resume=args.resume)
    summary = results.get("summary") if isinstance(results, dict) else None
    print(f"done: results in {out}")
    if print_closing_report(results, out):
        return 0
    if summary:
        print(json.dumps(summary, indent=2, default=float))
    return 0


def print_closing_report(results, out) -> bool:
    """The closing report's tables (`recipes/report.py`) of a grpo or warmup_then_grpo job, and
    where its report.md is -> False for other kinds (or if it cannot be built: the JSON summary)."""
    # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
    from recipes.report import report_from_results

    try:
        report = report_from_results(results)
    except Exception as err:  # the job is done; its results are on disk
        print(f"[report] not shown ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})")
        return False
    if report is None:
        return False
    report.print(compact=True)  # the verdict and the retrieval table; report.md has every section
    if (Path(out) / "report.md").is_file():
        print(f"report: {Path(out) / 'report.md'}")
    return True


def cmd_extract(args) -> int:
    # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
    from cycle_oracle.activations import extract, write_store
    from cycle_oracle.corpus import Document, load_documents
    from cycle_oracle.config import DataSource
    from cycle_oracle.models import load_causal_lm, load_tokenizer, resolve_layer, resolve_model_path, num_layers

    path = resolve_model_path(args.model)
    tok, model = load_tokenizer(path), load_causal_lm(path)
    layer = resolve_layer(float(args.layer) if "." in args.layer else int(args.layer), num_layers(model))
    if args.texts:
        docs = [Document(f"text:{i}", t) for i, t in enumerate(Path(args.texts).read_text().splitlines()) if t.strip()]
    else:
        docs = load_documents(DataSource(kind="text_files", paths=args.corpus) if args.corpus else DataSource(kind="embedded"))
    positions = args.positions if args.positions in ("all", "last") else [int(x) for x in args.positions.split(",")]
    store = write_store(args.out, extract(model, tok, docs, layer, positions, batch_size=args.batch_size, max_tokens=args.max_tokens), args.model, layer)
    print(f"wrote {len(store)} activations (layer {layer}, d={store.meta['d_model']}) to {args.out}")
    return 0


def cmd_describe(args) -> int:
    # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
    from cycle_oracle.evals.viewer import describe_texts_to_html

    if args.file and not Path(args.file).is_file():
        raise UserError(f"--file {args.file}: no such file (expected a text file, one text per line)")
    texts = [args.text] if args.text else Path(args.file).read_text().splitlines()
    describe_texts_to_html(args.checkpoint, [t for t in texts if t.strip()], args.html, model=args.model, layer=args.layer)
    print(f"wrote {args.html}")
    return 0


def cmd_eval(args) -> int:
    """`cycle-oracle eval [RECIPE] [--checkpoint DIR] [--oracle NAME ...] [--grader DIR] [--out DIR] [--set k=v] [--data-dir DIR]`."""
    oracles = _oracle_names(args.oracle)  # before anything is imported or started
    # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
    from recipes import evaluate

    recipe = args.recipe or str(evaluate.DEFAULT_EVAL_RECIPE)
    overrides = list(args.set or [])
    if args.checkpoint:
        overrides.append(f"init_from={args.checkpoint}")
    if oracles:
        overrides.append(f"eval.oracles=[{','.join(oracles)}]")
    if args.grader:
        overrides.append(f"eval.grader={args.grader}")
    cfg = load_recipe(recipe, overrides)
    if cfg.kind != "eval":
        cfg = cfg.model_copy(update={"kind": "eval"})
    out = args.out or _default_out(recipe)
    results = evaluate.run(cfg, out, data_dir=args.data_dir)
    summary = results.get("summary", {})
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("oracles/")}, indent=2, default=float))
    if results.get("other_oracles"):  # every oracle's numbers are in results.json; the report sets them side by side
        print(f"oracles side by side: {', '.join(results['oracles'])} (summary keys oracles/<name>/..., report.md)")
    print(f"done: report in {out}/report.md")
    return 0


def cmd_config(args) -> int:
    """`cycle-oracle config [SECTION]`: every key of a recipe section with its type, default and help
    (the schema's own descriptions, `config.field_help`); without SECTION the recipe's top level."""
    path = args.section or ""
    model = schema_section(path)
    about = " ".join((model.__doc__ or "").split("\n\n")[0].split())
    print(f"{path or 'recipe'} ({model.__name__})" + (f": {about}" if about else ""))
    for row in field_help(path):
        print(f"\n  {row.name}: {row.type} = {row.default}")
        for line in textwrap.wrap(row.description, width=96):
            print(f"      {line}")
        if row.section:
            print(f"      (its keys: cycle-oracle config {path + '.' if path else ''}{row.name})")
    return 0


def cmd_bench(args) -> int:
    # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
    from bench.main import main as bench_main

    return bench_main(list(args.rest))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cycle-oracle",
        description="Train and evaluate a cycle-consistent activation oracle: an LLM that describes its own activations.",
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of its one-line message")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe (YAML) on Ray", description="Validate a recipe and run it: warmup, grpo, warmup_then_grpo, describe or eval. Writes config.yaml, metrics.jsonl, checkpoints/ and results.json into --out.")
    r.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    r.add_argument("--out", help="run folder (default runs/<recipe>-<time>)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value, e.g. --set grpo.steps=20 (repeatable)")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    r.add_argument("--address", help="join an existing Ray cluster (e.g. auto) instead of starting a local one")
    r.add_argument("--dry-run", action="store_true", help="validate the recipe and print its placement plan, start nothing")
    r.add_argument("--verbose", action="store_true", help="show every actor's and library's output live (default: <run>/logs/)")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("extract", help="extract activations to shards", description="Read residual-stream activations (layer L = after L blocks, no final norm) and write safetensors shards + metadata + corpus mean.")
    e.add_argument("--model", default="smollm2-135m-instruct", help="HF folder, hub name or embedded name")
    e.add_argument("--layer", default="0.5", help="block count (int) or depth fraction (float in (0,1))")
    e.add_argument("--texts", help="a text file, one document per line")
    e.add_argument("--corpus", nargs="*", help="text files split into paragraph documents")
    e.add_argument("--positions", default="all", help="all | last | comma-separated token indices")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--out", required=True, help="output folder for the activation store")
    e.set_defaults(func=cmd_extract)

    d = sub.add_parser("describe", help="describe every token of a text; writes an HTML viewer", description="Describe each token's activation with a checkpoint's decoder and write a self-contained HTML page (hover/click a token to see its description, reconstruction cosine and the encoder's pooling weights).")
    d.add_argument("--checkpoint", help="run folder or checkpoint folder (omit for the untrained decoder)")
    d.add_argument("--model", default=None, help="model name when no checkpoint is given")
    d.add_argument("--layer", default=None, help="read layer when no checkpoint is given")
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="the text to describe")
    g.add_argument("--file", help="a file of texts, one per line")
    d.add_argument("--html", required=True, help="output HTML file")
    d.set_defaults(func=cmd_describe)

    v = sub.add_parser(
        "eval", help="run evals (retrieval, probes, arithmetic, controls) on a checkpoint and training-free baselines",
        description="Evaluate a checkpoint (or the untrained decoder) and training-free baselines side by side on the\n"
                    "same pools, splits and graders; write results.json, report.md and plots.",
        epilog="oracles (--oracle NAME, repeatable; eval.oracles in the recipe):\n" + "\n".join(f"  {k:<12} {h}" for k, h in ORACLE_HELP.items())
               + "\nRetrieval grades every oracle with the checkpoint's encoder: patchscopes, logit_lens, latentlens and\n"
                 "text_guess need --checkpoint with an encoder for it (docs/EVALS.md). Evals (eval.tasks): retrieval, probes,\n"
                 "arithmetic, secrets (Taboo organisms: recipes/secrets_cpu.yaml).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("recipe", nargs="?", default=None, help="an eval recipe YAML (kind: eval)")
    v.add_argument("--checkpoint", help="run folder or checkpoint folder (omit for the untrained decoder)")
    v.add_argument("--oracle", action="append", metavar="NAME",
                   help=f"an oracle to evaluate, the first one's results at the top of results.json: {', '.join(ORACLE_HELP)} "
                        f"(repeatable or comma-separated; default: eval.oracles, i.e. decoder)")
    v.add_argument("--grader", metavar="CHECKPOINT",
                   help="another run or checkpoint folder whose encoder grades every oracle's descriptions beside the checkpoint's own "
                        "(a frozen warmup encoder, a text encoder); same model and read layer (eval.grader)")
    v.add_argument("--out", help="eval run folder")
    v.add_argument("--set", action="append", metavar="KEY=VALUE")
    v.add_argument("--data-dir", help="folder with the eval data files")
    v.set_defaults(func=cmd_eval)

    c = sub.add_parser("config", help="print a recipe section's keys with defaults and help",
                       description="Print every key of a recipe section with its type, default and description, e.g. "
                                   "`cycle-oracle config grpo` or `cycle-oracle config encoder.optim`; without SECTION the top-level keys.")
    c.add_argument("section", nargs="?", default=None, help="a section of the recipe schema, dotted for nested ones (grpo, eval.secrets, ...)")
    c.set_defaults(func=cmd_config)

    b = sub.add_parser("bench", help="benchmarks (JSON out)", description="Measure rollout, scoring, learner and end-to-end GRPO step throughput against the machine's matmul limit.")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def quiet_library_environment() -> None:
    """Environment the libraries read at import, set before any of them is imported (the Ray actors
    this driver starts inherit it): transformers logs errors only, no tqdm bars from transformers
    or huggingface_hub ("Loading weights", "Writing model shards"), and DeepSpeed is told the
    accelerator where this process sees no CUDA device (else it warns "Setting accelerator to CPU"
    at import). A value already set wins."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "DS_ACCELERATOR" not in os.environ:
        # imported here: `--help`, `config` and `--dry-run` load no torch, Ray or vLLM (module docstring)
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) is not cmd_bench:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # bench forwards every option to bench.main (REMAINDER misses a leading --option)
        args.rest = [*extra, *args.rest]
    if not getattr(args, "verbose", False):  # known-harmless library noise in the driver process, at its source
        quiet_library_environment()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.func(args)
    except UserError as err:  # our own errors: one message, no traceback (--debug shows it)
        if args.debug:
            raise
        print(f"cycle-oracle {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
